"""Preference pairs for ``llama-sft dpo``: data files -> prompt, chosen and rejected ids -> batches.

Contract: ``load_pairs(path, tokenizer, template, max_seq_length, bad) -> (pairs, PairStats)`` reads
one ``.json``/``.jsonl`` file, ``load_pair_dir`` the data files of a folder in the order of
``records.find_data_files``. A file holds pairs of one format, told by the first record's keys:

* Alpaca: ``instruction``, optional ``input``, ``system`` and ``history`` as for SFT, and the two
  answers ``chosen`` and ``rejected``.
* Conversation: ``conversations`` (ShareGPT) or ``messages`` (OpenAI) holding the conversation so
  far, which ends with a user turn, and ``chosen``/``rejected``: each an assistant message of the
  same style, or a string.
* Prompt: ``prompt``, a string (with an optional ``system`` string) or a list of messages ending
  with a user turn; ``chosen``/``rejected`` a string, an assistant message, or a list of one.

The conversation is read by ``records.read_messages``/``conversation_record``, so its rules are
SFT's. Each answer is laid out as the last answer of an SFT record, by SFT's own functions
(``templates.exchanges``/``exchange_ids``, ``encode.layout``, which masks), and the ids are split
where its trained span starts: ``PreferencePair.prompt`` is ``[BOS] +`` the whole rendered
conversation before the answer (masked), ``chosen``/``rejected`` the answer ids and the template's
end-of-turn id (trained): the ids ``encode.encode_record`` gives with ``train_on_turns="last"``. The
prompt is kept whole; answers longer than the room ``max_seq_length`` leaves are cut (their
end-of-turn lost; counted).

Bad records follow ``records.BadRecords``: besides what SFT refuses, a missing or empty answer, two
answers of the same tokens, a conversation ending with an assistant turn, and a prompt that leaves
no room for one answer token raise ``DataError`` naming the file and record (stop), or are counted
by reason (skip; the caller ends with ``bad.check(len(pairs))``).

``collate_pairs`` stacks a batch: chosen rows first, then rejected rows in the same order.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .collate import Collator
from .encode import IGNORE_INDEX, layout
from .records import (
    FORMATS,
    ROLES,
    SKIPPED,
    BadRecords,
    Record,
    RecordError,
    alpaca_record,
    check_object,
    conversation_record,
    file_format,
    find_data_files,
    read_items,
    read_messages,
    record_format,
    record_text,
)
from .templates import Template, exchange_ids, exchanges
from .text import TextCleaning
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

ANSWERS = ("chosen", "rejected")
_SPACE = re.compile(r"\s*")
FORMAT_NAMES = {
    "alpaca": "Alpaca (instruction/chosen/rejected)",
    "sharegpt": "ShareGPT (conversations/chosen/rejected)",
    "messages": "OpenAI messages (messages/chosen/rejected)",
    "prompt": "prompt/chosen/rejected",
}


@dataclass(frozen=True)
class PreferenceRecord:
    """A validated record: the prompt as an SFT record without its answer, and the two answers."""

    record: Record
    chosen: str
    rejected: str


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    # An answer was cut to fit max_seq_length (its end-of-turn id lost).
    truncated: bool = False


@dataclass
class PairStats:
    max_seq_length: int = 0
    pairs: int = 0
    truncated: int = 0
    # Pairs whose answers are the same tokens once cut: no preference is left in them.
    same_after_cut: int = 0
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    # Per pair, prompt plus the longer answer before cutting.
    full_lengths: list[int] = field(default_factory=list)

    COUNTS = ("pairs", "truncated", "same_after_cut", "prompt_tokens", "chosen_tokens", "rejected_tokens")

    def report(self, name: str) -> str:
        lengths = np.array(self.full_lengths or [0])
        p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
        return (
            f"{name}: {self.pairs} preference pairs, {self.truncated} with an answer cut to --max_seq_length "
            f"{self.max_seq_length} (its end-of-turn lost), {self.same_after_cut} of them left with the same "
            f"answer tokens (no preference to learn). Tokens: {self.prompt_tokens} prompt, "
            f"{self.chosen_tokens} chosen, {self.rejected_tokens} rejected. Prompt plus the longer answer "
            f"before cutting: p50 {p50}, p90 {p90}, p99 {p99}, max {int(lengths.max())}"
        )

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("max_seq_length", *self.COUNTS)}


def pair_format(item: object) -> str:
    """``alpaca``, ``sharegpt``, ``messages`` or ``prompt``, by the keys of one record."""
    kind = record_format(item)
    return "prompt" if kind == "alpaca" and isinstance(item, dict) and "prompt" in item else kind


def is_preference_file(path: str | Path) -> bool:
    """Whether a data file holds preference pairs: its first record has 'chosen' or 'rejected'.
    Only that record is parsed, and a file it cannot read counts as not holding pairs, so that
    the loader reads it and reports what is wrong."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return False
    start = _SPACE.match(text).end()
    if text.startswith("[", start):
        start = _SPACE.match(text, start + 1).end()
    try:
        first, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return False
    return isinstance(first, dict) and any(key in first for key in ANSWERS)


