"""The command-line entry of a training run (``llama-sft train``/``pretrain`` and the
``run_clm_*_with_peft.py`` scripts).

Contract: ``main(argv, task)`` normalizes the command line once (``flags.normalize_argv``), sets up
the process (the speed-ups' environment variables, unless ``--speedups off`` or ``--skip_speedups
cpu_environment``, from the flags or the YAML alike), then parses once and trains; an input error
is one line on stderr and exit code 2.

This module imports neither PyTorch nor transformers at the top: the environment variables must be
set before PyTorch's first allocation, and importing ``TrainingArguments`` already allocates.
"""

from __future__ import annotations

import os
import sys

from ..options import ArgumentError
from .flags import normalize_argv, skipped_speedups


def prepare_process(argv: list[str]) -> None:
    """What the speed-ups set in the process before PyTorch's first allocation (a normalized command
    line says which are skipped). Called by each command that trains, before it imports the run."""
    from .. import speedups

    speedups.prepare_process(skipped_speedups(argv))


def main(argv: list[str], callbacks: list | None = None, task: str = "sft") -> None:
    debug = os.environ.get("LLAMA_SFT_DEBUG") == "1"
    try:
        argv = normalize_argv(argv)
    except ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    debug = debug or "--debug_errors" in argv
    prepare_process(argv)
    from .run import INPUT_ERRORS, TrainingStopped, train

    try:
        train(argv, callbacks, task, normalized=True)
    except INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1 if isinstance(exc, TrainingStopped) else 2)
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Without this, gloo/DeepSpeed runs sometimes abort at interpreter exit.
            torch.distributed.destroy_process_group()
