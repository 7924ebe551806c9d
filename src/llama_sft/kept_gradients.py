"""Gradients of the vocabulary-sized matrices written into memory kept from step to step (CPU).

Contract: a ``KeptGradient`` serves one parameter for a whole run. ``take(param)`` returns a
tensor shaped like ``param`` in one buffer that lives as long as the ``KeptGradient``, for a gradient that autograd will store as ``param.grad``;
None when ``param`` already has a gradient (a second micro-batch of the same optimizer step), which
then needs a new tensor for autograd to add to it. The returned tensor is a new tensor object
viewing the buffer, which autograd adopts as ``param.grad`` without a copy; when the Trainer drops
``param.grad`` after the optimizer step, the buffer stays. Whoever keeps a step's ``param.grad``
past the next forward sees it overwritten.

``EmbeddingWithKeptGradient`` is ``nn.Embedding`` whose weight gradient is made that way: the
same values as PyTorch's (zero, then each position's output gradient added to its token's row,
none to ``padding_idx``). ``keep_embedding_gradients(model)`` gives the class to the model's
trained embeddings (with ``modules_to_save``, PEFT's trained copy), keeping weights and state
dict keys. ``SftTrainer`` takes the trained ``lm_head``'s gradient the same way on a CPU.

``KeptRows`` is memory for a (rows, columns) tensor whose row count changes from step to step:
``take(rows, columns, dtype)`` returns a view of one buffer, grown (never shrunk) when a step needs
more rows; what was written there by an earlier call is overwritten. ``HeadMemory`` holds what the
fused output projection (``trainer.LabelledHeadCrossEntropy``) writes from step to step: its
logits, which become their own gradient, in a ``KeptRows``, and its weight's gradient in a
``KeptGradient``.

Why: a 55,296 x 512 float32 gradient is 113 MB, above glibc's largest ``mmap`` threshold (32 MiB),
so each new one is mapped afresh and its pages fault in as it is first written; the Trainer drops
the gradients after every optimizer step. In a profile of the benchmark's run on the 2-core CPU
(session 8), zeroing the embedding's new gradient took 67 ms a step and casting ``lm_head``'s
gradient to float32 into a new tensor 66 ms; ~8-11 ms each into memory already there. The
logits of the labelled positions (1,304 x 55,296 bfloat16, 144 MB, on one of the benchmark's steps)
are new every step too: their product took 96 ms into a new tensor and 49 ms into memory already
there (medians of 25, interleaved, session 9). On a GPU, PyTorch's caching allocator already
reuses the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import serving_module


class KeptGradient:
    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def take(self, param: torch.Tensor) -> torch.Tensor | None:
        if param.grad is not None:
            return None
        if self.buffer is None:  # one parameter for the whole run
            self.buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        return self.buffer.view(param.shape)


# A grown buffer gets this many rows more than asked for, so that a run whose steps need a few
# rows more each time does not allocate (and fault in) a new buffer at every step.
KEPT_ROWS_SLACK = 256


class KeptRows:
    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def take(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        needed = rows * columns
        if self.buffer is None or self.buffer.dtype != dtype or self.buffer.numel() < needed:
            self.buffer = None  # the old buffer goes before the new one is made
            self.buffer = torch.empty((rows + KEPT_ROWS_SLACK) * columns, dtype=dtype)
        return self.buffer[:needed].view(rows, columns)


@dataclass
class HeadMemory:
    logits: KeptRows = field(default_factory=KeptRows)
    grad: KeptGradient = field(default_factory=KeptGradient)


class _EmbeddingKeptGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, kept):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.kept = weight, padding_idx, kept
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        grad = ctx.kept.take(weight)
        grad = torch.zeros_like(weight) if grad is None else grad.zero_()
        grad.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, weight.shape[1]).to(grad.dtype))
        if ctx.padding_idx is not None:
            grad[ctx.padding_idx] = 0
        return None, grad, None, None


class EmbeddingWithKeptGradient(torch.nn.Embedding):
    kept: KeptGradient

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if (
            self.weight.requires_grad
            and torch.is_grad_enabled()
            and self.weight.device.type == "cpu"
            and self.max_norm is None
            and not self.scale_grad_by_freq
            and not self.sparse
        ):
            return _EmbeddingKeptGradient.apply(ids, self.weight, self.padding_idx, self.kept)
        return super().forward(ids)


def keep_embedding_gradients(model: torch.nn.Module) -> int:
    """Give ``EmbeddingWithKeptGradient``'s class to the model's trained input embeddings; returns
    how many."""
    embeddings = serving_module(model.get_input_embeddings())
    if type(embeddings) is not torch.nn.Embedding or not embeddings.weight.requires_grad:
        return 0
    embeddings.__class__ = EmbeddingWithKeptGradient
    embeddings.kept = KeptGradient()
    return 1
