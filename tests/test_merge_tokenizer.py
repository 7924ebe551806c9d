"""llama-sft merge-tokenizer on generated SentencePiece models and, when present, the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from lora_helpers import logits, peft_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_sft.cli import main as cli_main
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import demo_records, make_model, make_tokenizer, write_alpaca
from llama_sft.tools.merge import merge
from llama_sft.tools.merge_tokenizer import HF_DIR, SP_DIR, SP_NAME, merge_tokenizers

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers"
ENGLISH = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Translate the following sentence into Chinese and explain the grammar used in it.",
] * 30
CHINESE = [
    "人工智能是研究开发用于模拟延伸和扩展人的智能的理论方法技术及应用系统的一门新的技术科学。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "中国的首都是北京，上海是中国最大的城市之一。",
    "请把这个英文词翻译成中文，并给出一个例句。",
    "今天天气很好，我们一起去公园散步吧。",
    "机器学习是人工智能的一个分支，深度学习是机器学习的一种方法。",
    "我们说是指一个人在社会中的地位。",
] * 20
SENTENCE = "人工智能是研究开发用于模拟人的智能的理论方法。"


def chinese_sp_model(folder: Path, vocab_size: int = 300) -> Path:
    """A Chinese SentencePiece model as merge-tokenizer expects one (no byte fallback, own specials)."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHINESE),
        model_prefix=str(folder / "chinese_sp"),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return folder / "chinese_sp.model"


def pieces(model: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def check_merged(out: Path, llama_model: Path, chinese_model: Path, capsys=None) -> int:
    llama, chinese = pieces(llama_model), pieces(chinese_model)
    merged_model = out / SP_DIR / SP_NAME
    merged = pieces(merged_model)
    assert merged[: len(llama)] == llama, "LLaMA pieces keep their ids"
    assert len(set(merged)) == len(merged), "no duplicated pieces"
    known = set(llama)
    expected_new = [p for p in dict.fromkeys(chinese) if p not in known and not p.startswith("<")]
    assert merged[len(llama) :] == expected_new
    hf = AutoTokenizer.from_pretrained(str(out / HF_DIR))
    assert len(hf) == len(merged) == len(llama) + len(expected_new)
    before = spm.SentencePieceProcessor(model_file=str(llama_model)).encode(SENTENCE)
    after = spm.SentencePieceProcessor(model_file=str(merged_model)).encode(SENTENCE)
    assert len(after) < len(before)
    assert hf(SENTENCE, add_special_tokens=False)["input_ids"] == after
    assert TextTokenizer.load(out / HF_DIR).encode(SENTENCE) == after
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2
    return len(expected_new)


def test_merge_generated_models_then_train(tmp_path, capsys):
    llama_dir = tmp_path / "llama"
    make_tokenizer(llama_dir, ENGLISH, vocab_size=300, with_pad=False)
    chinese = chinese_sp_model(tmp_path / "zh")
    out = tmp_path / "merged"
    cli_main(
        [
            "merge-tokenizer",
            "--llama_tokenizer_dir",
            str(llama_dir),
            "--chinese_sp_model_file",
            str(chinese),
            "--output_dir",
            str(out),
            "--text",
            SENTENCE,
        ]
    )
    printed = capsys.readouterr().out
    added = check_merged(out, llama_dir / "tokenizer.model", chinese)
    assert added > 50
    assert f"added from the Chinese model: {added}" in printed
    assert "before (" in printed and "after (" in printed

    # The merged tokenizer trains: a tiny model over its vocabulary, a few steps of llama-sft train.
    tokenizer = TextTokenizer.load(out / HF_DIR)
    root = tmp_path / "run"
    train_records, held = demo_records()
    write_alpaca(train_records[:32], root / "data" / "train.json")
    make_model(root / "base", len(tokenizer) - 1, hidden=32, layers=1, heads=2)
    from llama_sft.training.run import train

    lora = train(
        [
            "--model_name_or_path", str(root / "base"),
            "--tokenizer_name_or_path", str(out / HF_DIR),
            "--dataset_dir", str(root / "data"),
            "--data_cache_dir", str(root / "cache"),
            "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--max_seq_length", "256", "--output_dir", str(root / "output"),
            "--lora_rank", "4", "--lora_alpha", "8", "--trainable", "q_proj,v_proj",
            "--modules_to_save", "embed_tokens,lm_head", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "1",
        ]
    )  # fmt: skip
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert len(TextTokenizer.load(lora)) == len(tokenizer)

    # ... and the LoRA it trained (over a vocabulary grown by <pad>) merges to PEFT's logits.
    merged = merge(root / "base", [lora], "huggingface", root / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    reference = peft_reference(root / "base", [lora])
    assert model.config.vocab_size == len(tokenizer) == len(AutoTokenizer.from_pretrained(str(merged)))
    diff = (logits(model, len(tokenizer)) - logits(reference, len(tokenizer))).abs().max().item()
    assert diff < 1e-4, diff


def test_merge_real_llama_and_chinese_models(tmp_path):
    llama_model = SHARED / "llama" / "tokenizer.model"
    chinese = SHARED / "chinese-sp" / "chinese_sp.model"
    if not (llama_model.is_file() and chinese.is_file()):
        pytest.skip(f"real tokenizers not present under {SHARED}")
    report = merge_tokenizers(llama_model.parent, chinese, tmp_path / "out")
    added = check_merged(tmp_path / "out", llama_model, chinese)
    assert report.llama_pieces == 32000 and report.added == added
    assert report.merged_pieces == 32000 + added
    print(f"real merge: 32000 + {added} = {report.merged_pieces} pieces")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    chinese = chinese_sp_model(tmp_path / "zh")
    (tmp_path / "not_a_model").write_bytes(b"\x00garbage")
    cases = [
        (
            ["--llama_tokenizer_dir", str(tmp_path / "missing"), "--chinese_sp_model_file", str(chinese)],
            "missing",
        ),
        (
            ["--llama_tokenizer_dir", str(tmp_path / "zh"), "--chinese_sp_model_file", str(chinese)],
            "no tokenizer.model",
        ),
        (
            ["--llama_tokenizer_dir", str(chinese), "--chinese_sp_model_file", str(tmp_path / "not_a_model")],
            "not a SentencePiece model",
        ),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["merge-tokenizer", *argv, "--output_dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
