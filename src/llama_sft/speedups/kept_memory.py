"""Vocabulary-sized gradients and logits written into memory kept from step to step (CPU).

Contract: a ``KeptGradient`` serves one parameter for a whole run. ``take(param)`` returns a
tensor shaped like ``param`` in memory that lives as long as the ``KeptGradient``, for a gradient
that autograd will store as ``param.grad``; None when ``param`` already has a gradient (a second
micro-batch of the same optimizer step), which then needs a new tensor for autograd to add to it.
The returned tensor is a new tensor object viewing that memory, which autograd adopts as
``param.grad`` without a copy; when the Trainer drops ``param.grad`` after the optimizer step, the
memory stays. Whoever keeps a step's ``param.grad`` past the next forward sees it overwritten.

``KeptRows`` is memory for a (rows, columns) tensor whose row count changes from step to step, used
for a moment within a forward: ``take(rows, columns, dtype)`` returns a view of one buffer, grown
(never shrunk) when a step needs more; what an earlier call wrote there is overwritten. A
``KeptGradient`` made with ``KeptGradient(rows)`` lends that buffer to its gradient instead of
having one of its own; while the gradient is alive (``param.grad`` set), ``take`` returns new
memory.

``EmbeddingWithKeptGradient`` is ``nn.Embedding`` whose weight gradient is made by a
``KeptGradient``: the same values as PyTorch's (zero, then each position's output gradient added
to its token's row, none to ``padding_idx``). ``keep_embedding_gradients(model, rows)`` gives the
class to the model's trained embeddings (with ``modules_to_save``, PEFT's trained copy), keeping
weights and state dict keys. ``HeadMemory`` holds what the fused output projection
(``trainer.LabelledHeadCrossEntropy``) writes from step to step: its logits, which become their
own gradient, in a ``KeptRows``, and its weight's gradient in a ``KeptGradient``. ``SftTrainer``
uses both on a CPU, the embedding's gradient in the logits' memory: the logits live only within
the output projection's forward, the embedding's gradient from the end of the backward to the
optimizer step.

Why: a 55,296 x 512 float32 gradient is 113 MB, above glibc's largest ``mmap`` threshold (32 MiB),
so each new one is mapped afresh and its pages fault in as it is first written; the Trainer drops
the gradients after every optimizer step, and the labelled positions' logits are new every step
too (docs/performance.md gives the times). Sharing one buffer between the logits and the
embedding's gradient keeps the resident memory of one of them. On a GPU, PyTorch's caching
allocator already reuses the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..peft_modules import serving_module

# A grown buffer gets room for this many rows more than asked for, so that a run whose steps need
# a few rows more each time does not allocate (and fault in) a new buffer at every step.
KEPT_ROWS_SLACK = 256


class KeptRows:
    def __init__(self):
        self.buffer: torch.Tensor | None = None  # bytes
        self.lent_to: torch.Tensor | None = None

    def take(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        if self.lent_to is not None and self.lent_to.grad is not None:
            return torch.empty(rows, columns, dtype=dtype)  # the buffer holds that gradient
        return self._view(rows * columns, dtype, (rows + KEPT_ROWS_SLACK) * columns).view(rows, columns)

    def lend(self, param: torch.Tensor) -> torch.Tensor:
        self.lent_to = param
        return self._view(param.numel(), param.dtype, param.numel()).view(param.shape)

    def _view(self, numel: int, dtype: torch.dtype, numel_if_grown: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < numel * dtype.itemsize:
            self.buffer = None  # the old buffer goes before the new one is made
            self.buffer = torch.empty(numel_if_grown * dtype.itemsize, dtype=torch.uint8)
        return self.buffer[: numel * dtype.itemsize].view(dtype)


class KeptGradient:
    def __init__(self, rows: KeptRows | None = None):
        self.buffer: torch.Tensor | None = None
        self.rows = rows

    def take(self, param: torch.Tensor) -> torch.Tensor | None:
        if param.grad is not None:
            return None
        if self.rows is not None:
            return self.rows.lend(param)
        if self.buffer is None:  # one parameter for the whole run
            self.buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        return self.buffer.view(param.shape)


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


def keep_embedding_gradients(model: torch.nn.Module, rows: KeptRows | None = None) -> int:
    """Give ``EmbeddingWithKeptGradient``'s class to the model's trained input embeddings, their
    gradient in ``rows``' buffer if given; returns how many."""
    embeddings = serving_module(model.get_input_embeddings())
    if type(embeddings) is not torch.nn.Embedding or not embeddings.weight.requires_grad:
        return 0
    embeddings.__class__ = EmbeddingWithKeptGradient
    embeddings.kept = KeptGradient(rows)
    return 1
