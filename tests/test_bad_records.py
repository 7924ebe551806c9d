"""Skipping bad records: the collector, the loaders under both policies, pre-training files, preview,
and the real ShareGPT sample with its malformed conversations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_RECORDS, shared_path, write_json

from llama_sft.data import pretrain
from llama_sft.data.encode import IGNORE_INDEX
from llama_sft.data.pretrain import build_blocks, find_text_files
from llama_sft.data.records import (
    REASONS,
    BadRecords,
    DataError,
    Record,
    RecordError,
    conversation_record,
    find_data_files,
    load_dataset_dir,
    load_numbered,
    load_records,
    read_messages,
)
from llama_sft.data.text import TextCleaning

CORPUS = Path(__file__).parent / "bad_inputs"
# Files of the bad-input corpus that load fine (they fail later, at encoding).
LOADABLE = {"prompt_fills_max_seq_length.jsonl"}

TRUNCATED = b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp'


def test_stop_raises_the_message_and_counts_nothing():
    bad = BadRecords()
    with pytest.raises(DataError) as error:
        bad.add("a.json", "empty text", "a.json, record 3: 'output' is empty")
    assert str(error.value) == "a.json, record 3: 'output' is empty"
    assert type(error.value) is DataError and bad.total == 0
    bad.check(10)
    assert bad.report_lines() == []


def test_skip_counts_by_reason_and_keeps_three_examples():
    bad = BadRecords("skip", 0.5)
    for index in range(5):
        bad.add("a.json", "opens with assistant turn", f"a.json, record {index}, turn 0: opens")
    bad.add(Path("b.jsonl"), "invalid JSON", "b.jsonl, line 2: invalid JSON")
    bad.check(14)
    assert bad.to_dict() == {
        "on_bad_records": "skip",
        "max_bad_fraction": 0.5,
        "bad": 6,
        "kept": 14,
        "by_reason": {"opens with assistant turn": 5, "invalid JSON": 1},
        "examples": {
            "opens with assistant turn": [f"a.json, record {i}, turn 0: opens" for i in range(3)],
            "invalid JSON": ["b.jsonl, line 2: invalid JSON"],
        },
        "files": ["a.json", "b.jsonl"],
    }
    assert bad.report_lines() == [
        "--on_bad_records skip: skipped 6 bad records of 20 (30.0%), kept 14:",
        "  5 opens with assistant turn, such as:",
        "    a.json, record 0, turn 0: opens",
        "    a.json, record 1, turn 0: opens",
        "    a.json, record 2, turn 0: opens",
        "  1 invalid JSON, such as:",
        "    b.jsonl, line 2: invalid JSON",
    ]
    with pytest.raises(ValueError, match="unknown bad-record reason"):
        bad.add("a.json", "some new reason", "a.json, record 9: ?")


def test_check_stops_when_too_much_or_everything_is_bad():
    bad = BadRecords("skip", 0.25)
    for name in ("a.json", "b.json", "c.json", "d.json", "e.json"):
        bad.add(name, "empty text", f"{name}, record 0: 'output' is empty")
    bad.check(15)  # 5 of 20: exactly the limit
    with pytest.raises(DataError) as error:
        bad.check(14)
    message = str(error.value)
    assert message.startswith(
        "a.json, b.json, c.json and 2 more: 5 of 19 records are bad (26.3%: 5 empty text)"
    )
    assert "fix the records or raise --max_bad_fraction" in message and "\n" not in message
    assert message.endswith("The first: a.json, record 0: 'output' is empty")
    with pytest.raises(DataError, match=r"all 5 records are bad \(5 empty text\), so none is left"):
        bad.check(0)
    everything = BadRecords("skip", 1.0)
    everything.add("a.json", "unreadable file", "a.json: invalid JSON")
    with pytest.raises(DataError, match=r"^a.json: all 1 records are bad"):
        everything.check(0)


def test_bad_settings_and_merging():
    with pytest.raises(DataError, match=r"--on_bad_records 'drop': use one of stop, skip"):
        BadRecords("drop")
    with pytest.raises(DataError, match=r"--max_bad_fraction 1.5: give a fraction from 0 to 1"):
        BadRecords("skip", 1.5)
    first, second = BadRecords("skip"), BadRecords("skip")
    for index in range(2):
        first.add("a.txt", "no text field", f"a.txt, line {index}: no text")
        second.add("b.txt", "no text field", f"b.txt, line {index}: no text")
    second.add("b.txt", "unreadable file", "b.txt: not valid UTF-8")
    first.merge(second.to_dict())
    assert first.counts == {"no text field": 4, "unreadable file": 1}
    assert first.examples["no text field"] == [
        "a.txt, line 0: no text",
        "a.txt, line 1: no text",
        "b.txt, line 0: no text",
    ]
    assert first.files == ["a.txt", "b.txt"]


def test_a_truncated_file_among_good_ones(tmp_path):
    data = tmp_path / "data"
    write_json(data / "a.json", SMALL_RECORDS[:6])
    (data / "b.json").write_bytes(TRUNCATED)
    (data / "c.jsonl").write_text("\n".join(json.dumps(r) for r in SMALL_RECORDS[6:9]) + "\n")
    with pytest.raises(DataError) as stopped:
        load_dataset_dir(data)
    assert str(stopped.value) == (
        f"{data / 'b.json'}: invalid JSON at line 1, column 60 (Unterminated string starting at); "
        "the file must be one JSON list of records"
    )
    bad = BadRecords("skip")
    records = load_dataset_dir(data, bad)
    bad.check(len(records))
    assert records == load_records(data / "a.json") + load_records(data / "c.jsonl") and len(records) == 9
    assert bad.counts == {"unreadable file": 1}
    assert bad.examples["unreadable file"] == [str(stopped.value)]
    assert bad.files == [str(data / "b.json")]


def test_skipped_lines_and_records_keep_their_index(tmp_path):
    path = tmp_path / "talks.jsonl"
    talk = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    lines = [
        json.dumps({"instruction": "a stray Alpaca record", "output": "x"}),
        json.dumps(talk),
        '{"conversations": [',
        "",
        json.dumps({"conversations": [{"from": "gpt", "value": "hello"}]}),
        json.dumps(talk),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"talks.jsonl, line 3: invalid JSON"):
        load_records(path)
    bad = BadRecords("skip")
    assert load_numbered(path, bad) == [(1, Record("q", "", "a")), (4, Record("q", "", "a"))]
    # Most records are ShareGPT, so the stray first one is what the file's format check counts.
    assert bad.examples == {
        "mixed formats": [
            f"{path}, record 0: the record is Alpaca but record 1 is ShareGPT; keep one format per file "
            "(split the file)"
        ],
        "invalid JSON": [f"{path}, line 3: invalid JSON (Expecting value); fix or remove that line"],
        "opens with assistant turn": [
            f"{path}, record 3, turn 0: the conversation opens with an assistant turn; "
            "it must open with a user turn"
        ],
    }


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".json", ".jsonl") and p.name not in LOADABLE),
)
def test_skip_counts_what_stop_raises_in_the_same_words(tmp_path, name):
    path = tmp_path / name
    shutil.copyfile(CORPUS / name, path)
    with pytest.raises(DataError) as stopped:
        load_records(path)
    bad = BadRecords("skip")
    kept = load_records(path, bad)
    assert bad.total >= 1 and set(bad.counts) <= set(REASONS)
    messages = [m for shown in bad.examples.values() for m in shown]
    assert str(stopped.value) in messages
    assert all("\n" not in m and m.startswith(str(path)) for m in messages)
    assert len(kept) + bad.total <= _item_count(path)


def _item_count(path: Path) -> int:
    """How many records a file offers to count: its list's items, or its non-blank lines; one for a
    file that holds no list."""
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
        return len(items) if isinstance(items, list) and items else 1
    except (UnicodeDecodeError, json.JSONDecodeError):
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        return max(1, len(lines))


TXT = "Hello world.\n机器学习是人工智能的一个分支。\n"


def _stream(tokenizer, documents: list[str]) -> list[int]:
    return [t for doc in documents for t in tokenizer.encode(doc) + [tokenizer.eos_id]]


def test_an_undecodable_text_file_among_good_ones(tokenizer, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TXT, encoding="utf-8")
    # Good lines first, so some of the file is tokenized and written before the bad byte is met.
    (data / "b.txt").write_bytes(("今天天气很好。\n" * 5).encode() + b"caf\xe9 au lait\n")
    (data / "c.jsonl").write_text('{"text": "Summarize the text."}\n{"txt": "no text"}\n{"text": "Hi."}\n')
    monkeypatch.setattr(pretrain, "_BATCH_DOCUMENTS", 2)
    files = find_text_files(data)
    with pytest.raises(DataError) as stopped:
        build_blocks(files, tokenizer, 3, tmp_path / "cache")
    assert str(stopped.value) == (
        f"{data / 'b.txt'}: not valid UTF-8 at byte 113 (line 6); re-save the file as UTF-8"
    )
    bad = BadRecords("skip")
    dataset, stats, cached = build_blocks(files, tokenizer, 3, tmp_path / "cache", bad=bad)
    bad.check(stats.documents)
    stream = _stream(
        tokenizer, ["Hello world.", "机器学习是人工智能的一个分支。", "Summarize the text.", "Hi."]
    )
    assert not cached and (stats.files, stats.documents, stats.tokens) == (2, 4, len(stream))
    assert np.asarray(dataset.tokens).tolist() == stream[: stats.blocks * 3]
    assert bad.counts == {"unreadable file": 1, "no text field": 1}
    assert bad.examples["unreadable file"] == [str(stopped.value)]
    assert bad.examples["no text field"][0].startswith(f'{data / "c.jsonl"}, line 2: no "text" string')
    # From the cache the counts are the same; a stopping run is not served the skipping run's blocks.
    again = BadRecords("skip")
    _, stats_again, cached = build_blocks(files, tokenizer, 3, tmp_path / "cache", bad=again)
    assert cached and stats_again == stats and again.to_dict() == {**bad.to_dict(), "kept": None}
    with pytest.raises(DataError, match="not valid UTF-8"):
        build_blocks(files, tokenizer, 3, tmp_path / "cache", bad=BadRecords("stop"))
    # Without a cache the same.
    uncached = BadRecords("skip")
    alone, _, _ = build_blocks(files, tokenizer, 3, None, bad=uncached)
    assert alone[0] == dataset[0] and uncached.counts == bad.counts


def test_pretraining_text_all_bad_or_empty(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"\xff\xfe\n")
    (data / "b.jsonl").write_text('{"txt": 1}\n')
    (data / "c.txt").write_text("  \n")
    bad = BadRecords("skip")
    with pytest.raises(
        DataError, match=r"all 3 records are bad \(1 unreadable file, 1 no text field, 1 empty file\)"
    ):
        build_blocks(find_text_files(data), tokenizer, 3, tmp_path / "cache", bad=bad)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]


def _real_sample() -> Path:
    return shared_path("data/sharegpt_en_sample.json")


def test_real_sharegpt_sample_skipped_and_counted():
    path = _real_sample()
    items = json.loads(path.read_text())
    bad = BadRecords("skip")
    bad.EXAMPLES = len(items)  # keep every message, to compare them all with the stop wording
    records = load_records(path, bad)
    bad.check(len(records))
    assert len(records) + bad.total == len(items) == 1000
    assert bad.counts == {"opens with assistant turn": 357, "empty text": 2, "turns out of order": 2}
    assert (
        bad.report_lines()[0] == "--on_bad_records skip: skipped 361 bad records of 1000 (36.1%), kept 639:"
    )
    # Each record alone, stopped at: the same message as skipping counted, record for record.
    stopped = []
    for index, item in enumerate(items):
        try:
            where = f"{path}, record {index}"
            conversation_record(*read_messages(item, "sharegpt", where, TextCleaning("x"), index), where)
        except RecordError as exc:
            stopped.append((exc.reason, str(exc)))
    assert sorted(stopped) == sorted((r, m) for r, shown in bad.examples.items() for m in shown)
    with pytest.raises(DataError) as first:
        load_records(path)
    assert str(first.value) == bad.examples["opens with assistant turn"][0] == stopped[0][1]


def test_preview_of_the_real_sample_trains_every_assistant_turn(tmp_path, capsys):
    from llama_sft.tools.preview import main as preview_main

    path = _real_sample()
    tokenizer_dir = shared_path("tokenizers/chinese-llama-2")
    argv = ["--tokenizer_name_or_path", str(tokenizer_dir), "--dataset_dir", str(path),
            "--prompt_template", "llama2-chat"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        preview_main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith(
        f"error: {path}, record 0, turn 0: the conversation opens"
    )
    seen = tmp_path / "seen.jsonl"
    preview_main([*argv, "--on_bad_records", "skip", "--num_records", "1000", "--max_seq_length", "8192",
                  "--output_file", str(seen)])  # fmt: skip
    report = capsys.readouterr().err.splitlines()
    assert report[0] == "--on_bad_records skip: skipped 361 bad records of 1000 (36.1%), kept 639:"
    assert "  357 opens with assistant turn, such as:" in report
    kept = dict(load_numbered(path, BadRecords("skip")))
    examples = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [e["index"] for e in examples] == list(kept) and len(examples) == 639
    for example in examples:
        trained = [label != IGNORE_INDEX for label in example["labels"]]
        spans = sum(1 for i, on in enumerate(trained) if on and (i == 0 or not trained[i - 1]))
        assert example["status"] == "whole" and spans == len(kept[example["index"]].turns), example["index"]
    with pytest.raises(SystemExit) as exit_:
        preview_main([*argv, "--on_bad_records", "skip", "--max_bad_fraction", "0.3"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "361 of 1000 records are bad (36.1%" in error
    assert "error: " in error and "raise --max_bad_fraction" in error


def test_good_data_counts_nothing(data_dir):
    files = find_data_files(data_dir / "train")
    bad = BadRecords("skip")
    assert [r for f in files for r in load_records(f, bad)] == load_dataset_dir(data_dir / "train")
    assert bad.total == 0
