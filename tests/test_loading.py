"""One loader for every tool, and the flags every tool shares (--config, --lora_model)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from lora_helpers import logits, peft_reference, write_base, write_lora

from llama_sft.checks import ModelError
from llama_sft.loading import ModelSpec, load
from llama_sft.options import parse_command
from llama_sft.tools import chat, export, merge, merge_tokenizer, preview
from llama_sft.tools.merge import merge as merge_folders
from llama_sft.tools.serve import command as serve

# Each command's parser with the flags it requires, and a flag to set from YAML: (name, value, parsed).
COMMANDS = {
    "chat": (chat.build_parser, ["--base_model", "B"], ("max_new_tokens", "7", 7)),
    "serve": (serve.build_parser, ["--base_model", "B"], ("max_batch_size", "3", 3)),
    "merge": (
        merge.build_parser,
        ["--base_model", "B", "--lora_model", "L", "--output_dir", "O"],
        ("pth_shards", "2", 2),
    ),
    "export": (
        export.build_parser,
        ["--base_model", "B", "--output_file", "o.gguf"],
        ("outtype", "q8_0", "q8_0"),
    ),
    "preview": (
        preview.build_parser,
        ["--tokenizer_name_or_path", "T", "--dataset_dir", "D"],
        ("num_records", "5", 5),
    ),
    "merge-tokenizer": (
        merge_tokenizer.build_parser,
        ["--llama_tokenizer_dir", "L", "--chinese_sp_model_file", "C"],
        ("text", "你好", "你好"),
    ),
}


@pytest.mark.parametrize("name", ["chat", "serve", "merge", "export"])
def test_lora_model_takes_folders_space_or_comma_separated(name):
    build, required, _ = COMMANDS[name]
    for given in (["a", "b", "c"], ["a,b", "c"], ["a, b,c"]):
        args = parse_command(build(), [*required, "--lora_model", *given])
        assert args.lora_model == ["a", "b", "c"], given


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_a_yaml_config_that_later_flags_override(name, tmp_path):
    build, required, (flag, value, parsed) = COMMANDS[name]
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({flag: value}, ensure_ascii=False))  # JSON is YAML
    assert getattr(parse_command(build(), [*required, "--config", str(config)]), flag) == parsed
    later = parse_command(build(), [*required, "--config", str(config), f"--{flag}", "9"])
    assert str(getattr(later, flag)) == "9"


def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_command(chat.build_parser(), ["--base_model", "B", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == f"error: {bad}: a --config file is a mapping of argument names to values\n"
    )


@pytest.fixture
def folders(tmp_path, tokenizer_dir):
    """A base with the test tokenizer, and two LoRAs of different seeds that both train lm_head in
    full: the later one's replaces the earlier one's, so the order they are applied in shows."""
    from llama_sft.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(tokenizer_dir)
    base = tmp_path / "base"
    write_base(base, vocab=len(tokenizer))
    tokenizer.save(base)
    first = write_lora(base, tmp_path / "first", seed=1, modules_to_save=["lm_head"])
    second = write_lora(
        base, tmp_path / "second", seed=2, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    return base, first, second, len(tokenizer)


def test_loras_load_in_order_with_the_logits_of_peft_and_of_merge(folders, tmp_path):
    base, first, second, vocab = folders
    loaded = load(ModelSpec(base, [first, second], device="cpu"))
    ours = logits(loaded.model, vocab)
    assert torch.allclose(ours, logits(peft_reference(base, [first, second]), vocab), atol=1e-5)
    # The other order is another model (the other lm_head wins): the order given is the order applied.
    assert not torch.allclose(ours, logits(load(ModelSpec(base, [second, first])).model, vocab), atol=1e-5)
    # merge's own arithmetic, streamed shard by shard, gives the same model.
    merged = merge_folders(base, [first, second], output_dir=tmp_path / "merged")
    assert torch.allclose(ours, logits(load(ModelSpec(merged)).model, vocab), atol=1e-5)


def test_template_order_system_prompt_and_pretraining_loras(folders, tmp_path, caplog):
    base, first, second, _ = folders
    caplog.set_level(logging.INFO, logger="llama_sft")
    assert load(ModelSpec(base, [first]), with_model=False).template.name == "alpaca"
    assert "no template.json with the LoRA or the model" in caplog.text
    (base / "template.json").write_text(json.dumps({"name": "base-t", "prompt": "B: {instruction}"}))
    (first / "template.json").write_text(json.dumps({"name": "first-t", "prompt": "F: {instruction}"}))
    assert load(ModelSpec(base, [second]), with_model=False).template.name == "base-t"
    # The last LoRA that has one wins over an earlier LoRA's and the base's.
    assert load(ModelSpec(base, [first, second]), with_model=False).template.name == "first-t"
    assert load(ModelSpec(base, [second, first]), with_model=False).template.name == "first-t"
    named = load(ModelSpec(base, [first], prompt_template="llama2-chat", system_prompt="Be brief."), False)
    assert (named.template.name, named.template.system_prompt) == ("llama2-chat", "Be brief.")
    pretrained = shutil.copytree(second, tmp_path / "pt_lora_model")
    (pretrained / "training_args.json").write_text(json.dumps({"task": "pre-training"}))
    (base / "template.json").unlink()
    assert load(ModelSpec(base, [pretrained]), with_model=False).template.name == "none"
    # merge writes the template it resolves the same way, so chat on the merged model continues text too.
    merged = merge_folders(base, [pretrained], output_dir=tmp_path / "merged")
    assert json.loads((merged / "template.json").read_text())["name"] == "none"


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_weight_is_read(folders, tmp_path):
    base, _, _, vocab = folders
    small = tmp_path / "small"
    write_base(small, vocab=vocab - 50)
    (small / "model.safetensors").write_bytes(b"not read")  # the check comes before any weight
    with pytest.raises(ModelError, match="embedding rows; pass the tokenizer the model was trained with"):
        load(ModelSpec(small, tokenizer_path=base))
