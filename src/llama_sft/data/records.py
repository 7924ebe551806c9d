"""Stage 1: data files -> validated records.

Contract: ``load_records(path) -> list[Record]`` reads one ``.json`` file (a JSON list of objects)
or ``.jsonl`` file (one object a line); ``find_data_files(dataset_dir)`` lists a folder's data
files in a stable order. A file holds records of one format, told by the first record's keys:

* Alpaca: string ``instruction`` and ``output``, optional string ``input`` (missing or null is
  empty), optional ``system`` string and ``history`` (``[[user, assistant], ...]``, earlier turns).
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}],
  "system": str (optional)}``.
* OpenAI messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``.

Every record becomes a ``Record``: its last exchange (``instruction``/``output``), the exchanges
before it (``history``) and the system prompt (None: the template's). A conversation is an
optional system turn, then user and assistant turns in alternation from a user turn, with at least
one assistant turn; a last user turn without an answer trains nothing and is left out. Anything
else raises ``DataError`` naming the file, the record index (and the turn index) and what to do,
before any model is loaded. Text goes through ``text.clean_text`` (lone surrogates and control
characters removed, with one warning per file; NUL refused).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
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
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    # The conversation ended with a user turn that has no answer, which was left out. Not part of
    # the record's value (equality, hashing): only counted by the data report.
    unanswered: bool = field(default=False, compare=False)

    @property
    def full_instruction(self) -> str:
        """The text put into the template: a non-empty ``input`` joins the instruction on a new line."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        """Every ``(user, assistant)`` exchange, oldest first."""
        return (*self.history, (self.full_instruction, self.output))


# The key that tells each format apart, the names of a turn's two fields, and the roles it may name.
FORMATS = {
    "sharegpt": ("conversations", "from", "value"),
    "messages": ("messages", "role", "content"),
}
ROLES = {
    "sharegpt": {
        "system": "system",
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
    },
    "messages": {"system": "system", "user": "user", "assistant": "assistant"},
}
FORMAT_NAMES = {"alpaca": "Alpaca", "sharegpt": "ShareGPT", "messages": "OpenAI messages"}


def record_format(item: object) -> str:
    """``alpaca``, ``sharegpt`` or ``messages``, by the keys of one record."""
    if isinstance(item, dict):
        for name, (key, _, _) in FORMATS.items():
            if key in item:
                return name
    return "alpaca"


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
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except ValueError:
        # The JSON parsed, but Python converts no integer of more than 4300 digits (by default).
        raise json.JSONDecodeError("a number with too many digits", text, 0) from None


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
    kind = record_format(items[0]) if items else "alpaca"
    records, unanswered = [], 0
    for index, item in enumerate(items):
        this = record_format(item)
        if this != kind:
            raise DataError(
                f"{path}, record {index}: the record is {FORMAT_NAMES[this]} but record 0 is "
                f"{FORMAT_NAMES[kind]}; keep one format per file (split the file)"
            )
        if kind == "alpaca":
            records.append(_to_record(item, path, index, cleaning))
            continue
        system, messages = read_messages(item, kind, f"{path}, record {index}", cleaning, index)
        records.append(conversation_record(system, messages, f"{path}, record {index}"))
        unanswered += records[-1].unanswered
    if not records:
        raise DataError(f"{path}: the file holds no records")
    if cleaning.summary():
        logger.warning(cleaning.summary())
    if unanswered:
        logger.info(
            "%s: %d conversation(s) end with a user turn, which has no answer to train on", path, unanswered
        )
    return records


def read_messages(
    item: object, kind: str, where: str, cleaning: TextCleaning, index: int
) -> tuple[str | None, list[tuple[str, str]]]:
    """A ShareGPT or messages record as ``(system prompt or None, [(role, text), ...])`` with roles
    ``user``/``assistant`` in order from a user turn; the last turn may be either."""
    key, role_key, text_key = FORMATS[kind]
    _check_object(item, where, f"an object with {key!r}")
    turns = item[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: {key!r} must be a non-empty list of {{{role_key!r}: ..., {text_key!r}: ...}} objects"
        )
    system = None
    if kind == "sharegpt" and item.get("system") is not None:
        system = _text(item["system"], f"{where}: 'system'", cleaning, index)
    messages: list[tuple[str, str]] = []
    for number, turn in enumerate(turns):
        at = f"{where}, turn {number}"
        _check_object(turn, at, f"an object with {role_key!r} and {text_key!r}")
        name = turn.get(role_key)
        role = ROLES[kind].get(name) if isinstance(name, str) else None
        if role is None:
            raise DataError(
                f"{at}: unknown {role_key!r} {str(name)[:40]!r}; use one of {', '.join(ROLES[kind])}"
            )
        text = _text(turn.get(text_key), f"{at}: {text_key!r}", cleaning, index, missing=text_key not in turn)
        if role == "system":
            if number != 0:
                raise DataError(
                    f"{at}: a system turn after the first turn; only the first turn may be the system prompt"
                )
            if system is not None:
                raise DataError(f"{at}: a system turn and a 'system' field both; keep one")
            system = text
            continue
        expected = "user" if not messages or messages[-1][0] == "assistant" else "assistant"
        if role != expected:
            if not messages:
                problem = "the conversation opens with an assistant turn; it must open with a user turn"
            else:
                problem = (
                    f"two {role} turns running (turns {number - 1} and {number}); merge them or fix the roles"
                )
            raise DataError(f"{at}: {problem}")
        messages.append((role, text))
    if not messages:
        raise DataError(f"{where}: the conversation holds only a system turn; add user and assistant turns")
    return system, messages


def conversation_record(system: str | None, messages: list[tuple[str, str]], where: str) -> Record:
    unanswered = messages[-1][0] == "user"
    if unanswered:
        messages = messages[:-1]
    if not messages:
        raise DataError(
            f"{where}: the conversation has no assistant turn, so nothing to train on; add the answer"
        )
    texts = [text for _, text in messages]
    history = tuple(zip(texts[0:-2:2], texts[1:-2:2], strict=True))
    return Record(texts[-2], "", texts[-1], system, history, unanswered)


def _check_object(item: object, where: str, expected: str) -> None:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected {expected}, found {type(item).__name__}")
    if isinstance(item, _Object) and item.duplicated:
        raise DataError(
            f"{where}: key {item.duplicated[0]!r} appears twice; JSON readers disagree on which value wins, "
            "so remove one"
        )


def _text(value: object, where: str, cleaning: TextCleaning, index: int, missing: bool = False) -> str:
    """One text of a conversation: a non-empty string, cleaned by the policy of ``text``."""
    if not isinstance(value, str):
        found = "missing" if missing else f"a {type(value).__name__}" if value is not None else "null"
        raise DataError(f"{where} must be a string, found {found}")
    try:
        text = cleaning.clean(value, f"record {index}")
    except UnencodableText as exc:
        raise DataError(f"{where} {exc}") from None
    if not text.strip():
        raise DataError(f"{where} is empty; give it text or remove the turn")
    return text


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
    system = None
    if item.get("system") is not None:
        system = _text(item["system"], f"{where}: 'system'", cleaning, index)
    history = item.get("history")
    pairs = []
    if history is not None:
        if not isinstance(history, list):
            raise DataError(
                f"{where}: 'history' must be a list of [user, assistant] pairs, found {type(history).__name__}"
            )
        for number, pair in enumerate(history):
            at = f"{where}, history turn {number}"
            if not isinstance(pair, list) or len(pair) != 2:
                raise DataError(f"{at}: expected a [user, assistant] pair of strings, found {_shape(pair)}")
            pairs.append(
                tuple(
                    _text(text, f"{at}: the {side} text", cleaning, index)
                    for side, text in zip(("user", "assistant"), pair, strict=True)
                )
            )
    return Record(**values, system=system, history=tuple(pairs))


def _shape(value: object) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def load_dataset_dir(dataset_dir: str | Path) -> list[Record]:
    return [record for path in find_data_files(dataset_dir) for record in load_records(path)]
