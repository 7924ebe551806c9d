"""Conversations: the readers, the four templates' exact renderings, which tokens are trained, and
where a long conversation is cut."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path, train_argv, write_json
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_sft.data.encode import IGNORE_INDEX, encode_cached, encode_record, encode_records
from llama_sft.data.records import (
    DataError,
    Record,
    conversation_record,
    load_dataset_dir,
    load_records,
    read_messages,
)
from llama_sft.data.templates import TemplateError, load_template, prompt_ids, render_text
from llama_sft.data.text import TextCleaning
from llama_sft.data.tokenizer import TextTokenizer

# The models' own chat templates, as their tokenizer_config.json files hold them.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
REFERENCES = {"chatml": (QWEN2_CHAT_TEMPLATE, ""), "llama3": (LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>")}

EXCHANGES = [("把“狗”翻译成英文 ", " dog"), ("And {cat}?", "cat\n"), ("Thanks!", "You're welcome.")]


def messages_of(system: str | None, turns: list[tuple[str, str | None]]) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("system", [None, "Answer in English. "])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("open_end", [False, True], ids=["answered", "generation-prompt"])
def test_renderings_equal_the_models_own_chat_templates(name, system, count, open_end):
    turns = EXCHANGES[:count]
    if open_end:
        turns = [*turns[:-1], (turns[-1][0], None)]
    reference, bos = REFERENCES[name]
    environment = ImmutableSandboxedEnvironment()
    expected = environment.from_string(reference).render(
        messages=messages_of(system, turns), bos_token=bos, add_generation_prompt=open_end
    )
    template = load_template(name)
    assert render_text(template, turns, system, bos_token=bos) == expected
    # The chat template written into tokenizer_config.json renders the same string.
    ours = environment.from_string(template.chat_template())
    assert ours.render(messages=messages_of(system, turns), bos_token=bos, eos_token="</s>") == expected


def test_chatml_and_llama3_literally():
    turns = [("hi", "hello"), ("2+2?", None)]
    assert render_text(load_template("chatml"), turns, bos_token="") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_text(load_template("llama3"), turns, "Be brief.", bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nhello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama2_chat_and_alpaca_literally():
    turns = [("u1", "a1"), ("u2", "a2")]
    assert render_text(load_template("llama2-chat"), turns, "S") == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nu1 [/INST]a1</s><s>[INST] u2 [/INST]a2</s>"
    )
    assert render_text(load_template("alpaca"), turns) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nu1\n\n### Response: a1</s><s>### Instruction:\nu2\n\n### Response: a2</s>"
    )


def test_llama2_chat_ids_against_metas_chat_completion(tokenizer):
    """Meta's reference encodes each exchange as one string, f"[INST] {u} [/INST] {a} " with BOS and
    EOS. Ours encodes prompt and answer apart; SentencePiece's split at whitespace makes that the
    same ids, except that Meta's trailing space before EOS is one more piece, which llama-sft (like
    Chinese-Alpaca-2's training and `llama-sft chat`) does not put there."""
    sp, system = tokenizer.sp, "You are a helpful assistant."
    turns = [("Translate to Chinese: cat", "猫"), ("And dog?", "狗 is dog"), ("Thanks", "You are welcome")]
    meta = []
    for number, (user, answer) in enumerate(turns):
        if number == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        meta += [sp.bos_id()] + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [sp.eos_id()]
    ids, labels, status = encode_record(
        Record(turns[-1][0], "", turns[-1][1], system, tuple(turns[:-1])),
        load_template("llama2-chat"),
        tokenizer,
        1000,
    )
    space, eos = sp.piece_to_id("▁"), sp.eos_id()
    before_eos = [i for i, t in enumerate(meta) if t == space and meta[i + 1] == eos]
    assert len(before_eos) == 3 and all(ids[i - 1] != space for i, t in enumerate(ids) if t == eos)
    assert [t for i, t in enumerate(meta) if i not in before_eos] == ids
    # Chat's prompt for the third question is training's sequence up to that answer.
    prompt = prompt_ids(load_template("llama2-chat"), tokenizer, turns[2][0], turns[:2], system)
    assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX
    assert labels[len(prompt)] != IGNORE_INDEX


