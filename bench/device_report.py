"""The GPU check's environment record and its one JSON + markdown summary.

Why one file per kind: a lent GPU machine returns at most 8 files, and the
README quotes the markdown as it is, so bench/device_check.sh leaves each
stage's raw JSON in a work dir and this gathers them, with each stage's
status and time, into `device_check.json` and `device_check.md`.

    python -m bench.device_report env --out env.json
    python -m bench.device_report summary --work DIR --out OUTDIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

STAGES_FILE = "stages.tsv"  # name \t status \t seconds \t budget \t detail, one line per stage
PACKAGES = ("torch", "triton", "transformers", "tokenizers", "peft", "vllm", "xgrammar")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def environment() -> dict[str, Any]:
    """What a reader needs to place the figures: GPU, driver, CUDA/cuDNN, package versions, date."""
    import torch  # here, not at the top: the summary must still be written if torch broke

    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "driver": _driver() if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def read_stages(work: Path) -> list[dict[str, Any]]:
    rows = []
    path = work / STAGES_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, secs, budget, detail = (line.split("\t") + [""] * 5)[:5]
        rows.append({"stage": name, "status": status, "seconds": int(secs or 0), "budget_s": int(budget or 0),
                     "detail": detail})
    return rows


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gather(work: Path) -> dict[str, Any]:
    return {"environment": _load(work / "env.json"), "model": _load(work / "model.json"),
            "settings": _load(work / "settings.json"), "stages": read_stages(work),
            "sdpa": _load(work / "sdpa.json"), "launch_count": _load(work / "launch.json"),
            "bench_quick": _load(work / "bench" / "results.json"), "vllm": _load(work / "vllm.json")}


def markdown(r: dict[str, Any]) -> str:
    env, model, settings = r["environment"] or {}, r["model"] or {}, r["settings"] or {}
    pk = env.get("packages", {})
    lines = ["### GPU check (`bench/device_check.sh`)", "",
             f"{env.get('gpu') or 'no GPU'} (sm {env.get('capability')}, driver {env.get('driver')}), "
             f"{env.get('date')}; model {model.get('source', '?')}, {settings.get('dtype', '?')} on "
             f"{settings.get('device', '?')}; torch {pk.get('torch')} (CUDA {env.get('cuda_runtime')}, cuDNN "
             f"{env.get('cudnn')}), triton {pk.get('triton')}, transformers {pk.get('transformers')}, "
             f"Python {env.get('python')}.", "",
             "| stage | status | seconds | budget | detail |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['budget_s']} | {s['detail']} |"
              for s in r["stages"]]
    return "\n".join(lines + _sdpa_md(r["sdpa"]) + _launch_md(r["launch_count"]) + _bench_md(r["bench_quick"])
                     + _vllm_md(r["vllm"])) + "\n"


def _sdpa_md(s: dict | None) -> list[str]:
    if not s:
        return []
    out = ["", f"SDPA backend for the engine's attention calls ({s['heads']} heads over {s['kv_heads']} KV heads, "
           f"head dim {s['head_dim']}, {s['dtype']}): chosen by torch, and each backend forced alone. "
           f"Decode: {s['shapes']['decode']}; prefill: {s['shapes']['prefill']}.", "",
           "| call | chosen | flash | efficient | cudnn | math |", "| --- | --- | --- | --- | --- | --- |"]
    for name, c in s["cases"].items():
        forced = [("ok" if v == "ok" else "no") for v in c["forced"].values()]
        out.append(f"| {name} | {c['backend']} | " + " | ".join(forced) + " |")
    return out


def _launch_md(lc: dict | None) -> list[str]:
    if not lc:
        return []
    out = ["", f"Per decode step of {lc['sequences']} sequences ({lc['model']}, {lc['dtype']}, prompt "
           f"{lc['prompt']}), torch.profiler, mean over {lc['steps']} step(s):", "",
           "| config | CUDA kernels | launch calls | aten ops (top-level) | copies | syncs | SDPA |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("base", "lora16_scattered"):
        c = lc[name]
        out.append(f"| {name} | {c['cuda_kernels']:.0f} | {c['launch_calls']:.0f} | {c['aten_ops']:.0f} "
                   f"({c['top_ops']:.0f}) | {c['copies']:.0f} | {c['sync_calls']:.0f} | "
                   + ", ".join(f"{k} {v:.0f}" for k, v in c["sdpa"].items()) + " |")
    m = lc["per_adapted_module"]
    out.append(f"\n16 adapters add {m['extra_per_step']:.0f} {m['counted']} per step over "
               f"{lc['adapted_modules']} adapted modules: {m['extra_per_module']:.2f} per module (target <= 2).")
    return out


def _bench_md(b: dict | None) -> list[str]:
    if not b:
        return []
    out = ["", "`python -m bench --quick` (full table in bench_quick.md):", "",
           "| scenario | metric | value | target |", "| --- | --- | --- | --- |"]
    for row in b.get("table", []):
        value, target = row.get("value"), row.get("target")
        shown = f"{value:.2f}" if isinstance(value, float) else value
        out.append(f"| {row.get('scenario')} | {row.get('metric')} | {shown} | {'' if target is None else target} |")
    return out


def _vllm_md(v: dict | None) -> list[str]:
    if not v:
        return []
    out = ["", f"Against vLLM multi-LoRA: {v['requests']} requests x {v['new_tokens']} tokens, {v['dtype']}; "
           f"{v['note']}.", "", "| load | loraplex tok/s | vLLM tok/s | ratio |", "| --- | --- | --- | --- |"]
    for k, ratio in v["ratio"].items():
        out.append(f"| {k} | {v['loraplex_tok_s'][k]:.0f} | {v['vllm_tok_s'][k]:.0f} | {ratio:.2f}x |")
    return out


def detail(stage: str, work: Path) -> str:
    """One line for a stage's row in the summary table, from that stage's JSON."""
    r = gather(work)
    if stage == "sdpa" and r["sdpa"]:
        return "; ".join(f"{name}: {c['backend']}" for name, c in r["sdpa"]["cases"].items())
    if stage == "launch" and r["launch_count"]:
        lc = r["launch_count"]
        key = lc["per_adapted_module"]["counted"]
        return f"{key} per step: base {lc['base'][key]:.0f}, 16 adapters {lc['lora16_scattered'][key]:.0f}"
    if stage == "bench" and r["bench_quick"]:
        b = r["bench_quick"]
        return f"{len(b.get('table', []))} rows, {len(b.get('failures', []))} failed requests"
    if stage == "vllm" and r["vllm"]:
        return ", ".join(f"{k} {v:.2f}x of vLLM" for k, v in r["vllm"]["ratio"].items())
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("detail")
    d.add_argument("stage", choices=["sdpa", "launch", "bench", "vllm"])
    d.add_argument("--work", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "detail":
        print(detail(a.stage, a.work))
        return 0
    if a.cmd == "env":
        a.out.write_text(json.dumps(environment(), indent=2) + "\n")
        return 0
    result = gather(a.work)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "device_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
