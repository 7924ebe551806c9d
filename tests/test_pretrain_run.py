"""Continued pre-training as a run: `llama-sft pretrain`, run_pt.sh, pt_lora_model, resume, bad input,
and the whole route merge-tokenizer -> pretrain -> merge -> train -> chat on tiny models."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import ROOT, SMALL_RECORDS, flags_to_argv, write_json
from lora_helpers import logits
from peft import PeftModel
from safetensors.torch import load_file
from test_reliability import run_with
from transformers import AutoModelForCausalLM

from llama_sft.cli import main as cli_main
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import make_model, make_tokenizer
from llama_sft.training.checkpoints import checkpoints

pytestmark = pytest.mark.slow

BAD = Path(__file__).parent / "bad_inputs" / "pretrain"

# Chinese sentences built from parts: the held-out ones are new combinations of words the model sees.
SUBJECTS = ["小明", "小红", "老师", "我们", "妈妈", "同学们"]
VERBS = ["今天去", "明天去", "喜欢去", "不想去"]
PLACES = ["公园散步。", "图书馆看书。", "学校上课。", "商店买水果。", "海边游泳。"]


def sentences() -> tuple[list[str], list[str]]:
    every = ["".join(parts) for parts in itertools.product(SUBJECTS, VERBS, PLACES)]
    random.Random(0).shuffle(every)
    return every[12:], every[:12]


def write_text_corpus(folder: Path, train: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n".join(train * 3) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": text}, ensure_ascii=False) for text in train]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def pt_argv(model: Path, tokenizer: Path, data: Path, out: Path, **overrides) -> list[str]:
    """run_pt.sh's flags at test size; keyword overrides replace or add flags (None drops one)."""
    flags = {
        "model_name_or_path": model,
        "tokenizer_name_or_path": tokenizer,
        "dataset_dir": data,
        "data_cache_dir": out.parent / "cache",
        "validation_split_percentage": 0.001,
        "per_device_train_batch_size": 4,
        "do_train": True,
        "seed": 7,
        "max_steps": 24,
        "lr_scheduler_type": "cosine",
        "learning_rate": 5e-3,
        "warmup_ratio": 0.05,
        "weight_decay": 0.01,
        "logging_strategy": "steps",
        "logging_steps": 4,
        "save_strategy": "steps",
        "save_total_limit": 3,
        "save_steps": 12,
        "gradient_accumulation_steps": 1,
        "preprocessing_num_workers": 2,
        "block_size": 48,
        "output_dir": out,
        "overwrite_output_dir": True,
        "logging_first_step": True,
        "lora_rank": 8,
        "lora_alpha": 16,
        "trainable": "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        "modules_to_save": "embed_tokens,lm_head",
        "lora_dropout": 0.05,
        "report_to": "none",
        "disable_tqdm": "True",
    }
    flags.update(overrides)
    return flags_to_argv(flags)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer that knows the Chinese sentences, a random model over it, the text and held-out text."""
    root = tmp_path_factory.mktemp("pt")
    train, held = sentences()
    tokenizer = make_tokenizer(root / "tokenizer", train * 3 + ["Hello world."] * 5, vocab_size=400)
    make_model(
        root / "base", len(tokenizer), hidden=32, layers=2, heads=2, intermediate=64, max_positions=256
    )
    write_text_corpus(root / "data", train)
    (root / "held.txt").write_text("\n".join(held * 3) + "\n", encoding="utf-8")
    return root


def eval_losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["eval_loss"] for h in history if "eval_loss" in h]


@pytest.fixture(scope="module")
def finished(world):
    """One `llama-sft pretrain` run, evaluated on held-out sentences before, during and after."""
    out = world / "out"
    argv = pt_argv(
        world / "base",
        world / "tokenizer",
        world / "data",
        out,
        validation_file=world / "held.txt",
        do_eval=True,
        eval_strategy="steps",
        eval_steps=12,
        eval_on_start="True",
    )
    cli_main(["pretrain", *argv])
    return out


def test_pretraining_lowers_held_out_loss_and_writes_pt_lora_model(world, finished):
    losses = eval_losses(finished)
    assert len(losses) >= 3
    assert losses[-1] < losses[0] - 1.0, losses
    folder = finished / "pt_lora_model"
    names = {p.name for p in folder.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.model",
        "training_args.json",
    } <= names
    assert "template.json" not in names  # plain text has no prompt to describe
    described = json.loads((folder / "training_args.json").read_text())
    assert described["task"] == "pre-training"
    assert described["data"]["block_size"] == 48 and "prompt_template" not in described["data"]
    stats = json.loads((finished / "data_stats.json").read_text())
    train_stats = stats["train"]
    assert (train_stats["files"], train_stats["documents"], train_stats["block_size"]) == (2, 108 * 4, 48)
    assert train_stats["blocks"] == train_stats["tokens"] // 48
    assert train_stats["dropped_tokens"] == train_stats["tokens"] - 48 * train_stats["blocks"]
    assert stats["eval"]["documents"] == 36
    assert (finished / "loss_curve.png").stat().st_size > 1000
    assert [c.name for c in checkpoints(finished)] == ["checkpoint-12", "checkpoint-24"]
    assert (finished / "checkpoint-24" / "pt_lora_model" / "adapter_model.safetensors").is_file()


def test_pt_lora_model_loads_in_peft_and_merges_to_the_same_logits(world, finished, tmp_path):
    tokenizer = TextTokenizer.load(world / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(finished / "pt_lora_model")).eval()
    untouched = AutoModelForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32)
    assert (logits(reference, len(tokenizer)) - logits(untouched, len(tokenizer))).abs().max() > 1e-2

    cli_main(
        [
            "merge", "--base_model", str(world / "base"), "--lora_model", str(finished / "pt_lora_model"),
            "--output_dir", str(tmp_path / "merged"),
        ]
    )  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    diff = (logits(merged, len(tokenizer)) - logits(reference, len(tokenizer))).abs().max().item()
    assert diff < 1e-4, diff
    assert TextTokenizer.load(tmp_path / "merged").encode("小明今天去公园散步。") == tokenizer.encode(
        "小明今天去公园散步。"
    )


def test_yaml_config_and_dry_run(world, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    config = tmp_path / "pt.yaml"
    config.write_text(
        "\n".join(
            [
                f"model_name_or_path: {world / 'base'}",
                f"tokenizer_name_or_path: {world / 'tokenizer'}",
                f"dataset_dir: {world / 'data'}",
                f"data_cache_dir: {tmp_path / 'cache'}",
                "block_size: 32",
                f"output_dir: {out}",
                "do_train: true",
                "per_device_train_batch_size: 2",
                "lora_rank: 4",
                "modules_to_save: embed_tokens,lm_head",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    capsys.readouterr()
    cli_main(["pretrain", "--config", str(config), "--dry_run", "True"])
    captured = capsys.readouterr()
    assert "50 blocks of --block_size 32" in caplog.text
    assert "trainable" in captured.out.lower() and "GiB" in captured.out
    assert not out.exists()


def test_block_size_defaults_to_the_model_context(world, tmp_path, caplog):
    argv = pt_argv(world / "base", world / "tokenizer", world / "data", tmp_path / "out", block_size=None)
    cli_main(["pretrain", *argv, "--dry_run", "True"])
    assert "blocks of --block_size 256" in caplog.text  # max_position_embeddings 256 < 1024


def test_sigterm_saves_then_resume_matches(world, tmp_path):
    def argv(out: Path, **overrides) -> list[str]:
        settings = dict(max_steps=6, save_steps=3, overwrite_output_dir=False, per_device_train_batch_size=2)
        settings.update(overrides)
        return pt_argv(world / "base", world / "tokenizer", world / "data", out, **settings)

    def adapter(out: Path) -> dict[str, torch.Tensor]:
        return load_file(out / "pt_lora_model" / "adapter_model.safetensors")

    reference = tmp_path / "reference"
    assert run_with(argv(reference), step=0, what=0, task="pt").returncode == 0
    stopped = tmp_path / "stopped"
    result = run_with(argv(stopped), step=4, what=15, task="pt")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "stopped by SIGTERM at step 4" in result.stderr
    assert [c.name for c in checkpoints(stopped)] == ["checkpoint-3", "checkpoint-4"]
    assert (stopped / "checkpoint-4" / "pt_lora_model").is_dir() and not (stopped / "pt_lora_model").exists()
    assert run_with(argv(stopped), step=0, what=0, task="pt").returncode == 0  # resumes checkpoint-4
    resumed, expected = adapter(stopped), adapter(reference)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    argv = pt_argv(world / "base", world / "tokenizer", world / "data", out, max_steps=6, save_steps=3)
    result = run_with(argv, step=5, what="nan", task="pt")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "step 5: the loss is NaN or infinite" in result.stderr
    assert [c.name for c in checkpoints(out)] == ["checkpoint-3"] and not (out / "pt_lora_model").exists()
    kept = load_file(out / "checkpoint-3" / "pt_lora_model" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def bad_file(name: str):
    def setup(data: Path, flags: dict) -> None:
        for path in data.iterdir():
            path.unlink()
        shutil.copyfile(BAD / name, data / name)

    return setup


def no_text_files(data: Path, flags: dict) -> None:
    for path in data.iterdir():
        path.rename(path.with_suffix(".md"))


def set_flags(**values):
    return lambda data, flags: flags.update(values)


BAD_CASES = [
    ("no text files", no_text_files, ["no *.txt or *.jsonl files in --dataset_dir"]),
    ("empty file", bad_file("empty.txt"), ["empty.txt: the file holds no text", "remove it or fill it"]),
    ("whitespace only", bad_file("whitespace_only.txt"), ["whitespace_only.txt: the file holds no text"]),
    ("not UTF-8", bad_file("not_utf8.txt"), ["not_utf8.txt: not valid UTF-8 at byte 28 (line 2)", "UTF-8"]),
    (
        "jsonl without text",
        bad_file("no_text_field.jsonl"),
        ['no_text_field.jsonl, line 2: no "text" string'],
    ),
    ("jsonl not JSON", bad_file("invalid_json.jsonl"), ["invalid_json.jsonl, line 2: invalid JSON"]),
    (
        "block larger than the context",
        set_flags(block_size=512),
        [
            "--block_size 512 is larger than the model's context (256 positions",
            "use --block_size 256 or less",
        ],
    ),
    ("block of one token", set_flags(block_size=1), ["--block_size 1: must be a finite number at least 2"]),
    (
        "fewer tokens than a block",
        set_flags(block_size=256, dataset_dir="held.txt"),
        ["fewer than one block of --block_size 256", "add text or lower --block_size"],
    ),
]


@pytest.mark.parametrize(("name", "setup", "fragments"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_line_and_leaves_output_dir(
    world, finished, tmp_path, capsys, name, setup, fragments
):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(world / "data", data)
    shutil.copytree(finished, out)
    flags: dict = {}
    setup(data, flags)
    if flags.get("dataset_dir") == "held.txt":
        flags["dataset_dir"] = world / "held.txt"
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["pretrain", *pt_argv(world / "base", world / "tokenizer", data, out, **flags)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in last, last
    assert snapshot(out) == before


def test_block_size_is_refused_for_instruction_tuning(world, tmp_path, capsys):
    write_json(tmp_path / "sft" / "a.json", SMALL_RECORDS)
    argv = pt_argv(world / "base", world / "tokenizer", tmp_path / "sft", tmp_path / "out", block_size=64)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", *argv])
    assert exit_.value.code == 2
    assert "--block_size 64 is for pre-training" in capsys.readouterr().err


def chinese_sp_model(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(folder / "chinese_sp"),
        model_type="bpe",
        vocab_size=120,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return folder / "chinese_sp.model"


def test_route_merge_tokenizer_pretrain_merge_train_chat(tmp_path, capsys):
    """The Chinese-LLaMA route on tiny models: the new vocabulary rows learn Chinese before SFT."""
    train, held = sentences()
    english = ["The quick brown fox jumps over the lazy dog.", "Translate the sentence into Chinese."] * 40
    make_tokenizer(tmp_path / "llama", english + ["今天"] * 3, vocab_size=300, with_pad=False)
    llama_rows = len(TextTokenizer.load(tmp_path / "llama"))
    make_model(
        tmp_path / "base", llama_rows, hidden=32, layers=2, heads=2, intermediate=64, max_positions=256
    )
    cli_main(
        [
            "merge-tokenizer", "--llama_tokenizer_dir", str(tmp_path / "llama"),
            "--chinese_sp_model_file", str(chinese_sp_model(tmp_path / "zh", train * 3)),
            "--output_dir", str(tmp_path / "merged_tokenizer"),
        ]
    )  # fmt: skip
    tokenizer_dir = tmp_path / "merged_tokenizer" / "merged_tokenizer_hf"
    tokenizer = TextTokenizer.load(tokenizer_dir)
    assert len(tokenizer) > llama_rows + 30

    # Pre-train: the embeddings grow to the merged vocabulary and the new rows train.
    (tmp_path / "held.txt").write_text("\n".join(held * 3) + "\n", encoding="utf-8")
    out = tmp_path / "pt"
    argv = pt_argv(
        tmp_path / "base",
        tokenizer_dir,
        write_text_corpus(tmp_path / "text", train),
        out,
        validation_file=tmp_path / "held.txt",
        do_eval=True,
        eval_strategy="steps",
        eval_steps=24,
        eval_on_start="True",
        max_steps=24,
    )
    cli_main(["pretrain", *argv])
    losses = eval_losses(out)
    assert losses[-1] < losses[0] - 1.0, losses
    saved = load_file(out / "pt_lora_model" / "adapter_model.safetensors")
    embedding = next(v for k, v in saved.items() if "embed_tokens" in k and v.shape[0] == len(tokenizer))
    old = load_file(tmp_path / "base" / "model.safetensors")["model.embed_tokens.weight"]
    # New rows start at the mean of the old ones (mean resizing); those of pieces in the text move.
    used = {t for text in train for t in tokenizer.encode(text) if t >= llama_rows}
    assert len(used) > 20
    moved = (embedding[sorted(used)] - old.mean(0)).norm(dim=1)
    assert moved.min() > 1e-3, moved.min()

    # Merge the pre-training LoRA, instruction-tune the merged model, chat with the result.
    cli_main(
        [
            "merge", "--base_model", str(tmp_path / "base"), "--lora_model", str(out / "pt_lora_model"),
            "--output_dir", str(tmp_path / "chinese_llama"),
        ]
    )  # fmt: skip
    write_json(tmp_path / "sft" / "train.json", SMALL_RECORDS)
    sft_argv = pt_argv(
        tmp_path / "chinese_llama", tokenizer_dir, tmp_path / "sft", tmp_path / "sft_out", block_size=None
    )
    cli_main(["train", *sft_argv, "--max_seq_length", "256", "--max_steps", "4", "--save_strategy", "no"])
    lora = tmp_path / "sft_out" / "sft_lora_model"
    assert (lora / "template.json").is_file()
    questions = tmp_path / "questions.txt"
    questions.write_text("小明今天去哪里？\nTranslate to Chinese: red\n", encoding="utf-8")
    predictions = tmp_path / "predictions.json"
    cli_main(
        [
            "chat", "--base_model", str(tmp_path / "chinese_llama"), "--lora_model", str(lora),
            "--data_file", str(questions), "--predictions_file", str(predictions),
            "--do_sample", "false", "--max_new_tokens", "8",
        ]
    )  # fmt: skip
    answers = json.loads(predictions.read_text(encoding="utf-8"))
    assert [a["instruction"] for a in answers] == ["小明今天去哪里？", "Translate to Chinese: red"]
    assert all(isinstance(a["output"], str) for a in answers)


def test_run_pt_sh_runs_the_documented_command(world, tmp_path):
    """scripts/training/run_pt.sh as written (torchrun, DeepSpeed ZeRO-2, --fp16, --torch_dtype float16,
    --save_safetensors False), its parameters set from the environment."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "pretrained_model": str(world / "base"),
        "chinese_tokenizer_path": str(world / "tokenizer"),
        "dataset_dir": str(world / "data"),
        "data_cache": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "block_size": "64",
        "lora_rank": "4",
        "lora_alpha": "8",
        "gradient_accumulation_steps": "4",
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "training" / "run_pt.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "pt_lora_model"
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["modules_to_save"])) == (
        4,
        8,
        ["embed_tokens", "lm_head"],
    )
    assert "blocks of --block_size 64" in result.stderr
    assert "LoRA ready for merging" in result.stderr


def test_chat_continues_text_with_a_pre_training_lora(world, finished, tmp_path, caplog):
    """No template is saved after pre-training: chat continues the text as written (template none)."""
    from llama_sft.data.templates import load_template
    from llama_sft.tools.demo import greedy_answer

    questions = tmp_path / "starts.txt"
    questions.write_text("小明今天去\n老师明天去\n", encoding="utf-8")
    predictions = tmp_path / "continued.json"
    cli_main(
        [
            "chat", "--base_model", str(world / "base"), "--lora_model", str(finished / "pt_lora_model"),
            "--data_file", str(questions), "--predictions_file", str(predictions),
            "--do_sample", "false", "--max_new_tokens", "6", "--repetition_penalty", "1.0",
        ]
    )  # fmt: skip
    assert "pre-training LoRA" in caplog.text
    tokenizer = TextTokenizer.load(world / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(finished / "pt_lora_model")).eval()
    answers = json.loads(predictions.read_text(encoding="utf-8"))
    assert [a["instruction"] for a in answers] == ["小明今天去", "老师明天去"]
    for answer in answers:
        expected = greedy_answer(reference, tokenizer, load_template("none"), answer["instruction"], 6)
        assert answer["output"] == expected and expected
