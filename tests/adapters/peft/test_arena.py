"""Arena memory: the pre-faulted spare that keeps page faults off a cold adapter's load."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
import torch

from server.adapters.peft import arena
from server.adapters.peft.arena import Arena, SpareBuffer, prefault

MiB = 1 << 20


def _wait_ready(spare: SpareBuffer, timeout_s: float = 10.0) -> tuple[int, torch.dtype] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := spare.ready()) is not None:
            return got
        time.sleep(0.01)
    return None


def test_the_next_take_of_the_same_size_gets_the_spare_made_in_the_background() -> None:
    spare = SpareBuffer()
    first = spare.take(MiB, torch.float32)
    assert first.shape == (MiB,) and (spare.hits, spare.misses) == (0, 1)
    assert _wait_ready(spare) == (MiB, torch.float32)
    second = spare.take(MiB, torch.float32)
    assert (spare.hits, spare.misses) == (1, 1)
    assert second.data_ptr() != first.data_ptr()  # its own memory: the first is still in use
    second.fill_(3.0)
    first.fill_(1.0)
    assert float(second.sum()) == 3.0 * MiB and float(first.sum()) == MiB
    assert _wait_ready(spare) == (MiB, torch.float32)  # and the one after that is on its way


def test_another_size_or_dtype_is_fresh_memory_and_the_spare_follows_it() -> None:
    spare = SpareBuffer()
    spare.take(MiB, torch.float32)
    assert _wait_ready(spare) == (MiB, torch.float32)
    other = spare.take(MiB // 2, torch.float32)
    assert other.numel() == MiB // 2 and spare.hits == 0
    assert _wait_ready(spare) == (MiB // 2, torch.float32)
    half = spare.take(MiB // 2, torch.float16)
    assert half.dtype == torch.float16 and spare.hits == 0
    assert _wait_ready(spare) == (MiB // 2, torch.float16)


def test_small_buffers_bypass_the_spare_and_leave_it_for_the_adapter_size() -> None:
    spare = SpareBuffer()
    spare.take(MiB, torch.float32)
    assert _wait_ready(spare) == (MiB, torch.float32)
    tiny = spare.take(100, torch.float32)  # one module's arena (tests, tools): not an adapter's
    assert tiny.numel() == 100 and spare.misses == 1
    assert spare.ready() == (MiB, torch.float32)
    spare.take(MiB, torch.float32)
    assert spare.hits == 1


def test_no_spare_beyond_the_size_cap(monkeypatch) -> None:
    monkeypatch.setattr(arena, "SPARE_MAX_BYTES", MiB)
    spare = SpareBuffer()
    spare.take(MiB, torch.float32)  # 4 MiB: over the cap
    time.sleep(0.2)
    assert spare.ready() is None
    spare.take(MiB, torch.float32)
    assert spare.hits == 0


def test_arenas_carve_exactly_their_tensors_from_spare_or_fresh_memory() -> None:
    tensors = [torch.randn(512, 600), torch.randn(7, 11)]  # over 1 MiB: an adapter-sized arena
    hits = arena._spare.hits
    for _ in range(3):  # fresh or spare memory first, then the spare: the same contents either way
        a = Arena(sum(t.numel() for t in tensors), torch.float32)
        views = [a.take(*t.shape).copy_(t) for t in tensors]
        for v, t in zip(views, tensors):
            torch.testing.assert_close(v, t, rtol=0, atol=0)
        with pytest.raises(ValueError, match="full"):
            a.take(1)
        assert _wait_ready(arena._spare) is not None
    assert arena._spare.hits >= hits + 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux-only")
def test_prefault_maps_big_cpu_buffers_and_skips_small_ones() -> None:
    big = torch.empty(3 * MiB + 123, dtype=torch.uint8)
    small = torch.empty(1000, dtype=torch.uint8)
    assert prefault(small) is False
    assert prefault(big) is _kernel_at_least(5, 14)  # older kernels refuse the advice: nothing done
    big.fill_(7)
    assert int(big[-1]) == 7 and int(big[0]) == 7


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)
