"""loraplex against vLLM's multi-LoRA on one load: 32 greedy requests over 16 rank-16 PEFT adapters.

Why: vLLM is what a user would otherwise serve many LoRA adapters with on a
GPU, so our throughput on the same requests, adapters and model, relative to
it, is the figure that says whether loraplex is worth running there. Both sides
run one warm-up pass, then the timed load, once with every request on the base
and once over the 16 adapters. loraplex is measured as users reach it (its
server over HTTP, streamed); vLLM offline (`LLM.generate`, no HTTP), which
favours vLLM, so the ratio is a lower bound. vLLM runs in its own process after
loraplex's server has exited, so neither holds GPU memory the other needs.

    python -m bench.vllm_compare --model DIR --out vllm.json   # needs vllm installed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.adapters import make_adapters
from bench.config import BenchConfig
from bench.load import GenRequest, run_load
from bench.prepare import lora_ids
from bench.process import spawn
from bench.workload import assign

ADAPTERS = 16
REQUESTS = 32
RANK = 16


def requests(adapters: list[str | None], new_tokens: int) -> list[GenRequest]:
    return assign(adapters, REQUESTS, new_tokens)


def loraplex_side(model: str, store: Path, ids: list[str], new_tokens: int, device: str, dtype: str,
                  log: Path) -> dict[str, float]:
    """tok/s of our server on the base-only and the 16-adapter load."""
    cfg = BenchConfig(model=model, device=device, dtype=dtype, concurrency=REQUESTS, new_tokens=new_tokens)
    out: dict[str, float] = {}
    with spawn(cfg, store, log, max_batch=REQUESTS, resident=ADAPTERS) as h:
        run_load(h.base_url, requests([None, *ids], 4), REQUESTS, cfg.run_timeout_s)  # warm-up, every adapter
        for name, adapters in (("base", [None]), ("lora16", list(ids))):
            run = run_load(h.base_url, requests(adapters, new_tokens), REQUESTS, cfg.run_timeout_s)
            if run.failed:
                raise RuntimeError(f"{len(run.failed)} failed requests: {run.failed[0].error[:300]}")
            out[name] = run.throughput
    return out


def vllm_side(model: str, store: Path, ids: list[str], new_tokens: int, dtype: str) -> dict[str, float]:
    """tok/s of vLLM's offline engine on the same requests (imported here: only this process needs vllm)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from bench.adapters import store_dir

    llm = LLM(model=model, dtype=dtype, enable_lora=True, max_loras=ADAPTERS, max_lora_rank=RANK,
              max_num_seqs=REQUESTS, max_model_len=2048, gpu_memory_utilization=0.5, seed=0)
    loras = {a: LoRARequest(a, i + 1, str(store_dir(store, a))) for i, a in enumerate(ids)}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)

    def generate(reqs: list[GenRequest]) -> float:
        t0 = time.perf_counter()
        outs = llm.generate([r.prompt for r in reqs], params,
                            lora_request=[loras[r.adapter_id] if r.adapter_id else None for r in reqs],
                            use_tqdm=False)
        wall = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / wall

    generate(requests([None, *ids], 4))  # warm-up: every adapter loaded once, graphs captured
    return {"base": generate(requests([None], new_tokens)), "lora16": generate(requests(list(ids), new_tokens))}


def compare(model: str, new_tokens: int, device: str, dtype: str, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    store = work / "store"
    ids = lora_ids(ADAPTERS)
    make_adapters(AutoModelForCausalLM.from_pretrained(model), "lora", ids, store, RANK, seed=1)
    ours = loraplex_side(model, store, ids, new_tokens, device, dtype, work / "server.log")
    proc = subprocess.run([sys.executable, "-m", "bench.vllm_compare", "--vllm-only", "--model", model,
                           "--store", str(store), "--new-tokens", str(new_tokens), "--dtype", dtype],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM side failed ({proc.returncode}): {proc.stderr[-2000:]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"requests": REQUESTS, "adapters": ADAPTERS, "rank": RANK, "new_tokens": new_tokens, "dtype": dtype,
            "loraplex_tok_s": ours, "vllm_tok_s": theirs,
            "ratio": {k: ours[k] / theirs[k] for k in ours if theirs.get(k)},
            "note": "loraplex over HTTP (streamed), vLLM offline LLM.generate: the ratio is a lower bound"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model dir (both sides load it)")
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    p.add_argument("--vllm-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.vllm_only:
        print(json.dumps(vllm_side(a.model, a.store, lora_ids(ADAPTERS), a.new_tokens, a.dtype)))
        return 0
    with tempfile.TemporaryDirectory(prefix="loraplex-vllm-") as work:
        result = compare(a.model, a.new_tokens, a.device, a.dtype, Path(work))
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
