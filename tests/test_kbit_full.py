"""Training in less memory or in full: 4/8-bit base weights (QLoRA) and full fine-tuning."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import train_argv
from peft import PeftModel
from safetensors.torch import load_file
from test_reliability import RUNNER, run_with  # noqa: F401  (the kill-and-resume runner)
from transformers import AutoModelForCausalLM, TrainerCallback

from llama_sft.training.command_line import main
from llama_sft.training.run import train

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def kbit_model_dir(tmp_path_factory, tokenizer):
    """Rows of 64: bitsandbytes' CPU kernels quantise in blocks of 64 and need whole blocks."""
    from llama_sft.tools.demo import make_model

    folder = tmp_path_factory.mktemp("kbit_base")
    make_model(folder, len(tokenizer), hidden=64, layers=2, heads=4, intermediate=128)
    return folder


class Losses(TrainerCallback):
    def __init__(self):
        self.train, self.eval = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train.append(logs["loss"])
        if logs and "eval_loss" in logs:
            self.eval.append(logs["eval_loss"])


@pytest.mark.parametrize("kbits", [4, 8])
def test_kbit_lora_trains_and_its_adapter_loads_and_merges_on_the_unquantised_base(
    kbit_model_dir, tokenizer_dir, data_dir, tmp_path, kbits
):
    model_dir = kbit_model_dir
    out = tmp_path / "out"
    losses = Losses()
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, out, load_in_kbits=kbits, max_steps=8, eval_steps=4, save_steps=4,
        learning_rate=3e-2,
    )  # fmt: skip
    lora_dir = train(argv, callbacks=[losses])
    assert losses.eval[-1] < losses.eval[0] or losses.train[-1] < losses.train[0]
    run = json.loads((lora_dir / "training_args.json").read_text())
    assert run["model"]["load_in_kbits"] == kbits

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    saved = load_file(lora_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())  # LoRA moved from zero
    embed = next(v for k, v in saved.items() if "embed_tokens" in k)
    assert not torch.equal(embed, base.get_input_embeddings().weight)  # modules_to_save trained

    # Stock PEFT on the unquantised base, and llama-sft merge into it: the same logits.
    tuned = PeftModel.from_pretrained(base, str(lora_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
    merged_dir = tmp_path / "merged"
    from llama_sft.tools.merge import main as merge_main

    merge_main(
        ["--base_model", str(model_dir), "--lora_model", str(lora_dir), "--output_dir", str(merged_dir)]
    )
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    if kbits != 4:
        return

    # chat loads the base in 4 bits with the adapter beside it, unmerged.
    from llama_sft.loading import load_model

    quantised = load_model(model_dir, lora_dir, torch.device("cpu"), load_in_kbits=4)
    assert (
        type(quantised.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    )
    with torch.no_grad():
        close = torch.nn.functional.cosine_similarity(
            quantised(input_ids=ids).logits.flatten(), expected.flatten(), 0
        )
    assert close > 0.9  # 4-bit rounding of the base, not another model

    # --peft_path continues the QLoRA adapter: at learning rate 0 it comes out as it went in.
    again = train(
        train_argv(
            model_dir, tokenizer_dir, data_dir, tmp_path / "again", load_in_kbits=4, peft_path=lora_dir,
            learning_rate=0, max_steps=2, do_eval=False, evaluation_strategy="no", save_strategy="no",
        )
    )  # fmt: skip
    continued = load_file(again / "adapter_model.safetensors")
    assert continued.keys() == saved.keys() and all(torch.equal(continued[k], saved[k]) for k in saved)


def test_full_finetuning_writes_a_complete_model_folder(model_dir, tokenizer_dir, data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, out, full_finetuning=True, max_steps=4, learning_rate=1e-3
    )
    with caplog.at_level("WARNING"):
        folder = train(argv)
    assert folder == out / "sft_full_model"
    assert "the LoRA flags (--lora_rank" in caplog.text
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "template.json",
        "training_args.json",
        "tokenizer.model",
    } <= names
    assert not (out / "sft_lora_model").exists()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tuned = AutoModelForCausalLM.from_pretrained(str(folder))
    moved = [
        name
        for name, param in tuned.named_parameters()
        if not torch.equal(param, base.get_parameter(name).to(param.dtype))
    ]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.norm.weight" in moved
    for step in (2, 4):  # every checkpoint holds a model folder of its own (hard links, no copy)
        assert (out / f"checkpoint-{step}" / "sft_full_model" / "model.safetensors").is_file()

    # chat answers from the folder alone (its template and tokenizer are inside).
    from llama_sft.tools.chat import main as chat_main

    questions = tmp_path / "q.txt"
    questions.write_text("hello\n")
    answers = tmp_path / "a.json"
    chat_main(
        ["--base_model", str(folder), "--data_file", str(questions), "--predictions_file", str(answers),
         "--do_sample", "false", "--max_new_tokens", "4"]
    )  # fmt: skip
    assert len(json.loads(answers.read_text())) == 1


def test_full_finetuning_resumed_after_a_kill_ends_as_an_uninterrupted_run(
    model_dir, tokenizer_dir, data_dir, tmp_path
):
    def argv(out):
        return train_argv(
            model_dir, tokenizer_dir, data_dir, out, full_finetuning=True, max_steps=6, save_steps=3,
            eval_steps=3, per_device_train_batch_size=2, overwrite_output_dir=False, learning_rate=1e-3,
        )  # fmt: skip

    whole = train(argv(tmp_path / "whole"))
    killed = run_with(argv(tmp_path / "killed"), 4, int(signal.SIGKILL))
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoint-3" / "sft_full_model").is_dir()
    resumed = train(argv(tmp_path / "killed"))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"load_in_kbits": 3}, "--load_in_kbits 3: supported are 4 (QLoRA: NF4 or FP4), 8 (LLM.int8) and 16"),
        ({"load_in_kbits": 4, "full_finetuning": True}, "--load_in_kbits 4 with --full_finetuning"),
        (
            {"load_in_kbits": 8, "deepspeed": "ZERO3"},
            "--load_in_kbits 8 with DeepSpeed ZeRO-3: ZeRO-3 shards the weights",
        ),
    ],
)
def test_unworkable_kbit_settings_are_refused_before_loading(
    model_dir, tokenizer_dir, data_dir, tmp_path, capsys, flags, message
):
    if flags.get("deepspeed") == "ZERO3":
        config = tmp_path / "ds3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
        flags = {**flags, "deepspeed": config}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(model_dir, tokenizer_dir, data_dir, out, **flags))
    # Parsing a DeepSpeed config registers it process-wide: the refused run must not leave ZeRO-3
    # behind for the next model this process loads.
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_bitsandbytes_is_one_line_with_the_install_command(
    model_dir, tokenizer_dir, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out", load_in_kbits=4))
    assert exit_info.value.code == 2
    assert "needs bitsandbytes: pip install bitsandbytes==0.50.2" in capsys.readouterr().err
