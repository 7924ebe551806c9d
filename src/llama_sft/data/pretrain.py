"""Pre-training data: plain-text documents -> fixed-length blocks where every position is labelled.

Contract: ``find_text_files(dataset_dir)`` lists a folder's ``.txt`` and ``.jsonl`` files in a stable
order. A document is one non-blank line of a ``.txt`` file, or the ``"text"`` string of one line of a
``.jsonl`` file (as LLaMA-Factory and the original ``load_dataset("text")`` read them). Each document
goes through ``text.clean_text``, is tokenized (SentencePiece-identical ids) and followed by EOS; the
documents are concatenated and cut into ``block_size`` blocks (the original's ``group_texts``). The
last partial block is dropped, as ``group_texts`` does, and the report says how many tokens that was.

``build_blocks(files, tokenizer, block_size, cache_dir)`` streams the files line by line and writes
the token stream to disk in batches, so memory stays flat whatever the corpus size; the result is a
memory-mapped ``BlockDataset`` keyed by the files' contents, the tokenizer and ``block_size``; a file
lock on the entry lets only the first process of a node tokenize. Bad input raises ``DataError``
naming the file (and line or byte offset) and the fix.

``build_blocks(..., bad=BadRecords("skip"))`` leaves bad input out instead and counts it there
(``records.BadRecords``): a bad line of a ``.jsonl`` file (invalid JSON, no ``"text"`` string, NUL)
counts one and only that line is left out; a file that is not valid UTF-8 counts one and is left
out whole, even when the bad byte comes late; a file with no text counts one. The caller then
calls ``bad.check(stats.documents)``. A cached build keeps its counts, so they are the same from
the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from .records import BadRecords, DataError, RecordError
from .text import TextCleaning, UnencodableText
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
# Bump when blocks change in a way the cache key cannot see.
PRETRAIN_VERSION = 1
# Documents tokenized per call: large enough for SentencePiece's threads, small enough to stay flat.
_BATCH_DOCUMENTS = 2048
_PROGRESS_SECONDS = 10.0


def find_text_files(dataset_dir: str | Path) -> list[Path]:
    directory = Path(dataset_dir)
    if not directory.exists():
        raise DataError(f"{directory}: --dataset_dir does not exist")
    if directory.is_file():
        files = [directory] if directory.suffix in TEXT_SUFFIXES else []
    else:
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(
            f"{directory}: no *.txt or *.jsonl files in --dataset_dir; put plain-text files there "
            '(one document a line) or JSON lines with a "text" field'
        )
    return files


def check_block_size(block_size: int, context: int | None) -> None:
    """``context`` is the model's ``max_position_embeddings`` (None when unknown)."""
    if block_size < 2:
        raise DataError(
            f"--block_size {block_size} is too small: a block needs at least 2 tokens to predict one; "
            "use 512 or more"
        )
    if context is not None and block_size > context:
        raise DataError(
            f"--block_size {block_size} is larger than the model's context ({context} positions, "
            f"max_position_embeddings); use --block_size {context} or less"
        )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (line number, decoded line), reading the file in binary so a decoding error names its byte."""
    offset = 0
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw, offset = raw[3:], 3
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RecordError(
                        f"{path}: not valid UTF-8 at byte {offset + exc.start} (line {number}); "
                        "re-save the file as UTF-8",
                        "unreadable file",
                    ) from None
                offset += len(raw)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None


def iter_documents(path: Path, bad: BadRecords | None = None) -> Iterator[str]:
    """The cleaned documents of one file, streamed. A bad line, or a file with none, goes to ``bad``
    (None: raises DataError). A file that is not UTF-8 raises ``RecordError`` part-way, for the
    caller to drop what it already took of the file."""
    bad = bad if bad is not None else BadRecords()
    cleaning = TextCleaning(str(path))
    count = skipped = 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            text = line.rstrip("\r\n")
            if path.suffix == ".jsonl":
                text = _jsonl_text(path, number, line)
            try:
                text = cleaning.clean(text, f"line {number}")
            except UnencodableText as exc:
                raise RecordError(f"{path}, line {number}: {exc}", "unencodable text") from None
        except RecordError as exc:
            bad.add(path, exc.reason, str(exc))
            skipped += 1
            continue
        if text.strip():
            count += 1
            yield text
    if count == 0 and not skipped:
        bad.add(
            path,
            "empty file",
            f"{path}: the file holds no text (empty or whitespace only); remove it or fill it",
        )
    if summary := cleaning.summary():
        logger.warning(summary)


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise RecordError(
            f"{path}, line {number}: invalid JSON; fix or remove that line", "invalid JSON"
        ) from None
    except ValueError:
        # The JSON parsed, but Python converts no integer of more than 4300 digits (by default).
        raise RecordError(
            f"{path}, line {number}: holds a number of more than {sys.get_int_max_str_digits()} digits, "
            "which no JSON reader here takes; fix or remove that line",
            "invalid JSON",
        ) from None
    text = item.get("text") if isinstance(item, dict) else None
    if not isinstance(text, str):
        raise RecordError(
            f'{path}, line {number}: no "text" string; pre-training JSON lines look like '
            '{"text": "..."}: add the field or remove that line',
            "no text field",
        )
    return text


@dataclass
class PretrainStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    block_size: int = 0
    dropped_tokens: int = 0

    def report(self, name: str) -> str:
        tail = (
            f"the last {self.dropped_tokens} tokens (a partial block) were dropped"
            if self.dropped_tokens
            else "no partial block was left over"
        )
        return (
            f"{name}: {self.files} files, {self.documents} documents, {self.tokens} tokens with one EOS "
            f"per document -> {self.blocks} blocks of --block_size {self.block_size}; {tail}"
        )


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of a flat token array (a memory map for cached data); labels equal the input ids.
    ``blocks`` picks some of the array's blocks (after ``split``); None means all of them."""

    def __init__(self, tokens: np.ndarray, block_size: int, blocks: np.ndarray | None = None):
        self.tokens, self.block_size, self.blocks = tokens, block_size, blocks

    def __len__(self) -> int:
        return len(self.blocks) if self.blocks is not None else len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = int(self.blocks[index]) if self.blocks is not None else index
        ids = self.tokens[block * self.block_size : (block + 1) * self.block_size].tolist()
        return {"input_ids": ids, "labels": list(ids)}

    def split(self, share: float) -> tuple[BlockDataset, BlockDataset | None]:
        """Hold out ``share`` of the blocks (a fraction below 1, else a percentage; at least one) by a
        fixed-seed shuffle, as the SFT records are split. Returns (train, held out or None)."""
        fraction = share if share < 1 else share / 100
        count = min(len(self) - 1, math.ceil(len(self) * fraction)) if fraction > 0 else 0
        if count <= 0:
            return self, None
        order = np.random.default_rng(1234).permutation(len(self))
        mine = self.blocks if self.blocks is not None else np.arange(len(self))
        held, kept = np.sort(order[:count]), np.sort(order[count:])
        return (
            BlockDataset(self.tokens, self.block_size, mine[kept]),
            BlockDataset(self.tokens, self.block_size, mine[held]),
        )

    def sample(self, count: int, seed: int) -> BlockDataset:
        """The first ``count`` blocks of a shuffle by ``seed`` (--max_train_samples), kept in their order
        in the text; all of them when there are no more."""
        if count >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))
        mine = self.blocks if self.blocks is not None else np.arange(len(self))
        return BlockDataset(self.tokens, self.block_size, mine[np.sort(order[:count])])

    def lengths(self) -> list[int]:
        return [self.block_size] * len(self)

    def num_tokens(self) -> int:
        return len(self) * self.block_size


