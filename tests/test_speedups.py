"""The speed-ups behind one switch: ``--speedups off`` trains the same model the same way, slower;
the core reaches them through one call and runs without them."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from transformers import TrainerCallback

from llama_sft.speedups import NAMES, cpu_kernels
from llama_sft.training.command_line import main
from llama_sft.training.run import train
from llama_sft.training.trainer import SftTrainer

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llama_sft"
TRAINING_STEP = SftTrainer.training_step


class Recorder(TrainerCallback):
    """Each micro-step's loss (unrounded) and the LoRA gradients before the first optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if "lora_" in n and p.grad is not None
            }


def run(monkeypatch, argv, speedups: str) -> tuple[list[float], dict, dict]:
    losses = []

    def recorded(self, *args, **kwargs):
        loss = TRAINING_STEP(self, *args, **kwargs)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(SftTrainer, "training_step", recorded)
    recorder = Recorder()
    out = train([*argv, "--speedups", speedups], callbacks=[recorder])
    run_args = json.loads((out / "training_args.json").read_text())
    return losses, recorder.grads, run_args


@pytest.fixture
def float32_argv(model_dir, tokenizer_dir, data_dir, tmp_path):
    def make(name: str, steps: int) -> list[str]:
        return train_argv(
            model_dir, tokenizer_dir, data_dir, tmp_path / name, max_steps=steps, lora_dropout=0.0,
            save_strategy="no", eval_strategy="no", evaluation_strategy=None, do_eval=False,
        )  # fmt: skip

    return make


def test_auto_and_off_give_the_same_loss_and_lora_gradients(float32_argv, monkeypatch):
    """One step in float32 with LoRA dropout 0 (the two paths draw different dropout bits)."""
    fast_losses, fast_grads, fast_args = run(monkeypatch, float32_argv("auto", 1), "auto")
    plain_losses, plain_grads, plain_args = run(monkeypatch, float32_argv("off", 1), "off")
    assert len(fast_losses) == len(plain_losses) == 1
    assert abs(fast_losses[0] - plain_losses[0]) <= 1e-5 * abs(plain_losses[0])
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    assert scale > 0
    for name, plain in plain_grads.items():
        assert torch.allclose(fast_grads[name], plain, rtol=1e-4, atol=1e-4 * scale), name
    # What each run used is saved with it.
    assert all(state.startswith("skipped: --speedups off") for state in plain_args["speedups"].values())
    assert plain_args["speedups"].keys() == set(NAMES)
    applied = {n for n, state in fast_args["speedups"].items() if state.startswith("applied")}
    assert {"labelled_logits", "fused_head", "fused_lora", "packed_attention", "kept_memory"} <= applied
    assert fast_args["compute_dtype"] == plain_args["compute_dtype"] == "float32"


def test_a_few_steps_give_the_same_losses(float32_argv, monkeypatch):
    fast, _, _ = run(monkeypatch, float32_argv("auto", 4), "auto")
    plain, _, _ = run(monkeypatch, float32_argv("off", 4), "off")
    assert len(fast) == len(plain) == 4
    for a, b in zip(fast, plain, strict=True):
        assert abs(a - b) <= 1e-3 * abs(b), (fast, plain)
    assert plain[-1] < plain[0]


