"""A step's integer metadata in one persistent buffer: one host fill, one host→device copy.

Why: a step needs a dozen small index tensors (token ids, positions, KV rows,
sampling rows, decode lengths...). Built one by one from Python lists, each is
an allocation and, on a GPU, a blocking pageable copy. Here every list of the
step is written into one preallocated host buffer (pinned on CUDA) through a
numpy view, and the used prefix goes to the device in one `non_blocking` copy;
the step's tensors are views of the device buffer. The same shapes land at the
same addresses step after step, which is what a captured CUDA graph needs.
On CPU the host buffer *is* the device buffer: no copy at all.

The views are valid until the next `load` (the runner uses them within one step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INITIAL_CAPACITY = 4096  # int64 entries; grows (doubling) when a step needs more


class StepBuffers:
    def __init__(self, device: torch.device, capacity: int = INITIAL_CAPACITY) -> None:
        self.device = device
        self.generation = 0  # bumped when the buffers are reallocated (captured views are then stale)
        self._copied: torch.cuda.Event | None = None
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        cuda = self.device.type == "cuda"
        self.host = torch.empty(capacity, dtype=torch.long, pin_memory=cuda)  # [capacity]
        self._np = self.host.numpy()
        self.dev = torch.empty(capacity, dtype=torch.long, device=self.device) if cuda else self.host
        self.generation += 1

    @property
    def capacity(self) -> int:
        return int(self.host.shape[0])

    def load(self, *fields: Sequence[int]) -> list[torch.Tensor]:
        """Each list as a `[len]` int64 tensor on the device, laid out back to back in the buffer."""
        total = sum(len(f) for f in fields)
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still read the host buffer
        offset, spans = 0, []
        for f in fields:
            n = len(f)
            self._np[offset:offset + n] = f
            spans.append((offset, n))
            offset += n
        if self.dev is not self.host:
            self.dev[:total].copy_(self.host[:total], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return [self.dev[o:o + n] for o, n in spans]


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a decode step is padded up to: 1, 2, 4, 8, then every multiple of 8, up to max_batch."""
    sizes = {b for b in (1, 2, 4) if b < max_batch} | set(range(8, max_batch, 8)) | {max_batch}
    return tuple(sorted(sizes))


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding n (n itself past the largest)."""
    return next((b for b in buckets if b >= n), n)
