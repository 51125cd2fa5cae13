"""Arena: one owned flat buffer per adapter in host memory, carved into its tensors."""

from __future__ import annotations

import math

import torch


class Arena:
    """One owned flat buffer an adapter's compute-form tensors are carved from, in order.

    Why: hundreds of small tensors per adapter fragment the host heap (freed
    adapters leave holes a new one does not exactly fit, so RSS outgrows the
    tensor bytes); one allocation per adapter is freed whole, and one pass over
    `flat` checks every value. Loaders write straight into `take(...)` views, so
    no intermediate copy of the adapter exists.
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.flat = torch.empty(numel, dtype=dtype)  # [numel]
        self._used = 0

    def take(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if self._used + n > self.flat.numel():
            raise ValueError(f"arena of {self.flat.numel()} elements is full")
        view = self.flat[self._used:self._used + n].view(shape)
        self._used += n
        return view

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` cast to the arena's dtype, in the arena."""
        return self.take(*tensor.shape).copy_(tensor)