def cache_key(
    files: list[Path], tokenizer: TextTokenizer, block_size: int, on_bad_records: str = "stop"
) -> str:
    digest = hashlib.sha256()
    for path in files:
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                file_digest.update(chunk)
        digest.update(path.suffix.encode() + file_digest.digest())
    for name in ("tokenizer.model", "tokenizer.json"):
        path = tokenizer.directory / name
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    settings = {
        "special": [tokenizer.eos_id, len(tokenizer)],
        "block_size": block_size,
        "version": PRETRAIN_VERSION,
    }
    if on_bad_records != "stop":
        # Blocks built skipping bad input must not be found by a run that stops on it. Stopping
        # builds keep the key they always had, so their caches stay valid.
        settings["on_bad_records"] = on_bad_records
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _encode(tokenizer: TextTokenizer, texts: list[str], num_workers: int) -> list[list[int]]:
    if tokenizer.sp is not None:
        return tokenizer.sp.encode(texts, num_threads=max(1, num_workers))
    return tokenizer.encode_batch(texts)


def _write_tokens(
    out,
    files: list[Path],
    tokenizer: TextTokenizer,
    num_workers: int,
    stats: PretrainStats,
    bad: BadRecords | None = None,
) -> None:
    bad = bad if bad is not None else BadRecords()
    dtype = _dtype(tokenizer)
    progress = _Progress(files)
    for number, path in enumerate(files, start=1):
        start, before = out.tell(), (stats.documents, stats.tokens)
        batch: list[str] = []
        try:
            for text in iter_documents(path, bad):
                batch.append(text)
                if len(batch) == _BATCH_DOCUMENTS:
                    _flush(out, tokenizer, batch, num_workers, stats, dtype)
                    batch = []
                    progress.tick(path, number, stats)
            _flush(out, tokenizer, batch, num_workers, stats, dtype)
            stats.files += 1
        except RecordError as exc:
            # A file undecodable part-way is left out whole: its tokens written so far are cut off.
            out.seek(start)
            out.truncate()
            stats.documents, stats.tokens = before
            bad.add(path, exc.reason, str(exc))
        progress.file_done(path, number, stats)


