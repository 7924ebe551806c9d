"""--dry_run: parameter counts from a meta-device model, data statistics and a memory estimate."""

import json
import os

import torch

from llama_sft.tools.demo import build_demo
from llama_sft.training.args import parse_train_args
from llama_sft.training.planner import build_meta_model, count_parameters, estimate_memory
from llama_sft.training.run import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEVEN = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def llama_config(folder, vocab, hidden, intermediate, layers, heads):
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llama_7b_trainable_count_matches_the_original(tmp_path):
    # Chinese-Alpaca LLaMA-7B SFT set-up: 49954-row vocabulary, r=8 on the seven projections,
    # embed_tokens and lm_head trained in full. The original printed 429,211,648 trainable:
    # 32 layers x 8 x (4 x (4096+4096) + 3 x (4096+11008)) LoRA + 2 x 49954 x 4096.
    folder = llama_config(tmp_path / "7b", 49954, 4096, 11008, 32, 32)
    args = parse_train_args(
        ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"), "--lora_rank", "8",
         "--trainable", ",".join(SEVEN), "--modules_to_save", "embed_tokens,lm_head"]
    )  # fmt: skip
    model = build_meta_model(args, 49954)
    trainable, total = count_parameters(model)
    assert trainable == 429_211_648
    assert all(p.device == torch.device("meta") for p in model.parameters())
    assert total > 6_800_000_000

    # Training frees the float16 base copies of embed_tokens and lm_head (2 x 49954 x 4096), except
    # under DeepSpeed.
    def frozen(deepspeed):
        plan = estimate_memory(
            model, load_dtype=torch.float16, compute_dtype=torch.float16, tokens_per_pass=512,
            labelled_tokens_per_pass=256, gradient_checkpointing=False, zero=2 if deepspeed else 0,
            frees_base_copies=not deepspeed, world_size=1, device="cuda",
        )  # fmt: skip
        return plan.parts["frozen weights"]

    assert frozen(True) == (total - trainable) * 2
    assert frozen(False) == frozen(True) - 2 * 49954 * 4096 * 2


def test_cli_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    build_demo(tmp_path / "demo")
    vocab = json.loads((tmp_path / "demo" / "base_model" / "config.json").read_text())["vocab_size"]
    model_dir = llama_config(tmp_path / "config_only", vocab, 128, 344, 4, 4)  # no weight files
    out = tmp_path / "out"
    result = train(
        ["--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tmp_path / "demo" / "tokenizer"),
         "--dataset_dir", str(tmp_path / "demo" / "data" / "train"), "--do_train", "--output_dir", str(out),
         "--data_cache_dir", str(tmp_path / "cache"), "--trainable", ",".join(SEVEN),
         "--modules_to_save", "embed_tokens,lm_head", "--per_device_train_batch_size", "8", "--dry_run"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert result is None
    assert "trainable params:" in printed and "estimated peak" in printed and "training examples" in printed
    assert not out.exists()


def test_kbit_and_full_finetuning_plans(tmp_path):
    """4-bit: the seven projections of LLaMA-7B's 32 layers are quantised (embed_tokens and lm_head
    are trained in full and stay as they are); full fine-tuning trains all 6.7B weights, its
    weights, gradients and Adam states sharded by ZeRO-3 across 8 processes."""
    from llama_sft.training.planner import KBIT_BYTES, quantised_weights

    folder = llama_config(tmp_path / "7b", 32000, 4096, 11008, 32, 32)
    base = ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]
    lora = ["--trainable", ",".join(SEVEN), "--modules_to_save", "embed_tokens,lm_head"]
    model = build_meta_model(parse_train_args(base + lora + ["--load_in_kbits", "4"]), 32000)
    quantised = quantised_weights(model, ["embed_tokens", "lm_head"])
    assert quantised == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) == 6_476_005_376

    def plan(model, **kw):
        settings = dict(
            load_dtype=torch.float16, compute_dtype=torch.float16, tokens_per_pass=512,
            labelled_tokens_per_pass=256, gradient_checkpointing=False, zero=0, frees_base_copies=True,
            world_size=1, device="cuda",
        )  # fmt: skip
        return estimate_memory(model, **{**settings, **kw}).parts

    sixteen, four = plan(model), plan(model, kbits=4, keep_unquantised=["embed_tokens", "lm_head"])
    assert (
        four["frozen weights"]
        == int(quantised * KBIT_BYTES[4, True]) + (sixteen["frozen weights"] // 2 - quantised) * 2
    )
    assert four["frozen weights"] < sixteen["frozen weights"] / 3

    full = build_meta_model(parse_train_args(base + ["--full_finetuning"]), 32000)
    trainable, total = count_parameters(full)
    assert trainable == total == 6_738_415_616
    parts = plan(full, zero=3, world_size=8)
    assert parts["frozen weights"] == 0
    assert parts["trainable weights"] == total * 4 // 8 and parts["AdamW state"] == total * 8 // 8
