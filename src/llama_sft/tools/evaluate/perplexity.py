"""Perplexity on plain text, read and blocked exactly as ``llama-sft pretrain`` reads it.

Contract: ``text_blocks(tokenizer, data_dir, block_size) -> [(file, blocks)]`` gives, per
``.txt``/``.jsonl`` file of ``data_dir`` (``data.pretrain.find_text_files``), the ``block_size``-token
blocks ``data.pretrain.build_blocks`` makes of that file alone: its documents cleaned, tokenized,
each followed by EOS, concatenated and cut, the last partial block dropped. Bad input raises
``DataError`` naming the file. ``block_nll(model, blocks, batch_size)`` returns the negative
log-likelihood summed over every predicted token (each block predicts its tokens after the first)
and their count; ``perplexity_result`` turns such sums per file into the results: per file and
overall, perplexity is ``exp(summed NLL / predicted tokens)``, so files weigh by their tokens.
Another backend (llama.cpp on a GGUF) can score the same blocks and report through the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ...data.pretrain import build_blocks, check_block_size, find_text_files
from ...data.records import DataError
from ...data.tokenizer import TextTokenizer

DEFAULT_BLOCK_SIZE = 1024


def text_blocks(
    tokenizer: TextTokenizer, data_dir: str | Path, block_size: int
) -> list[tuple[Path, list[list[int]]]]:
    check_block_size(block_size, None)
    found = []
    for path in find_text_files(data_dir):
        try:
            dataset, _, _ = build_blocks([path], tokenizer, block_size, cache_dir=None)
        except DataError as exc:
            message = str(exc)
            folder = f"{path.parent}: "
            if message.startswith(folder) and not message.startswith(f"{path}"):
                # Blocked alone, a file too short for one block is that file's problem.
                raise DataError(f"{path}: {message[len(folder) :]}") from None
            raise
        found.append((path, [dataset[i]["input_ids"] for i in range(len(dataset))]))
    return found


@torch.no_grad()
def block_nll(
    model, blocks: list[list[int]], batch_size: int, advance: Callable[[int], None] | None = None
) -> tuple[float, int]:
    """(NLL summed over the predicted tokens, their count) for blocks of one length."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for begin in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[begin : begin + batch_size], device=device)
        logits = model(input_ids=ids).logits[:, :-1, :].float()
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
        if advance is not None:
            advance(len(ids))
    return total, count


def perplexity_result(sums: list[tuple[str | Path, float, int]]) -> dict:
    """``[(file, summed NLL, predicted tokens)]`` -> ``{"files": {file: ...}, "overall": ...}``,
    each entry ``{"tokens", "nll", "loss", "perplexity"}`` (``loss``: the mean NLL per token)."""

    def entry(nll: float, tokens: int) -> dict:
        loss = nll / tokens
        return {"tokens": tokens, "nll": nll, "loss": loss, "perplexity": math.exp(loss)}

    files = {str(name): entry(nll, tokens) for name, nll, tokens in sums}
    overall = entry(sum(nll for _, nll, _ in sums), sum(tokens for _, _, tokens in sums))
    return {"files": files, "overall": overall}
