"""AdapterBackend: the kernel backend equals the torch backend, and hands the kernel only what it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters.runtime.backend import KERNEL_MAX_T, CpuKernelBackend, TorchBackend
from server.adapters.weights.lora import LoraWeights
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.slots import SlotBank
from server.kernels.cpu import load_kernel

IN, OUT, R, SLOTS = 24, 16, 4, 3


class CountingKernel:
    """The real kernel, counting the calls that reach it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0

    def supports(self, *args) -> bool:
        return self.kernel.supports(*args)

    def add(self, *args, **kwargs) -> None:
        self.calls += 1
        self.kernel.add(*args, **kwargs)


@pytest.fixture
def kernel(tmp_path: Path) -> CountingKernel:
    k = load_kernel(tmp_path)
    if k is None:
        pytest.skip("no C compiler")
    return CountingKernel(k)


def _bank() -> SlotBank:
    bank = SlotBank(SLOTS, IN, OUT, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    for slot in range(SLOTS):
        bank.write(slot, LoraWeights(a=torch.randn(R, IN, generator=g), bt=torch.randn(R, OUT, generator=g)))
    return bank


@pytest.mark.parametrize("slots, kernel_calls", [
    ([0, 2, 1, 0, -1, 2], 1),  # decode: short runs, the kernel
    ([1] * 10 + [0, 2], 1),  # a long run (torch addmm) and short runs (kernel)
    ([2] * 10, 0),  # one long run only: nothing for the kernel
    ([0, 1] * (KERNEL_MAX_T + 1), 0),  # too many tokens per slot for the kernel: torch's bmm
])
def test_kernel_backend_equals_torch_backend(kernel, slots, kernel_calls):
    bank, batch = _bank(), AdapterBatch.build(AdapterMapping.from_token_slots(slots))
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(5))
    y_torch, y_kernel = torch.zeros(len(slots), OUT), torch.zeros(len(slots), OUT)
    TorchBackend().add_linear(x, y_torch, bank, batch)
    CpuKernelBackend(kernel).add_linear(x, y_kernel, bank, batch)  # type: ignore[arg-type]
    torch.testing.assert_close(y_kernel, y_torch, atol=1e-4, rtol=1e-5)
    assert kernel.calls == kernel_calls


def test_kernel_backend_leaves_autograd_to_torch(kernel):
    bank, batch = _bank(), AdapterBatch.build(AdapterMapping.from_token_slots([0, 1, 2]))
    x = torch.randn(3, IN, requires_grad=True)
    y = torch.zeros(3, OUT)
    CpuKernelBackend(kernel).add_linear(x, y, bank, batch)  # type: ignore[arg-type]
    assert kernel.calls == 0 and y.requires_grad
