"""Examples → token ids with the prompt masked, and deterministic batches.

Prompt and completion are tokenized *separately* and concatenated: that is how
the server sees them at inference (the prompt is tokenized alone, then the
model continues), so the boundary token the adapter learns from is the one it
will be asked to continue from. Loss falls on completion tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from server.errors import InvalidRequest
from server.training.spec import Example

IGNORE_INDEX = -100  # label of a token that carries no loss (cross_entropy's ignore_index)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens, else == input_ids

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [b, L] right-padded
    labels: torch.Tensor  # [b, L] IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # [b, L] 1 = real token

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (labels shifted by one, as the loss sees them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def render(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, bool]:
    """(prompt text, completion text, completion already ends the turn)."""
    if example.messages is None:
        return example.prompt or "", example.completion or "", False
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this base model's tokenizer has no chat template: use prompt/completion pairs")
    messages: list[dict[str, Any]] = [m.model_dump() for m in example.messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise InvalidRequest("the chat template does not render the conversation as prompt + answer")
    return prompt, full[len(prompt):], True


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                     index: int = 0) -> TokenizedExample:
    prompt, completion, ends_turn = render(example, tokenizer)
    # As the generation routes encode: raw prompts with special tokens, a rendered chat without
    # (the template already holds them).
    prompt_ids = tokenizer(prompt, add_special_tokens=example.messages is None)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if not ends_turn and eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = [*completion_ids, eos]  # teach the adapter to stop
    if not prompt_ids:
        raise InvalidRequest(f"data[{index}]: the prompt is empty")
    if not completion_ids:
        raise InvalidRequest(f"data[{index}]: the completion is empty")
    total = len(prompt_ids) + len(completion_ids)
    if total > max_tokens:
        raise InvalidRequest(f"data[{index}] is {total} tokens long; the limit per example is {max_tokens}")
    return TokenizedExample(
        input_ids=[*prompt_ids, *completion_ids],
        labels=[IGNORE_INDEX] * len(prompt_ids) + list(completion_ids),
    )


def tokenize_all(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                 max_tokens: int) -> list[TokenizedExample]:
    """Every example or an InvalidRequest naming the first bad one."""
    return [tokenize_example(ex, tokenizer, max_tokens, i) for i, ex in enumerate(examples)]


class BatchOrder:
    """Which examples micro-batch k holds: a function of (seed, k) alone.

    Epochs are seeded permutations, so a job resumed from a checkpoint at
    micro-step k sees exactly the batches an uninterrupted run would have.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.n = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self._perms[epoch]

    def indices(self, micro_step: int) -> list[int]:
        start = micro_step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> Batch:
    """Right-pad to the longest example.

    Right padding keeps every real token's causal context free of padding, so
    a plain causal attention (no padding mask) computes the same values for
    real tokens; padded positions carry no loss.
    """
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [b, L]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [b, L]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [b, L]
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return Batch(ids.to(device), labels.to(device), mask.to(device))
