"""Scale-out scenario: 2 replicas, 64 adapters, Zipf traffic — adapter affinity vs plain balancing.

`python -m bench.scale_out [--requests 256] [--concurrency 8] [--out FILE]`

Three runs of the same seeded request list (bench/workload.py, Zipf(1.0) over
64 adapter ids) through real HTTP (SSE on /generate): one process; 2 Ray
Serve replicas with adapter-affinity routing (the default); 2 replicas with
Serve's plain load balancing (no multiplexed id). Each replica's host tier is
kept smaller than the adapter set (`--host-tier`, prefetch off) so where a
request lands decides whether its adapter must be read from disk: "cold" is a
host-tier miss (`loraplex_adapter_cache_misses_total{tier="host"}`, summed over
replicas). The model is a tiny random Llama (SmolLM2's tokenizer), so the
numbers measure routing and per-request overhead, not a GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import run_load
from bench.process import free_port, wait_ready
from bench.workload import drawn

ADAPTERS = 64
MISSES_RE = re.compile(r'^loraplex_adapter_cache_misses_total\{[^}]*tier="host"[^}]*\}\s+([0-9.eE+-]+)$', re.M)


def build_model(root: Path) -> Path:
    """A 2-layer random Llama (hidden 64) saved with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.model.load import ensure_embedded_cache
    from server.settings import default_cache_dir

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    path = root / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ensure_embedded_cache(default_cache_dir())).save_pretrained(path)
    return path


def write_adapters(store: Path, count: int, rank: int = 8) -> list[str]:
    """`count` random LoRA adapters (q_proj, v_proj) as loose files of tenant `default` (dev mode)."""
    import torch
    from safetensors.torch import save_file

    ids = [f"a{i:03d}" for i in range(count)]
    for i, adapter_id in enumerate(ids):
        out = store / "default" / adapter_id
        out.mkdir(parents=True)
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(2):
            for module, out_dim in (("q_proj", 64), ("v_proj", 32)):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 64, generator=gen) * 0.1
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": ["q_proj", "v_proj"]}))
    return ids


def host_misses(url: str) -> float:
    return sum(float(v) for v in MISSES_RE.findall(httpx.get(f"{url}/metrics", timeout=30).text))


def measure(url: str, requests: list, concurrency: int, settle_s: float) -> dict[str, Any]:
    time.sleep(settle_s)  # replicas post their metrics every second
    before = host_misses(url)
    run = run_load(url, requests, concurrency, timeout_s=300)
    time.sleep(settle_s)
    cold = host_misses(url) - before
    done = len(requests) - len(run.failed)
    return {"requests": len(requests), "failed": len(run.failed), "cold_loads": cold,
            "warm_fraction": round(1 - cold / max(1, done), 3), "wall_s": round(run.wall_s, 2),
            "requests_per_s": round(done / run.wall_s, 2), "tokens_per_s": round(run.throughput, 1)}


def server_flags(model: Path, store: Path, host_tier: int) -> dict[str, Any]:
    return {"model": str(model), "store": store, "device": "cpu", "dtype": "float32", "max_batch": 4,
            "max_adapters_resident": 4, "max_adapters_host": host_tier, "prefetch_adapters": False}


def run_single(model: Path, store: Path, requests: list, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env_flags = server_flags(model, store, args.host_tier)
    env = {f"LORAPLEX_{k.upper()}": str(v) for k, v in env_flags.items()}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level",
           "warning"]
    import os

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(proc, url, 180, lambda: "")
            return measure(url, requests, args.concurrency, 0.0)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def run_cluster(model: Path, store: Path, requests: list, args: argparse.Namespace, affinity: bool) -> dict[str, Any]:
    from ray import serve

    from server.cluster.run import APP_NAME, build_application, sweep_store
    from server.settings import Settings

    settings = Settings(**server_flags(model, store, args.host_tier), replicas=2, log_level="warning")
    sweep_store(settings)
    serve.run(build_application(settings, None, affinity=affinity), name=APP_NAME, route_prefix="/")
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("cluster not ready")
            time.sleep(0.25)
        return measure(url, requests, args.concurrency, 1.5)
    finally:
        serve.delete(APP_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--host-tier", type=int, default=8, help="adapters each replica keeps in host memory")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    root = Path(tempfile.mkdtemp(prefix="loraplex-scale-out-"))
    try:
        model = build_model(root)
        store = root / "store"
        ids = write_adapters(store, ADAPTERS)
        requests = drawn(ids, args.requests, args.new_tokens, "zipf", seed=0)
        results = {"single": run_single(model, store, requests, args)}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        args.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        results["affinity"] = run_cluster(model, store, requests, args, affinity=True)
        results["balanced"] = run_cluster(model, store, requests, args, affinity=False)
        serve.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import os

    results["setup"] = {"adapters": ADAPTERS, "distinct_in_load": len({r.adapter_id for r in requests}),
                        "requests": args.requests, "concurrency": args.concurrency, "new_tokens": args.new_tokens,
                        "host_tier_per_replica": args.host_tier, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
