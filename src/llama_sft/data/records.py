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

Bad records: ``load_records(path, bad)`` takes a ``BadRecords`` collector. Under its ``stop`` policy
(the default, and what ``bad=None`` means) the first bad record raises the one-line ``DataError``;
under ``skip`` each bad record is left out and counted by a short reason key (``REASONS``), and the
caller ends with ``bad.check(kept)``, which stops when nothing is left or too much was bad.
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


class RecordError(DataError):
    """One bad record, or a data file that cannot be read as records at all: what ``BadRecords``
    counts. ``reason`` is one of ``REASONS``; the message is the one ``stop`` raises."""

    def __init__(self, message: str, reason: str = "bad record"):
        super().__init__(message)
        self.reason = reason


POLICIES = ("stop", "skip")
# The reason keys, stable because data_stats.json and scripts reading it use them.
REASONS = (
    "unreadable file",  # not UTF-8, not JSON, or JSON but not a list of records: counted once
    "empty file",  # a file with no records, or no text
    "invalid JSON",  # one line of a JSON Lines file
    "mixed formats",  # a record of another format than the file's
    "not an object",  # a record or a turn that is not a JSON object
    "duplicate key",
    "missing field",  # instruction/output, or a turn's text, missing or null
    "not a string",
    "empty text",
    "unencodable text",  # holds NUL (see text.clean_text)
    "bad history",  # Alpaca 'history' not a list of [user, assistant] pairs
    "no turns",  # 'conversations'/'messages' not a non-empty list
    "unknown role",
    "misplaced system turn",  # a system turn after the first, or besides a 'system' field
    "opens with assistant turn",
    "turns out of order",  # two user or two assistant turns in a row
    "no assistant turn",
    "no text field",  # a pre-training JSON line without a "text" string
    # Preference pairs (preference.py):
    "ends with assistant turn",  # a prompt must end with the user turn that both answers answer
    "same answers",  # 'chosen' and 'rejected' give the same tokens
    "prompt fills max_seq_length",  # no room left for even one answer token
)


