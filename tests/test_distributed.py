"""The documented command under torchrun: DeepSpeed ZeRO-2, --fp16, --torch_dtype float16, and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_argv
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

SCRIPT = ROOT / "scripts" / "training" / "run_clm_sft_with_peft.py"
DS_CONFIG = ROOT / "scripts" / "training" / "ds_zero2_no_offload.json"

pytestmark = pytest.mark.slow


def torchrun(nproc: int, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT), *argv]
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
    torchrun(2, argv, tmp_path)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".sft_lora_model*"))