class Chars:
    """A stand-in tokenizer: one id per character, BOS 1, EOS 2, and the chat tokens of chatml."""

    bos_id, eos_id, sp = 1, 2, None
    special = {"<|im_end|>": 3, "<|eot_id|>": 4}

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def token_id(self, text):
        return self.special.get(text)


def spans(ids, labels):
    """The trained stretches as text (end-of-turn ids written <3>, <2>)."""
    out, current = [], ""
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                out.append(current)
            current = ""
        else:
            assert label == token
            current += chr(token) if token > 10 else f"<{token}>"
    return out + ([current] if current else [])


CONVERSATION = Record("u3", "", "a3", "Sys!", (("u1", "a1"), ("u2", "a2")))


@pytest.mark.parametrize(
    ("name", "trained"),
    [
        ("chatml", ["a1<3>", "a2<3>", "a3<3>"]),
        ("llama2-chat", ["a1<2>", "a2<2>", "a3<2>"]),
        ("alpaca", ["a1<2>", "a2<2>", "a3<2>"]),
        ("llama3", ["a1<4>", "a2<4>", "a3<4>"]),
    ],
)
def test_every_answer_and_its_end_token_are_trained(name, trained):
    template = load_template(name)
    ids, labels, status = encode_record(CONVERSATION, template, Chars(), 10_000)
    assert status == "whole"
    assert spans(ids, labels) == trained
    text = "".join(chr(t) if t > 10 else "" for t in ids)
    assert "u1" in text and "u3" in text  # masked, but there
    assert ("Sys!" in text) == (name != "alpaca")  # alpaca's prompt has no place for a system prompt
    _, last_only, _ = encode_record(CONVERSATION, template, Chars(), 10_000, train_on_turns="last")
    assert spans(ids, last_only) == trained[-1:]


def test_chatml_newline_after_the_end_token_is_masked():
    ids, labels, _ = encode_record(CONVERSATION, load_template("chatml"), Chars(), 10_000)
    end = ids.index(3)
    assert ids[end + 1] == ord("\n") and labels[end] == 3 and labels[end + 1] == IGNORE_INDEX


def test_truncation_at_exchange_boundaries():
    template, tokenizer = load_template("llama2-chat"), Chars()
    full, _, _ = encode_record(CONVERSATION, template, tokenizer, 10_000)
    firsts = [i for i, t in enumerate(full) if t == 1] + [len(full)]  # where each exchange starts
    assert len(firsts) == 4 and encode_record(CONVERSATION, template, tokenizer, len(full))[2] == "whole"
    # One token short of everything: the last exchange goes whole, the first two stay.
    ids, labels, status = encode_record(CONVERSATION, template, tokenizer, len(full) - 1)
    assert (status, ids) == ("shortened", full[: firsts[2]]) and spans(ids, labels) == ["a1<2>", "a2<2>"]
    with_last, _, _ = encode_record(CONVERSATION, template, tokenizer, len(full) - 1, "last")
    assert spans(with_last, encode_record(CONVERSATION, template, tokenizer, len(full) - 1, "last")[1]) == [
        "a2<2>"
    ]
    # Only the first exchange fits.
    ids, labels, status = encode_record(CONVERSATION, template, tokenizer, firsts[2] - 1)
    assert (status, ids) == ("shortened", full[: firsts[1]]) and spans(ids, labels) == ["a1<2>"]
    # Not even the first: its answer is cut as a long Alpaca record's is; the system prompt stays.
    ids, labels, status = encode_record(CONVERSATION, template, tokenizer, firsts[1] - 2)
    assert (status, ids) == ("truncated", full[: firsts[1] - 2]) and spans(ids, labels) == ["a"]
    prompt_length = firsts[1] - 3  # BOS + the first prompt
    assert encode_record(CONVERSATION, template, tokenizer, prompt_length) == ([], [], "dropped")