class BadRecords:
    """What loading does with bad records, and the count of those it left out.

    ``policy`` ``stop``: ``add`` raises the record's one-line ``DataError``. ``skip``: ``add``
    counts the record under its reason and keeps the first ``EXAMPLES`` messages of each reason.
    What is counted, one each: a record of a file's list, a line of a JSON Lines file (pre-training:
    a document's line), and a whole file that cannot be read as records (not UTF-8, not JSON, not a
    list), whatever it held, since how many records it had is unknown. Files that cannot be opened
    at all (missing, no permission) still stop: they are a setup problem, not bad data.
    """

    EXAMPLES = 3

    def __init__(self, policy: str = "stop", max_fraction: float = 0.5):
        if policy not in POLICIES:
            raise DataError(f"--on_bad_records {policy!r}: use one of {', '.join(POLICIES)}")
        if not 0 <= max_fraction <= 1:
            raise DataError(f"--max_bad_fraction {max_fraction}: give a fraction from 0 to 1, such as 0.1")
        self.policy, self.max_fraction = policy, max_fraction
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.files: list[str] = []
        # Records left after loading, as the last ``check`` was told; None before it.
        self.kept: int | None = None

    @property
    def skipping(self) -> bool:
        return self.policy == "skip"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, file: str | Path, reason: str, message: str) -> None:
        """One bad record (or unreadable file) of ``file``: raises under ``stop``, counts under ``skip``."""
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        if not self.skipping:
            raise DataError(message) from None
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.EXAMPLES:
            shown.append(message)
        if str(file) not in self.files:
            self.files.append(str(file))

    def merge(self, saved: dict) -> None:
        """Adds the counts of another collector's ``to_dict`` (a cached build's, say)."""
        for reason, count in saved.get("by_reason", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        for reason, messages in saved.get("examples", {}).items():
            shown = self.examples.setdefault(reason, [])
            shown.extend(messages[: self.EXAMPLES - len(shown)])
        self.files.extend(f for f in saved.get("files", []) if f not in self.files)

    def check(self, kept: int) -> None:
        """After loading, with ``kept`` records left: raises when none is left after skipping, or
        when more than ``max_fraction`` of all counted records were bad."""
        self.kept = kept
        bad = self.total
        if not bad:
            return
        seen = bad + kept
        if kept and bad / seen <= self.max_fraction:
            return
        files = ", ".join(self.files[:3]) + (
            f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        )
        reasons = ", ".join(f"{count} {reason}" for reason, count in self._by_count())
        first = self.examples[self._by_count()[0][0]][0]
        if not kept:
            raise DataError(
                f"{files}: all {bad} records are bad ({reasons}), so none is left to train on; fix the "
                f"records, the first being: {first}"
            )
        raise DataError(
            f"{files}: {bad} of {seen} records are bad ({bad / seen:.1%}: {reasons}), more than "
            f"--max_bad_fraction {self.max_fraction}; fix the records or raise --max_bad_fraction. "
            f"The first: {first}"
        )

    def to_dict(self) -> dict:
        return {
            "on_bad_records": self.policy,
            "max_bad_fraction": self.max_fraction,
            "bad": self.total,
            "kept": self.kept,
            "by_reason": dict(self._by_count()),
            "examples": {reason: list(self.examples[reason]) for reason, _ in self._by_count()},
            "files": list(self.files),
        }

    def report_lines(self) -> list[str]:
        """For the log: a head line, then each reason's count and examples. Empty when nothing was bad."""
        bad = self.total
        if not bad:
            return []
        seen = (
            f" of {bad + self.kept} ({bad / (bad + self.kept):.1%}), kept {self.kept}"
            if self.kept is not None
            else ""
        )
        lines = [f"--on_bad_records skip: skipped {bad} bad records{seen}:"]
        for reason, count in self._by_count():
            lines.append(f"  {count} {reason}, such as:")
            lines += [f"    {message}" for message in self.examples[reason]]
        return lines

    def _by_count(self) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda pair: -pair[1])


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
        raise RecordError(
            f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); re-save the file as UTF-8",
            "unreadable file",
        ) from None


# Stands for a JSON line that was skipped, so later records keep the index the file gives them.
SKIPPED = object()


def _parse_lines(path: Path, text: str, bad: BadRecords) -> list[object]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_parse(line))
        except json.JSONDecodeError as exc:
            bad.add(
                path,
                "invalid JSON",
                f"{path}, line {number}: invalid JSON ({exc.msg}); fix or remove that line",
            )
            items.append(SKIPPED)
    return items


def _read_items(path: Path, bad: BadRecords) -> list[object]:
    """The file's records as parsed JSON. Raises ``RecordError`` for a file that holds no list of records."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        return _parse_lines(path, text, bad)
    try:
        items = _parse(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # A JSON Lines file saved as .json: every line an object is unambiguous, so read it.
            return _parse_lines(path, text, bad)
        raise RecordError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
            "the file must be one JSON list of records",
            "unreadable file",
        ) from None
    if isinstance(items, dict):
        raise RecordError(
            f"{path}: the file holds one JSON object; Alpaca data is a JSON list of records: "
            '[{"instruction": ..., "input": ..., "output": ...}, ...]',
            "unreadable file",
        )
    if not isinstance(items, list):
        raise RecordError(
            f"{path}: expected a JSON list of records, found {type(items).__name__}", "unreadable file"
        )
    return items


def file_format(items: list[object], skipping: bool, format_of=record_format) -> tuple[str, int]:
    """The file's format (``format_of`` a record) and the index of the record that sets it. Stopping,
    that is record 0; skipping, the format most objects have, so one damaged record cannot condemn
    all the others."""
    if not skipping or not items:
        return (format_of(items[0]) if items else "alpaca"), 0
    votes: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if isinstance(item, dict):
            votes.setdefault(format_of(item), []).append(index)
    if not votes:
        first = next((i for i, item in enumerate(items) if item is not SKIPPED), 0)
        return "alpaca", first
    kind = max(votes, key=lambda name: (len(votes[name]), -votes[name][0]))
    return kind, votes[kind][0]


def load_records(path: str | Path, bad: BadRecords | None = None) -> list[Record]:
    """The records of one data file. ``bad`` (None: stop at the first) decides what a bad record
    does; under ``skip`` the file's bad records are counted there and left out."""
    return [record for _, record in load_numbered(path, bad)]


