"""One check per problem: the same bad model folder, adapter folder or vocabulary gives the same
ModelError message from train, merge and chat (only the flag named differs), and each CLI turns it
into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import train_argv
from lora_helpers import write_lora

from llama_sft import checks
from llama_sft.checks import ModelError
from llama_sft.cli import main as cli_main
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import make_model

# Each command's names for the model folder and the adapter folder.
FLAGS = {
    "train": ("--model_name_or_path", "--peft_path"),
    "merge": ("--base_model", "--lora_model"),
    "chat": ("--base_model", "--lora_model"),
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, model_dir, tokenizer_dir) -> Path:
    """A good LoRA of the test model, with the tokenizer beside it (as train saves it)."""
    folder = write_lora(model_dir, tmp_path_factory.mktemp("checks") / "lora", targets=["q_proj", "v_proj"])
    TextTokenizer.load(tokenizer_dir).save(folder)
    return folder


def run_cli(argv: list[str], capsys) -> str:
    """Run ``llama-sft ARGV``; it must exit 2 with one ``error:`` line. Returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0].removeprefix("error: ")


def run_all(model: Path, adapter: Path, tokenizer: Path, data_dir: Path, tmp_path: Path, capsys) -> dict:
    """The message each command gives for this model folder and adapter folder, with its flag names
    replaced by MODEL_FLAG and ADAPTER_FLAG so that the three can be compared."""
    out = tmp_path / "out"
    argvs = {
        "train": [
            "train",
            *train_argv(model, tokenizer, data_dir, out, peft_path=adapter, trainable="q_proj,v_proj"),
        ],
        "merge": ["merge", "--base_model", str(model), "--lora_model", str(adapter), "--output_dir", str(out)],
        "chat": [
            "chat",
            "--base_model", str(model), "--lora_model", str(adapter),
            "--data_file", str(data_dir / "eval.json"), "--predictions_file", str(out / "predictions.json"),
        ],
    }  # fmt: skip
    messages = {}
    for command, argv in argvs.items():
        message = run_cli(argv, capsys)
        model_flag, adapter_flag = FLAGS[command]
        messages[command] = message.replace(model_flag, "MODEL_FLAG").replace(adapter_flag, "ADAPTER_FLAG")
        assert not out.exists(), command
    return messages


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", ')


def config_without_vocab(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))


def no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def not_a_folder(folder: Path) -> None:
    shutil.rmtree(folder)


@pytest.mark.parametrize(
    ("break_model", "fragments"),
    [
        (no_config, ["no config.json", "MODEL_FLAG must be a Hugging Face model folder"]),
        (config_not_json, ["config.json: not valid JSON", "re-download or re-save the model"]),
        (config_without_vocab, ["config.json: has no vocab_size"]),
        (no_weights, ["no weights", "in MODEL_FLAG", "Hugging Face format"]),
        (missing_shard, ["model-00002-of-00002.safetensors: listed in model.safetensors.index.json"]),
        (not_a_folder, ["MODEL_FLAG is not a folder"]),
    ],
)
def test_bad_model_folder_same_message_everywhere(
    model_dir, tokenizer_dir, lora_dir, data_dir, tmp_path, capsys, break_model, fragments
):
    model = copy(model_dir, tmp_path / "model")
    break_model(model)
    messages = run_all(model, lora_dir, tokenizer_dir, data_dir, tmp_path, capsys)
    assert messages["train"] == messages["merge"] == messages["chat"], messages
    assert messages["train"].startswith(str(model)), messages["train"]
    for fragment in fragments:
        assert fragment in messages["train"]
    with pytest.raises(ModelError) as error:
        checks.check_model_dir(model, "MODEL_FLAG")
    assert str(error.value) == messages["train"]


def no_adapter_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def adapter_config_not_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("peft_type: LORA\n")


def not_lora(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))


def no_adapter_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize(
    ("break_adapter", "fragments"),
    [
        (no_adapter_config, ["ADAPTER_FLAG has no adapter_config.json", "saved by PEFT"]),
        (adapter_config_not_json, ["adapter_config.json: not valid JSON", "re-save the LoRA"]),
        (not_lora, ["'PREFIX_TUNING' adapter, not a LoRA"]),
        (no_adapter_weights, ["no adapter_model.safetensors or adapter_model.bin in ADAPTER_FLAG"]),
        (not_a_folder, ["ADAPTER_FLAG is not a folder"]),
    ],
)
def test_bad_adapter_folder_same_message_everywhere(
    model_dir, tokenizer_dir, lora_dir, data_dir, tmp_path, capsys, break_adapter, fragments
):
    adapter = copy(lora_dir, tmp_path / "adapter")
    break_adapter(adapter)
    messages = run_all(model_dir, adapter, tokenizer_dir, data_dir, tmp_path, capsys)
    assert messages["train"] == messages["merge"] == messages["chat"], messages
    assert messages["train"].startswith(str(adapter)), messages["train"]
    for fragment in fragments:
        assert fragment in messages["train"]
    with pytest.raises(ModelError) as error:
        checks.check_adapter_dir(adapter, "ADAPTER_FLAG")
    assert str(error.value) == messages["train"]


