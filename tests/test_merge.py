"""llama-sft merge: merged logits equal PEFT's, streaming memory, pth layout, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import load_model, logits, peft_reference, write_base, write_lora
from memory_probe import measure
from transformers import AutoModelForCausalLM

from llama_sft.cli import main as cli_main
from llama_sft.tools.demo import make_tokenizer
from llama_sft.tools.merge import merge, meta_params
from llama_sft.tools.weights import permute


def merged_logits_diff(base: Path, loras: list[Path], out: Path) -> float:
    merge(base, loras, "huggingface", out)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reference = peft_reference(base, loras)
    vocab = reference.get_input_embeddings().weight.shape[0]
    assert merged.get_input_embeddings().weight.shape[0] == vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    return (logits(merged, vocab) - logits(reference, vocab)).abs().max().item()


@pytest.mark.parametrize(
    ("fmt", "shards", "vocab"),
    [("safetensors", 1, None), ("safetensors", 3, 120), ("bin", 1, 120), ("bin", 3, None)],
)
def test_one_lora_matches_peft(tmp_path, fmt, shards, vocab):
    base = tmp_path / "base"
    write_base(base, shards=shards, fmt=fmt)
    # The reference reads the same weights from safetensors: transformers is not what is tested here.
    reference_base = tmp_path / "reference_base"
    write_base(reference_base)
    lora = write_lora(reference_base, tmp_path / "lora", vocab=vocab)
    merge(base, [lora], "huggingface", tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    reference = peft_reference(reference_base, [lora])
    rows = vocab or 96
    assert merged.get_input_embeddings().weight.shape[0] == rows
    diff = (logits(merged, rows) - logits(reference, rows)).abs().max().item()
    assert diff < 1e-4, diff
    # The LoRA is not a no-op: the merged model is not the base.
    base_model = load_model(reference_base, rows)
    assert (logits(merged, rows) - logits(base_model, rows)).abs().max().item() > 1e-2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shards
    assert (tmp_path / "out" / "generation_config.json").is_file()


@pytest.mark.parametrize("resize", [False, True])
def test_two_loras_in_sequence_match_peft(tmp_path, resize):
    base = tmp_path / "base"
    write_base(base, shards=2)
    first = write_lora(base, tmp_path / "lora_llama", vocab=110 if resize else None, seed=1)
    second = write_lora(
        base,
        tmp_path / "lora_alpaca",
        vocab=111 if resize else None,
        seed=2,
        start_from=peft_reference(base, [first]),
        targets=["q_proj", "v_proj", "down_proj"],
    )
    diff = merged_logits_diff(base, [first, second], tmp_path / "out")
    assert diff < 1e-4, diff


def test_rslora_rank_and_alpha_patterns_and_bin_adapter(tmp_path):
    base = tmp_path / "base"
    write_base(base, kv_heads=2)
    lora = write_lora(
        base,
        tmp_path / "lora",
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        fmt="bin",
    )
    assert (lora / "adapter_model.bin").is_file()
    assert merged_logits_diff(base, [lora], tmp_path / "out") < 1e-4


def test_bfloat16_base_keeps_its_dtype(tmp_path):
    base = tmp_path / "base"
    write_base(base, dtype=torch.bfloat16)
    lora = write_lora(base, tmp_path / "lora")
    merge(base, [lora], "huggingface", tmp_path / "out")
    from safetensors import safe_open

    shard = next((tmp_path / "out").glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118


def test_tokenizer_and_template_of_last_lora_are_copied(tmp_path):
    texts = ["hello world, this is a tiny corpus"] * 20 + ["你好世界"] * 20
    tokenizer = make_tokenizer(tmp_path / "tok", texts, vocab_size=300)
    base = tmp_path / "base"
    write_base(base, vocab=len(tokenizer))
    lora = write_lora(base, tmp_path / "lora")
    tokenizer.save(lora)
    (lora / "template.json").write_text(json.dumps({"name": "x", "prompt": "Q: {instruction} A:"}))
    out = merge(base, [lora], "huggingface", tmp_path / "out")
    assert (out / "tokenizer.model").is_file() and (out / "template.json").is_file()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == len(tokenizer)


def test_pth_output_layout_and_unpermuted_qk(tmp_path):
    base = tmp_path / "base"
    write_base(base, hidden=64, heads=4, kv_heads=2, shards=2)
    lora = write_lora(base, tmp_path / "lora", vocab=100)
    merge(base, [lora], "huggingface", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).state_dict()
    for shards in (1, 2):
        out = tmp_path / f"pth{shards}"
        merge(base, [lora], "pth", out, pth_shards=shards)
        parts = [torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(shards)]
        assert not (out / f"consolidated.{shards:02d}.pth").exists()
        params = json.loads((out / "params.json").read_text())
        assert params == {
            "dim": 64,
            "n_heads": 4,
            "n_layers": 2,
            "norm_eps": 1e-6,
            "vocab_size": 100,
            "n_kv_heads": 2,
        }
        keys = set(parts[0])
        expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
        for layer in range(2):
            expected |= {f"layers.{layer}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
            expected |= {f"layers.{layer}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
            expected |= {f"layers.{layer}.{n}.weight" for n in ("attention_norm", "ffn_norm")}
        assert keys == expected

        def whole(name: str, dim: int | None, parts=parts) -> torch.Tensor:
            return parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)

        split = 0 if shards > 1 else None
        col = 1 if shards > 1 else None
        assert whole("tok_embeddings.weight", col).shape == (100, 64)
        assert whole("output.weight", split).shape == (100, 64)
        assert torch.equal(whole("output.weight", split), hf["lm_head.weight"])
        assert torch.equal(
            whole("layers.1.feed_forward.w2.weight", col), hf["model.layers.1.mlp.down_proj.weight"]
        )
        assert torch.equal(parts[-1]["norm.weight"], hf["model.norm.weight"])
        wq, wk = whole("layers.0.attention.wq.weight", split), whole("layers.0.attention.wk.weight", split)
        assert wk.shape == (32, 64)
        assert not torch.equal(wq, hf["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(permute(wq, 4), hf["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(permute(wk, 2), hf["model.layers.0.self_attn.k_proj.weight"])
    assert (tmp_path / "pth2" / "consolidated.00.pth").stat().st_size < (
        tmp_path / "pth1" / "consolidated.00.pth"
    ).stat().st_size


def test_meta_params_for_llama_7b():
    config = {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
    }
    params = meta_params({**config, "rms_norm_eps": 1e-6}, 49954)
    assert params == {
        "dim": 4096,
        "n_heads": 32,
        "n_layers": 32,
        "norm_eps": 1e-6,
        "vocab_size": 49954,
        "multiple_of": 256,
    }


# ----------------------------------------------------------------------------------- errors


def run_cli(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_shrinking_vocabulary_order_is_refused(tmp_path, capsys):
    base = tmp_path / "base"
    write_base(base)
    big = write_lora(base, tmp_path / "big", vocab=120)
    small = write_lora(base, tmp_path / "small", vocab=110)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    err = run_cli(
        ["merge", "--base_model", str(base), "--lora_model", f"{big},{small}", "--output_dir", str(out)],
        capsys,
    )
    assert "small/adapter_model.safetensors" in err and "training order" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_adapter_tokenizer_mismatch_is_refused(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path / "tok", ["some english text for a tokenizer"] * 10, vocab_size=300)
    base = tmp_path / "base"
    write_base(base, vocab=len(tokenizer))
    lora = write_lora(base, tmp_path / "lora", vocab=len(tokenizer) + 20)
    tokenizer.save(lora)
    err = run_cli(
        ["merge", "--base_model", str(base), "--lora_model", str(lora), "--output_dir", str(tmp_path / "o")],
        capsys,
    )
    assert str(lora) in err and f"{len(tokenizer)} tokens" in err and "tokenizer" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "problem", ["no_base", "no_weights", "not_lora", "no_adapter_file", "wrong_base", "output_holds_base"]
)
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, problem):
    base = tmp_path / "base"
    write_base(base)
    lora = write_lora(base, tmp_path / "lora")
    if problem == "no_base":
        base = tmp_path / "missing"
    elif problem == "no_weights":
        (base / "model.safetensors").unlink()
    elif problem == "not_lora":
        config = json.loads((lora / "adapter_config.json").read_text())
        (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    elif problem == "no_adapter_file":
        (lora / "adapter_model.safetensors").unlink()
    elif problem == "wrong_base":
        other = tmp_path / "other"
        write_base(other, hidden=48)
        base = other
    # The folder that holds both inputs: replacing it would delete them.
    output = tmp_path if problem == "output_holds_base" else tmp_path / "o"
    err = run_cli(
        ["merge", "--base_model", str(base), "--lora_model", str(lora), "--output_dir", str(output)], capsys
    )
    expected = {
        "no_base": "--base_model",
        "no_weights": "no weights",
        "not_lora": "not a LoRA",
        "no_adapter_file": "adapter_model.safetensors",
        "wrong_base": "another base model",
        "output_holds_base": "holds the input",
    }[problem]
    assert expected in err
    assert not (tmp_path / "o").exists() and (tmp_path / "lora" / "adapter_config.json").is_file()


def test_failure_while_writing_leaves_output_untouched(tmp_path, monkeypatch):
    base = tmp_path / "base"
    write_base(base, shards=2)
    lora = write_lora(base, tmp_path / "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    import llama_sft.tools.weights as weights_module

    calls = {"n": 0}
    real = weights_module.merged_tensor

    def failing(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(weights_module, "merged_tensor", failing)
    with pytest.raises(OSError):
        merge(base, [lora], "huggingface", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# ----------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_peak_memory_is_about_one_shard(tmp_path, use_dora):
    """Peak RSS growth stays near one shard, far below the whole model (6 shards), for DoRA too."""
    base = tmp_path / "base"
    shards = 6
    # hidden 768 x 8 layers, float32: ~180 MB in all, ~30 MB a shard.
    state = write_base(base, vocab=256, hidden=768, layers=8, heads=12, shards=shards)
    total = sum(v.numel() * v.element_size() for v in state.values())
    del state
    lora = write_lora(
        base, tmp_path / "lora", targets=["q_proj", "v_proj", "down_proj"], r=8, use_dora=use_dora
    )
    largest = max(p.stat().st_size for p in base.glob("model-*.safetensors"))
    growth = measure(
        "from llama_sft.tools.merge import merge",
        "merge(argv[0], [argv[1]], 'huggingface', argv[2])",
        base,
        lora,
        tmp_path / "out",
    )["growth"]
    print(
        f"model {total / 2**20:.0f} MB in {shards} shards (largest {largest / 2**20:.0f} MB); "
        f"merge peak RSS growth {growth / 2**20:.0f} MB"
    )
    assert growth < 2 * largest, (growth, largest)
    assert growth < total / 2
    merged = load_model(tmp_path / "out")
    assert merged.config.num_hidden_layers == 8