def read_pairs(path: str | Path, bad: BadRecords | None = None) -> list[tuple[int, PreferenceRecord]]:
    """The file's valid preference records, each with its index in the file."""
    path = Path(path)
    bad = bad if bad is not None else BadRecords()
    items = read_items(path, bad)
    if not items:
        return []
    cleaning = TextCleaning(str(path))
    kind, first = file_format(items, bad.skipping, pair_format)
    records = []
    for index, item in enumerate(items):
        if item is SKIPPED:
            continue
        where = f"{path}, record {index}"
        try:
            this = pair_format(item)
            if this != kind:
                raise RecordError(
                    f"{where}: the record is {FORMAT_NAMES[this]} but record {first} is "
                    f"{FORMAT_NAMES[kind]}; keep one format per file (split the file)",
                    "mixed formats",
                )
            records.append((index, _read_pair(item, kind, path, index, cleaning)))
        except RecordError as exc:
            bad.add(path, exc.reason, str(exc))
    if cleaning.summary():
        logger.warning(cleaning.summary())
    return records


def _read_pair(item: object, kind: str, path: Path, index: int, cleaning: TextCleaning) -> PreferenceRecord:
    where = f"{path}, record {index}"
    check_object(item, where, "an object with 'chosen' and 'rejected' answers")
    if kind == "alpaca":
        record = alpaca_record(item, path, index, cleaning, output="")
    elif kind in FORMATS:
        record = _prompt_record(*read_messages(item, kind, where, cleaning, index), where)
    else:
        prompt = item["prompt"]
        if isinstance(prompt, list) and prompt:
            style = _message_style(prompt[0])
            # The list is read as a conversation of its style, so its turn rules are SFT's.
            turns = {FORMATS[style][0]: prompt}
            record = _prompt_record(
                *read_messages(turns, style, f"{where}, 'prompt'", cleaning, index), where
            )
        elif isinstance(prompt, str) or prompt is None:
            text = record_text(prompt, f"{where}: 'prompt'", cleaning, index)
            system = item.get("system")
            system = None if system is None else record_text(system, f"{where}: 'system'", cleaning, index)
            record = Record(text, "", "", system)
        else:
            raise RecordError(
                f"{where}: 'prompt' must be a string or a non-empty list of messages, found "
                f"{'an empty list' if isinstance(prompt, list) else type(prompt).__name__}",
                "not a string",
            )
    style = kind if kind in FORMATS else None
    chosen, rejected = (_answer(item, key, style, where, cleaning, index) for key in ANSWERS)
    return PreferenceRecord(record, chosen, rejected)


def _message_style(message: object) -> str:
    return "sharegpt" if isinstance(message, dict) and "from" in message else "messages"


def _prompt_record(system: str | None, messages: list[tuple[str, str]], where: str) -> Record:
    """The conversation before the answers as an SFT record whose answer is still empty."""
    if messages[-1][0] == "assistant":
        raise RecordError(
            f"{where}: the conversation ends with an assistant turn; a preference record's conversation "
            "ends with the user turn that 'chosen' and 'rejected' answer: remove the last answer or move it "
            "to 'chosen'",
            "ends with assistant turn",
        )
    return conversation_record(system, [*messages, ("assistant", "")], where)