def test_a_whole_run_with_speedups_off_uses_stock_modules(model_dir, tokenizer_dir, data_dir, tmp_path):
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["classes"] = {type(m).__module__.split(".")[0] for m in model.modules()}
            seen["attention"] = model.get_base_model().config._attn_implementation

    out = train(
        train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out", speedups="off"), callbacks=[Probe()]
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert seen["classes"] <= {"torch", "transformers", "peft"}
    assert seen["attention"] == "sdpa"
    eval_results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert eval_results["eval_loss"] < 10


def test_each_speedup_is_reported_applied_or_skipped_with_a_reason(
    model_dir, tokenizer_dir, data_dir, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(cpu_kernels, "_enabled", True)  # restored for later tests
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, tmp_path / "out", max_steps=1, do_eval=False,
        evaluation_strategy="no", save_strategy="no", skip_speedups="heap_trim,cpu_kernels",
        packing="False",
    )  # fmt: skip
    with caplog.at_level("INFO"):
        train(argv)
    block = caplog.text[caplog.text.index("speed-ups:") :]
    for name in NAMES:
        assert re.search(rf"^  {name} +(applied: |skipped: )", block, re.M), name
    assert re.search(r"heap_trim +skipped: --skip_speedups", block)
    assert re.search(r"cpu_kernels +skipped: --skip_speedups", block)
    assert re.search(r"packed_attention +skipped: --packing False", block)
    assert re.search(r"no_cudnn_attention +skipped: not on a CUDA GPU", block)
    assert cpu_kernels.kernels() is None  # skipped for this process


@pytest.mark.parametrize(
    "skip, message",
    [
        ("fused_heads", "--skip_speedups names fused_heads, which is not a speed-up; choose from"),
        ("labelled_logits", "fused_head needs labelled_logits; skip both, or neither"),
    ],
)
def test_unknown_or_unworkable_choices_are_refused(
    model_dir, tokenizer_dir, data_dir, tmp_path, capsys, skip, message
):
    out = tmp_path / "out"
    argv = train_argv(model_dir, tokenizer_dir, data_dir, out, skip_speedups=skip)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names += [f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_the_core_reaches_the_speedups_through_one_call_only():
    uses = {}
    for path in PACKAGE.rglob("*.py"):
        if "speedups" in path.relative_to(PACKAGE).parts:
            continue
        found = [
            name
            for name in imported_modules(path)
            if "speedups" in name.split(":")[0] or name.endswith(":speedups")
        ]
        if found:
            uses[path.relative_to(PACKAGE).as_posix()] = found
    # The run applies them; the command-line entry prepares the process before PyTorch allocates.
    assert uses == {"training/run.py": ["..:speedups"], "training/command_line.py": ["..:speedups"]}
    run_source = (PACKAGE / "training" / "run.py").read_text()
    assert re.findall(r"speedups\.\w+", run_source) == ["speedups.apply"]
    entry_source = (PACKAGE / "training" / "command_line.py").read_text()
    assert re.findall(r"speedups\.\w+", entry_source) == ["speedups.prepare_process"]


def test_a_trainer_without_the_speedups_package_still_trains(model_dir, tokenizer_dir, data_dir, tmp_path):
    """Delete speedups/ and its one call: the same training, with transformers' and PEFT's own
    modules, attention and loss."""
    copy = tmp_path / "src" / "llama_sft"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(copy / "speedups")
    run_py = copy / "training" / "run.py"
    source = run_py.read_text()
    source = re.sub(r"^from \.\. import speedups.*\n", "", source, flags=re.M)
    source = source.replace(
        "fast = speedups.apply(args, build_model)",
        "fast = __import__('types').SimpleNamespace(model=build_model(), loss=None, autocast=None, "
        "callbacks=[], report={}, compute_dtype='float32')",
    )
    run_py.write_text(source)
    entry = copy / "training" / "command_line.py"
    source = re.sub(r"^    from \.\. import speedups\n", "", entry.read_text(), flags=re.M)
    entry.write_text(re.sub(r"^    speedups\.prepare_process\(.*\)\n", "    pass\n", source, flags=re.M))
    argv = train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out", max_steps=2)
    script = (
        "import os, sys, llama_sft; from llama_sft.training.command_line import main; main(sys.argv[1:]); "
        "assert 'speedups' not in os.listdir(os.path.dirname(llama_sft.__file__)); "
        "assert not [m for m in sys.modules if m.startswith('llama_sft.speedups')]"
    )
    env = {**os.environ, "PYTHONPATH": str(copy.parent)}
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "sft_lora_model" / "adapter_model.safetensors").is_file()