class _Progress:
    """A log line every few seconds and after each file, for corpora that take more than a moment."""

    def __init__(self, files: list[Path]):
        self.files, self.total = len(files), sum(path.stat().st_size for path in files)
        self.done = 0
        self.start = self.last = time.monotonic()

    def tick(self, path: Path, number: int, stats: PretrainStats) -> None:
        if time.monotonic() - self.last >= _PROGRESS_SECONDS:
            self._log(path, number, stats, "reading")

    def file_done(self, path: Path, number: int, stats: PretrainStats) -> None:
        self.done += path.stat().st_size
        late = time.monotonic() - self.last >= _PROGRESS_SECONDS
        # The last file's line closes a run that printed progress before.
        if late or (number == self.files and self.last > self.start):
            self._log(path, number, stats, "done with")

    def _log(self, path: Path, number: int, stats: PretrainStats, what: str) -> None:
        self.last = time.monotonic()
        rate = stats.tokens / max(1e-9, self.last - self.start) / 1e6
        logger.info(
            "tokenizing: %s %s (file %d of %d), %.0f of %.0f MB in finished files, %d documents, "
            "%d tokens so far (%.2f M tokens/s)",
            what,
            path.name,
            number,
            self.files,
            self.done / 1e6,
            self.total / 1e6,
            stats.documents,
            stats.tokens,
            rate,
        )


def _flush(out, tokenizer, batch, num_workers, stats, dtype) -> None:
    if not batch:
        return
    ids = _encode(tokenizer, batch, num_workers)
    flat = np.fromiter(
        (t for doc in ids for t in (*doc, tokenizer.eos_id)),
        dtype=dtype,
        count=sum(len(doc) + 1 for doc in ids),
    )
    flat.tofile(out)
    stats.documents += len(batch)
    stats.tokens += len(flat)


def build_blocks(
    files: list[Path],
    tokenizer: TextTokenizer,
    block_size: int,
    cache_dir: str | Path | None,
    num_workers: int = 1,
    bad: BadRecords | None = None,
    overwrite: bool = False,
) -> tuple[BlockDataset, PretrainStats, bool]:
    """Tokenize and block the files, or map the cached result. Returns (dataset, stats, came_from_cache).
    ``overwrite`` (--overwrite_cache): tokenize even when the entry exists, and replace it.

    With a ``cache_dir``, processes of one node (sharing that folder) take a file lock on the entry:
    the first tokenizes, the others wait and map its result. With None the token stream goes to a
    temporary file that is unlinked once mapped. ``bad`` (None: stop) decides what bad input does;
    under ``skip`` this build's counts are added to it, whether tokenized now or taken from the cache.
    """
    check_block_size(block_size, None)
    found = BadRecords(bad.policy if bad is not None else "stop")
    result = _build(files, tokenizer, block_size, cache_dir, num_workers, found, overwrite)
    if bad is not None:
        bad.merge(found.to_dict())
    return result


