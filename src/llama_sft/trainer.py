"""The Trainer with a loss that only pays for labelled positions.

Contract: ``SftTrainer`` is a ``transformers.Trainer`` whose loss is the standard one, the mean
token cross-entropy over every labelled token of the global batch (all gradient-accumulation
micro-batches and all processes together, as transformers normalises with
``num_items_in_batch``), computed with less work and memory:

1. the vocabulary projection (``lm_head``) runs only at positions whose next label is not -100,
   through the model's own ``logits_to_keep`` argument; with a 55,296-row vocabulary that
   projection is about half the FLOPs of a small model, and prompts are a third of the tokens;
2. the cross-entropy is computed chunk by chunk from the logits in their own dtype: no float32
   copy of the logits and no saved log-softmax, and its backward writes the gradient directly;
3. a packed row longer than ``max_tokens_per_pass`` is trained in pieces of whole records
   (``packing.split_packed``), each forward and backward in turn, within one optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from .encode import IGNORE_INDEX
from .packing import split_packed

CE_CHUNK_ROWS = 128


class LabelledCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits`` (n, vocab) against ``targets`` (n,), -100 ignored."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            part = logits[start : start + CE_CHUNK_ROWS].float()
            lse[start : start + CE_CHUNK_ROWS] = torch.logsumexp(part, dim=-1)
        valid = targets != IGNORE_INDEX
        safe = targets.clamp_min(0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = valid.float() * grad_loss.float()
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            end = min(start + CE_CHUNK_ROWS, logits.shape[0])
            # d(lse - logit[target]) / d logits = softmax - one_hot(target)
            probs = torch.exp(logits[start:end].float() - lse[start:end, None])
            rows = torch.arange(end - start, device=logits.device)
            probs[rows, safe[start:end]] -= 1.0
            grad[start:end] = (probs * scale[start:end, None]).to(grad.dtype)
        return grad, None


def labelled_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """(summed loss, number of labelled tokens, model outputs) of one batch; ``inputs`` holds labels."""
    inputs = dict(inputs)
    targets = inputs.pop("labels")[:, 1:]
    # Sequence positions whose next token is labelled in at least one row: the only logits needed.
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    picked = targets[:, keep]
    loss = LabelledCrossEntropy.apply(outputs.logits.flatten(0, 1), picked.flatten())
    return loss, (picked != IGNORE_INDEX).sum(), outputs


class SftTrainer(Trainer):
    def __init__(self, *args, max_tokens_per_pass: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_tokens_per_pass = max_tokens_per_pass
        # compute_loss below normalises by num_items_in_batch itself, so the Trainer must count it
        # and must not divide the loss again by the number of accumulation steps.
        self.model_accepts_loss_kwargs = True

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
        loss, count, outputs = labelled_loss_sum(model, inputs)
        if num_items_in_batch is None:
            loss = loss / count.clamp_min(1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # The count covers every process while DDP averages gradients over them.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