def test_stats_count_outcomes_turns_and_tokens():
    template, tokenizer = load_template("llama2-chat"), Chars()
    full = len(encode_record(CONVERSATION, template, tokenizer, 10_000)[0])
    short = Record("q", "", "a")
    records = [CONVERSATION, short, Record("q" * 400, "", "a"), Record("q", "", "a" * 400)]
    dataset, stats = encode_records(records, template, tokenizer, full, num_workers=2)
    assert (stats.whole, stats.shortened, stats.truncated, stats.dropped) == (2, 0, 1, 1)
    assert stats.turns_trained == 3 + 1 + 1
    assert stats.tokens_trained == 3 * 3 + 2 + (
        full - len(encode_record(short, template, tokenizer, 99)[0]) + 2
    )
    assert stats.tokens_trained == sum(label != IGNORE_INDEX for e in dataset for label in e["labels"])
    dataset, stats = encode_records(records, template, tokenizer, full - 1)
    assert (stats.whole, stats.shortened, stats.turns_trained) == (1, 1, 2 + 1 + 1)
    report = stats.report("train data", full - 1)
    assert "1 conversations shortened" in report and "Trained: 4 assistant turns" in report
    for index, record in enumerate(records[:2]):
        assert dataset[index]["input_ids"] == encode_record(record, template, tokenizer, full - 1)[0]


def test_stats_count_conversations_whose_last_user_turn_has_no_answer(tokenizer, tmp_path):
    """A conversation ending in a user turn trains its answered exchanges; the report, to_dict
    (data_stats.json) and the data cache all carry how many such conversations there were."""
    talks = [
        {"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                           {"from": "human", "value": "never answered"}]},
        {"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"}]},
        {"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                           {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"},
                           {"from": "human", "value": "also never answered"}]},
    ]  # fmt: skip
    sharegpt = write_json(tmp_path / "talks.json", talks)
    messages = tmp_path / "talks.jsonl"
    messages.write_text(
        json.dumps({"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                 {"role": "user", "content": "u2"}]}) + "\n"
    )  # fmt: skip
    alpaca = write_json(tmp_path / "alpaca.json", [{"instruction": "q", "output": "r"}])
    records = load_records(sharegpt) + load_records(messages) + load_records(alpaca)
    assert [r.unanswered for r in records] == [True, False, True, True, False]
    # The unanswered turn is left out of the record, which equals the same talk without it.
    assert records[0] == records[1] == Record("u1", "", "a1") and records[2].history == (("u1", "a1"),)
    template = load_template("llama2-chat")
    _, stats = encode_records(records, template, tokenizer, 512)
    assert (stats.whole, stats.unanswered, stats.turns_trained) == (5, 3, 1 + 1 + 2 + 1 + 1)
    assert stats.to_dict()["unanswered"] == 3
    report = stats.report("train data", 512)
    assert "0 conversations shortened to the leading exchanges that fit, 3 ending in a user turn " in report
    assert "with no answer (that turn left out). Trained: 6 assistant turns" in report
    # Counted whatever becomes of the conversation at --max_seq_length, and kept in the cache.
    _, short = encode_records(records, template, tokenizer, 8)
    assert short.dropped == 5 and short.unanswered == 3
    files = [sharegpt, messages, alpaca]
    for from_cache in (False, True):
        _, cached, hit = encode_cached(records, files, template, tokenizer, 512, tmp_path / "cache")
        assert hit == from_cache and cached.to_dict() == stats.to_dict()


def test_batch_encoding_equals_single_with_sentencepiece(tokenizer):
    template = load_template("llama2-chat")
    records = [CONVERSATION, Record("Translate", "猫", "cat " * 50), Record("hi", "", "ok", "只用中文回答。")]
    dataset, _ = encode_records(records, template, tokenizer, 64, num_workers=2, train_on_turns="last")
    for index, record in enumerate(records):
        ids, labels, _ = encode_record(record, template, tokenizer, 64, "last")
        assert dataset[index] == {"input_ids": ids, "labels": labels}


def test_a_template_token_the_tokenizer_lacks_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="'<\\|im_end\\|>', which the tokenizer does not have"):
        encode_record(CONVERSATION, load_template("chatml"), tokenizer, 64)


SHAREGPT = {
    "id": "x",
    "system": "S",
    "conversations": [
        {"from": "human", "value": "u1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "u2"},
        {"from": "assistant", "value": "a2"},
        {"from": "human", "value": "never answered"},
    ],
}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2", "name": "ann"},
        {"role": "assistant", "content": "a2"},
    ]
}
ALPACA = {"instruction": "u2", "input": "", "output": "a2", "system": "S", "history": [["u1", "a1"]]}