def _build(
    files: list[Path],
    tokenizer: TextTokenizer,
    block_size: int,
    cache_dir: str | Path | None,
    num_workers: int,
    found: BadRecords,
    overwrite: bool = False,
) -> tuple[BlockDataset, PretrainStats, bool]:
    key = cache_key(files, tokenizer, block_size, found.policy)
    if cache_dir is None:
        return (
            *_tokenize(files, tokenizer, block_size, Path(tempfile.gettempdir()), None, num_workers, found),
            False,
        )
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"pretrain-{key}.lock")
        lock.acquire()
    except OSError as exc:
        raise DataError(
            f"{folder}: cannot write the tokenized data ({exc.strerror}); point --data_cache_dir at a "
            "writable folder"
        ) from None
    try:
        cached = None if overwrite else _load_cached(folder / f"pretrain-{key}", block_size, found)
        if cached is not None:
            return (*cached, True)
        return (
            *_tokenize(files, tokenizer, block_size, folder, folder / f"pretrain-{key}", num_workers, found),
            False,
        )
    finally:
        lock.release()


def _load_cached(stem: Path, block_size: int, found: BadRecords) -> tuple[BlockDataset, PretrainStats] | None:
    """The cached blocks and stats, the bad input counted when they were built added to ``found``."""
    tokens_path, stats_path = stem.with_suffix(".tokens"), stem.with_suffix(".json")
    if not (tokens_path.is_file() and stats_path.is_file()):
        return None
    try:
        saved = json.loads(stats_path.read_text())
        dtype = np.dtype(saved.pop("dtype"))
        # Read into a collector of its own first, so a damaged entry adds nothing to ``found``.
        counted = BadRecords(found.policy)
        counted.merge(saved.pop("bad_records", None) or {})
        stats = PretrainStats(**saved)
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
        if len(tokens) == stats.blocks * block_size:
            found.merge(counted.to_dict())
            return BlockDataset(tokens, block_size), stats
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    logger.warning("ignoring unreadable pre-training cache %s; tokenizing again", tokens_path)
    return None


def _tokenize(
    files: list[Path],
    tokenizer: TextTokenizer,
    block_size: int,
    folder: Path,
    stem: Path | None,
    num_workers: int,
    found: BadRecords,
) -> tuple[BlockDataset, PretrainStats]:
    """Streams the token stream into a temporary file in ``folder``, renamed to ``stem.tokens`` when given."""
    dtype = _dtype(tokenizer)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tokens.tmp")
    except OSError as exc:
        raise DataError(
            f"{folder}: cannot write the tokenized data ({exc.strerror}); set --data_cache_dir"
        ) from None
    stats = PretrainStats(block_size=block_size)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_tokens(out, files, tokenizer, num_workers, stats, found)
            stats.blocks = stats.tokens // block_size
            stats.dropped_tokens = stats.tokens - stats.blocks * block_size
            # The partial last block is cut from the file itself, so the map holds whole blocks only.
            out.truncate(stats.blocks * block_size * np.dtype(dtype).itemsize)
        if stats.documents == 0:
            # Everything was skipped: say so rather than that the text is too short.
            found.check(0)
        if stats.blocks == 0:
            raise DataError(
                f"{files[0].parent}: the text holds {stats.tokens} tokens, fewer than one block of "
                f"--block_size {block_size}; add text or lower --block_size"
            )
        tokens = np.memmap(tmp, dtype=dtype, mode="r")
        if stem is not None:
            os.replace(tmp, stem.with_suffix(".tokens"))
            _write_stats(stem.with_suffix(".json"), stats, dtype, found)
    finally:
        # Without a cache the mapped file is unlinked at once: its pages live until the map is closed.
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BlockDataset(tokens, block_size), stats


def _dtype(tokenizer: TextTokenizer) -> type:
    # Two bytes a token while the vocabulary fits (LLaMA's 32000, Chinese-LLaMA's 55296), four beyond.
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32


def _write_stats(path: Path, stats: PretrainStats, dtype: type, found: BadRecords) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as out:
        json.dump({**asdict(stats), "dtype": np.dtype(dtype).name, "bad_records": found.to_dict()}, out)
    os.replace(tmp, path)
