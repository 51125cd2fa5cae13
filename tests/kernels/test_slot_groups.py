"""SlotGroups: the Triton kernels' launch metadata, built once per step from the step's runs."""

from __future__ import annotations

import torch

from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.kernels.groups import SlotGroups

CPU = torch.device("cpu")


def test_tokens_are_grouped_by_slot_in_step_order_base_tokens_left_out():
    g = SlotGroups.build([(3, 0, 2), (-1, 2, 1), (0, 3, 1), (3, 4, 3), (-2, 7, 1), (0, 8, 1)], CPU)
    assert g is not None
    assert g.tokens.tolist() == [3, 8, 0, 1, 4, 5, 6]
    assert g.starts.tolist() == [0, 2, 7]
    assert g.slots.tolist() == [0, 3]
    assert (g.count, g.num_tokens, g.max_tokens) == (2, 7, 5)
    assert {g.tokens.dtype, g.starts.dtype, g.slots.dtype} == {torch.int32}


def test_no_adapted_token_no_groups():
    assert SlotGroups.build([(-1, 0, 4), (-2, 4, 2)], CPU) is None
    assert SlotGroups.build([], CPU) is None


def test_adapter_batch_builds_them_once_for_the_step():
    batch = AdapterBatch.build(AdapterMapping.from_token_slots([1, 1, -1, 0, 1]))
    assert batch.groups is not None
    assert batch.groups.tokens.tolist() == [3, 0, 1, 4] and batch.groups.slots.tolist() == [0, 1]
    assert AdapterBatch.build(AdapterMapping.base_only(3)).groups is None
