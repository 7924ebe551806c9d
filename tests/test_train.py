"""End-to-end training in-process on a tiny model: what lands in sft_lora_model, and that it is right."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import train_argv
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from llama_sft.checks import ModelError
from llama_sft.data.collate import Collator
from llama_sft.data.encode import encode_records
from llama_sft.data.records import load_records
from llama_sft.data.templates import load_template
from llama_sft.speedups import cpu_kernels
from llama_sft.speedups.memory import drop_replaced_base_weights, replaced_base_modules
from llama_sft.tools.demo import make_model
from llama_sft.training.args import LoraArguments
from llama_sft.training.model import attach_lora
from llama_sft.training.run import train


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_loss(model, tokenizer, eval_file) -> float:
    dataset, _ = encode_records(load_records(eval_file), load_template("alpaca"), tokenizer, 128)
    batch = Collator(tokenizer.pad_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model(**batch).loss.item()


def test_documented_flags_write_a_ready_lora(model_dir, tokenizer_dir, tokenizer, data_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    before = digest(weights)
    out = tmp_path / "out"
    torch.backends.cuda.enable_cudnn_sdp(True)
    lora_dir = train(
        train_argv(
            model_dir,
            tokenizer_dir,
            data_dir,
            out,
            fp16=True,
            torch_dtype="float16",
            gradient_checkpointing=True,
        )
    )
    # The run says which speed-ups it used; cuDNN's attention is left alone off a GPU.
    assert torch.backends.cuda.cudnn_sdp_enabled()

    assert lora_dir == out / "sft_lora_model"
    names = {p.name for p in lora_dir.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= names
    assert {"special_tokens_map.json", "template.json", "training_args.json"} <= names
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert sorted(config["target_modules"]) == sorted(
        "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj".split(",")
    )
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    assert json.loads((lora_dir / "template.json").read_text())["name"] == "alpaca"
    run = json.loads((lora_dir / "training_args.json").read_text())
    assert run["lora"]["lora_rank"] == 4 and run["data"]["max_seq_length"] == 128
    assert run["speedups"]["no_cudnn_attention"] == "skipped: not on a CUDA GPU"
    assert run["speedups"]["labelled_logits"].startswith("applied")
    assert (out / "loss_curve.png").stat().st_size > 1000
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "sft_lora_model" / "adapter_model.safetensors").is_file()

    # Base weights untouched on disk; adapter weights moved away from their initial values.
    assert digest(weights) == before
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    embed = next(t for name, t in tensors.items() if "embed_tokens" in name)
    assert not torch.equal(embed, base.model.embed_tokens.weight)

    # Stock PEFT loads it and reproduces the trainer's final evaluation.
    base_loss = eval_loss(base, tokenizer, data_dir / "eval.json")
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(lora_dir)
    ).eval()
    tuned_loss = eval_loss(tuned, tokenizer, data_dir / "eval.json")
    recorded = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    # The trainer evaluated under bfloat16 autocast (what --fp16 becomes on a CPU): bf16-sized tolerance.
    assert tuned_loss == pytest.approx(recorded, rel=2e-3)
    assert abs(tuned_loss - base_loss) > 0.1


@pytest.mark.parametrize("modules_to_save", ["embed_tokens,lm_head", None])
def test_gradient_checkpointing_with_and_without_saved_modules(
    model_dir, tokenizer_dir, data_dir, tmp_path, modules_to_save
):
    out = tmp_path / "out"
    argv = train_argv(
        model_dir,
        tokenizer_dir,
        data_dir,
        out,
        gradient_checkpointing=True,
        modules_to_save=modules_to_save,
        do_eval=False,
        evaluation_strategy="no",
        save_strategy="no",
    )
    lora_dir = train(argv)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and all(0 < loss < 100 for loss in losses)
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)
    assert any("embed_tokens" in name for name in tensors) == (modules_to_save is not None)


def test_continue_from_peft_path(model_dir, tokenizer_dir, data_dir, tmp_path, caplog):
    first = train(
        train_argv(
            model_dir, tokenizer_dir, data_dir, tmp_path / "a", do_eval=False, evaluation_strategy="no"
        )
    )
    saved = load_file(first / "adapter_model.safetensors")

    # Learning rate 0: the continued adapter must come out exactly as it was loaded.
    with caplog.at_level(logging.INFO):
        frozen = train(
            train_argv(
                model_dir,
                tokenizer_dir,
                data_dir,
                tmp_path / "b",
                peft_path=first,
                learning_rate=0,
                lora_rank=16,
                do_eval=False,
                evaluation_strategy="no",
            )
        )
    assert "its r is 4; the flag's 16 is ignored" in caplog.text
    kernels_applied = re.search(r"cpu_kernels +applied: fused C kernels", caplog.text) is not None
    assert kernels_applied == (cpu_kernels.kernels() is not None)
    again = load_file(frozen / "adapter_model.safetensors")
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert json.loads((frozen / "adapter_config.json").read_text())["r"] == 4

    # And with a learning rate it keeps training from there.
    moved = train(
        train_argv(
            model_dir,
            tokenizer_dir,
            data_dir,
            tmp_path / "c",
            peft_path=first,
            do_eval=False,
            evaluation_strategy="no",
        )
    )
    after = load_file(moved / "adapter_model.safetensors")
    lora_keys = [k for k in saved if "lora_A" in k]
    assert all(not torch.equal(after[k], saved[k]) for k in lora_keys)


def test_tokenizer_larger_than_model_resizes(tokenizer_dir, tokenizer, data_dir, tmp_path):
    small = tmp_path / "small_model"
    make_model(small, len(tokenizer) - 12, hidden=32, layers=1, heads=2, intermediate=64)
    lora_dir = train(
        train_argv(small, tokenizer_dir, data_dir, tmp_path / "out", do_eval=False, evaluation_strategy="no")
    )
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    embed = next(t for name, t in tensors.items() if "embed_tokens" in name)
    assert embed.shape[0] == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(small))
    base.resize_token_embeddings(len(tokenizer))
    PeftModel.from_pretrained(base, str(lora_dir))


def test_tokenizer_smaller_than_model_is_refused(tokenizer_dir, tokenizer, data_dir, tmp_path):
    big = tmp_path / "big_model"
    make_model(big, len(tokenizer) + 100, hidden=32, layers=1, heads=2, intermediate=64)
    with pytest.raises(ModelError, match="LLaMA vs|original LLaMA tokenizer"):
        train(train_argv(big, tokenizer_dir, data_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bin_base_bin_adapter_template_file_and_tensorboard(
    model_dir, tokenizer, tokenizer_dir, data_dir, tmp_path
):
    """A .bin base (read with weights_only), --save_safetensors False, a template file, TensorBoard logs."""
    bin_model = tmp_path / "bin_model"
    bin_model.mkdir()
    for name in ("config.json", "generation_config.json"):
        (bin_model / name).write_bytes((model_dir / name).read_bytes())
    torch.save(load_file(model_dir / "model.safetensors"), bin_model / "pytorch_model.bin")
    template_file = tmp_path / "qa.json"
    template_file.write_text(json.dumps({"name": "qa", "prompt": "Q: {instruction}\nA:"}))
    out = tmp_path / "out"
    lora_dir = train(
        train_argv(
            bin_model, tokenizer_dir, data_dir, out, save_safetensors="False", prompt_template=template_file,
            report_to="tensorboard",
        )
    )  # fmt: skip
    assert (lora_dir / "adapter_model.bin").is_file() and not (
        lora_dir / "adapter_model.safetensors"
    ).exists()
    assert json.loads((lora_dir / "template.json").read_text())["prompt"] == "Q: {instruction}\nA:"
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bin_model)), str(lora_dir)
    ).eval()
    assert eval_loss(tuned, tokenizer, data_dir / "eval.json") < 100


# The training entry with the run itself replaced by a probe: what the process looks like when
# the run starts. The run module is not imported before the entry (that would allocate).
ALLOCATION_PROBE = """
import os, sys, types
def huge_kib():
    try:
        with open("/proc/self/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    return next((int(line.split()[1]) for line in lines if line.startswith("AnonHugePages:")), -1)
def train(argv, callbacks, task, normalized):
    import torch
    before = huge_kib()
    block = torch.ones(64 * 2**20 // 4)
    grown = huge_kib() - before if before >= 0 else -1
    names = ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY")
    print(*(os.environ.get(name, "unset") for name in names), grown)
run = types.ModuleType("llama_sft.training.run")
run.INPUT_ERRORS, run.TrainingStopped, run.train = (), RuntimeError, train
sys.modules["llama_sft.training.run"] = run
from llama_sft.training.command_line import main
main(sys.argv[1:])
"""


def thp_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise, never, or '' when unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.parametrize(
    "preset, flags", [(None, []), ("0", []), (None, ["--speedups", "off"]), (None, "yaml")]
)
def test_train_sets_allocation_options_before_torch_allocates(preset, flags, tmp_path):
    # A fresh interpreter: the options only count when set before PyTorch's first allocation.
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY")}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset  # a user's own setting wins
    if flags == "yaml":  # speedups: off inside a --config file is the flag
        (tmp_path / "run.yaml").write_text("speedups: 'off'\n")
        flags = ["--config", str(tmp_path / "run.yaml")]
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATION_PROBE, *flags], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    thp, lru, huge_kib = result.stdout.split()
    off = bool(flags)
    assert (thp, lru) == ((preset or "1", "64") if not off else ("unset", "unset"))
    if thp_mode() == "madvise" and int(huge_kib) >= 0:
        # Only PyTorch's request puts the 64 MiB block (partly) in 2 MiB pages in this mode.
        assert (int(huge_kib) >= 2048) == (preset is None and not off)


def test_importing_the_package_changes_no_environment_variable():
    names = ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    env = {k: v for k, v in os.environ.items() if k not in names}
    script = (
        "import os, llama_sft.speedups, llama_sft.training.run, llama_sft.training.command_line, llama_sft.cli; "
        f"print(sorted(set({names!r}) & set(os.environ)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("return_freed, fp16", [(True, False), (True, True), (False, False)])
def test_freed_memory_goes_back_every_step_in_float32_every_eighth_under_bf16_unless_switched_off(
    model_dir, tokenizer_dir, data_dir, tmp_path, monkeypatch, return_freed, fp16
):
    from llama_sft.speedups.memory import TRIM_EVERY_STEPS, ReturnFreedMemory
    from llama_sft.training.precision import cpu_bf16_is_fast

    intervals = []
    monkeypatch.setattr(
        ReturnFreedMemory,
        "on_step_end",
        lambda self, args, state, control, **kw: intervals.append(self.every),
    )
    argv = train_argv(
        model_dir,
        tokenizer_dir,
        data_dir,
        tmp_path / "out",
        max_steps=2,
        do_eval=False,
        evaluation_strategy="no",
        save_strategy="no",
        return_freed_memory=str(return_freed),
        fp16=fp16,
    )
    train(argv)
    # --fp16 trains under bfloat16 autocast where the CPU has bfloat16 units, else in float32.
    every = TRIM_EVERY_STEPS if fp16 and cpu_bf16_is_fast()[0] else 1
    assert intervals == ([every, every] if return_freed else [])


def test_base_copies_of_saved_modules_leave_memory_when_training_begins(
    model_dir, tokenizer_dir, data_dir, tmp_path
):
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            for name in ("model.embed_tokens", "lm_head"):
                wrapper = model.base_model.model.get_submodule(name)
                seen[name] = (wrapper.original_module.weight, wrapper.modules_to_save["default"].weight)

    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, tmp_path / "out", max_steps=2, do_eval=False,
        evaluation_strategy="no", save_strategy="no",
    )  # fmt: skip
    lora_dir = train(argv, callbacks=[Probe()])

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    saved = load_file(lora_dir / "adapter_model.safetensors")
    for name, (original, trained) in seen.items():
        base_weight = base.get_submodule(name).weight
        assert original.is_meta and original.shape == base_weight.shape
        assert not trained.is_meta and trained.dtype == torch.float32
        # The adapter holds the trained copy, which has moved away from the base weights on disk.
        key = next(k for k in saved if f"{name}.weight" in k)
        assert torch.equal(saved[key], trained.detach())
        assert not torch.equal(trained.detach(), base_weight)


def test_replaced_base_weights_are_freed_only_while_the_adapter_is_on(model_dir):
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    rows, width = base.get_input_embeddings().weight.shape
    model = attach_lora(base, LoraArguments(trainable="q_proj", modules_to_save="embed_tokens,lm_head"))
    with model.disable_adapter():
        assert replaced_base_modules(model) == [] and drop_replaced_base_weights(model) == 0
    assert not any(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    # The two bfloat16 originals, and nothing else; shapes stay, so parameter counts do too.
    assert drop_replaced_base_weights(model) == 2 * rows * width * 2
    assert [n for n, p in model.named_parameters() if p.is_meta] == [
        "base_model.model.model.embed_tokens.original_module.weight",
        "base_model.model.lm_head.original_module.weight",
    ]
    assert sum(p.numel() for p in model.parameters()) == total