def read_items(path: Path, bad: BadRecords) -> list[object]:
    """The parsed JSON records of one data file, for every reader of record files: a JSON Lines line
    that does not parse is counted by ``bad`` and stands as ``SKIPPED``, so later records keep their
    index; a file that holds no records is counted and gives []."""
    try:
        items = _read_items(path, bad)
    except RecordError as exc:
        bad.add(path, exc.reason, str(exc))
        return []
    if not items:
        bad.add(path, "empty file", f"{path}: the file holds no records")
    return items


def load_numbered(path: str | Path, bad: BadRecords | None = None) -> list[tuple[int, Record]]:
    """As ``load_records``, each record with its index in the file (skipped records keep theirs)."""
    path = Path(path)
    bad = bad if bad is not None else BadRecords()
    items = read_items(path, bad)
    if not items:
        return []
    cleaning = TextCleaning(str(path))
    kind, first = file_format(items, bad.skipping)
    records, unanswered = [], 0
    for index, item in enumerate(items):
        if item is SKIPPED:
            continue
        where = f"{path}, record {index}"
        try:
            this = record_format(item)
            if this != kind:
                raise RecordError(
                    f"{where}: the record is {FORMAT_NAMES[this]} but record {first} is "
                    f"{FORMAT_NAMES[kind]}; keep one format per file (split the file)",
                    "mixed formats",
                )
            if kind == "alpaca":
                record = alpaca_record(item, path, index, cleaning)
            else:
                system, messages = read_messages(item, kind, where, cleaning, index)
                record = conversation_record(system, messages, where)
        except RecordError as exc:
            bad.add(path, exc.reason, str(exc))
            continue
        records.append((index, record))
        unanswered += record.unanswered
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
    check_object(item, where, f"an object with {key!r}")
    turns = item[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(
            f"{where}: {key!r} must be a non-empty list of {{{role_key!r}: ..., {text_key!r}: ...}} objects",
            "no turns",
        )
    system = None
    if kind == "sharegpt" and item.get("system") is not None:
        system = record_text(item["system"], f"{where}: 'system'", cleaning, index)
    messages: list[tuple[str, str]] = []
    for number, turn in enumerate(turns):
        at = f"{where}, turn {number}"
        check_object(turn, at, f"an object with {role_key!r} and {text_key!r}")
        name = turn.get(role_key)
        role = ROLES[kind].get(name) if isinstance(name, str) else None
        if role is None:
            raise RecordError(
                f"{at}: unknown {role_key!r} {str(name)[:40]!r}; use one of {', '.join(ROLES[kind])}",
                "unknown role",
            )
        text = record_text(
            turn.get(text_key), f"{at}: {text_key!r}", cleaning, index, missing=text_key not in turn
        )
        if role == "system":
            if number != 0:
                raise RecordError(
                    f"{at}: a system turn after the first turn; only the first turn may be the system prompt",
                    "misplaced system turn",
                )
            if system is not None:
                raise RecordError(
                    f"{at}: a system turn and a 'system' field both; keep one", "misplaced system turn"
                )
            system = text
            continue
        expected = "user" if not messages or messages[-1][0] == "assistant" else "assistant"
        if role != expected:
            if not messages:
                problem = "the conversation opens with an assistant turn; it must open with a user turn"
                reason = "opens with assistant turn"
            else:
                problem = (
                    f"two {role} turns running (turns {number - 1} and {number}); merge them or fix the roles"
                )
                reason = "turns out of order"
            raise RecordError(f"{at}: {problem}", reason)
        messages.append((role, text))
    if not messages:
        raise RecordError(
            f"{where}: the conversation holds only a system turn; add user and assistant turns",
            "no assistant turn",
        )
    return system, messages


def conversation_record(system: str | None, messages: list[tuple[str, str]], where: str) -> Record:
    unanswered = messages[-1][0] == "user"
    if unanswered:
        messages = messages[:-1]
    if not messages:
        raise RecordError(
            f"{where}: the conversation has no assistant turn, so nothing to train on; add the answer",
            "no assistant turn",
        )
    texts = [text for _, text in messages]
    history = tuple(zip(texts[0:-2:2], texts[1:-2:2], strict=True))
    return Record(texts[-2], "", texts[-1], system, history, unanswered)


def check_object(item: object, where: str, expected: str) -> None:
    if not isinstance(item, dict):
        raise RecordError(f"{where}: expected {expected}, found {type(item).__name__}", "not an object")
    if isinstance(item, _Object) and item.duplicated:
        raise RecordError(
            f"{where}: key {item.duplicated[0]!r} appears twice; JSON readers disagree on which value wins, "
            "so remove one",
            "duplicate key",
        )


def record_text(value: object, where: str, cleaning: TextCleaning, index: int, missing: bool = False) -> str:
    """One text of a conversation: a non-empty string, cleaned by the policy of ``text``."""
    if not isinstance(value, str):
        found = "missing" if missing else f"a {type(value).__name__}" if value is not None else "null"
        reason = "not a string" if found.startswith("a ") else "missing field"
        raise RecordError(f"{where} must be a string, found {found}", reason)
    try:
        text = cleaning.clean(value, f"record {index}")
    except UnencodableText as exc:
        raise RecordError(f"{where} {exc}", "unencodable text") from None
    if not text.strip():
        raise RecordError(f"{where} is empty; give it text or remove the turn", "empty text")
    return text


def alpaca_record(
    item: object, path: Path, index: int, cleaning: TextCleaning, output: str | None = None
) -> Record:
    """An Alpaca record. ``output`` is the answer when the caller read it itself (a preference
    record holds 'chosen' and 'rejected' instead of 'output')."""
    where = f"{path}, record {index}"
    check_object(item, where, "an object with instruction/input/output")
    values = {} if output is None else {"output": output}
    needed = "'instruction' and 'output' strings" if output is None else "an 'instruction' string"
    for key in ("instruction", "input", "output")[: 3 if output is None else 2]:
        value = item.get(key)
        if value is None and key == "input":
            value = ""
        if value is None:
            problem = f"{key!r} is null" if key in item else f"missing {key!r}"
            raise RecordError(f"{where}: {problem}; every record needs {needed}", "missing field")
        if not isinstance(value, str):
            raise RecordError(
                f"{where}: {key!r} must be a string, found {type(value).__name__}", "not a string"
            )
        try:
            values[key] = cleaning.clean(value, f"record {index}")
        except UnencodableText as exc:
            raise RecordError(f"{where}: {key!r} {exc}", "unencodable text") from None
    if not values["instruction"].strip() and not values["input"].strip():
        raise RecordError(
            f"{where}: 'instruction' and 'input' are both empty; give the record an instruction", "empty text"
        )
    system = None
    if item.get("system") is not None:
        system = record_text(item["system"], f"{where}: 'system'", cleaning, index)
    history = item.get("history")
    pairs = []
    if history is not None:
        if not isinstance(history, list):
            raise RecordError(
                f"{where}: 'history' must be a list of [user, assistant] pairs, found {type(history).__name__}",
                "bad history",
            )
        for number, pair in enumerate(history):
            at = f"{where}, history turn {number}"
            if not isinstance(pair, list) or len(pair) != 2:
                raise RecordError(
                    f"{at}: expected a [user, assistant] pair of strings, found {_shape(pair)}", "bad history"
                )
            pairs.append(
                tuple(
                    record_text(text, f"{at}: the {side} text", cleaning, index)
                    for side, text in zip(("user", "assistant"), pair, strict=True)
                )
            )
    return Record(**values, system=system, history=tuple(pairs))


def _shape(value: object) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def load_dataset_dir(dataset_dir: str | Path, bad: BadRecords | None = None) -> list[Record]:
    return [record for path in find_data_files(dataset_dir) for record in load_records(path, bad)]
