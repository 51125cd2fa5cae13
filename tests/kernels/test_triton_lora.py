"""The Triton LoRA kernels against a per-token float64 reference.

On CPU they run on Triton's interpreter (the `interpreted_triton_lora` fixture, tests/conftest.py);
the `cuda` tests run the compiled kernels on a GPU (`pytest -m cuda`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from server.kernels.groups import SlotGroups

IN, OUT, SLOTS, R_CAP = 80, 72, 5, 24  # `in` spans two splits of the reduction; `out` two column blocks
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, start, length) runs of equal slot, as AdapterMapping's segments."""
    runs: list[tuple[int, int, int]] = []
    for t, s in enumerate(slots):
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, t, 1))
    return runs


def _bank(slots: int, ranks: list[int], dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Slot tensors as a SlotBank holds them: rows at or past a slot's rank are zero."""
    g = torch.Generator().manual_seed(seed)
    a, bt = torch.zeros(slots, R_CAP, IN), torch.zeros(slots, R_CAP, OUT)
    for s, r in enumerate(ranks):
        a[s, :r], bt[s, :r] = torch.randn(r, IN, generator=g), torch.randn(r, OUT, generator=g) / 4
    return a.to(device, dtype), bt.to(device, dtype)


def _reference(x, y, a, bt, slots: list[int], r: int) -> torch.Tensor:
    """float64, token by token."""
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            out[t] += (x[t].double() @ a[s, :r].double().T) @ bt[s, :r].double()
    return out


def _case(slots: list[int], ranks: list[int], dtype: torch.dtype, device: str = "cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slots), IN, generator=g).to(device, dtype)
    y = torch.randn(len(slots), OUT, generator=g).to(device, dtype)
    a, bt = _bank(len(ranks), ranks, dtype, device, seed)
    return x, y, a, bt, SlotGroups.build(_runs(slots), torch.device(device))


def _random_slots(n: int, num_slots: int, seed: int) -> list[int]:
    return torch.randint(-1, num_slots, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CASES = {
    "decode-scattered": _random_slots(12, SLOTS, seed=3),
    "decode-consecutive": [0, 1, 2, 3, 4, 0, 1, 2],
    "base-rows-between": [-1, 2, -1, -1, 4, -1],
    "prefill-segments": [3] * 21 + [1] * 17 + [3] * 5,  # slot 3 twice: one group, its weights read per block
    "mixed-decode-prefill": [2] * 40 + [-1] * 3 + [0, 4, 0, 1] + [1] * 9,
    "one-token": [4],
}


@pytest.mark.parametrize("slots", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("r", [R_CAP, 13])  # all rows, and r_used < r_cap
def test_float32_matches_the_reference(interpreted_triton_lora, slots, r):
    ranks = [r, 3, r, 7, 1]  # ragged: zero-padded past each rank
    x, y, a, bt, groups = _case(slots, ranks, torch.float32)
    expected = _reference(x, y, a, bt, slots, r)
    interpreted_triton_lora.add_lora(x, y, a, bt, groups, r)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_base_only_rows_are_not_touched(interpreted_triton_lora):
    slots = [-1, 0, -1, 1, -1]
    x, y, a, bt, groups = _case(slots, [8, 8], torch.float32)
    y[0] = float("nan")  # a write of even `y + 0` would show as a change of bits elsewhere; NaN stays NaN
    before = y.clone()
    interpreted_triton_lora.add_lora(x, y, a, bt, groups, 8)
    for t in (0, 2, 4):
        assert torch.equal(y[t].nan_to_num(), before[t].nan_to_num())
    assert not torch.equal(y[1], before[1]) and not torch.equal(y[3], before[3])


def test_many_slots_few_tokens_each(interpreted_triton_lora):
    num_slots = 40
    slots = [s % num_slots for s in range(0, 3 * num_slots, 3)][::-1] + [7, 7]  # every slot, scattered
    x, y, a, bt, groups = _case(slots, [(s % 4) * 5 + 1 for s in range(num_slots)], torch.float32)
    assert groups is not None and groups.count == num_slots
    expected = _reference(x, y, a, bt, slots, 16)
    interpreted_triton_lora.add_lora(x, y, a, bt, groups, 16)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_padded_groups_change_nothing(interpreted_triton_lora):
    """A captured step's fixed grid: empty groups and a larger `max_tokens` launch programs that do nothing."""
    slots = CASES["mixed-decode-prefill"]
    x, y, a, bt, groups = _case(slots, [8, 3, 8, 5, 8], torch.float32)
    n, g = groups.num_tokens, groups.count
    padded = SlotGroups(
        tokens=torch.cat([groups.tokens, torch.zeros(7, dtype=torch.int32)]),  # rows past the last group: unread
        starts=torch.cat([groups.starts, groups.starts[-1:].repeat(3)]),  # three empty groups
        slots=torch.cat([groups.slots, torch.zeros(3, dtype=torch.int32)]),
        max_tokens=groups.max_tokens + 40)
    assert (padded.count, padded.num_tokens) == (g + 3, n + 7)
    expected = _reference(x, y, a, bt, slots, 8)
    interpreted_triton_lora.add_lora(x, y, a, bt, padded, 8)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_strided_input_rows(interpreted_triton_lora):
    slots = [1, 0, 1, -1]
    x, y, a, bt, groups = _case(slots, [5, 9], torch.float32)
    wide = torch.randn(len(slots), IN * 2)
    wide[:, ::2] = x
    expected = _reference(x, y, a, bt, slots, 9)
    interpreted_triton_lora.add_lora(wide[:, ::2], y, a, bt, groups, 9)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slots", [CASES["decode-scattered"], CASES["mixed-decode-prefill"]], ids=["decode", "mixed"])
def test_16_bit_adds_in_float32_and_rounds_once(interpreted_triton_lora, dtype, slots):
    x, y, a, bt, groups = _case(slots, [16, 4, 11, 16, 2], dtype)
    exact = _reference(x, y, a, bt, slots, 16)
    interpreted_triton_lora.add_lora(x, y, a, bt, groups, 16)
    assert y.dtype == dtype
    # one rounding of the exact sum: half an ulp, one ulp where the interpreter's cast truncates
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y.double() - exact).abs() <= ulp + 1e-3).all()


def test_mismatched_shapes_are_refused(interpreted_triton_lora):
    x, y, a, bt, groups = _case([0, 1], [4, 4], torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        interpreted_triton_lora.add_lora(x[:, :-1], y, a, bt, groups, 4)
    with pytest.raises(ValueError, match="do not fit"):
        interpreted_triton_lora.add_lora(x, y[:, :-1], a, bt, groups, 4)
    with pytest.raises(ValueError, match="do not fit"):
        interpreted_triton_lora.add_lora(x, y, a, bt, groups, R_CAP + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slots", [CASES["decode-scattered"], CASES["mixed-decode-prefill"], [1] * 300 + [0] * 3],
                         ids=["decode", "mixed", "long-prefill"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_match_the_reference(dtype, slots):
    from server.kernels import triton_lora

    x, y, a, bt, groups = _case(slots, [16, 4, 11, 16, 2], dtype, device="cuda")
    exact = _reference(x, y, a, bt, slots, 16)
    triton_lora.add_lora(x, y, a, bt, groups, 16)
    torch.cuda.synchronize()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=1e-5)
    else:
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((y.double() - exact).abs() <= 0.5 * ulp + 1e-3).all()


def test_the_interpreter_is_not_left_in_the_environment():
    """Only the kernel tests run with TRITON_INTERPRET (tests/conftest.py): servers the suite starts must not."""
    assert "TRITON_INTERPRET" not in os.environ


COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from server.kernels import triton_lora as tk

    def compile(fn, pointers, constexprs):
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
        return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    index = dict(tokens_ptr="*i32", starts_ptr="*i32", slots_ptr="*i32")
    for dtype, f32_dot in (("bf16", False), ("fp32", True)):
        shrink = compile(tk._shrink_kernel, dict(x_ptr="*" + dtype, a_ptr="*" + dtype, h_ptr="*fp32", **index),
                         dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=tk.BLOCK_K, F32_DOT=f32_dot))
        compile(tk._expand_kernel, dict(h_ptr="*fp32", bt_ptr="*" + dtype, y_ptr="*" + dtype, **index),
                dict(BLOCK_M=64, BLOCK_R=64, BLOCK_N=tk.BLOCK_N))
        if dtype == "bf16":
            assert "mma" in shrink, "the 16-bit shrink must run on tensor cores"
    print("compiled")
""")


def test_the_kernels_compile_for_a_hopper_gpu(tmp_path):
    """What the interpreter cannot check (types, layouts, tensor-core dots): Triton's compiler, run ahead
    of time for sm_90 with no GPU, in a fresh process (this one's Triton is set up for the interpreter)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
