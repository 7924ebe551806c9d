"""llama-sft chat: batch predictions, streaming, multi-turn prompts, and the demo's LoRA answering."""

from __future__ import annotations

import io
import json

import pytest
import torch
from lora_helpers import peft_reference, write_lora

from llama_sft.cli import main as cli_main
from llama_sft.data.templates import Template, load_template
from llama_sft.tools.chat import Conversation, GenerationSettings, TextStream, generate_ids, read_instructions
from llama_sft.tools.chat import main as chat_main
from llama_sft.tools.demo import greedy_answer, make_model, make_tokenizer
from llama_sft.tools.merge import merge

# 400 steps (llama-sft demo) reach most held-out answers; fewer keep the test short yet learn some.

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Translate to Chinese: cat 猫 dog 狗 horse 马 water 水 fire 火",
    "[INST] <<SYS>> You are a helpful assistant. 你是一个乐于助人的助手。 <</SYS>> [/INST]",
] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer, a random base and a random LoRA (with the tokenizer and alpaca template beside it)."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = make_tokenizer(root / "tokenizer", TEXTS, vocab_size=320)
    make_model(root / "base", len(tokenizer), hidden=32, layers=2, heads=4)
    lora = write_lora(root / "base", root / "lora", targets=["q_proj", "v_proj"])
    tokenizer.save(lora)
    load_template("alpaca").save(lora)
    return root, tokenizer


def test_batch_mode_greedy_writes_predictions(tiny, tmp_path, capsys):
    root, tokenizer = tiny
    lines = tmp_path / "questions.txt"
    lines.write_text("Translate to Chinese: cat\n\nWhat is 水 in English?\n", encoding="utf-8")
    alpaca = tmp_path / "questions.json"
    rows = [{"instruction": "Translate to Chinese:", "input": "dog", "output": "狗"}, {"instruction": "Hi"}]
    alpaca.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    reference = peft_reference(root / "base", [root / "lora"])
    template = load_template("alpaca")
    for data_file, expected_instructions in (
        (lines, ["Translate to Chinese: cat", "What is 水 in English?"]),
        (alpaca, ["Translate to Chinese:", "Hi"]),
    ):
        out = tmp_path / f"{data_file.stem}_predictions.json"
        cli_main(
            [
                "chat", "--base_model", str(root / "base"), "--lora_model", str(root / "lora"),
                "--data_file", str(data_file), "--predictions_file", str(out),
                "--do_sample", "false", "--max_new_tokens", "6", "--repetition_penalty", "1.0",
            ]
        )  # fmt: skip
        predictions = json.loads(out.read_text(encoding="utf-8"))
        assert [p["instruction"] for p in predictions] == expected_instructions
        assert all(isinstance(p["output"], str) for p in predictions)
        for prediction in predictions:
            full = (
                f"{prediction['instruction']}\n{prediction['input']}"
                if "input" in prediction
                else prediction["instruction"]
            )
            assert prediction["output"] == greedy_answer(
                reference, tokenizer, template, full, max_new_tokens=6
            )
    assert "input" not in json.loads((tmp_path / "questions_predictions.json").read_text())[1]
    assert json.loads((tmp_path / "questions_predictions.json").read_text())[0]["input"] == "dog"
    assert "2 answers written" in capsys.readouterr().out


def test_merged_model_chats_like_base_plus_lora(tiny, tmp_path):
    """A merged model carries the LoRA's tokenizer and template; chat needs only --base_model."""
    root, _ = tiny
    merge(root / "base", [root / "lora"], "huggingface", tmp_path / "merged")
    data = tmp_path / "q.txt"
    data.write_text("Translate to Chinese: cat\n", encoding="utf-8")
    answers = []
    for extra in (
        ["--base_model", str(tmp_path / "merged")],
        ["--base_model", str(root / "base"), "--lora_model", str(root / "lora")],
    ):
        out = tmp_path / f"p{len(answers)}.json"
        chat_main(
            [
                *extra,
                "--data_file",
                str(data),
                "--predictions_file",
                str(out),
                "--do_sample",
                "false",
                "--max_new_tokens",
                "8",
            ]
        )
        answers.append(json.loads(out.read_text())[0]["output"])
    assert answers[0] == answers[1]