def _answer(item: dict, key: str, style: str | None, where: str, cleaning: TextCleaning, index: int) -> str:
    """One answer's text: a string, an assistant message (of the file's style in a conversation
    file), or a list of one such message."""
    at = f"{where}: {key!r}"
    value = item.get(key)
    if value is None:
        problem = f"{key!r} is null" if key in item else f"missing {key!r}"
        if not any(answer in item for answer in ANSWERS):
            problem = "no 'chosen' or 'rejected' answer (is this SFT data, for llama-sft train?)"
        raise RecordError(
            f"{where}: {problem}; a preference record needs a 'chosen' and a 'rejected' answer",
            "missing field",
        )
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(
                f"{at} is a list of {len(value)}; give one assistant message (or a string)", "not a string"
            )
        value = value[0]
    missing = False
    if isinstance(value, dict):
        style = style or _message_style(value)
        _, role_key, text_key = FORMATS[style]
        check_object(value, at, f"an object with {role_key!r} and {text_key!r}")
        name = value.get(role_key)
        if (ROLES[style].get(name) if isinstance(name, str) else None) != "assistant":
            roles = " or ".join(repr(role) for role, means in ROLES[style].items() if means == "assistant")
            raise RecordError(
                f"{at}: {role_key!r} is {str(name)[:40]!r}; an answer is an assistant message: give it "
                f"{role_key!r} {roles}",
                "unknown role",
            )
        value, at, missing = value.get(text_key), f"{at}: {text_key!r}", text_key not in value
    if isinstance(value, str) and not value.strip():
        raise RecordError(
            f"{at} is empty; a preference record needs two non-empty answers: write it or remove the record",
            "empty text",
        )
    return record_text(value, at, cleaning, index, missing=missing)


def _check_turns(pair: PreferenceRecord, template: Template, where: str) -> None:
    if pair.record.history and not template.multi_turn:
        raise RecordError(
            f"{where}: the prompt holds {len(pair.record.history)} earlier exchange(s) but the prompt template "
            f"{template.name!r} has no multi-turn format; use a multi-turn --prompt_template (alpaca, "
            "llama2-chat) or leave the earlier turns out",
            "bad history",
        )


def encode_pairs(
    pairs: list[PreferenceRecord], template: Template, tokenizer: TextTokenizer
) -> list[tuple[list[int], list[int], list[int]]]:
    """The uncut ``(prompt, chosen, rejected)`` ids of each pair, as SFT lays them out: the
    conversation with one answer as its last, through ``templates.exchange_ids`` and
    ``encode.layout`` (which masks), split where its trained span, the answer and end-of-turn,
    starts. Every text is encoded once, in two batches, as ``encode.encode_records`` does."""
    laid_out = []
    for pair in pairs:
        turns = [*pair.record.history, (pair.record.full_instruction, pair.chosen)]
        conversation = exchanges(template, turns, pair.record.system)
        # The rejected answer as the layout gives it (stripped where the template trims).
        turns[-1] = (pair.record.full_instruction, pair.rejected)
        laid_out.append((conversation, exchanges(template, turns, pair.record.system)[-1]))
    prompts = iter(tokenizer.encode_batch([e.prompt for conversation, _ in laid_out for e in conversation]))
    answers = iter(
        tokenizer.encode_batch([e.answer for conversation, last in laid_out for e in (*conversation, last)])
    )
    end_id = template.end_id(tokenizer)
    after = tokenizer.encode(template.after_answer) if template.after_answer else []
    encoded = []
    for conversation, rejected in laid_out:
        earlier = [
            exchange_ids(e, tokenizer, end_id, after, next(prompts), next(answers)) for e in conversation[:-1]
        ]
        last_prompt = next(prompts)
        sides = []
        for exchange in (conversation[-1], rejected):
            last = exchange_ids(exchange, tokenizer, end_id, after, last_prompt, next(answers))
            ids, labels, _, _ = layout([*earlier, last], sys.maxsize, "last")
            trained = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
            sides.append((ids[: trained[0]], ids[trained[0] : trained[-1] + 1]))
        (prompt, chosen), (_, rejected_ids) = sides
        encoded.append((prompt, chosen, rejected_ids))
    return encoded