def test_three_formats_read_into_the_same_record(tmp_path):
    expected = Record("u2", "", "a2", "S", (("u1", "a1"),))
    write_json(tmp_path / "d" / "a.json", [SHAREGPT])
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    write_json(tmp_path / "d" / "c.json", [ALPACA, {"instruction": "q", "output": "r"}])
    assert load_dataset_dir(tmp_path / "d") == [expected, expected, expected, Record("q", "", "r")]
    assert expected.turns == (("u1", "a1"), ("u2", "a2"))


def test_conversation_text_is_cleaned_and_nul_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a\x1b[31mb"}, {"from": "gpt", "value": "c\ud800"}]}]))  # fmt: skip
    assert load_records(path) == [Record("a[31mb", "", "c")]
    path = tmp_path / "n.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\x00"}]}]))  # fmt: skip
    with pytest.raises(DataError, match=r"n.json, record 0, turn 1: 'content' holds a NUL character"):
        load_records(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": []}, "record 0: 'conversations' must be a non-empty list"),
        ({"conversations": [{"from": "system", "value": "S"}]}, "holds only a system turn"),
        (
            {"conversations": ["hi"]},
            "record 0, turn 0: expected an object with 'from' and 'value', found str",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "turn 0: unknown 'role' 'tool'"),
        ({"messages": [{"role": "user"}]}, "turn 0: 'content' must be a string, found missing"),
        (
            {"system": "A", "conversations": [{"from": "system", "value": "B"}]},
            "a system turn and a 'system' field both",
        ),
        (
            {"instruction": "a", "output": "b", "history": "x"},
            "'history' must be a list of [user, assistant]",
        ),
        (
            {"instruction": "a", "output": "b", "history": [["", "x"]]},
            "history turn 0: the user text is empty",
        ),
        (
            {"instruction": "a", "output": "b", "system": 3},
            "record 0: 'system' must be a string, found a int",
        ),
    ],
)
def test_bad_conversations(tmp_path, record, message):
    with pytest.raises(DataError) as error:
        load_records(write_json(tmp_path / "bad.json", [record]))
    assert message in str(error.value) and "\n" not in str(error.value)


# whole, shortened (later exchanges left out), truncated, dropped at --max_seq_length 2048
EXPECTED_SHAREGPT_COUNTS = (384, 231, 10, 14)


def test_real_sharegpt_sample():
    """1,000 real ShareGPT conversations as found: the reader stops at the first malformed one, and
    the well-formed ones (each checked alone) all encode with the Chinese-LLaMA-2 tokenizer."""
    path = shared_path("data/sharegpt_en_sample.json")
    tokenizer = TextTokenizer.load(shared_path("tokenizers/chinese-llama-2"))
    with pytest.raises(DataError, match=r"sharegpt_en_sample.json, record 0, turn 0: the conversation opens"):
        load_records(path)
    good = []
    for index, item in enumerate(json.loads(path.read_text())):
        try:
            system, messages = read_messages(item, "sharegpt", f"record {index}", TextCleaning("x"), index)
            good.append(conversation_record(system, messages, f"record {index}"))
        except DataError:
            continue
    assert len(good) == 639
    _, stats = encode_records(good, load_template("llama2-chat"), tokenizer, 2048, num_workers=2)
    counts = (stats.whole, stats.shortened, stats.truncated, stats.dropped)
    assert sum(counts) == 639 and stats.turns_trained > 639
    assert counts == EXPECTED_SHAREGPT_COUNTS


