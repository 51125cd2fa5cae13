"""The PNG plots for the README, drawn from the results JSON (so they can be redrawn from a file).

Why from the JSON and not live objects: `python -m bench.plots results.json`
redraws the figures of any past run without re-measuring.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402


def _bar(ax: Any, labels: list[str], values: list[float | None], title: str, ylabel: str,
         target: float | None = None) -> None:
    vals = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(labels, vals, color="#4C72B0")
    for b, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, color="#C44E52", linestyle="--", linewidth=1, label=f"target {target}")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)


def plot_overhead(s1: dict, out: Path, half: dict | None = None) -> Path:
    """`half`: the float16-slot server's run of the target load (bench.scenarios.scenario1_half_slots)."""
    names = [n for n in s1["ratios"] if n != "base"]
    labels, values = list(names), [s1["ratios"][n]["decode_tok_per_s"] for n in names]
    if half is not None:
        labels.append(f"{half['config']} f16 slots")
        values.append(half["ratios"]["decode_tok_per_s"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _bar(axes[0], labels, values, "Decode throughput / base-only (equal work per step)", "ratio", target=0.90)
    x = range(len(names))
    axes[1].plot(x, [s1["ratios"][n]["itl_p50_ms"] for n in names], "o-", label="ITL p50")
    axes[1].plot(x, [s1["ratios"][n]["itl_p99_ms"] for n in names], "s-", label="ITL p99")
    axes[1].set_xticks(list(x), names, rotation=20, fontsize=8)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_title("Inter-token latency / base-only", fontsize=10)
    axes[1].legend(fontsize=8)
    return _save(fig, out / "s1_adapter_overhead.png")


def plot_vs_peft(s2: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["loraplex", "PEFT mixed batch", "PEFT naive loop"]
    vals = [s2["loraplex_tok_per_s"], s2["peft_mixed_tok_per_s"], s2["peft_naive_tok_per_s"]]
    _bar(ax, labels, vals, "Same requests, same model: generated tokens/s (median of rounds)", "tokens/s")
    ax.set_yscale("log")
    return _save(fig, out / "s2_vs_peft.png")


def plot_hot_load(s3: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    idle = s3["idle_ttft_ms"]
    series = [("on disk only", idle["disk"]["cold"]), ("in host memory", idle["host"]["cold"]),
              ("resident", idle["host"]["warm"] + idle["disk"]["warm"])]
    axes[0].boxplot([vals or [0] for _, vals in series], whis=(0, 100))
    axes[0].set_xticks([1, 2, 3], [name for name, _ in series])
    axes[0].set_title("Time to first token by where the adapter is (idle server)", fontsize=10)
    axes[0].set_ylabel("ms")
    gaps = s3["gaps_ms"]
    axes[1].boxplot([gaps["resident"] or [0], gaps["loading"] or [0]], whis=(1, 99), showfliers=False)
    axes[1].set_xticks([1, 2], ["no loads", "adapters loading"])
    axes[1].set_title("Running batch inter-token gap (whiskers p1-p99)", fontsize=10)
    axes[1].set_ylabel("ms")
    return _save(fig, out / "s3_hot_load.png")


def plot_scale(s4: dict, table: list[dict], out: Path) -> Path:
    rows = [r for r in table if r["scenario"] == 4 and r["metric"].startswith("throughput")]
    fig, ax = plt.subplots(figsize=(6, 4))
    _bar(ax, [r["metric"].split(",")[1].split("/")[0].strip() for r in rows], [r["value"] for r in rows],
         f"{s4['registered']} adapters, {s4['slots']} slots: throughput / 16-adapter load", "ratio", target=0.8)
    return _save(fig, out / "s4_scale.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sc = results.get("scenarios", {})
    paths = []
    if "s1" in sc:
        paths.append(plot_overhead(sc["s1"], out, sc.get("s1_half_slots")))
    if "s2" in sc:
        paths.append(plot_vs_peft(sc["s2"], out))
    if "s3" in sc:
        paths.append(plot_hot_load(sc["s3"], out))
    if "s4" in sc:
        paths.append(plot_scale(sc["s4"], results.get("table", []), out))
    return paths


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json")
    for p in draw_all(json.loads(src.read_text()), src.parent):
        print(p)