def fit_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_seq_length: int, where: str
) -> tuple[PreferencePair, int]:
    """The pair with its answers cut to the room the prompt leaves, and the length of prompt plus
    the longer answer before cutting."""
    if chosen == rejected:
        raise RecordError(
            f"{where}: 'chosen' and 'rejected' encode to the same tokens, so there is no preference to learn; "
            "fix one answer or remove the record",
            "same answers",
        )
    room = max_seq_length - len(prompt)
    if room <= 0:
        raise RecordError(
            f"{where}: the prompt alone takes {len(prompt)} tokens, leaving no room for an answer in "
            f"--max_seq_length {max_seq_length}; raise --max_seq_length or shorten the prompt (or its history)",
            "prompt fills max_seq_length",
        )
    full = len(prompt) + max(len(chosen), len(rejected))
    return PreferencePair(prompt, chosen[:room], rejected[:room], full > max_seq_length), full


def load_numbered_pairs(
    path: str | Path,
    tokenizer: TextTokenizer,
    template: Template,
    max_seq_length: int,
    bad: BadRecords | None = None,
    stats: PairStats | None = None,
) -> list[tuple[int, PreferencePair]]:
    """As ``load_pairs``, each pair with its record's index in the file; counts go to ``stats``."""
    path = Path(path)
    bad = bad if bad is not None else BadRecords()
    stats = stats if stats is not None else PairStats(max_seq_length)
    records = []
    for index, record in read_pairs(path, bad):
        try:
            _check_turns(record, template, f"{path}, record {index}")
        except RecordError as exc:
            bad.add(path, exc.reason, str(exc))
            continue
        records.append((index, record))
    encoded = encode_pairs([record for _, record in records], template, tokenizer)
    pairs = []
    for (index, _), ids in zip(records, encoded, strict=True):
        try:
            pair, full = fit_pair(*ids, max_seq_length, f"{path}, record {index}")
        except RecordError as exc:
            bad.add(path, exc.reason, str(exc))
            continue
        pairs.append((index, pair))
        stats.pairs += 1
        stats.truncated += pair.truncated
        stats.same_after_cut += pair.chosen == pair.rejected
        stats.prompt_tokens += len(pair.prompt)
        stats.chosen_tokens += len(pair.chosen)
        stats.rejected_tokens += len(pair.rejected)
        stats.full_lengths.append(full)
    return pairs


def load_pairs(
    path: str | Path,
    tokenizer: TextTokenizer,
    template: Template,
    max_seq_length: int,
    bad: BadRecords | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """The pairs of one data file. ``bad`` None stops at the first bad record with its ``DataError``."""
    stats = PairStats(max_seq_length)
    numbered = load_numbered_pairs(path, tokenizer, template, max_seq_length, bad, stats)
    return [pair for _, pair in numbered], stats


def load_pair_dir(
    dataset_dir: str | Path,
    tokenizer: TextTokenizer,
    template: Template,
    max_seq_length: int,
    bad: BadRecords | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """The pairs of every data file of a folder (or of one file), in ``find_data_files`` order."""
    stats, pairs = PairStats(max_seq_length), []
    for path in find_data_files(dataset_dir):
        pairs += [
            pair for _, pair in load_numbered_pairs(path, tokenizer, template, max_seq_length, bad, stats)
        ]
    return pairs, stats


def collate_pairs(
    pairs: list[PreferencePair], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of shape ``(2B, L)``: rows ``0..B-1`` are
    prompt + chosen, rows ``B..2B-1`` prompt + rejected, right-padded; labels are -100 on the
    prompt and the padding, the answer ids elsewhere."""
    examples = [
        {"input_ids": pair.prompt + answer, "labels": [IGNORE_INDEX] * len(pair.prompt) + answer}
        for side in ANSWERS
        for pair in pairs
        for answer in (getattr(pair, side),)
    ]
    return Collator(pad_id, pad_to_multiple_of)(examples)