def test_tiny_model_learns_conversations(model_dir, tokenizer_dir, tmp_path):
    from llama_sft.training.run import train

    data = tmp_path / "data"
    talks = [
        [("Translate to Chinese: red", "红色"), ("And dog?", "狗"), ("And cat?", "猫")],
        [("What is 狗 in English?", "dog"), ("And 猫?", "cat")],
    ]
    sharegpt = [
        {"conversations": [{"from": side, "value": text} for pair in talk for side, text in zip(("human", "gpt"), pair, strict=True)]}
        for talk in talks
    ]  # fmt: skip
    # A last user turn without an answer trains nothing: the same examples, counted in data_stats.json.
    sharegpt[0]["conversations"].append({"from": "human", "value": "And 鸟?"})
    write_json(data / "train" / "talks.json", sharegpt * 8)
    messages = [
        {
            "messages": [
                {"role": r, "content": t}
                for pair in talk
                for r, t in zip(("user", "assistant"), pair, strict=True)
            ]
        }
        for talk in talks
    ]
    (data / "eval.jsonl").write_text("\n".join(json.dumps(m, ensure_ascii=False) for m in messages) + "\n")
    argv = train_argv(
        model_dir, tokenizer_dir, data, tmp_path / "out", validation_file=data / "eval.jsonl",
        prompt_template="llama2-chat", max_steps=8, eval_steps=4, save_strategy="no",
    )  # fmt: skip
    train(argv)
    out = tmp_path / "out"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["whole"] == 16 and stats["train"]["turns_trained"] == 8 * 5
    assert stats["train"]["unanswered"] == 8 and stats["eval"]["unanswered"] == 0
    assert stats["eval"]["turns_trained"] == 5


def test_preview_marks_what_training_trains(tokenizer, tokenizer_dir, tmp_path, capsys):
    from llama_sft.tools.preview import main as preview_main

    data = write_json(
        tmp_path / "d" / "talk.json", [SHAREGPT, {**SHAREGPT, "conversations": SHAREGPT["conversations"][:2]}]
    )
    argv = ["--tokenizer_name_or_path", str(tokenizer_dir), "--dataset_dir", str(data.parent),
            "--prompt_template", "llama2-chat", "--output_file", str(tmp_path / "seen.jsonl")]  # fmt: skip
    preview_main(argv)
    shown = capsys.readouterr().out
    assert shown.startswith(f"=== {data}, record 0: whole, ")
    assert "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nu1 [/INST][[ a1</s>]]<s>[INST] u2 [/INST][[ a2</s>]]\n" in shown
    assert f"=== {data}, record 1: whole" in shown and shown.count("[[") == 3
    lines = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert [(line["file"], line["index"], line["status"]) for line in lines] == [
        (str(data), 0, "whole"),
        (str(data), 1, "whole"),
    ]
    for line, record in zip(lines, load_records(data), strict=True):
        ids, labels, _ = encode_record(record, load_template("llama2-chat"), tokenizer, 512)
        assert (line["input_ids"], line["labels"]) == (ids, labels)

    preview_main(
        [*argv[:4], "--prompt_template", "llama2-chat", "--max_seq_length", "30", "--train_on_turns", "last"]
    )
    shown = capsys.readouterr().out
    assert "record 0: shortened" in shown and "[[ a1</s>]]" in shown and "u2" not in shown
    with pytest.raises(SystemExit) as exit_:
        preview_main([*argv[:4], "--prompt_template", "chatml"])
    assert exit_.value.code == 2 and "'<|im_end|>', which the tokenizer" in capsys.readouterr().err
