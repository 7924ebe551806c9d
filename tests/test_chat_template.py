"""The prompt template as a Jinja chat template, for tools that read tokenizer_config.json."""

from __future__ import annotations

import json

import pytest
from conftest import train_argv
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_sft.data.templates import load_template
from llama_sft.training.run import train

CONVERSATION = [
    {"role": "user", "content": "把“狗”翻译成英文"},
    {"role": "assistant", "content": "dog"},
    {"role": "user", "content": "And {cat}?"},
]


def expected(name: str, messages: list[dict]) -> str:
    """What prompt_ids puts in ids, as text: <s> prompt answer </s> <s> follow-up ..."""
    literal = {
        "alpaca": (
            "<s>Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{q}\n\n### Response: "
        ),
        "llama2-chat": "<s>[INST] <<SYS>>\n{s}\n<</SYS>>\n\n{q} [/INST]",
    }[name]
    system = "You are a helpful assistant. 你是一个乐于助人的助手。"
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = literal.replace("{s}", system).replace("{q}", messages[0]["content"])
    if len(messages) > 1:
        later = {
            "alpaca": "<s>### Instruction:\n{q}\n\n### Response: ",
            "llama2-chat": "<s>[INST] {q} [/INST]",
        }[name]
        space = "" if name == "alpaca" else " "
        text += space + messages[1]["content"] + "</s>" + later.replace("{q}", messages[2]["content"])
    return text


@pytest.mark.parametrize("name", ["alpaca", "llama2-chat"])
@pytest.mark.parametrize("system", [None, "只用中文回答。"])
@pytest.mark.parametrize("turns", [1, 3])
def test_rendered_text_is_the_training_prompt(name, system, turns):
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION[:turns]
    template = ImmutableSandboxedEnvironment().from_string(load_template(name).chat_template())
    rendered = template.render(messages=messages, bos_token="<s>", eos_token="</s>")
    if name == "alpaca" and system:  # alpaca's prompt has no place for a system prompt
        messages = messages[1:]
    assert rendered == expected(name, messages)


def test_saved_folders_carry_it_for_apply_chat_template(model_dir, tokenizer_dir, data_dir, tmp_path):
    from transformers import AutoTokenizer

    out = train_argv(
        model_dir, tokenizer_dir, data_dir, tmp_path / "out", max_steps=1, do_eval=False,
        evaluation_strategy="no", save_strategy="no", prompt_template="llama2-chat",
    )  # fmt: skip
    lora_dir = train(out)
    config = json.loads((lora_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == load_template("llama2-chat").chat_template()
    tokenizer = AutoTokenizer.from_pretrained(str(lora_dir))
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == expected("llama2-chat", CONVERSATION).replace("<s>", tokenizer.bos_token).replace(
        "</s>", tokenizer.eos_token
    )

    from llama_sft.tools.merge import main as merge_main

    merged = tmp_path / "merged"
    merge_main(["--base_model", str(model_dir), "--lora_model", str(lora_dir), "--output_dir", str(merged)])
    assert (
        json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == config["chat_template"]
    )
