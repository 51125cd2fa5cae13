"""The GPU check's CPU-runnable parts: its launch counter, its SDPA report, its summary, its script's syntax.

The script itself needs a GPU node to mean anything; what can break here (the
helpers it calls and the shell it is written in) is checked here in seconds on
the tiny random model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import device_report
from bench.device_model import SOURCE_FILE, from_arch, resolve, save_arch
from bench.launch_count import ADAPTERS, SDPA_OPS, measure, scattered_slots
from bench.sdpa_report import Shapes, report
from server.settings import Settings

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "device_check.sh"


@pytest.fixture(scope="module")
def launch(tiny_model_dir: Path) -> dict:
    settings = Settings(model=str(tiny_model_dir), device="cpu", dtype="float32", max_adapters_resident=32,
                        max_rank=16, max_batch=32)
    return measure(settings, prompt=8, steps=2)


def test_scattered_slots_are_16_adapters_never_neighbours():
    slots = scattered_slots()
    assert len(slots) == 32 and len(set(slots)) == ADAPTERS
    assert all(abs(a - b) > 1 for a, b in zip(slots, slots[1:]))  # neighbouring sequences: non-adjacent slots
    assert all(b - a == 2 for a, b in zip(sorted(set(slots)), sorted(set(slots))[1:]))


def test_launch_count_on_cpu_counts_ops_and_one_sdpa_per_layer(launch, tiny_model_dir):
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    base, lora = launch["base"], launch["lora16_scattered"]
    assert base["cuda_kernels"] == lora["cuda_kernels"] == 0  # no GPU here
    assert 0 < base["top_ops"] <= base["aten_ops"]
    assert lora["top_ops"] > base["top_ops"]  # the adapters' math is counted
    for config in (base, lora):  # decode rows are attended in one batched SDPA per layer
        assert set(config["sdpa"]) <= set(SDPA_OPS.values())
        assert sum(config["sdpa"].values()) == layers
    extra = launch["per_adapted_module"]
    assert extra["counted"] == "top_ops" and extra["extra_per_step"] == lora["top_ops"] - base["top_ops"]


def test_sdpa_report_on_cpu_names_the_chosen_backend_and_refusals():
    r = report(Shapes(heads=4, kv_heads=2, head_dim=16), torch.device("cpu"), torch.float32)
    assert len(r["cases"]) == 4
    for case in r["cases"].values():
        assert case["backend"] in SDPA_OPS.values()
        assert case["forced"]["math"] == "ok"
        assert case["forced"]["efficient"].startswith("refused")  # a CUDA-only backend


def test_summary_gathers_the_stages_into_json_and_markdown(launch, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "launch.json").write_text(json.dumps(launch))
    (work / "settings.json").write_text(json.dumps({"device": "cpu", "dtype": "float32"}))
    (work / device_report.STAGES_FILE).write_text("env\tok\t3\t15\t\nvllm\tskipped\t0\t0\tno CUDA\n")
    assert device_report.main(["summary", "--work", str(work), "--out", str(out)]) == 0
    result = json.loads((out / "device_check.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["env", "vllm"] and result["sdpa"] is None
    md = (out / "device_check.md").read_text()
    assert "| vllm | skipped | 0 | 0 | no CUDA |" in md
    assert "| lora16_scattered |" in md and "per module (target <= 2)" in md


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_device_model_random_weights_from_the_architecture_alone(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, dest = tmp_path / "arch", tmp_path / "model"
    save_arch(tiny_model_dir, arch)
    assert not list(arch.glob("*.safetensors"))  # config and tokenizer only: what travels
    from_arch(arch, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert model.config.num_hidden_layers == 2
    (dest / SOURCE_FILE).write_text('{"source": "earlier run"}')
    assert resolve(dest, None, arch) == (dest, "earlier run")  # converted once, reused


def test_script_cuts_stages_at_the_total_and_still_writes_the_summary(tmp_path):
    """A 15 s total leaves 5 s for stages after the report's reserve: the rest are skipped, not run."""
    env = {**os.environ, "DEVICE_CHECK_CPU": "1", "DEVICE_CHECK_TOTAL_S": "15", "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "DEVICE_CHECK_CARRY": str(tmp_path / "no-carry")}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 45
    stages = json.loads((tmp_path / "out" / "device_check.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["env", "install", "model", "pytest", "sdpa", "launch", "bench", "vllm"]
    assert all(s["status"] in ("ok", "timeout", "skipped") for s in stages)
    assert stages[3]["status"] == "skipped" and "no time left" in stages[3]["detail"]
