"""A normal run prints nothing on its libraries' behalf: no deprecations, no accelerator notices,
no plotting warnings. Real commands in fresh interpreters, as a user starts them (the documented
DeepSpeed command is checked the same way in test_distributed.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
from conftest import assert_quiet, train_argv

from llama_sft.quiet import quiet_libraries
from llama_sft.tools.demo import make_model
from llama_sft.training.run import plot_losses


def llama_sft(*argv, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "llama_sft.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_train_then_chat_print_no_library_notices(tokenizer, tokenizer_dir, data_dir, tmp_path):
    # A base model a few rows short of the tokenizer, as LLaMA is of a Chinese tokenizer: the run
    # grows the embedding, and every save of the adapter carries it.
    model_dir = tmp_path / "base"
    make_model(model_dir, len(tokenizer) - 12, hidden=32, layers=1, heads=2, intermediate=64)
    out = tmp_path / "out"
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, out, fp16=True, torch_dtype="float16", gradient_checkpointing=True,
        max_steps=2,
    )  # fmt: skip
    assert_quiet(llama_sft("train", *argv, cwd=tmp_path), "llama-sft train")
    assert (out / "loss_curve.png").is_file()
    # The record says what was asked and what ran: --fp16 on a CPU is bfloat16 or float32.
    record = json.loads((out / "sft_lora_model" / "training_args.json").read_text())
    assert record["requested"]["fp16"] is True and record["training"]["fp16"] is False
    assert record["requested"]["torch_dtype"] == "float16"
    ran = "bfloat16 autocast (llama-sft's)" if record["training"]["bf16"] else "float32"
    assert record["effective"]["precision"] == ran and record["effective"]["device"] == "cpu"
    assert record["effective"]["weights_dtype"] == record["model"]["torch_dtype"] != "float16"

    # Loading the LoRA goes through PEFT's PeftModel, as training's get_peft_model does.
    (tmp_path / "questions.txt").write_text("Translate to Chinese: red\n", encoding="utf-8")
    chat = llama_sft(
        "chat", "--base_model", model_dir, "--lora_model", out / "sft_lora_model",
        "--data_file", tmp_path / "questions.txt", "--predictions_file", tmp_path / "answers.json",
        "--max_new_tokens", 4, cwd=tmp_path,
    )  # fmt: skip
    assert_quiet(chat, "llama-sft chat")
    assert (tmp_path / "answers.json").is_file()

    gguf = tmp_path / "model.gguf"
    export = llama_sft(
        "export", "--base_model", model_dir, "--lora_model", out / "sft_lora_model", "--output_file", gguf,
        cwd=tmp_path,
    )  # fmt: skip
    assert_quiet(export, "llama-sft export")
    # Only the file it wrote is named, not gguf's temporary one.
    assert "gguf_writer" not in export.stderr and ".tmp-" not in export.stderr and gguf.is_file()


@pytest.mark.parametrize(
    "history",
    [[], [{"train_loss": 5.0, "train_runtime": 1.0, "step": 4}], [{"learning_rate": 0.01, "step": 1}]],
    ids=["empty", "summary-only", "no-loss"],
)
def test_no_loss_logged_writes_no_plot(history, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_losses(history, tmp_path / "loss_curve.png") is False
    assert not (tmp_path / "loss_curve.png").exists()


@pytest.mark.parametrize(
    "history",
    [
        [{"loss": 6.1, "step": 1}, {"loss": 5.9, "step": 2}, {"train_loss": 6.0, "step": 2}],
        [{"eval_loss": 5.7, "step": 2}],
    ],
    ids=["train", "eval-only"],
)
def test_a_logged_loss_writes_a_png_without_warnings(history, tmp_path):
    path = tmp_path / "loss_curve.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_losses(history, path) is True
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 1000


def test_filters_drop_only_the_named_messages():
    def shown(message: str, category: type[Warning], module: str) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_libraries()
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return bool(caught)

    deprecated = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert not shown(deprecated, FutureWarning, "transformers.modeling_utils")
    assert shown("`use_cache` is deprecated", FutureWarning, "transformers.modeling_utils")
    assert shown(deprecated, FutureWarning, "somewhere.else")

    quiet_libraries()
    deepspeed = logging.getLogger("DeepSpeed")

    def passes(logger: logging.Logger, message: str) -> bool:
        return bool(
            logger.filter(logger.makeRecord(logger.name, logging.WARNING, "x.py", 1, message, (), None))
        )

    assert not passes(
        deepspeed, "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable"
    )
    assert passes(deepspeed, "Setting accelerator to cuda (auto detect)")
    transformers = logging.getLogger("transformers.modeling_utils")
    assert not passes(
        transformers,
        "The new embeddings will be initialized from a multivariate normal distribution that has old "
        "embeddings' mean and covariance. As described in this article: ...",
    )
    assert passes(transformers, "Some weights of the model checkpoint were not used")
    accelerate = logging.getLogger("accelerate.accelerator")
    assert not passes(
        accelerate,
        "[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 2. "
        "Using DeepSpeed's value.",
    )
    assert passes(accelerate, "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, ...")
