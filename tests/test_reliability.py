"""Crashes, signals, NaNs and checkpoint rotation: a run that dies costs minutes, not the run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

from llama_sft.training.checkpoints import (
    SCALER_HALVINGS,
    FiniteGradCallback,
    TrainingStopped,
    checkpoints,
    last_complete_checkpoint,
)
from llama_sft.training.run import train

pytestmark = pytest.mark.slow

RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import TrainerCallback
    from llama_sft.training.command_line import main

    class Inject(TrainerCallback):
        # At one step: send this process a signal, or make the gradients NaN as a NaN loss would.
        def __init__(self, step, what):
            self.step, self.what = step, what
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step and self.what != "nan":
                os.kill(os.getpid(), int(self.what))
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == self.step and self.what == "nan":
                next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))

    step, what, task = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    main(sys.argv[4:], callbacks=[Inject(step, what)], task=task)
    """
)


def run_with(argv: list[str], step: int, what: str | int, task: str = "sft") -> subprocess.CompletedProcess:
    """Train in a fresh process; at ``step`` send signal ``what`` to it, or make the gradients NaN."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(step), str(what), task, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "sft_lora_model" / "adapter_model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def argv_for(model_dir, tokenizer_dir, data_dir):
    def make(out: Path, **overrides) -> list[str]:
        settings = dict(
            max_steps=8, save_steps=3, eval_steps=4, per_device_train_batch_size=2, overwrite_output_dir=False
        )
        settings.update(overrides)
        return train_argv(model_dir, tokenizer_dir, data_dir, out, **settings)

    return make


def test_sigkill_then_resume_is_bit_identical(argv_for, tmp_path):
    reference = tmp_path / "reference"
    assert run_with(argv_for(reference), step=0, what=0).returncode == 0

    crashed = tmp_path / "crashed"
    result = run_with(argv_for(crashed), step=5, what=9)
    assert result.returncode == -9
    assert [c.name for c in checkpoints(crashed)] == ["checkpoint-3"]
    assert not (crashed / "sft_lora_model").exists()

    # The same command again resumes from checkpoint-3 (no --overwrite_output_dir).
    assert run_with(argv_for(crashed), step=0, what=0).returncode == 0
    assert_identical(adapter(crashed), adapter(reference))
    history = json.loads((crashed / "trainer_state.json").read_text())["log_history"]
    reference_history = json.loads((reference / "trainer_state.json").read_text())["log_history"]
    assert [h["loss"] for h in history if "loss" in h][-5:] == [
        h["loss"] for h in reference_history if "loss" in h
    ][-5:]


def test_sigterm_saves_then_resume_matches(argv_for, tmp_path):
    reference = tmp_path / "reference"
    assert run_with(argv_for(reference), step=0, what=0).returncode == 0

    stopped = tmp_path / "stopped"
    result = run_with(argv_for(stopped), step=4, what=15)
    assert result.returncode == 1
    assert "SIGTERM received" in result.stderr
    assert "stopped by SIGTERM at step 4" in result.stderr and "checkpoint-4" in result.stderr
    assert [c.name for c in checkpoints(stopped)] == ["checkpoint-3", "checkpoint-4"]

    resumed = run_with(argv_for(stopped, overwrite_output_dir=True, resume_from_checkpoint=True), 0, 0)
    assert resumed.returncode == 0
    assert_identical(adapter(stopped), adapter(reference))


def test_incomplete_checkpoint_is_skipped(argv_for, tmp_path, caplog):
    out = tmp_path / "out"
    train(argv_for(out, max_steps=6))
    broken = out / "checkpoint-9"
    broken.mkdir()
    (broken / "optimizer.pt").write_bytes(b"half")
    assert last_complete_checkpoint(out) == out / "checkpoint-6"
    assert "skipping" in caplog.text and "checkpoint-9" in caplog.text


def test_rotation_keeps_limit_and_the_resumed_checkpoint(argv_for, tmp_path):
    out = tmp_path / "out"
    train(argv_for(out, max_steps=8, save_steps=2, save_total_limit=2))
    assert [c.name for c in checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]

    train(
        argv_for(
            out, max_steps=12, save_steps=2, save_total_limit=1, resume_from_checkpoint=out / "checkpoint-6"
        )
    )
    assert [c.name for c in checkpoints(out)] == ["checkpoint-6", "checkpoint-12"]


def test_overwrite_sets_old_checkpoints_aside_until_a_new_one_exists(argv_for, tmp_path):
    out = tmp_path / "out"
    train(argv_for(out, max_steps=6))
    assert [c.name for c in checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]

    # A fresh run that dies before its first save still has the old checkpoints (renamed aside).
    result = run_with(argv_for(out, max_steps=6, overwrite_output_dir=True), step=1, what=9)
    assert result.returncode == -9
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3.superseded",
        "checkpoint-6.superseded",
    ]

    train(argv_for(out, max_steps=4, overwrite_output_dir=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(argv_for, tmp_path, policy):
    out = tmp_path / "out"
    argv = argv_for(out, save_steps=2, max_steps=6, nan_policy=policy)
    result = run_with(argv, step=4, what="nan")
    if policy == "stop":
        assert result.returncode == 1, result.stderr[-2000:]
        assert "step 4: the loss is NaN or infinite" in result.stderr and "--nan_policy skip" in result.stderr
        last = last_complete_checkpoint(out)
        assert last == out / "checkpoint-2" and not (out / "sft_lora_model").exists()
        assert all(torch.isfinite(t).all() for t in adapter(last).values())
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert "step 4: the loss is not finite; skipping this batch" in result.stderr
        assert all(torch.isfinite(t).all() for t in adapter(out).values())


@pytest.mark.parametrize("fp16,deepspeed", [(True, None), (False, None), (True, "ds_zero2_no_offload.json")])
def test_fp16_overflow_is_left_to_the_loss_scaler(fp16, deepspeed):
    layer = torch.nn.Linear(2, 2)
    callback = FiniteGradCallback("stop")
    args, state = SimpleNamespace(fp16=fp16, deepspeed=deepspeed), SimpleNamespace(global_step=0)

    def step(value: float) -> None:
        for param in layer.parameters():
            param.grad = torch.full_like(param, value)
        callback.on_pre_optimizer_step(args, state, None, model=layer)
        state.global_step += 1

    # Under float16 AMP a GradScaler skips overflowing steps itself while it lowers its scale.
    scaler_in_charge = fp16 and deepspeed is None
    tolerated = SCALER_HALVINGS if scaler_in_charge else 0
    for _ in range(tolerated):
        step(float("inf"))
    step(0.5)  # a finite step: the count starts again
    for _ in range(tolerated):
        step(float("nan"))
    with pytest.raises(TrainingStopped, match=f"step {2 * tolerated + 2}: the loss is NaN or infinite"):
        step(float("nan"))
