"""Stage 1: Alpaca files -> validated records.

Contract: ``load_records(path) -> list[Record]`` reads one ``.json`` file (a JSON list of objects)
or ``.jsonl`` file (one object a line); ``find_data_files(dataset_dir)`` lists a folder's data
files in a stable order. Every record has string ``instruction`` and ``output`` and an optional
string ``input`` (missing or null is empty). Anything else raises ``DataError`` naming the file,
the record index and what to do, before any model is loaded. Text goes through ``text.clean_text``
(lone surrogates and control characters removed, with one warning per file; NUL refused).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .text import TextCleaning, UnencodableText

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """Bad training data. The message names the file and record and says what to do."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str

    @property
    def full_instruction(self) -> str:
        """The text put into the template: a non-empty ``input`` joins the instruction on a new line."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def find_data_files(dataset_dir: str | Path) -> list[Path]:
    directory = Path(dataset_dir)
    if not directory.exists():
        raise DataError(f"{directory}: --dataset_dir does not exist")
    if directory.is_file():
        return [directory]
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise DataError(
            f"{directory}: no *.json or *.jsonl files in --dataset_dir; put Alpaca-format files there "
            '([{"instruction": ..., "input": ..., "output": ...}, ...])'
        )
    return files


class _Object(dict):
    """A JSON object that remembers the keys it held twice (json keeps only the last value)."""

    duplicated: tuple[str, ...] = ()


def _keep_duplicates(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    keys = [k for k, _ in pairs]
    obj.duplicated = tuple(sorted({k for k in keys if keys.count(k) > 1}))
    return obj


def _parse(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_keep_duplicates)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        # utf-8-sig: files saved by Windows editors start with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); re-save the file as UTF-8"
        ) from None


def _parse_lines(path: Path, text: str) -> list[object]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_parse(line))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {number}: invalid JSON ({exc.msg}); fix or remove that line"
            ) from None
    return items


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    text = _read_text(path)
    if path.suffix == ".jsonl":
        items = _parse_lines(path, text)
    else:
        try:
            items = _parse(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):
                # A JSON Lines file saved as .json: every line an object is unambiguous, so read it.
                items = _parse_lines(path, text)
            else:
                raise DataError(
                    f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
                    "the file must be one JSON list of records"
                ) from None
        if isinstance(items, dict):
            raise DataError(
                f"{path}: the file holds one JSON object; Alpaca data is a JSON list of records: "
                '[{"instruction": ..., "input": ..., "output": ...}, ...]'
            )
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of records, found {type(items).__name__}")
    cleaning = TextCleaning(str(path))
    records = [_to_record(item, path, index, cleaning) for index, item in enumerate(items)]
    if not records:
        raise DataError(f"{path}: the file holds no records")
    if cleaning.summary():
        logger.warning(cleaning.summary())
    return records


def _to_record(item: object, path: Path, index: int, cleaning: TextCleaning) -> Record:
    where = f"{path}, record {index}"
    if not isinstance(item, dict):
        raise DataError(
            f"{where}: expected an object with instruction/input/output, found {type(item).__name__}"
        )
    if isinstance(item, _Object) and item.duplicated:
        raise DataError(
            f"{where}: key {item.duplicated[0]!r} appears twice; JSON readers disagree on which value wins, "
            "so remove one"
        )
    values = {}
    for key in ("instruction", "input", "output"):
        value = item.get(key)
        if value is None and key == "input":
            value = ""
        if value is None:
            problem = f"{key!r} is null" if key in item else f"missing {key!r}"
            raise DataError(f"{where}: {problem}; every record needs 'instruction' and 'output' strings")
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, found {type(value).__name__}")
        try:
            values[key] = cleaning.clean(value, f"record {index}")
        except UnencodableText as exc:
            raise DataError(f"{where}: {key!r} {exc}") from None
    if not values["instruction"].strip() and not values["input"].strip():
        raise DataError(f"{where}: 'instruction' and 'input' are both empty; give the record an instruction")
    return Record(**values)


def load_dataset_dir(dataset_dir: str | Path) -> list[Record]:
    return [record for path in find_data_files(dataset_dir) for record in load_records(path)]