def test_interactive_streams_and_keeps_llama2_chat_history(tiny):
    root, tokenizer = tiny
    stdin = io.StringIO("Translate to Chinese: cat\nAnd dog?\n/clear\nHello\n/exit\nnever read\n")
    stdout = io.StringIO()
    chat_main(
        [
            "--base_model", str(root / "base"), "--lora_model", str(root / "lora"),
            "--prompt_template", "llama2-chat", "--do_sample", "false", "--max_new_tokens", "5",
        ],
        stdin=stdin,
        stdout=stdout,
    )  # fmt: skip
    shown = stdout.getvalue()
    assert "multi-turn" in shown and shown.count(">>> ") == 5 and "(history cleared)" in shown

    # The same conversation by hand: the streamed text is what greedy decoding of these prompts gives.
    from llama_sft.loading import load_model

    model = load_model(root / "base", root / "lora", torch.device("cpu"))
    settings = GenerationSettings(max_new_tokens=5, do_sample=False)
    conversation = Conversation(load_template("llama2-chat"), tokenizer, 1000)
    expected = []
    for instruction in ("Translate to Chinese: cat", "And dog?", None, "Hello"):
        if instruction is None:
            conversation.clear()
            continue
        answer = generate_ids(model, tokenizer, conversation.prompt(instruction), settings)
        conversation.add(instruction, answer)
        expected.append(tokenizer.decode(answer))
    banner = shown.split("\n", 1)[0] + "\n"
    assert shown == (
        f"{banner}>>> {expected[0]}\n>>> {expected[1]}\n>>> (history cleared)\n>>> {expected[2]}\n>>> "
    )
    assert conversation.turns and conversation.turns[0][0] == "Hello"


def test_conversation_prompt_layout_and_trimming():
    template = load_template("llama2-chat")

    class Chars:
        """A stand-in tokenizer: one id per character, BOS 1, EOS 2."""

        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    tokenizer = Chars()
    conversation = Conversation(template, tokenizer, max_prompt_tokens=10_000)
    assert conversation.prompt("hi") == [1] + tokenizer.encode(template.render("hi"))
    conversation.add("hi", [500, 501])
    conversation.add("more", [600])
    full = conversation.prompt("last")
    expected = (
        [1] + tokenizer.encode(template.render("hi")) + [500, 501, 2]
        + [1] + tokenizer.encode("[INST] more [/INST]") + [600, 2]
        + [1] + tokenizer.encode("[INST] last [/INST]")
    )  # fmt: skip
    assert full == expected
    # Too long: the oldest turn goes and the next one takes the full (system) prompt.
    conversation.max_prompt_tokens = len(full) - 1
    trimmed = conversation.prompt("last")
    assert trimmed == [1] + tokenizer.encode(template.render("more")) + [600, 2] + [1] + tokenizer.encode(
        "[INST] last [/INST]"
    )
    # alpaca's later turns are ### Instruction/### Response blocks after the previous answer.
    alpaca = load_template("alpaca")
    later = Conversation(alpaca, tokenizer, 10_000)
    later.add("hi", [5])
    assert later.prompt("x") == [1] + tokenizer.encode(alpaca.render("hi")) + [5, 2] + [1] + tokenizer.encode(
        "### Instruction:\nx\n\n### Response: "
    )
    # A template without a multi-turn format (a template.json saved before alpaca had one): every
    # prompt stands alone.
    single = Conversation(Template("old-alpaca", alpaca.prompt), tokenizer, 10_000)
    single.add("hi", [5])
    assert single.prompt("x") == [1] + tokenizer.encode(alpaca.render("x"))


def test_stream_holds_back_partial_characters(tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode("猫 says 喵喵 and 狗 says 汪")
    assert any(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids), "needs byte-fallback pieces"
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    stream.put(torch.tensor([[1, 5, 6]]))  # the prompt, skipped
    for token in ids:
        stream.put(torch.tensor([token]))
    stream.end()
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_read_instructions_formats(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"instruction": "a", "input": "b"}\n{"instruction": "c"}\n')
    assert read_instructions(jsonl) == [{"instruction": "a", "input": "b"}, {"instruction": "c", "input": ""}]


@pytest.mark.parametrize("problem", ["no_base", "no_lora", "bad_data", "small_model"])
def test_bad_inputs_give_one_line_errors(tiny, tmp_path, capsys, problem):
    root, tokenizer = tiny
    argv = ["chat", "--base_model", str(root / "base"), "--lora_model", str(root / "lora")]
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "x"}]')
    expected = ""
    if problem == "no_base":
        argv[2], expected = str(tmp_path / "nothing"), "--base_model"
    elif problem == "no_lora":
        argv[4], expected = str(tmp_path / "nothing"), "--lora_model"
    elif problem == "bad_data":
        data.write_text("[{]")
        expected = "not valid JSON"
    else:
        make_model(tmp_path / "small", len(tokenizer) - 10, hidden=16, layers=1, heads=2)
        argv = ["chat", "--base_model", str(tmp_path / "small"), "--tokenizer_path", str(root / "tokenizer")]
        expected = "embedding rows"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--data_file", str(data), "--predictions_file", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert not (tmp_path / "p.json").exists()


