"""Checkpoints that survive crashes: which ones are complete, which to resume, which to delete.

Contract:
- A checkpoint ``checkpoint-N`` is *complete* when its ``sft_lora_model/`` (``sft_full_model/``
  after full fine-tuning, its weights hard links to the checkpoint's own; ``pt_*`` after
  pre-training) exists: that folder is
  renamed into place after the Trainer has written everything else (weights, optimizer, scheduler,
  RNG states, trainer_state.json), so a crash mid-save leaves an incomplete folder that
  ``last_complete_checkpoint`` skips with a message.
- ``CheckpointCallback`` finishes each checkpoint (its ``sft_lora_model``), then rotates: it keeps the
  newest ``save_total_limit`` complete checkpoints and never deletes the one this run resumed from.
- ``StopCallback`` turns SIGTERM/SIGINT into "finish this step, save, stop", agreed across processes.
- ``FiniteGradCallback`` stops (or skips the step) when the gradients are not finite, before the
  optimizer can write NaN into the adapter; the last good checkpoint is kept. Under float16 AMP
  (``--fp16`` on a GPU without DeepSpeed) overflowing steps are the loss scaler's to skip, and only
  more of them in a row than its halvings from 2**16 down to 1 count.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from .saving import OUTPUT_DIRS, atomic_dir, output_name, write_lora_folder, write_model_folder

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SUPERSEDED = ".superseded"


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (a signal, a non-finite loss); the message says what to do."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def is_complete(checkpoint: Path) -> bool:
    done = any((checkpoint / name).is_dir() for name in OUTPUT_DIRS)
    return done and (checkpoint / "trainer_state.json").is_file()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    for checkpoint in reversed(checkpoints(output_dir)):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning("skipping %s: incomplete (a crash during its save?)", checkpoint)
    return None


def set_aside_old_checkpoints(output_dir: Path) -> list[Path]:
    """Starting afresh in a folder with checkpoints: rename them out of the resume/rotation namespace.

    They are deleted only once this run has saved a complete checkpoint of its own, so a run that
    dies early never costs the only good checkpoint.
    """
    moved = []
    for checkpoint in checkpoints(output_dir):
        target = checkpoint.with_name(checkpoint.name + SUPERSEDED)
        shutil.rmtree(target, ignore_errors=True)
        checkpoint.rename(target)
        moved.append(target)
    if moved:
        logger.warning(
            "--overwrite_output_dir: %d earlier checkpoint(s) renamed to *%s; they are deleted once this "
            "run saves its first checkpoint",
            len(moved),
            SUPERSEDED,
        )
    return moved


class CheckpointCallback(TrainerCallback):
    def __init__(
        self,
        tokenizer,
        template,
        run_args: dict,
        safetensors: bool,
        keep: int | None,
        resumed: str | None,
        full: bool = False,
        task: str = "sft",
    ):
        self.full = full
        self.name = output_name(full, task)
        self.tokenizer, self.template, self.run_args, self.safetensors = (
            tokenizer,
            template,
            run_args,
            safetensors,
        )
        self.keep = keep
        self.resumed = Path(resumed).resolve() if resumed else None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.full:
            # Hard links: the checkpoint's weights serve as the model folder without a second copy.
            with atomic_dir(checkpoint / self.name) as tmp:
                for item in checkpoint.iterdir():
                    if item.is_file() and (
                        item.suffix in (".safetensors", ".bin") or item.name.endswith("config.json")
                    ):
                        if item.name.startswith(("optimizer", "scheduler", "rng_state", "training_args")):
                            continue
                        os.link(item, tmp / item.name)
                for item in checkpoint.glob("model*.index.json"):
                    os.link(item, tmp / item.name)
                write_model_folder(tmp, self.tokenizer, self.template, self.run_args)
        else:
            with atomic_dir(checkpoint / self.name) as tmp:
                for name in ("adapter_model.safetensors", "adapter_config.json"):
                    shutil.copyfile(checkpoint / name, tmp / name)
                write_lora_folder(tmp, self.tokenizer, self.template, self.run_args, self.safetensors)
        for old in Path(args.output_dir).glob(f"checkpoint-*{SUPERSEDED}"):
            shutil.rmtree(old, ignore_errors=True)
        self.rotate(Path(args.output_dir), state.best_model_checkpoint)

    def rotate(self, output_dir: Path, best: str | None) -> None:
        if not self.keep:
            return
        protected = {self.resumed, Path(best).resolve() if best else None}
        complete = [c for c in checkpoints(output_dir) if is_complete(c)]
        for checkpoint in complete[: max(0, len(complete) - self.keep)]:
            if checkpoint.resolve() not in protected:
                shutil.rmtree(checkpoint, ignore_errors=True)


class StopCallback(TrainerCallback):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C): finish the step, save, stop."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous = {}
        self.stopped_at: int | None = None

    def _handler(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really means it
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then saving a checkpoint", self.signal_name)

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        # On the training device: NCCL reduces only GPU tensors, gloo CPU ones.
        requested = torch.tensor([1 if self.signal_name else 0], device=args.device)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process must stop at the same step, or the others wait forever in a collective.
            torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        if requested.item():
            self.signal_name = self.signal_name or "a signal on another process"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# Under float16 AMP, PyTorch's GradScaler multiplies the loss by 2**16 at first and, when the
# gradients overflow, skips that update itself and halves its scale: a few such steps are normal at
# the start of a run. More in a row than the halvings down to a scale of 1 mean a non-finite loss.
SCALER_HALVINGS = 16


class FiniteGradCallback(TrainerCallback):
    """A NaN/inf loss makes every gradient non-finite; catch it before the optimizer step."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped = 0
        self.in_a_row = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if args.fp16 and not args.deepspeed and self.in_a_row <= SCALER_HALVINGS:
            return  # the GradScaler skips this update and lowers its scale
        step = state.global_step + 1
        if self.policy == "skip":
            self.skipped += 1
            logger.warning(
                "step %d: the loss is not finite; skipping this batch (%d skipped so far)", step, self.skipped
            )
            for param in model.parameters():
                param.grad = None
            return
        in_a_row = f" (and the {self.in_a_row - 1} steps before it)" if self.in_a_row > 1 else ""
        raise TrainingStopped(
            f"step {step}: the loss is NaN or infinite{in_a_row}, so training stopped before the update; the last good "
            "checkpoint is kept. Lower --learning_rate, check the data, or pass --nan_policy skip to skip such batches"
        )
