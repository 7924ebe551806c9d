"""Stage 4: records -> token ids and labels. The one place where labels are masked.

Contract: ``encode_record(record, template, tokenizer, max_seq_length, train_on_turns)`` returns
``(input_ids, labels, status)``. A record is a conversation of one or more exchanges, laid out by
``templates.exchanges``/``exchange_ids``: per exchange ``[BOS] + prompt`` (masked: ``-100``) then
``answer + end-of-turn`` (trained: labels equal ``input_ids``) then the template's text after the
answer (masked). With ``train_on_turns="last"`` only the last exchange's answer is trained. For a
single-turn Alpaca record this is ``[BOS] + prompt + response + [EOS]``.

Too long a sequence is cut at an exchange boundary: ``status`` is ``"whole"``, ``"shortened"`` (the
leading whole exchanges that fit are kept, the system prompt with the first; never a user turn
without its answer), ``"truncated"`` (not even the first exchange fits: its answer is cut, EOS lost,
at least one answer token kept) or ``"dropped"`` (the first prompt alone fills ``max_seq_length``:
the record would train on nothing, so it yields no example).

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
from .templates import Template, exchange_ids, exchanges
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when encoding changes in a way the cache key cannot see (the cached stats included).
ENCODING_VERSION = 3
TRAIN_ON_TURNS = ("all", "last")


def encode_record(
    record: Record,
    template: Template,
    tokenizer: TextTokenizer,
    max_seq_length: int,
    train_on_turns: str = "all",
) -> tuple[list[int], list[int], str]:
    end_id = template.end_id(tokenizer)
    after = tokenizer.encode(template.after_answer) if template.after_answer else []
    parts = [
        exchange_ids(exchange, tokenizer, end_id, after)
        for exchange in exchanges(template, record.turns, record.system)
    ]
    return layout(parts, max_seq_length, train_on_turns)[:3]


Parts = list[tuple[list[int], list[int], list[int]]]


def layout(
    parts: Parts, max_seq_length: int, train_on_turns: str = "all"
) -> tuple[list[int], list[int], str, int]:
    """Join ``(prompt, answer + end-of-turn, text after it)`` id lists of each exchange into
    ``(input_ids, labels, status, answers trained)``, cutting at an exchange boundary when too long."""
    lengths = [sum(map(len, part)) for part in parts]
    status = "whole"
    if sum(lengths) > max_seq_length:
        keep, total = 0, 0
        while keep < len(parts) and total + lengths[keep] <= max_seq_length:
            total += lengths[keep]
            keep += 1
        if keep:
            parts, status = parts[:keep], "shortened"
        else:
            # Not even the first exchange fits: cut its answer, as a long Alpaca record is cut.
            prompt, answer, _ = parts[0]
            room = max_seq_length - len(prompt)
            if room <= 0:
                return [], [], "dropped", 0
            parts, status = [(prompt, answer[:room], [])], "truncated"
    ids: list[int] = []
    labels: list[int] = []
    for position, (prompt, answer, after) in enumerate(parts):
        trained = train_on_turns == "all" or position == len(parts) - 1
        ids += prompt + answer + after
        labels += [IGNORE_INDEX] * len(prompt)
        labels += answer if trained else [IGNORE_INDEX] * len(answer)
        labels += [IGNORE_INDEX] * len(after)
    return ids, labels, status, len(parts) if train_on_turns == "all" else 1


@dataclass
class EncodeStats:
    whole: int = 0
    truncated: int = 0
    dropped: int = 0
    shortened: int = 0
    turns_trained: int = 0
    tokens_trained: int = 0
    # Conversations whose last user turn had no answer; that turn was left out when they were read.
    unanswered: int = 0
    full_lengths: list[int] = field(default_factory=list)

    COUNTS = ("whole", "truncated", "dropped", "shortened", "turns_trained", "tokens_trained", "unanswered")

    def report(self, name: str, max_seq_length: int) -> str:
        lengths = np.array(self.full_lengths or [0])
        p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
        return (
            f"{name}: {len(self.full_lengths)} records -> {self.whole} kept whole, "
            f"{self.truncated} truncated to --max_seq_length {max_seq_length} (their EOS is lost), "
            f"{self.dropped} dropped (prompt alone fills --max_seq_length), "
            f"{self.shortened} conversations shortened to the leading exchanges that fit, "
            f"{self.unanswered} ending in a user turn with no answer (that turn left out). "
            f"Trained: {self.turns_trained} assistant turns, {self.tokens_trained} tokens. "
            f"Length in tokens before truncation: p50 {p50}, p90 {p90}, p99 {p99}, max {int(lengths.max())}"
        )

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.COUNTS}


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
    train_on_turns: str = "all",
) -> tuple[EncodedDataset, EncodeStats]:
    laid_out = [exchanges(template, r.turns, r.system) for r in records]
    prompts = [e.prompt for conversation in laid_out for e in conversation]
    answers = [e.answer for conversation in laid_out for e in conversation]
    # All texts go to the tokenizer in two batches (SentencePiece spreads a batch over threads).
    if tokenizer.sp is not None:
        threads = max(1, num_workers)
        prompt_ids = tokenizer.sp.encode(prompts, num_threads=threads)
        answer_ids = tokenizer.sp.encode(answers, num_threads=threads)
    else:
        prompt_ids, answer_ids = tokenizer.encode_batch(prompts), tokenizer.encode_batch(answers)
    end_id = template.end_id(tokenizer)
    after = tokenizer.encode(template.after_answer) if template.after_answer else []
    stats, examples, next_text = EncodeStats(), [], 0
    stats.unanswered = sum(record.unanswered for record in records)
    for conversation in laid_out:
        parts = []
        for exchange in conversation:
            parts.append(
                exchange_ids(exchange, tokenizer, end_id, after, prompt_ids[next_text], answer_ids[next_text])
            )
            next_text += 1
        ids, labels, status, trained = layout(parts, max_seq_length, train_on_turns)
        stats.full_lengths.append(sum(sum(map(len, part)) for part in parts))
        setattr(stats, status, getattr(stats, status) + 1)
        if status != "dropped":
            examples.append((ids, labels))
            stats.tokens_trained += len(labels) - labels.count(IGNORE_INDEX)
            stats.turns_trained += trained
    return EncodedDataset.from_examples(examples), stats


def check_template_fits(template: Template, tokenizer: TextTokenizer, max_seq_length: int) -> None:
    template.end_id(tokenizer)  # a template's end-of-turn token the tokenizer lacks stops the run here
    overhead = 1 + len(tokenizer.encode(template.render(""))) + 1
    if overhead >= max_seq_length:
        raise DataError(
            f"--max_seq_length {max_seq_length} is too small: the prompt template {template.name!r} alone "
            f"takes {overhead} tokens with BOS and EOS; raise --max_seq_length (512 or more is usual)"
        )


def cache_key(
    files: list[Path],
    template: Template,
    tokenizer: TextTokenizer,
    max_seq_length: int,
    extra: str = "",
    train_on_turns: str = "all",
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
        "train_on_turns": train_on_turns,
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
    train_on_turns: str = "all",
    overwrite: bool = False,
) -> tuple[EncodedDataset, EncodeStats, bool]:
    """Encode, or load the cached result. Returns (dataset, stats, came_from_cache). ``overwrite``
    (--overwrite_cache): encode even when the entry exists, and replace it."""
    path = None
    if cache_dir is not None:
        key = cache_key(files, template, tokenizer, max_seq_length, extra_key, train_on_turns)
        path = Path(cache_dir) / f"encoded-{key}.npz"
        if path.is_file() and not overwrite:
            try:
                with np.load(path) as z:
                    counts = dict(zip(EncodeStats.COUNTS, (int(v) for v in z["counts"]), strict=True))
                    stats = EncodeStats(**counts, full_lengths=z["full_lengths"].tolist())
                    return EncodedDataset(z["input_ids"], z["labels"], z["offsets"]), stats, True
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable data cache %s; encoding again", path)
    dataset, stats = encode_records(records, template, tokenizer, max_seq_length, num_workers, train_on_turns)
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
                counts=np.array([getattr(stats, key) for key in EncodeStats.COUNTS]),
                full_lengths=np.array(stats.full_lengths, dtype=np.int64),
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
