"""DoRA and rsLoRA: training with --use_dora/--use_rslora, merging DoRA adapters as PEFT does, and the
fused LoRA layers leaving DoRA to PEFT."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import train_argv
from lora_helpers import TARGETS, load_model, logits, peft_reference, write_base, write_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_merge import run_cli
from transformers import AutoModelForCausalLM

from llama_sft.speedups.fused_modules import FusedLoraLinear, use_fused_modules
from llama_sft.tools.merge import merge
from llama_sft.tools.weights import permute
from llama_sft.training.args import LoraArguments, parse_train_args
from llama_sft.training.model import attach_lora
from llama_sft.training.planner import build_meta_model, count_parameters
from llama_sft.training.run import train


def write_dora(base, out, **kwargs):
    return write_lora(base, out, use_dora=True, **kwargs)


def unmerged_logits(base, lora, vocab):
    """The adapter as PEFT runs it while training: not merged, DoRA computed in the forward."""
    return logits(PeftModel.from_pretrained(load_model(base, vocab), str(lora)), vocab)


@pytest.mark.parametrize(
    ("shards", "extra"),
    [
        (1, {}),
        (2, {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
        (1, {"targets": [*TARGETS, "embed_tokens"]}),
    ],
)
def test_dora_merge_matches_peft(tmp_path, shards, extra):
    base = tmp_path / "base"
    write_base(base, shards=shards)
    lora = write_dora(base, tmp_path / "lora", **extra)
    out = merge(base, [lora], "huggingface", tmp_path / "out")
    merged = logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), 96)
    assert (merged - logits(peft_reference(base, [lora]), 96)).abs().max().item() < 1e-4
    assert (merged - unmerged_logits(base, lora, 96)).abs().max().item() < 1e-4
    # The magnitudes count: the same A and B merged as a plain LoRA give other logits.
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    plain = load_file(lora / "adapter_model.safetensors")
    plain = {k: v for k, v in plain.items() if "magnitude" not in k}
    save_file(plain, str(lora / "adapter_model.safetensors"))
    merge(base, [lora], "huggingface", tmp_path / "plain")
    as_lora = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32), 96)
    assert (merged - as_lora).abs().max().item() > 1e-2


def test_dora_after_lora_over_a_resized_vocabulary(tmp_path):
    # The second adapter was trained on base + first: its norms are of that weight plus its delta.
    base = tmp_path / "base"
    write_base(base, shards=2)
    first = write_lora(base, tmp_path / "first", vocab=110, seed=1)
    second = write_dora(base, tmp_path / "second", seed=2, start_from=peft_reference(base, [first]))
    out = merge(base, [first, second], "huggingface", tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    diff = logits(merged, 110) - logits(peft_reference(base, [first, second]), 110)
    assert diff.abs().max().item() < 1e-4

    # pth output: the same merged tensors in Meta's layout.
    merge(base, [first, second], "pth", tmp_path / "pth")
    meta = torch.load(tmp_path / "pth" / "consolidated.00.pth", weights_only=True)
    hf = merged.state_dict()
    assert torch.equal(
        permute(meta["layers.1.attention.wq.weight"], 4), hf["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(meta["layers.0.feed_forward.w2.weight"], hf["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("problem", ["no_magnitudes", "magnitudes_without_flag", "wrong_length"])
def test_inconsistent_dora_adapters_are_refused(tmp_path, capsys, problem):
    base = tmp_path / "base"
    write_base(base)
    lora = write_dora(base, tmp_path / "lora")
    weights, config_file = lora / "adapter_model.safetensors", lora / "adapter_config.json"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    if problem == "no_magnitudes":
        tensors = {k: v for k, v in tensors.items() if "magnitude" not in k}
    elif problem == "magnitudes_without_flag":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": False}))
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(weights))
    err = run_cli(
        ["merge", "--base_model", str(base), "--lora_model", str(lora), "--output_dir", str(tmp_path / "o")],
        capsys,
    )
    expected = {
        "no_magnitudes": "lora_magnitude_vector of 32 values (found none)",
        "magnitudes_without_flag": "no use_dora: true",
        "wrong_length": "lora_magnitude_vector of 32 values (found 31 values)",
    }[problem]
    assert expected in err and str(weights) in err
    assert not (tmp_path / "o").exists()


def test_fused_lora_linear_leaves_dora_to_peft():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(24, 40))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.0)
    reference = get_peft_model(layer, config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.2)
    fused = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 40)), config)
    fused.load_state_dict(reference.state_dict())
    use_fused_modules(fused, norms_mlps=False, rotary=False)
    module = fused.base_model.model[0]
    assert isinstance(module, FusedLoraLinear)
    x = torch.randn(3, 5, 24)
    expected, got = reference(x), fused(x)
    assert torch.equal(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    magnitude = "base_model.model.0.lora_magnitude_vector.default.weight"
    fused_params = dict(fused.named_parameters())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            assert torch.equal(fused_params[name].grad, param.grad), name
    assert fused_params[magnitude].grad.abs().sum() > 0


def test_peft_path_keeps_its_dora_config(tmp_path, caplog):
    base = tmp_path / "base"
    write_base(base)
    lora = write_dora(base, tmp_path / "lora", use_rslora=True, targets=["q_proj", "v_proj"])
    given = LoraArguments(
        peft_path=str(lora), lora_rank=4, lora_alpha=8, lora_dropout=0.0, trainable="q_proj,v_proj"
    )
    with caplog.at_level(logging.WARNING):
        model = attach_lora(load_model(base), given)
    # --use_dora and --use_rslora were left at their defaults: nothing of the user's is ignored, and
    # the adapter stays DoRA.
    assert "is ignored" not in caplog.text
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in name for name in trainable)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        attach_lora(load_model(base), LoraArguments(**{**vars(given), "use_dora": True, "use_rslora": True}))
    assert "is ignored" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        attach_lora(load_model(base), LoraArguments(**{**vars(given), "lora_rank": 16}))
    assert "its r is 4; the flag's 16 is ignored" in caplog.text


def test_dry_run_counts_the_magnitudes(tmp_path):
    base = tmp_path / "base"
    write_base(base)

    def trainable(*flags):
        argv = ["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "out"), "--lora_rank", "4"]
        argv += ["--trainable", "q_proj,down_proj", *flags]
        return count_parameters(build_meta_model(parse_train_args(argv), 96))[0]

    # One magnitude per output row of each adapted layer: 2 layers x (32 + 32).
    assert trainable("--use_dora") - trainable() == 2 * (32 + 32)
    assert trainable("--use_rslora") == trainable()


def test_training_with_dora_and_rslora(model_dir, tokenizer_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    flags = {"use_dora": True, "use_rslora": True, "max_steps": 12, "learning_rate": 5e-3}
    no_eval_no_save = {"do_eval": False, "evaluation_strategy": "no", "save_strategy": "no"}
    lora_dir = train(train_argv(model_dir, tokenizer_dir, data_dir, out, **flags, **no_eval_no_save))
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses

    # The magnitudes trained: they moved away from the weight norms they start from.
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    start = torch.linalg.vector_norm(base["model.layers.0.self_attn.q_proj.weight"], dim=1)
    assert not torch.allclose(tensors[name], start, atol=1e-4)

    # The trained adapter merges through the CLI into what PEFT computes.
    merged = tmp_path / "merged"
    capsys.readouterr()
    from llama_sft.cli import main as cli_main

    cli_main(
        ["merge", "--base_model", str(model_dir), "--lora_model", str(lora_dir), "--output_dir", str(merged)]
    )
    rows = base["model.embed_tokens.weight"].shape[0]
    got = logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32), rows)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(lora_dir))
    assert (got - logits(reference, rows)).abs().max().item() < 1e-4