def test_lora_over_a_grown_vocabulary(tiny, tmp_path):
    """A LoRA that saved embed_tokens/lm_head for a larger tokenizer loads over the smaller base."""
    root, tokenizer = tiny
    make_model(tmp_path / "small_base", len(tokenizer) - 5, hidden=32, layers=2, heads=4)
    lora = write_lora(tmp_path / "small_base", tmp_path / "lora", vocab=len(tokenizer), targets=["q_proj"])
    tokenizer.save(lora)
    data = tmp_path / "q.txt"
    data.write_text("Translate to Chinese: cat\n", encoding="utf-8")
    out = tmp_path / "p.json"
    argv = [
        "--base_model",
        str(tmp_path / "small_base"),
        "--lora_model",
        str(lora),
        "--prompt_template",
        "alpaca",
    ]
    chat_main(
        [
            *argv,
            "--data_file",
            str(data),
            "--predictions_file",
            str(out),
            "--do_sample",
            "false",
            "--max_new_tokens",
            "8",
            "--repetition_penalty",
            "1.0",
        ]
    )
    reference = peft_reference(tmp_path / "small_base", [lora])
    expected = greedy_answer(reference, tokenizer, load_template("alpaca"), "Translate to Chinese: cat", 8)
    assert json.loads(out.read_text())[0]["output"] == expected


def test_batch_mode_answers_the_last_turn_of_conversations(tiny, tmp_path):
    """ShareGPT and messages files: the last user turn is answered after the earlier turns, whose
    prompt is training's sequence for the same conversation up to that answer."""
    from llama_sft.data.encode import IGNORE_INDEX, encode_record
    from llama_sft.data.records import Record
    from llama_sft.loading import load_model

    root, tokenizer = tiny
    sharegpt = tmp_path / "talks.json"
    talk = [{"from": "human", "value": "Translate to Chinese: cat"}, {"from": "gpt", "value": "猫"},
            {"from": "human", "value": "And dog?"}, {"from": "gpt", "value": "狗"}]  # fmt: skip
    sharegpt.write_text(json.dumps([{"system": "只用中文回答。", "conversations": talk}], ensure_ascii=False))
    messages = tmp_path / "talks.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    settings = GenerationSettings(max_new_tokens=4, do_sample=False)
    model = load_model(root / "base", root / "lora", torch.device("cpu"))
    template = load_template("llama2-chat")
    for data_file in (sharegpt, messages):
        out = tmp_path / f"{data_file.suffix[1:]}_predictions.json"
        chat_main(
            ["--base_model", str(root / "base"), "--lora_model", str(root / "lora"), "--prompt_template",
             "llama2-chat", "--data_file", str(data_file), "--predictions_file", str(out),
             "--do_sample", "false", "--max_new_tokens", "4"]
        )  # fmt: skip
        [prediction] = json.loads(out.read_text(encoding="utf-8"))
        if data_file == sharegpt:
            assert prediction["history"] == [["Translate to Chinese: cat", "猫"]]
            assert prediction["system"] == "只用中文回答。" and prediction["instruction"] == "And dog?"
            record = Record("And dog?", "", "狗", "只用中文回答。", (("Translate to Chinese: cat", "猫"),))
            ids, labels, _ = encode_record(record, template, tokenizer, 1000)
            prompt = ids[: len(ids) - labels[::-1].index(IGNORE_INDEX)]  # up to the last answer
        else:
            assert "history" not in prediction and prediction["instruction"] == "Hi"
            prompt = [tokenizer.bos_id] + tokenizer.encode(template.render("Hi"))
        assert (
            prediction["output"] == tokenizer.decode(generate_ids(model, tokenizer, prompt, settings)).strip()
        )
