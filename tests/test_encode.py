"""Exact token layout and label masks on literal records."""

from __future__ import annotations

import pytest

from llama_sft.data.encode import IGNORE_INDEX, encode_cached, encode_record, encode_records
from llama_sft.data.records import Record
from llama_sft.data.templates import load_template

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response: "
)
CHAT_PROMPT = "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n{} [/INST]"


@pytest.mark.parametrize(
    ("template_name", "prompt_format"), [("alpaca", ALPACA_PROMPT), ("llama2-chat", CHAT_PROMPT)]
)
@pytest.mark.parametrize(
    ("record", "instruction_text"),
    [
        (Record("Translate to Chinese: red", "", "红色"), "Translate to Chinese: red"),
        (Record("Translate to English", "猫", "cat"), "Translate to English\n猫"),
    ],
)
def test_layout_and_mask(tokenizer, template_name, prompt_format, record, instruction_text):
    sp = tokenizer.sp
    prompt_ids = [1] + sp.encode(prompt_format.format(instruction_text))
    response_ids = sp.encode(record.output) + [2]

    ids, labels, status = encode_record(record, load_template(template_name), tokenizer, 512)

    assert status == "whole"
    assert ids == prompt_ids + response_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert ids[0] == tokenizer.bos_id == 1 and ids[-1] == labels[-1] == tokenizer.eos_id == 2


def test_truncation_cases(tokenizer):
    template = load_template("alpaca")
    record = Record("Translate to Chinese: mountain", "", "山 and 河 and 水")
    full, _, _ = encode_record(record, template, tokenizer, 10_000)
    prompt_len = 1 + len(tokenizer.encode(template.render(record.instruction)))
    response = full[prompt_len:]
    assert len(response) >= 3

    ids, labels, status = encode_record(record, template, tokenizer, len(full))
    assert (status, ids) == ("whole", full)

    ids, labels, status = encode_record(record, template, tokenizer, len(full) - 1)
    assert status == "truncated"
    assert ids == full[:-1] and labels[-1] != tokenizer.eos_id
    assert labels == [IGNORE_INDEX] * prompt_len + response[:-1]

    ids, labels, status = encode_record(record, template, tokenizer, prompt_len + 1)
    assert status == "truncated"
    assert labels == [IGNORE_INDEX] * prompt_len + response[:1]

    for max_len in (prompt_len, prompt_len - 5):
        assert encode_record(record, template, tokenizer, max_len) == ([], [], "dropped")


def test_stats_count_every_case(tokenizer):
    template = load_template("alpaca")
    short = Record("Translate to Chinese: red", "", "红色")
    long = Record("Translate to Chinese: red", "", "红色 " * 40)
    huge = Record("Translate to Chinese: red " * 60, "", "红色")
    dataset, stats = encode_records([short, long, huge], template, tokenizer, 120)
    assert (stats.whole, stats.truncated, stats.dropped) == (1, 1, 1)
    assert len(dataset) == 2
    assert max(dataset.lengths()) == 120
    report = stats.report("train data", 120)
    assert "1 kept whole, 1 truncated" in report and "1 dropped" in report and "p50" in report
    for example in dataset:
        assert any(label != IGNORE_INDEX for label in example["labels"])


def test_batch_encoding_equals_single(tokenizer):
    template = load_template("llama2-chat")
    records = [Record("What is 狗 in English?", "", "dog"), Record("Translate", "猫", "cat " * 50)]
    dataset, _ = encode_records(records, template, tokenizer, 64, num_workers=2)
    singles = [encode_record(r, template, tokenizer, 64) for r in records]
    assert [dataset[i]["input_ids"] for i in range(2)] == [s[0] for s in singles]
    assert [dataset[i]["labels"] for i in range(2)] == [s[1] for s in singles]


def test_cache_is_keyed_by_content_template_and_length(tokenizer, tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    records = [Record("Translate to Chinese: red", "", "红色")]
    alpaca, chat = load_template("alpaca"), load_template("llama2-chat")
    cache = tmp_path / "cache"

    first, _, hit = encode_cached(records, [data], alpaca, tokenizer, 64, cache)
    assert not hit
    again, stats, hit = encode_cached(records, [data], alpaca, tokenizer, 64, cache)
    assert hit and again[0] == first[0] and stats.whole == 1
    assert not encode_cached(records, [data], chat, tokenizer, 64, cache)[2]
    assert not encode_cached(records, [data], alpaca, tokenizer, 32, cache)[2]
    data.write_text("[ ]")
    assert not encode_cached(records, [data], alpaca, tokenizer, 64, cache)[2]
    assert len(list(cache.glob("*.npz"))) == 4
