"""Stage 4: records -> token ids and labels. The one place where labels are masked.

Contract: ``encode_record(record, template, tokenizer, max_seq_length)`` returns
``(input_ids, labels, status)`` where ``input_ids = [BOS] + prompt + response + [EOS]``,
``labels`` is ``-100`` over BOS and the prompt and equals ``input_ids`` over the response and EOS.
Too long a sequence loses its tail: ``status`` is ``"whole"``, ``"truncated"`` (the response is cut,
EOS lost, at least one response token kept) or ``"dropped"`` (the prompt alone fills
``max_seq_length``: the record would train on nothing, so it yields no example).

``encode_records`` does this for a whole file set and returns an ``EncodedDataset`` plus
``EncodeStats``; ``encode_cached`` keys a cache on everything that changes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .records import DataError, Record
from .templates import Template, prompt_ids
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when encoding changes in a way the cache key cannot see.
ENCODING_VERSION = 1


def encode_record(
    record: Record, template: Template, tokenizer: TextTokenizer, max_seq_length: int
) -> tuple[list[int], list[int], str]:
    prompt = prompt_ids(template, tokenizer, record.full_instruction)
    response = tokenizer.encode(record.output) + [tokenizer.eos_id]
    return _join(prompt, response, max_seq_length)


def _join(prompt: list[int], response: list[int], max_seq_length: int) -> tuple[list[int], list[int], str]:
    room = max_seq_length - len(prompt)
    if room <= 0:
        return [], [], "dropped"
    status = "whole" if len(response) <= room else "truncated"
    response = response[:room]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response, status


@dataclass
class EncodeStats:
    whole: int = 0
    truncated: int = 0
    dropped: int = 0
    full_lengths: list[int] = field(default_factory=list)

    def report(self, name: str, max_seq_length: int) -> str:
        lengths = np.array(self.full_lengths or [0])
        p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
        return (
            f"{name}: {len(self.full_lengths)} records -> {self.whole} kept whole, "
            f"{self.truncated} truncated to --max_seq_length {max_seq_length} (their EOS is lost), "
            f"{self.dropped} dropped (prompt alone fills --max_seq_length). "
            f"Length in tokens before truncation: p50 {p50}, p90 {p90}, p99 {p99}, max {int(lengths.max())}"
        )

    def to_dict(self) -> dict:
        return {"whole": self.whole, "truncated": self.truncated, "dropped": self.dropped}


class EncodedDataset(torch.utils.data.Dataset):
    """Examples stored as two flat int32 arrays plus offsets: small to cache, cheap to index."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": self.input_ids[start:end].tolist(), "labels": self.labels[start:end].tolist()}

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[int]]]) -> EncodedDataset:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in examples])
        ids = np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for _, lab in examples for t in lab), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, labels, offsets)


def encode_records(
    records: list[Record],
    template: Template,
    tokenizer: TextTokenizer,
    max_seq_length: int,
    num_workers: int = 1,
) -> tuple[EncodedDataset, EncodeStats]:
    prompts = [template.render(r.full_instruction) for r in records]
    responses = [r.output for r in records]
    if tokenizer.sp is not None:
        threads = max(1, num_workers)
        prompt_ids = tokenizer.sp.encode(prompts, num_threads=threads)
        response_ids = tokenizer.sp.encode(responses, num_threads=threads)
    else:
        prompt_ids, response_ids = tokenizer.encode_batch(prompts), tokenizer.encode_batch(responses)
    stats, examples = EncodeStats(), []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        prompt, response = [tokenizer.bos_id] + p, r + [tokenizer.eos_id]
        ids, labels, status = _join(prompt, response, max_seq_length)
        stats.full_lengths.append(len(prompt) + len(response))
        setattr(stats, status, getattr(stats, status) + 1)
        if status != "dropped":
            examples.append((ids, labels))
    return EncodedDataset.from_examples(examples), stats


def check_template_fits(template: Template, tokenizer: TextTokenizer, max_seq_length: int) -> None:
    overhead = 1 + len(tokenizer.encode(template.render(""))) + 1
    if overhead >= max_seq_length:
        raise DataError(
            f"--max_seq_length {max_seq_length} is too small: the prompt template {template.name!r} alone "
            f"takes {overhead} tokens with BOS and EOS; raise --max_seq_length (512 or more is usual)"
        )


def cache_key(
    files: list[Path], template: Template, tokenizer: TextTokenizer, max_seq_length: int, extra: str = ""
) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    for name in ("tokenizer.model", "tokenizer.json"):
        path = tokenizer.directory / name
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    settings = {
        "template": template.to_dict(),
        "special": [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, len(tokenizer)],
        "max_seq_length": max_seq_length,
        "version": ENCODING_VERSION,
        "extra": extra,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def encode_cached(
    records: list[Record],
    files: list[Path],
    template: Template,
    tokenizer: TextTokenizer,
    max_seq_length: int,
    cache_dir: str | Path | None,
    num_workers: int = 1,
    extra_key: str = "",
) -> tuple[EncodedDataset, EncodeStats, bool]:
    """Encode, or load the cached result. Returns (dataset, stats, came_from_cache)."""
    path = None
    if cache_dir is not None:
        key = cache_key(files, template, tokenizer, max_seq_length, extra_key)
        path = Path(cache_dir) / f"encoded-{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    stats = EncodeStats(
                        *(int(v) for v in z["counts"]), full_lengths=z["full_lengths"].tolist()
                    )
                    return EncodedDataset(z["input_ids"], z["labels"], z["offsets"]), stats, True
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable data cache %s; encoding again", path)
    dataset, stats = encode_records(records, template, tokenizer, max_seq_length, num_workers)
    if path is not None:
        try:
            write_cache(path, dataset, stats)
        except OSError as exc:
            # The cache only saves time; a read-only or full cache folder must not stop training.
            logger.warning("cannot write the data cache %s (%s); continuing without it", path, exc.strerror)
    return dataset, stats, False


def write_cache(path: Path, dataset: EncodedDataset, stats: EncodeStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a crash never leaves half a cache file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(
                out,
                input_ids=dataset.input_ids,
                labels=dataset.labels,
                offsets=dataset.offsets,
                counts=np.array([stats.whole, stats.truncated, stats.dropped]),
                full_lengths=np.array(stats.full_lengths, dtype=np.int64),
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
