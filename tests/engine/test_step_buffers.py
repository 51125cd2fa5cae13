"""StepBuffers: a step's lists land back to back in one persistent buffer, at the same place for the same shapes."""

from __future__ import annotations

import torch

from server.engine.step_buffers import StepBuffers, bucket_of, decode_buckets


def test_lists_come_back_as_views_of_one_buffer() -> None:
    buffers = StepBuffers(torch.device("cpu"), capacity=16)
    ids, positions, empty = buffers.load([7, 8, 9], range(3, 6), [])
    assert ids.tolist() == [7, 8, 9] and positions.tolist() == [3, 4, 5] and empty.numel() == 0
    assert ids.dtype == torch.long
    assert ids.untyped_storage().data_ptr() == positions.untyped_storage().data_ptr()
    again = buffers.load([1, 2, 3], [4, 5, 6], [])
    assert again[0].data_ptr() == ids.data_ptr() and again[1].data_ptr() == positions.data_ptr()


def test_a_step_larger_than_the_buffer_grows_it_and_bumps_the_generation() -> None:
    buffers = StepBuffers(torch.device("cpu"), capacity=4)
    generation = buffers.generation
    (big,) = buffers.load(list(range(10)))
    assert big.tolist() == list(range(10))
    assert buffers.capacity >= 10 and buffers.generation == generation + 1


def test_decode_buckets() -> None:
    assert decode_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert decode_buckets(3) == (1, 2, 3)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert [bucket_of(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 9]
