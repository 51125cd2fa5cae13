"""Which SDPA backend runs for the engine's attention shapes, and which ones could.

Why: on a GPU the attention backend torch picks (flash, memory-efficient,
cuDNN or the math fallback) decides much of a decode step's cost, and the
choice changes silently with the shapes, the mask and the dtype. This calls
the engine's own `attend` on tensors laid out as the engine lays them out
(decode: one query per cache row over a strided slice of the cache, with and
without the per-row length mask; prefill: one causal chunk, and a later chunk
under its mask) and reports, per case, the backend torch chose by itself (read
from the profiler's aten op names) and whether each backend accepts the case
when forced alone (`torch.nn.attention.sdpa_kernel`).

    python -m bench.sdpa_report --device cuda --dtype bfloat16 --out sdpa.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig

from bench.launch_count import SDPA_OPS
from server.engine.attention_math import attend, span_mask

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

ROWS, LENGTH, CHUNK = 32, 256, 128  # decode rows, their longest cached length, a prefill chunk


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "Shapes":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


Case = Callable[[], torch.Tensor]


def engine_cases(s: Shapes, device: torch.device, dtype: torch.dtype, rows: int = ROWS, length: int = LENGTH,
                 chunk: int = CHUNK) -> dict[str, Case]:
    """The attention calls of one engine step, as the engine makes them (see server/engine/attention.py)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cache_k, cache_v = rand(rows, s.kv_heads, 2 * length, s.head_dim), rand(rows, s.kv_heads, 2 * length, s.head_dim)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # [rows, kv_heads, L, hd], strided views of the cache
    flat_q = rand(1, s.heads, rows, s.head_dim)  # the step's flattened tokens
    q = flat_q[0].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, hd]
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen).to(device)
    lengths[0] = length
    mask = (torch.arange(length, device=device) < lengths.unsqueeze(1)).view(rows, 1, 1, length)
    pq = rand(1, s.heads, chunk, s.head_dim)  # [1, heads, n, hd]
    pk, pv = cache_k[:1, :, :chunk], cache_v[:1, :, :chunk]
    later = span_mask(length - chunk, chunk, 0, None, device)  # [n, L]: a second chunk over the first one's keys
    return {  # name -> call; the shapes are in `case_shapes`
        "decode, ragged lengths (mask)": lambda: attend(q, k, v, mask, False, None, None),
        "decode, equal lengths (no mask)": lambda: attend(q, k, v, None, False, None, None),
        "prefill, first chunk (causal)": lambda: attend(pq, pk, pv, None, True, None, None),
        "prefill, later chunk (mask)": lambda: attend(pq, cache_k[:1, :, :length], cache_v[:1, :, :length], later,
                                                      False, None, None),
    }


def case_shapes(rows: int = ROWS, length: int = LENGTH, chunk: int = CHUNK) -> dict[str, str]:
    return {"decode": f"{rows} rows x 1 query over up to {length} cached keys (strided cache views)",
            "prefill": f"1 row x {chunk} queries over {chunk} keys (first chunk) or {length} keys (later chunk)"}


def chosen_backend(case: Case, device: torch.device) -> dict:
    """Run `case` with every backend allowed: the SDPA ops the dispatcher ran and, on CUDA, the kernels."""
    case()  # warm-up: the first call may pick differently while it builds plans
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        case()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ops: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name[:120]] += 1
        elif e.name in SDPA_OPS:
            ops[SDPA_OPS[e.name]] += 1
    return {"backend": "+".join(sorted(ops)) or "none seen", "kernels": [k for k, _ in kernels.most_common(6)]}


def forced(case: Case) -> dict[str, str]:
    """backend -> "ok" or the reason torch gave for refusing it (its warnings, then the error)."""
    out: dict[str, str] = {}
    for name, backend in BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    case()
                out[name] = "ok"
            except (RuntimeError, NotImplementedError, ValueError) as e:
                reasons = [str(w.message).splitlines()[0] for w in caught] + [str(e).splitlines()[0]]
                out[name] = "refused: " + " | ".join(r[:200] for r in reasons)
    return out


def report(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    cases = engine_cases(shapes, device, dtype)
    with torch.inference_mode():
        return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "heads": shapes.heads,
                "kv_heads": shapes.kv_heads, "head_dim": shapes.head_dim, "enable_gqa": True,
                "shapes": case_shapes(),
                "cases": {name: {**chosen_backend(case, device), "forced": forced(case)}
                          for name, case in cases.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sdpa_report", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model dir (only its config is read)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, help="write the JSON here (stdout always gets it)")
    a = p.parse_args(argv)
    shapes = Shapes.from_config(AutoConfig.from_pretrained(a.model))
    result = report(shapes, torch.device(a.device), getattr(torch, a.dtype))
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
