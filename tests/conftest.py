"""Hermetic fixtures: a SentencePiece tokenizer trained in seconds and a tiny random LLaMA."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fused CPU kernels are built once for the whole session (and its subprocesses), not in ~/.cache.
if "LLAMA_SFT_KERNEL_DIR" not in os.environ:
    os.environ["LLAMA_SFT_KERNEL_DIR"] = tempfile.mkdtemp(prefix="llama-sft-kernels-")
    atexit.register(shutil.rmtree, os.environ["LLAMA_SFT_KERNEL_DIR"], True)

from llama_sft.data.templates import load_template  # noqa: E402
from llama_sft.tools.demo import demo_records, make_model, make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


# What libraries print that a user cannot act on; a normal run prints none of it.
NOTICES = (
    "FutureWarning",
    "DeprecationWarning",
    "UserWarning",
    "Setting accelerator",
    "No artists",
    "Gradient accumulation steps mismatch",
    "multivariate normal distribution",
    "Loading weights",  # transformers' bar, kept for a terminal only
)


def assert_quiet(result, what: str) -> None:
    # DeepSpeed logs to stdout, Python's warnings go to stderr: both are read.
    output = result.stdout + result.stderr
    found = [notice for notice in NOTICES if notice in output]
    assert not found, f"{what} printed {found}:\n{output[-4000:]}"


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present (real tokenizers/data live in ../shared on the project machines)")
    return path


def corpus() -> list[str]:
    train, held = demo_records()
    texts = []
    for name in ("alpaca", "llama2-chat"):
        template = load_template(name)
        texts += [template.render(r.full_instruction) + " " + r.output for r in train + held]
    texts += [
        "Hello world. 你好，世界。今天天气很好，我们去公园散步吧。",
        "Summarize the text: 机器学习是人工智能的一个分支。",
    ]
    return texts * 3


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder, corpus(), vocab_size=500)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from llama_sft.data.tokenizer import TextTokenizer

    return TextTokenizer.load(tokenizer_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("base_model")
    make_model(folder, len(tokenizer), hidden=32, layers=2, heads=2, intermediate=64)
    return folder


def write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


SMALL_RECORDS = [
    {"instruction": "Translate to Chinese: red", "input": "", "output": "红色"},
    {"instruction": "What is 狗 in English?", "output": "dog"},
    {"instruction": "Translate to English", "input": "猫", "output": "cat"},
    {"instruction": "Give the Chinese word for ten.", "input": "", "output": "十"},
] * 4


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_json(tmp_path / "data" / "train" / "part1.json", SMALL_RECORDS[:8])
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in SMALL_RECORDS[8:])
    (tmp_path / "data" / "train" / "part2.jsonl").write_text(lines + "\n", encoding="utf-8")
    write_json(tmp_path / "data" / "eval.json", SMALL_RECORDS[:4])
    return tmp_path / "data"


def train_argv(
    model_dir: Path, tokenizer_dir: Path, data_dir: Path, output_dir: Path, **overrides
) -> list[str]:
    """The documented run_sft.sh flag list at test size; keyword overrides replace or add flags."""
    flags = {
        "model_name_or_path": model_dir,
        "tokenizer_name_or_path": tokenizer_dir,
        "dataset_dir": data_dir / "train",
        "validation_file": data_dir / "eval.json",
        "data_cache_dir": output_dir.parent / "cache",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "do_train": True,
        "do_eval": True,
        "seed": 7,
        "max_steps": 4,
        "lr_scheduler_type": "cosine",
        "learning_rate": 1e-2,
        "warmup_ratio": 0.03,
        "weight_decay": 0,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_total_limit": 3,
        "evaluation_strategy": "steps",
        "eval_steps": 2,
        "save_steps": 2,
        "gradient_accumulation_steps": 1,
        "preprocessing_num_workers": 2,
        "max_seq_length": 128,
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "ddp_timeout": 30000,
        "logging_first_step": True,
        "lora_rank": 4,
        "lora_alpha": 8,
        "trainable": "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        "modules_to_save": "embed_tokens,lm_head",
        "lora_dropout": 0.05,
        "report_to": "none",
        "disable_tqdm": "True",
    }
    flags.update(overrides)
    return flags_to_argv(flags)


def flags_to_argv(flags: dict) -> list[str]:
    """{"name": value} -> ["--name", "value"]; True is a bare flag, None and False leave the flag out."""
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


@pytest.fixture
def built():
    """Skips a test of the fused CPU kernels themselves where they cannot be built."""
    from llama_sft.speedups import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C compiler?)")


@pytest.fixture(params=["kernels", "torch"])
def ops_path(request, monkeypatch):
    """Runs a test with the fused CPU kernels, then again with PyTorch's ops (no compiler)."""
    from llama_sft.speedups import cpu_kernels

    cpu_kernels.kernels.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("LLAMA_SFT_CPU_KERNELS", "0")
    elif cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C compiler?)")
    yield request.param
    cpu_kernels.kernels.cache_clear()