def test_tokenizer_smaller_than_the_model_same_message_everywhere(
    tokenizer_dir, tokenizer, data_dir, tmp_path, capsys
):
    """The original LLaMA tokenizer given for a Chinese-LLaMA model, at test size: the tokenizer
    beside the LoRA (where merge and chat look, and what train is given) has fewer tokens than the
    model has rows."""
    big = tmp_path / "big_model"
    make_model(big, len(tokenizer) + 100, hidden=32, layers=1, heads=2, intermediate=64)
    lora = write_lora(big, tmp_path / "lora", targets=["q_proj", "v_proj"])
    tokenizer.save(lora)
    messages = run_all(big, lora, lora, data_dir, tmp_path, capsys)
    assert messages["train"] == messages["merge"] == messages["chat"], messages
    assert messages["train"] == (
        f"{lora}: the tokenizer has {len(tokenizer)} tokens but the model {big} has {len(tokenizer) + 100} "
        "embedding rows. This usually means the original LLaMA tokenizer (32000) was given for a "
        "Chinese-LLaMA model (49953/55296): pass the tokenizer that came with the model"
    )


def test_tokenizer_larger_than_the_model(tokenizer_dir, tokenizer, data_dir, tmp_path, capsys):
    """Train grows the embedding; chat and merge cannot, and say which tokenizer to give."""
    small = tmp_path / "small_model"
    make_model(small, len(tokenizer) - 10, hidden=32, layers=1, heads=2, intermediate=64)
    lora = write_lora(small, tmp_path / "lora", targets=["q_proj", "v_proj"])
    tokenizer.save(lora)
    assert checks.check_vocab(len(tokenizer) - 10, len(tokenizer), small, lora)
    chat = run_cli(
        [
            "chat",
            "--base_model",
            str(small),
            "--lora_model",
            str(lora),
            "--data_file",
            str(data_dir / "eval.json"),
            "--predictions_file",
            str(tmp_path / "p.json"),
        ],
        capsys,
    )
    merge = run_cli(
        ["merge", "--base_model", str(small), "--lora_model", str(lora), "--output_dir", str(tmp_path / "o")],
        capsys,
    )
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "o").exists()
    for message in (chat, merge):
        assert message.startswith(str(lora)) and "embedding rows" in message and "tokenizer" in message


def test_check_vocab_counts_a_virtual_pad_only_where_asked():
    assert checks.check_vocab(100, 100, "m", "t") is False
    # A tokenizer that added its own <pad>: training gives it a row, inference needs none.
    assert checks.check_vocab(100, 101, "m", "t") is True
    assert checks.check_vocab(100, 101, "m", "t", virtual_pad=True) is False
    assert checks.check_vocab(100, 102, "m", "t", virtual_pad=True) is True
    with pytest.raises(ModelError, match=r"^t: the tokenizer has 99 tokens but the model m has 100"):
        checks.check_vocab(100, 99, "m", "t", virtual_pad=True)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_adapter_vocab_rows(model_dir, tokenizer, tmp_path, fmt):
    plain = write_lora(model_dir, tmp_path / "plain", targets=["q_proj"], fmt=fmt)
    grown = write_lora(model_dir, tmp_path / "grown", vocab=len(tokenizer) + 3, targets=["q_proj"], fmt=fmt)
    assert checks.adapter_vocab_rows(plain) is None
    assert checks.adapter_vocab_rows(grown) == len(tokenizer) + 3
    assert checks.adapter_weights_file(grown).name == f"adapter_model.{fmt}"


def test_weight_files_lists_shards_once_in_order(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes(b"")
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checks.weight_files(folder) == [folder / "b.safetensors", folder / "a.safetensors"]
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ModelError, match="not a valid shard index"):
        checks.weight_files(folder)


def test_has_tokenizer(tokenizer_dir, tmp_path):
    assert checks.has_tokenizer(tokenizer_dir)
    assert not checks.has_tokenizer(tmp_path)
