"""Preference pairs for ``llama-sft dpo``: the three record formats give SFT's ids, answers are cut
and the prompt kept, the batch layout, the bad-input corpus under both policies, and preview."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared_path, write_json

from llama_sft.data.encode import IGNORE_INDEX, encode_record
from llama_sft.data.preference import PreferencePair, collate_pairs, load_pair_dir, load_pairs
from llama_sft.data.records import BadRecords, DataError, Record
from llama_sft.data.templates import Template, load_template, prompt_ids
from llama_sft.data.tokenizer import TextTokenizer

BAD = Path(__file__).parent / "bad_inputs" / "preference"

USER = "Translate to Chinese\nred"
HISTORY = (("hi", "hello"),)
# One pair, written in each format: a system prompt, one earlier exchange, then the question.
FORMATS = {
    "alpaca.jsonl": {
        "instruction": "Translate to Chinese",
        "input": "red",
        "system": "S",
        "history": [["hi", "hello"]],
        "chosen": "红色",
        "rejected": "蓝色",
    },
    "sharegpt.json": {
        "system": "S",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": USER},
        ],
        "chosen": {"from": "gpt", "value": "红色"},
        "rejected": "蓝色",
    },
    "messages.json": {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": USER},
        ],
        "chosen": "红色",
        "rejected": {"role": "assistant", "content": "蓝色"},
    },
    "prompt_messages.json": {
        "prompt": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": USER},
        ],
        "chosen": [{"role": "assistant", "content": "红色"}],
        "rejected": [{"role": "assistant", "content": "蓝色"}],
    },
}


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        return path
    return write_json(path, records)


def sft(tokenizer, template, instruction, answer, history=(), system=None, max_seq_length=512):
    """SFT's ids and labels of the same conversation with ``answer`` as its last answer."""
    record = Record(instruction, "", answer, system, tuple(history))
    ids, labels, _ = encode_record(record, template, tokenizer, max_seq_length, "last")
    return ids, labels


def test_every_format_gives_the_ids_sft_trains(tokenizer, tmp_path):
    template = load_template("llama2-chat")
    expected_prompt = prompt_ids(template, tokenizer, USER, HISTORY, "S")
    chosen_ids, chosen_labels = sft(tokenizer, template, USER, "红色", HISTORY, "S")
    rejected_ids, rejected_labels = sft(tokenizer, template, USER, "蓝色", HISTORY, "S")
    assert expected_prompt[0] == tokenizer.bos_id and chosen_ids[-1] == tokenizer.eos_id
    for name, record in FORMATS.items():
        pairs, stats = load_pairs(write(tmp_path / name, [record]), tokenizer, template, 512)
        (pair,) = pairs
        assert pair.prompt == expected_prompt, name
        assert pair.prompt + pair.chosen == chosen_ids, name
        assert pair.prompt + pair.rejected == rejected_ids, name
        assert not pair.truncated and stats.pairs == 1 and stats.truncated == 0
        batch = collate_pairs(pairs, tokenizer.pad_id)
        assert batch["labels"][0, : len(chosen_labels)].tolist() == chosen_labels, name
        assert batch["labels"][1, : len(rejected_labels)].tolist() == rejected_labels, name
    # A plain-string prompt is one user turn; its 'system' is the system prompt.
    plain = {"prompt": USER, "system": "S", "chosen": "红色", "rejected": "蓝色"}
    (pair,), _ = load_pairs(write(tmp_path / "prompt.json", [plain]), tokenizer, template, 512)
    assert pair.prompt + pair.chosen == sft(tokenizer, template, USER, "红色", system="S")[0]
    assert pair.prompt == prompt_ids(template, tokenizer, USER, (), "S")


def test_text_after_the_answer_bos_once_and_trimming_follow_the_template(tokenizer, tmp_path):
    template = Template(
        "bot", "<<{system_prompt}>> User: {instruction}\nBot:", followup_prompt="User: {instruction}\nBot:",
        after_answer="\n", bos="first", trim=True,
    )  # fmt: skip
    record = {**FORMATS["messages.json"], "chosen": " 红色 ", "rejected": "蓝色\n"}
    (pair,), _ = load_pairs(write(tmp_path / "p.json", [record]), tokenizer, template, 512)
    ids, labels = sft(tokenizer, template, USER, "红色", HISTORY, "S")
    start = len(pair.prompt)
    assert pair.prompt == ids[:start] == prompt_ids(template, tokenizer, USER, HISTORY, "S")
    after = tokenizer.encode("\n")
    assert pair.prompt.count(tokenizer.bos_id) == 1 and ids[-len(after) :] == after
    # The text after the answer is masked by SFT, so it is not part of the answer here.
    end = len(ids) - len(after)
    assert pair.chosen == ids[start:end] == labels[start:end] and set(labels[end:]) == {IGNORE_INDEX}
    assert pair.chosen[-1] == tokenizer.eos_id
    assert pair.prompt + pair.rejected + after == sft(tokenizer, template, USER, "蓝色", HISTORY, "S")[0]
    same = {**record, "rejected": "红色\n"}
    with pytest.raises(DataError, match="record 0: 'chosen' and 'rejected' encode to the same tokens"):
        load_pairs(write(tmp_path / "same.json", [same]), tokenizer, template, 512)


