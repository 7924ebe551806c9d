"""The Trainer: transformers' own, with a token budget per pass and a pluggable loss.

Contract: ``SftTrainer`` is a ``transformers.Trainer`` whose loss is the standard one, the mean
token cross-entropy over every labelled token of the global batch (all gradient-accumulation
micro-batches and all processes together, as transformers normalises with
``num_items_in_batch``). Two additions:

1. a packed row longer than ``max_tokens_per_pass`` is trained in pieces of whole records
   (``packing.split_packed``), each forward and backward in turn, within one optimizer step;
2. ``loss``, when given, is a component called as ``loss(model, inputs)`` that returns (summed
   loss, labelled token count, outputs), which the trainer normalises; without it the model
   computes its own loss (transformers' ``ForCausalLMLoss``). ``autocast``, when given, is called
   as ``autocast(cache_enabled)`` for the context every forward runs in, in place of
   accelerate's (whose mixed precision is then "no"; ``TrainingArguments`` still say what runs,
   e.g. ``bf16``). The speed-ups (``llama_sft.speedups``) supply both; the trainer does not know
   what they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from transformers import Trainer

from ..data.encode import IGNORE_INDEX
from ..data.packing import split_packed

logger = logging.getLogger("llama_sft")


class SftTrainer(Trainer):
    def __init__(
        self,
        *args,
        max_tokens_per_pass: int | None = None,
        loss: Callable | None = None,
        autocast: Callable | None = None,
        **kwargs,
    ):
        if autocast is not None and not hasattr(Trainer, "_build_accelerator_args"):
            # The hook that keeps accelerate from autocasting too is an internal of transformers.
            logger.warning(
                "own_autocast skipped: this transformers has no Trainer._build_accelerator_args; "
                "accelerate's autocast runs instead"
            )
            autocast = None
        # Read by _build_accelerator_args, which Trainer.__init__ calls.
        self.own_autocast = autocast
        super().__init__(*args, **kwargs)
        self.max_tokens_per_pass = max_tokens_per_pass
        self.loss_component = loss
        if loss is not None:
            # compute_loss normalises by num_items_in_batch itself, so the Trainer must count it
            # and must not divide the loss again by the number of accumulation steps.
            self.model_accepts_loss_kwargs = True

    def _build_accelerator_args(self, **kwargs):
        settings = super()._build_accelerator_args(**kwargs)
        if self.own_autocast is not None:
            settings["mixed_precision"] = "no"  # our autocast replaces accelerate's
        return settings

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        if self.own_autocast is None:
            return super().autocast_smart_context_manager(cache_enabled)
        return self.own_autocast(cache_enabled)

    def training_step(self, model, inputs, num_items_in_batch=None):
        pieces = split_packed(inputs, None if self.is_deepspeed_enabled else self.max_tokens_per_pass)
        if len(pieces) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            num_items_in_batch = sum(int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in pieces)
        total = 0.0
        for i, piece in enumerate(pieces):
            # Gradients are synchronised across processes once, on the last piece.
            last = i == len(pieces) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                total = total + super().training_step(model, piece, num_items_in_batch)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_component is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, count, outputs = self.loss_component(model, inputs)
        if num_items_in_batch is None:
            loss = loss / count.clamp_min(1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # The count covers every process while DDP averages gradients over them.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
