"""Stage 5 (default): encoded examples -> one padding-free packed row.

Contract: ``PackingCollator()(examples)`` takes dicts with equal-length ``input_ids`` and ``labels``
lists (one micro-batch, in the sampler's order) and returns int64 tensors of shape
``(1, total tokens)``: ``input_ids`` (the examples back to back, no padding), ``labels`` and
``position_ids``. ``position_ids`` restart at 0 at each record; ``labels`` are -100 at each
record's first position, so no loss term predicts one record from the end of another. There is
no ``attention_mask``: given restarting ``position_ids`` and no mask, transformers builds a
block-diagonal causal mask for sdpa and eager attention (``masking_utils``) and flash-attention
takes the restarts as variable-length boundaries, so no record attends to another.

The micro-batch holds exactly the records the unpacked path would put in it: packing changes the
layout of a batch, never its content. ``split_packed(batch, max_tokens)`` cuts a packed row at
record boundaries into pieces of at most ``max_tokens`` tokens (a longer record is a piece of its
own), which the trainer runs one after another within the same optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encode import IGNORE_INDEX


@dataclass
class PackingCollator:
    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for example in examples:
            n = len(example["input_ids"])
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            positions += range(n)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


def record_starts(position_ids: torch.Tensor) -> list[int]:
    """Offsets in a packed row (shape (1, n)) where a record begins, plus the row's length."""
    starts = (position_ids[0] == 0).nonzero().squeeze(-1).tolist()
    return starts + [position_ids.shape[1]]


def split_packed(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """Cut one packed row into consecutive pieces of whole records, each at most ``max_tokens`` long."""
    if not max_tokens or "position_ids" not in batch or batch["input_ids"].shape[0] != 1:
        return [batch]
    if batch["input_ids"].shape[1] <= max_tokens:
        return [batch]
    bounds, cuts = record_starts(batch["position_ids"]), [0]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end - cuts[-1] > max_tokens and start > cuts[-1]:
            cuts.append(start)
    cuts.append(bounds[-1])
    return [
        {key: value[:, a:b] for key, value in batch.items()} for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
