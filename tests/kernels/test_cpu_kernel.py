"""The compiled CPU LoRA kernel against plain torch, and its build / fallback rules.

Shapes are chosen to hit every code path of lora_cpu.c: feature sizes that are
and are not multiples of the vector width, ranks below / above the 8-row
blocking and above the 64-row chunk, 1..9 tokens per slot (passes of 4 plus a
remainder), slots out of order and far apart, slot tensors sliced from a larger
rank capacity, and x / y rows with padding between them.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat

import pytest
import torch

from server.kernels import cpu
from server.kernels.cpu import Blocks, GroupedLoraKernel, load_kernel

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> GroupedLoraKernel:
    k = load_kernel(tmp_path_factory.mktemp("kcache"))
    assert k is not None, "a compiler is present, so the kernel must build"
    return k


def _blocks(token_slots: list[int]) -> Blocks:
    """Block per distinct slot (first-seen order, not sorted: the kernel must not care)."""
    order = list(dict.fromkeys(s for s in token_slots if s >= 0))
    tokens = [[t for t, s in enumerate(token_slots) if s == slot] for slot in order]
    starts = [0]
    for ts in tokens:
        starts.append(starts[-1] + len(ts))
    return Blocks.build(order, starts, [t for ts in tokens for t in ts])


def _reference(x, y, a, bt, token_slots):
    out = y.clone()
    for t, s in enumerate(token_slots):
        if s >= 0:
            out[t] += (a[s] @ x[t]) @ bt[s]  # [r] then [out]
    return out


@pytest.mark.parametrize("in_f, out_f, r", [(576, 1536, 16), (37, 5, 7), (16, 48, 8), (70, 33, 70), (1, 3, 1)])
@pytest.mark.parametrize("per_slot", [1, 2, 4, 5, 9])
def test_matches_torch(kernel, in_f, out_f, r, per_slot):
    g = torch.Generator().manual_seed(in_f * 100 + per_slot)
    slots, r_cap = 12, r + 5
    a_full = torch.randn(slots, r_cap, in_f, generator=g)  # the bank's rank capacity, sliced below
    bt_full = torch.randn(slots, r_cap, out_f, generator=g)
    a, bt = a_full[:, :r], bt_full[:, :r]
    token_slots = [11, 2, 7] * per_slot + [-1, -1]  # interleaved, scattered, two base-only tokens
    n = len(token_slots)
    x = torch.randn(n, in_f + 3, generator=g)[:, :in_f]  # rows padded: row stride != in
    y_store = torch.randn(n, out_f + 2, generator=g)
    y = y_store[:, :out_f]
    expected, padding = _reference(x, y, a, bt, token_slots), y_store[:, out_f:].clone()
    kernel.add(x, y, a, bt, _blocks(token_slots))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y_store[:, out_f:], padding)  # writes stay inside each row's out features


@pytest.mark.parametrize("token_slots", [list(range(16)) * 2, [3] * 22 + [9] * 3 + [-1] * 7],
                         ids=["16-slots", "one-slot-many-tokens"])
def test_threads_give_the_same_result(kernel, token_slots):
    """Work is split into (slot, ≤4 tokens) items across threads: same numbers as one thread."""
    g = torch.Generator().manual_seed(5)
    a, bt = torch.randn(16, 16, 64, generator=g), torch.randn(16, 16, 96, generator=g)
    x = torch.randn(32, 64, generator=g)
    y0 = torch.randn(32, 96, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = y0.clone()
            kernel.add(x, y, a, bt, _blocks(token_slots))
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], _reference(x, y0, a, bt, token_slots), rtol=1e-5, atol=1e-4)


def test_out_of_range_slot_or_token_raises_instead_of_reading_past_memory(kernel):
    x, y = torch.zeros(3, 8), torch.zeros(3, 4)
    a, bt = torch.zeros(2, 2, 8), torch.zeros(2, 2, 4)
    with pytest.raises(IndexError, match="slot 2"):
        kernel.add(x, y, a, bt, Blocks.build([2], [0, 1], [0]))
    with pytest.raises(IndexError, match="token 3"):
        kernel.add(x, y, a, bt, Blocks.build([1], [0, 1], [3]))
    kernel.add(x, y, a, bt, Blocks.build([1], [0, 1], [2]))  # the edges themselves are fine


def _has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


@pytest.fixture
def f16_kernel(kernel) -> GroupedLoraKernel:
    if torch.float16 not in kernel.weight_dtypes:
        assert not _has_f16c(), "this CPU converts halves in hardware: the float16 variant must be built"
        pytest.skip("no F16C on this CPU: float16 slots take the torch path")
    return kernel


@pytest.mark.parametrize("in_f, out_f, r", [(576, 1536, 16), (37, 5, 7), (70, 33, 70)])
@pytest.mark.parametrize("per_slot", [1, 2, 5])
def test_float16_weights_match_torch_on_the_rounded_weights(f16_kernel, in_f, out_f, r, per_slot):
    """float16 A / Bᵀ are widened exactly: the result is float32 math on the rounded weights."""
    g = torch.Generator().manual_seed(in_f + per_slot)
    a = torch.randn(9, r + 3, in_f, generator=g)[:, :r].half()
    bt = torch.randn(9, r + 3, out_f, generator=g)[:, :r].half()
    token_slots = [8, 0, 3] * per_slot + [-1]
    x = torch.randn(len(token_slots), in_f, generator=g)
    y = torch.randn(len(token_slots), out_f, generator=g)
    expected = _reference(x, y, a.float(), bt.float(), token_slots)
    f16_kernel.add(x, y, a, bt, _blocks(token_slots))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_supports_float32_activations_and_built_weight_dtypes(kernel):
    x, y = torch.zeros(2, 8), torch.zeros(2, 4)
    a, bt = torch.zeros(3, 2, 8), torch.zeros(3, 2, 4)
    assert kernel.supports(x, y, a, bt)
    assert kernel.supports(x, y, a.half(), bt.half()) == (torch.float16 in kernel.weight_dtypes)
    assert not kernel.supports(x.bfloat16(), y, a, bt)
    assert not kernel.supports(x, y, a.double(), bt.double())
    assert not kernel.supports(x, y, a.half(), bt)  # A and Bᵀ of one dtype
    assert not kernel.supports(x, y, a.bfloat16(), bt.bfloat16())
    assert not kernel.supports(x.T, y, a, bt)  # columns, not rows


def test_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    assert load_kernel(tmp_path) is not None
    built = list((tmp_path / "kernels").glob("lora_cpu-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_loaded", {})  # a new process: the .so on disk is reused, not rebuilt
    monkeypatch.setattr(cpu, "_compile", lambda *a: pytest.fail("rebuilt a cached kernel"))
    assert load_kernel(tmp_path) is not None
    assert built[0].stat().st_mtime_ns == mtime


def _fake_compiler(tmp_path, script: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("script", [
    "exit 1\n",  # not even --version
    'if [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\necho "error: no" >&2; exit 1\n',  # compile fails
])
def test_a_broken_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog, script):
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, script))
    with caplog.at_level(logging.WARNING, logger="server.kernels.cpu"):
        assert load_kernel(tmp_path / "cache") is None
    assert "torch path" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written file left behind


def test_no_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="server.kernels.cpu"):
        assert load_kernel(tmp_path) is None
    assert "no C compiler" in caplog.text
    assert os.listdir(tmp_path) == []


def test_add_refuses_tensors_it_does_not_support(kernel):
    x, y = torch.zeros(2, 8), torch.zeros(2, 4)
    a, bt = torch.zeros(3, 2, 8), torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="unsupported"):
        kernel.add(x.double(), y, a, bt, Blocks.build([0], [0, 1], [0]))
