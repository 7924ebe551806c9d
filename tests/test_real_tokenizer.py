"""The real Chinese-LLaMA-2 tokenizer (55296 pieces) on real Chinese Alpaca records, when ../shared has them."""

from __future__ import annotations

import json

from conftest import shared_path, train_argv, write_json
from safetensors.torch import load_file

from llama_sft.tools.demo import make_model
from llama_sft.training.run import train


def test_tiny_model_with_55296_rows_trains_on_real_records(tmp_path):
    tokenizer_dir = shared_path("tokenizers/chinese-llama-2")
    records = json.loads(shared_path("data/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    data = tmp_path / "data"
    write_json(data / "train" / "zh.json", records[:48])
    write_json(data / "eval.json", records[960:968])
    model_dir = tmp_path / "model"
    make_model(model_dir, 55296, hidden=32, layers=1, heads=2, intermediate=64)

    out = tmp_path / "out"
    lora_dir = train(
        train_argv(model_dir, tokenizer_dir, data, out, max_seq_length=256, max_steps=3, save_strategy="no",
                   evaluation_strategy="no")
    )  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    embed = next(
        t for name, t in load_file(lora_dir / "adapter_model.safetensors").items() if "embed_tokens" in name
    )
    assert embed.shape == (55296, 32)
    assert json.loads((lora_dir / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["whole"] + stats["truncated"] == 48 - stats["dropped"]