def test_answers_are_cut_and_the_prompt_kept_whole(tokenizer, tmp_path):
    template = load_template("alpaca")
    long = {
        "instruction": "Summarize the text",
        "chosen": "机器学习是人工智能的一个分支。" * 3,
        "rejected": "不知道",
    }
    path = write(tmp_path / "long.json", [long])
    (full,), _ = load_pairs(path, tokenizer, template, 512)
    assert len(full.chosen) > 6 and len(full.rejected) < len(full.chosen)
    limit = len(full.prompt) + 5
    (cut,), stats = load_pairs(path, tokenizer, template, limit)
    assert cut.prompt == full.prompt
    assert cut.chosen == full.chosen[:5] and cut.rejected == full.rejected[:5]
    assert cut.truncated and stats.truncated == 1 and tokenizer.eos_id not in cut.chosen
    assert stats.full_lengths == [len(full.prompt) + len(full.chosen)]
    assert f"1 preference pairs, 1 with an answer cut to --max_seq_length {limit}" in stats.report("train")
    # Both answers open with SentencePiece's word-start piece: cut to one token, nothing is left to prefer.
    (one,), stats = load_pairs(path, tokenizer, template, len(full.prompt) + 1)
    assert one.chosen == one.rejected == full.chosen[:1] and stats.same_after_cut == 1
    assert "1 of them left with the same answer tokens" in stats.report("train")
    with pytest.raises(DataError, match=rf"record 0: the prompt alone takes {len(full.prompt)} tokens"):
        load_pairs(path, tokenizer, template, len(full.prompt))


def test_collate_puts_chosen_rows_first_and_masks_prompt_and_padding():
    pairs = [PreferencePair([1, 5, 6], [7, 2], [8, 9, 2]), PreferencePair([1, 5], [10, 11, 12, 2], [13, 2])]
    batch = collate_pairs(pairs, pad_id=0, pad_to_multiple_of=4)
    m = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 7, 2, 0, 0, 0],
        [1, 5, 10, 11, 12, 2, 0, 0],
        [1, 5, 6, 8, 9, 2, 0, 0],
        [1, 5, 13, 2, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [m, m, m, 7, 2, m, m, m],
        [m, m, 10, 11, 12, 2, m, m],
        [m, m, m, 8, 9, 2, m, m],
        [m, m, 13, 2, m, m, m, m],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate_pairs(pairs, pad_id=0)["input_ids"].shape == (4, 6)


# Each literal bad file: where its first bad record is, what the message says, its reason key, and
# how many good pairs a skipping run keeps from it (read with the alpaca template, max_seq_length 64).
BAD_FILES = {
    "same_answers.json": ("record 1", "encode to the same tokens", "same answers", 1),
    "empty_chosen.json": ("record 0", "'chosen' is empty", "empty text", 0),
    "missing_rejected.jsonl": ("record 1", "missing 'rejected'", "missing field", 1),
    "prompt_fills_max_seq_length.json": (
        "record 1",
        "raise --max_seq_length",
        "prompt fills max_seq_length",
        1,
    ),
    "conversation_ends_with_assistant.json": (
        "record 0",
        "ends with an assistant turn",
        "ends with assistant turn",
        0,
    ),
    "answer_from_user.json": ("record 0", "'rejected': 'role' is 'user'", "unknown role", 0),
    "answer_list_of_two.json": ("record 0", "'chosen' is a list of 2", "not a string", 0),
    "prompt_not_string.json": ("record 0", "'prompt' must be a string", "not a string", 0),
    "rejected_not_string.json": ("record 0", "'rejected' must be a string", "not a string", 0),
    "mixed_formats.jsonl": ("record 1", "keep one format per file", "mixed formats", 1),
    "duplicate_key.json": ("record 0", "key 'chosen' appears twice", "duplicate key", 0),
    "history_not_pairs.json": ("record 0, history turn 0", "[user, assistant] pair", "bad history", 0),
    "conversation_two_user_turns.json": ("record 0, turn 1", "two user turns", "turns out of order", 0),
    "invalid_line.jsonl": ("line 2", "invalid JSON", "invalid JSON", 1),
    "object_not_list.json": ("", "holds one JSON object", "unreadable file", 0),
}


def test_each_bad_file_names_file_and_record_and_skipping_counts_it(tokenizer):
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_FILES)
    template = load_template("alpaca")
    for name, (where, says, reason, kept) in BAD_FILES.items():
        path = BAD / name
        with pytest.raises(DataError) as error:
            load_pairs(path, tokenizer, template, 64)
        message = str(error.value)
        assert message.startswith(f"{path}, {where}:" if where else f"{path}:"), message
        assert says in message and "\n" not in message, message
        bad = BadRecords("skip")
        pairs, stats = load_pairs(path, tokenizer, template, 64, bad)
        assert bad.counts == {reason: 1} and len(pairs) == kept == stats.pairs, name
        assert bad.examples[reason] == [message]


