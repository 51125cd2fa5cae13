"""Train the shipped example adapters (pirate, French) on the embedded default model.

    python -m server.training.examples [--out adapters_store] [--only pirate] [--threads N]

This is the server's own pipeline minus HTTP: the job is submitted to a
`TrainingService` (same validation, queue, worker, trainer, PEFT export and
store publishing as `POST /v1/training/jobs`) over a scratch store, and the
worker is stepped in this process exactly as the engine thread steps it.
The published files are then copied to `<out>/default/<name>/`, where the
store serves hand-placed PEFT directories as version 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.limits import AdapterLimits
from server.adapters.service import AdapterService
from server.adapters.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME
from server.adapters.store.store import open_store
from server.model.load import load_base
from server.settings import Settings
from server.training.service import TrainingService
from server.training.spec import TrainingJobSpec

DATASETS = Path(__file__).resolve().parents[2] / "examples" / "datasets"

# Small on purpose (under 1 MB each): LoRA rank 4 / MiSS rank 8 on q_proj and v_proj; the
# French one is MiSS, so the shipped pair shows both methods.
EXAMPLES: dict[str, dict[str, Any]] = {
    "pirate": dict(method="lora", rank=4, alpha=8, target_modules=["q_proj", "v_proj"], steps=60,
                   learning_rate=2e-3, batch_size=4, warmup_steps=5, seed=0),
    "french": dict(method="miss", rank=8, target_modules=["q_proj", "v_proj"], steps=60,
                   learning_rate=2e-3, batch_size=4, warmup_steps=5, seed=0),
}


def load_dataset(name: str) -> list[dict[str, Any]]:
    lines = (DATASETS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_one(service: TrainingService, name: str, out_root: Path) -> dict[str, Any]:
    spec = TrainingJobSpec(adapter_id=name, data=load_dataset(name), **EXAMPLES[name])
    job, _ = service.submit(spec, "default", None)
    worker, started, last = service.worker, time.monotonic(), -1
    while service.get(job["id"], None)["status"] in ("queued", "running"):
        worker.run_one_step()
        step = service.get(job["id"], None)["progress"]["step"]
        if step != last and step % 10 == 0:
            rec = service.get(job["id"], None)
            print(f"{name}: step {step}/{spec.steps} loss {rec['loss']} ({time.monotonic() - started:.0f}s)",
                  flush=True)
            last = step
    done = service.get(job["id"], None)
    if done["status"] != "succeeded":
        raise SystemExit(f"{name}: job {done['status']}: {done['error']}")
    src = worker.adapters.store.resolve("default", name).path
    dest = out_root / "default" / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(src / file, dest / file)
    print(f"{name}: wrote {dest} in {time.monotonic() - started:.0f}s", flush=True)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="adapters_store", help="store root to place the adapters under")
    parser.add_argument("--only", action="append", choices=sorted(EXAMPLES), help="train just this one")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loraplex-examples-") as scratch:
        settings = Settings(store=Path(scratch) / "store")
        base = load_base(settings)
        limits = AdapterLimits.from_settings(settings)
        inject_adapter_layers(base.model, limits)
        adapters = AdapterService(base, open_store(settings.store, base, limits), limits)
        service = TrainingService(settings, base, adapters)
        try:
            for name in args.only or sorted(EXAMPLES):
                train_one(service, name, Path(args.out))
        finally:
            service.close()


if __name__ == "__main__":
    main(sys.argv[1:])
