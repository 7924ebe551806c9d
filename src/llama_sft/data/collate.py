"""Stage 5: encoded examples -> a padded batch.

Contract: ``Collator(pad_id)(examples)`` takes dicts with equal-length ``input_ids`` and ``labels``
lists and returns int64 tensors ``input_ids`` (right-padded with ``pad_id``), ``labels``
(right-padded with -100) and ``attention_mask`` (1 on real tokens, 0 on padding), all of shape
``(batch, longest)``; with ``pad_to_multiple_of`` the width is rounded up to that multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encode import IGNORE_INDEX


@dataclass
class Collator:
    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