def test_skipping_a_folder_counts_reasons_and_checks_the_fraction(tokenizer, tmp_path):
    folder = tmp_path / "pairs"
    good = [{"instruction": f"Say {n}", "chosen": f"{n}", "rejected": "no"} for n in range(4)]
    write(folder / "good.json", good)
    for name in ("same_answers.json", "missing_rejected.jsonl", "mixed_formats.jsonl"):
        shutil.copyfile(BAD / name, folder / name)
    template = load_template("alpaca")
    bad = BadRecords("skip", max_fraction=0.2)
    pairs, stats = load_pair_dir(folder, tokenizer, template, 64, bad)
    assert len(pairs) == stats.pairs == 7
    assert bad.counts == {"missing field": 1, "mixed formats": 1, "same answers": 1}
    with pytest.raises(DataError, match=r"3 of 10 records are bad \(30.0%"):
        bad.check(len(pairs))
    # Files are read in find_data_files order: good.json's 4 pairs, then missing_rejected.jsonl's.
    (after,), _ = load_pairs(folder / "missing_rejected.jsonl", tokenizer, template, 64, BadRecords("skip"))
    assert pairs[4] == after and pairs[0] != after
    with pytest.raises(DataError, match="missing_rejected.jsonl, record 1: missing 'rejected'"):
        load_pair_dir(folder, tokenizer, template, 64)


def test_preview_shows_prompt_then_both_answers(tokenizer, tokenizer_dir, tmp_path, capsys):
    from llama_sft.tools.preview import main as preview_main

    folder = tmp_path / "d"
    pairs_file = write(folder / "a_pairs.json", [FORMATS["messages.json"]])
    sft_file = write(folder / "b_sft.json", [{"instruction": "hi", "output": "hello"}])
    argv = ["--tokenizer_name_or_path", str(tokenizer_dir), "--dataset_dir", str(folder),
            "--prompt_template", "llama2-chat", "--output_file", str(tmp_path / "seen.jsonl")]  # fmt: skip
    preview_main(argv)
    shown = capsys.readouterr().out
    (pair,), _ = load_pairs(pairs_file, tokenizer, load_template("llama2-chat"), 512)
    assert shown.startswith(
        f"=== {pairs_file}, record 0: pair whole, prompt {len(pair.prompt)} tokens, chosen "
        f"{len(pair.chosen)} trained, rejected {len(pair.rejected)} trained\n"
        "prompt: <s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST] hello</s><s>[INST] Translate to Chinese\nred [/INST]\n"
        "chosen: [[ 红色</s>]]\nrejected: [[ 蓝色</s>]]\n"
    )
    assert f"=== {sft_file}, record 0: whole" in shown and "<</SYS>>\n\nhi [/INST][[ hello</s>]]\n" in shown
    lines = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "file": str(pairs_file),
        "index": 0,
        "status": "whole",
        "prompt": pair.prompt,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }
    assert lines[1]["file"] == str(sft_file) and "labels" in lines[1]

    shutil.copyfile(BAD / "same_answers.json", folder / "a_pairs.json")
    with pytest.raises(SystemExit) as exit_:
        preview_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert (
        err
        == f"error: {folder / 'a_pairs.json'}, record 1: 'chosen' and 'rejected' encode to the same "
        + ("tokens, so there is no preference to learn; fix one answer or remove the record\n")
    )


def test_real_chinese_llama_2_tokenizer_gives_sft_ids(tmp_path):
    tokenizer = TextTokenizer.load(shared_path("tokenizers/chinese-llama-2"))
    records = json.loads(shared_path("data/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:12]
    template = load_template("alpaca")
    pairs_data = [
        {
            "instruction": r["instruction"],
            "input": r["input"],
            "chosen": r["output"],
            "rejected": other["output"],
        }
        for r, other in zip(records, records[1:], strict=False)
    ]
    pairs, stats = load_pairs(write(tmp_path / "zh.json", pairs_data), tokenizer, template, 1024)
    assert len(pairs) == stats.pairs == 11
    for pair, data in zip(pairs, pairs_data, strict=True):
        instruction = Record(data["instruction"], data["input"], "").full_instruction
        assert pair.prompt == prompt_ids(template, tokenizer, instruction)
        ids, _ = sft(tokenizer, template, instruction, data["chosen"], max_seq_length=100_000)
        assert pair.prompt + pair.chosen == ids[:1024]
        assert pair.truncated == (len(ids) > 1024)
