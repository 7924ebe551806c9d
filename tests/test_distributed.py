"""The documented command under torchrun: DeepSpeed ZeRO-2, --fp16, --torch_dtype float16, and 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_quiet, train_argv, write_json
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

SCRIPT = ROOT / "scripts" / "training" / "run_clm_sft_with_peft.py"
DS_CONFIG = ROOT / "scripts" / "training" / "ds_zero2_no_offload.json"

pytestmark = pytest.mark.slow


def torchrun(
    nproc: int, argv: list[str], tmp_path: Path, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(29500 + os.getpid() % 1000), str(script), *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_documented_command_with_deepspeed(model_dir, tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, out, deepspeed=DS_CONFIG, fp16=True, torch_dtype="float16",
        gradient_checkpointing=True, ddp_find_unused_parameters="False", per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    result = torchrun(1, argv, tmp_path)
    assert "trainable params:" in result.stdout
    assert "float16 on a CPU runs ~100x slower" in result.stderr
    assert_quiet(result, "run_clm_sft_with_peft.py --deepspeed")

    lora_dir = out / "sft_lora_model"
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8) and sorted(config["modules_to_save"]) == [
        "embed_tokens",
        "lm_head",
    ]
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(lora_dir))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-3)
    # The base inside the PEFT model is still the base on disk.
    inner = tuned.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(inner, base.model.layers[0].self_attn.q_proj.weight)


def test_two_processes(model_dir, tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(model_dir, tokenizer_dir, data_dir, out, per_device_train_batch_size=2)
    result = torchrun(2, argv, tmp_path)
    # The first process tokenizes and caches; the second waits, then reads the cache (else it warns).
    assert "tokenized the data itself" not in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".sft_lora_model*"))


def losses_and_adapter(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], load_file(
        out / "sft_lora_model" / "adapter_model.safetensors"
    )


def assert_equivalent(a: Path, b: Path, tol: float = 1e-5) -> None:
    (loss_a, adapter_a), (loss_b, adapter_b) = losses_and_adapter(a), losses_and_adapter(b)
    assert len(loss_a) == len(loss_b) == 4
    assert loss_a == pytest.approx(loss_b, abs=tol)
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        assert torch.allclose(adapter_a[key], adapter_b[key], atol=tol, rtol=0), key


def test_processes_and_accumulation_are_equivalent(model_dir, tokenizer_dir, data_dir, tmp_path):
    """Same seed, same global batch of 8 records: 1x8, 2 processes x 4, and 8 accumulated steps of 1."""

    def argv(out: Path, batch: int, accumulation: int) -> list[str]:
        return train_argv(
            model_dir, tokenizer_dir, data_dir, out, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, lora_dropout=0.0, save_strategy="no", do_eval=False,
            evaluation_strategy="no", learning_rate=5e-3,
        )  # fmt: skip

    torchrun(1, argv(tmp_path / "one", 8, 1), tmp_path)
    torchrun(2, argv(tmp_path / "two", 4, 1), tmp_path)
    torchrun(1, argv(tmp_path / "accumulated", 1, 8), tmp_path)
    assert_equivalent(tmp_path / "one", tmp_path / "two")
    assert_equivalent(tmp_path / "one", tmp_path / "accumulated")


@pytest.mark.parametrize("deepspeed", [None, DS_CONFIG], ids=["ddp", "deepspeed"])
def test_two_processes_resume_matches_uninterrupted(model_dir, tokenizer_dir, data_dir, tmp_path, deepspeed):
    def argv(out: Path, **extra) -> list[str]:
        return train_argv(
            model_dir, tokenizer_dir, data_dir, out, deepspeed=deepspeed, per_device_train_batch_size=2,
            save_steps=2, eval_steps=2, overwrite_output_dir=False, **extra,
        )  # fmt: skip

    reference = tmp_path / "reference"
    torchrun(2, argv(reference), tmp_path)
    assert (reference / "checkpoint-2" / "sft_lora_model").is_dir()

    # A run that died after its step-2 checkpoint: only that checkpoint is left; the same command resumes.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")
    result = torchrun(2, argv(resumed), tmp_path)
    assert "resuming from" in result.stderr
    (loss_ref, adapter_ref), (loss_res, adapter_res) = (
        losses_and_adapter(reference),
        losses_and_adapter(resumed),
    )
    assert loss_res == pytest.approx(loss_ref, abs=1e-6)
    for key in adapter_ref:
        assert torch.allclose(adapter_ref[key], adapter_res[key], atol=1e-6, rtol=0), key


def test_zero3_saves_full_adapter(model_dir, tokenizer_dir, data_dir, tmp_path):
    """ZeRO-3 partitions every parameter; the saved adapter must still hold whole, trained tensors."""
    out = tmp_path / "out"
    zero3 = ROOT / "scripts" / "training" / "ds_zero3_no_offload.json"
    torchrun(
        1,
        train_argv(model_dir, tokenizer_dir, data_dir, out, deepspeed=zero3, evaluation_strategy="no"),
        tmp_path,
    )
    tensors = load_file(out / "sft_lora_model" / "adapter_model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert (
        tensors["base_model.model.model.embed_tokens.weight"].shape == base["model.embed_tokens.weight"].shape
    )
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.numel() > 0 and t.abs().sum() > 0 for t in lora_b)
    assert (out / "checkpoint-4" / "sft_lora_model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("zero", [2, 3])
def test_full_finetuning_under_deepspeed_saves_a_whole_model(
    model_dir, tokenizer_dir, data_dir, tmp_path, zero
):
    """ZeRO-3 shards every weight; the saved model (and each checkpoint's) holds whole, trained tensors."""
    out = tmp_path / "out"
    config = ROOT / "scripts" / "training" / f"ds_zero{zero}_no_offload.json"
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, out, deepspeed=config, evaluation_strategy="no", do_eval=False,
        full_finetuning=True, learning_rate=1e-3,
    )  # fmt: skip
    torchrun(1, argv, tmp_path)
    tuned = load_file(out / "sft_full_model" / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert tuned.keys() == base.keys()
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert tuned[name].shape == base[name].shape
        assert not torch.equal(tuned[name].float(), base[name].float()), name
    assert (out / "checkpoint-4" / "sft_full_model" / "model.safetensors").is_file()
    assert json.loads((out / "sft_full_model" / "template.json").read_text())["name"] == "alpaca"


def test_two_processes_on_conversations(model_dir, tokenizer_dir, tmp_path):
    """Conversations under 2 processes: one tokenizes and caches, both train, the data report is
    the same counts a single process computes."""
    data = tmp_path / "data"
    talk = [("Translate to Chinese: red", "红色"), ("And dog?", "狗"), ("And cat?", "猫")]
    turns = [
        {"from": side, "value": text}
        for pair in talk
        for side, text in zip(("human", "gpt"), pair, strict=True)
    ]
    write_json(data / "train" / "talks.json", [{"conversations": turns}] * 16)
    (data / "eval.jsonl").write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    argv = train_argv(
        model_dir, tokenizer_dir, data, out, validation_file=data / "eval.jsonl", per_device_train_batch_size=2,
        prompt_template="llama2-chat", max_seq_length=48,
    )  # fmt: skip
    result = torchrun(2, argv, tmp_path)
    assert "tokenized the data itself" not in result.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["whole"] + stats["train"]["shortened"] + stats["train"]["truncated"] == 16
    assert stats["train"]["turns_trained"] >= 16 and stats["eval"]["turns_trained"] >= 1


def test_two_processes_pretraining(model_dir, tokenizer_dir, tmp_path):
    """Pre-training under 2 processes: the first tokenizes the text into the cache, the second maps it;
    both train, and the held-out blocks are the same in both."""
    data = tmp_path / "text"
    data.mkdir()
    lines = [f"第{i}天，我们去公园散步，看见了{i % 7}只小鸟。" for i in range(200)]
    (data / "days.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = train_argv(
        model_dir, tokenizer_dir, data, out, dataset_dir=data, validation_file=None, max_seq_length=None,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, validation_split_percentage=0.05,
    ) + ["--block_size", "32"]  # fmt: skip
    result = torchrun(2, argv, tmp_path, script=ROOT / "scripts" / "training" / "run_clm_pt_with_peft.py")
    assert "tokenized the data itself" not in result.stderr
    assert "200 documents" in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any("eval_loss" in h for h in state["log_history"])
    assert (out / "pt_lora_model" / "adapter_model.safetensors").is_file()
    assert len(list((tmp_path / "cache").glob("pretrain-*.tokens"))) == 1
