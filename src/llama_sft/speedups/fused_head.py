"""The output projection and the cross-entropy, paid for only where a label is kept.

Contract: ``LabelledLoss`` is the trainer's loss component. Called with the model and a batch
holding ``labels``, it returns (summed token cross-entropy, number of labelled tokens, model
outputs): the same loss as transformers' ``ForCausalLMLoss`` before its division, computed with
less work and memory:

1. the vocabulary projection (``lm_head``) runs only at positions whose next label is not -100;
   with a 55,296-row vocabulary that projection is most of a small model's FLOPs, and prompts a
   large share of the tokens (speed-up ``labelled_logits``, whose figures are in
   docs/performance.md, The speed-ups);
2. with a ``head`` (``fused_head``), the projection, the cross-entropy and their gradients are
   computed together in the forward (``LabelledHeadCrossEntropy``): the logits become their own
   gradient in place, row by row in their dtype (with ``cpu_kernels``' fused kernel on a CPU, else
   a chunk of rows at a time), and are freed before the backward; no float32 copy of them is
   made. Without one (LoRA on ``lm_head``, a ZeRO-3 shard, an architecture that changes the
   logits after the projection) the model makes the logits and only the loss is fused
   (``LabelledCrossEntropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX
from ..peft_modules import serving_module
from . import cpu_kernels
from .kept_memory import HeadMemory

# Rows of logits turned into gradient at a time on a CPU: 16 x 55,296 float32 values stay near the
# L2 cache, where 128 rows do not (docs/performance.md, The speed-ups: `labelled_logits`). On a
# GPU the cost is in kernel launches, not cache misses: chunks of up to 2**26 float32 values make
# one chunk of a step's labelled rows.
CE_CHUNK_ROWS = 16
GPU_CE_CHUNK_VALUES = 2**26
# Rows of logits made at a time by the fused output projection when its products are in the
# weight's dtype (float32): 512 x 55,296 float32 logits are the size of the trained embedding's
# gradient, which shares their kept memory; all of a step's labelled rows at once made the products
# a little faster but raised peak RSS (docs/performance.md, The speed-ups: `fused_head`).
HEAD_BLOCK_ROWS = 512
# Rows of logits made at a time when only the loss is wanted (evaluation): 1,024 x 55,296 bfloat16
# logits are 108 MiB, whatever the size of the evaluation batch.
EVAL_ROWS = 1024


def ce_chunk_rows(device_type: str, vocab: int) -> int:
    """Rows of (rows, vocab) logits that ``cross_entropy_chunks`` upcasts to float32 at a time."""
    return CE_CHUNK_ROWS if device_type == "cpu" else max(1, GPU_CE_CHUNK_VALUES // vocab)


def cross_entropy_chunks(
    logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor | None
) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` (n, vocab) against ``targets`` (n,), -100 ignored; with
    ``grad`` given, also writes softmax - one_hot(target) there (zero on ignored rows), in its dtype.

    With the fused kernel (``cpu_kernels``), one row at a time in one pass for the loss and one for
    the gradient; otherwise one log-softmax per chunk of rows (``ce_chunk_rows``) yields both,
    without a host-device synchronisation. ``grad`` may be ``logits`` itself: each chunk is read
    before it is overwritten.
    """
    if cpu_kernels.takes_logits(logits, grad):
        return cpu_kernels.softmax_xent(logits, targets, grad).sum()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = ce_chunk_rows(logits.device.type, logits.shape[1])
    for start in range(0, logits.shape[0], rows):
        end = min(start + rows, logits.shape[0])
        valid = targets[start:end] != IGNORE_INDEX
        target = targets[start:end].clamp_min(0)[:, None]
        log_probs = torch.log_softmax(logits[start:end].float(), dim=-1)
        total -= (log_probs.gather(1, target).squeeze(1) * valid).sum()
        if grad is None:
            continue
        probs = log_probs.exp_().scatter_add_(1, target, valid[:, None].to(log_probs.dtype).neg())
        # Ignored rows become zero in the same pass that casts the chunk to the gradient's dtype.
        torch.mul(probs, valid[:, None], out=grad[start:end])
    return total


class LabelledCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits`` (n, vocab) against ``targets`` (n,), -100 ignored.

    The gradient is computed in the forward (``cross_entropy_chunks``) and kept in the logits'
    dtype instead of the logits: the backward only scales it. That is one pass over the logits
    fewer and no float32 copy of them.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None  # no grad in evaluation
        total = cross_entropy_chunks(logits, targets, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is used by this one backward only. A Python float scale is
        # applied in float32 even to a bfloat16 gradient (a bfloat16 1/N would be off by up to 0.4%).
        return grad.mul_(float(grad_loss)), None


class LabelledHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden`` (n, d) projected by ``weight`` (vocab, d), against
    ``targets`` (n,), -100 ignored: the output projection and the loss in one.

    The forward computes the logits (under the caller's autocast, as the model's ``lm_head``
    would), overwrites them with their gradient, turns that into the gradients of ``hidden`` and
    ``weight`` and frees it, so one (n, vocab) buffer exists for a moment and none is kept for the
    backward, which only scales the two small gradients (``head_loss_sum`` calls it only where a
    gradient will be taken). ``low``, when given, is ``weight`` already
    in the compute dtype (a ``ComputeDtypeCopy``): the products use it, and once they no longer need
    it, the weight's gradient product is written over it instead of into a new tensor.
    ``logits_into`` (n, vocab), in the products' dtype, is where the logits are made
    (``KeptRows.take``) and ``grad_into`` where the weight's gradient lands (``KeptGradient.take``),
    instead of new tensors. When every product is in the weight's dtype (float32 training,
    ``products_in_weight_dtype``), the rows go ``HEAD_BLOCK_ROWS`` at a time (``head_in_blocks``):
    only a block of logits exists (``logits_into`` needs a block's rows) and the products go
    straight into the weight's gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        low: torch.Tensor | None = None,
        logits_into: torch.Tensor | None = None,
        grad_into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if products_in_weight_dtype(hidden, weight, low):
            total, grad_hidden, grad_weight = head_in_blocks(
                hidden, weight, targets, need_hidden, need_weight, logits_into, grad_into
            )
            ctx.save_for_backward(grad_hidden, grad_weight)
            return total
        product_weight = weight if low is None else low
        if logits_into is None:
            logits = F.linear(hidden, product_weight)
        else:
            logits = torch.mm(hidden.to(low.dtype), low.t(), out=logits_into)
        total = cross_entropy_chunks(logits, targets, logits)  # the logits become their gradient
        grad_hidden = torch.matmul(logits, product_weight).to(hidden.dtype) if need_hidden else None
        grad_weight = None
        if need_weight:
            if low is None:
                in_compute_dtype = torch.matmul(logits.t(), hidden)
            else:  # the copy has served both products; its buffer takes the gradient's
                in_compute_dtype = torch.matmul(logits.t(), hidden.to(low.dtype), out=low)
            del logits  # before the float32 copy of the weight gradient is made
            if grad_into is None:
                grad_weight = in_compute_dtype.to(weight.dtype)
            else:
                grad_weight = grad_into.copy_(in_compute_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        scale = float(grad_loss)
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden.mul_(scale),
            None if grad_weight is None else grad_weight.mul_(scale),
            None,
            None,
            None,
            None,
        )


def products_in_weight_dtype(hidden: torch.Tensor, weight: torch.Tensor, low: torch.Tensor | None) -> bool:
    """Whether the output projection's products run in its weight's dtype (float32 training on a
    CPU without bfloat16 units): no compute-dtype copy, no autocast."""
    return low is None and hidden.dtype == weight.dtype and not torch.is_autocast_enabled(hidden.device.type)


def head_in_blocks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    logits_into: torch.Tensor | None = None,
    grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``LabelledHeadCrossEntropy``'s forward when every product is in the weight's dtype:
    (summed loss, gradient of ``hidden``, gradient of ``weight``), ``HEAD_BLOCK_ROWS`` rows at a
    time, the weight's gradient summed in place over the blocks (into ``grad_into`` if given), each
    block's logits made in ``logits_into`` (at least that many rows) if given."""
    rows = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    for start in range(0, max(rows, 1), HEAD_BLOCK_ROWS):
        block = hidden[start : start + HEAD_BLOCK_ROWS]
        into = None if logits_into is None else logits_into[: block.shape[0]]
        logits = torch.mm(block, weight.t(), out=into)
        total += cross_entropy_chunks(logits, targets[start : start + HEAD_BLOCK_ROWS], logits)
        if need_hidden:
            torch.mm(logits, weight, out=grad_hidden[start : start + HEAD_BLOCK_ROWS])
        if need_weight and grad_weight is None:
            grad_weight = torch.mm(logits.t(), block, out=grad_into)
        elif need_weight:
            grad_weight.addmm_(logits.t(), block)
    return total, grad_hidden, grad_weight


def head_loss_in_blocks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of ``hidden`` projected by ``weight``, logits made ``EVAL_ROWS``
    rows at a time: the loss alone, for evaluation."""
    return sum(
        cross_entropy_chunks(F.linear(rows, weight), wanted, None)
        for rows, wanted in zip(hidden.split(EVAL_ROWS), targets.split(EVAL_ROWS), strict=True)
    )


def head_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    low: torch.Tensor | None = None,
    kept: HeadMemory | None = None,
) -> torch.Tensor:
    """``LabelledHeadCrossEntropy`` where a gradient will be taken, into ``kept`` memory when it
    is given and the products' dtype is ``low``'s or (no ``low``, no autocast) the weight's; in
    evaluation (grad mode off), ``head_loss_in_blocks``. An autograd function cannot tell the two
    apart: its inputs still require grad under ``torch.no_grad()``, so it would make both
    gradients for nothing."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logits_into = grad_into = None
        # Kept memory where the products' dtype is known here: the compute-dtype copy's, or the
        # weight's, where the logits are made a block of rows at a time.
        in_weight_dtype = products_in_weight_dtype(hidden, weight, low)
        if kept is not None and (low is not None or in_weight_dtype):
            if in_weight_dtype:
                logits_into = kept.logits.take(
                    min(hidden.shape[0], HEAD_BLOCK_ROWS), weight.shape[0], weight.dtype
                )
            else:
                logits_into = kept.logits.take(hidden.shape[0], weight.shape[0], low.dtype)
            grad_into = kept.grad.take(weight) if weight.requires_grad else None
        return LabelledHeadCrossEntropy.apply(hidden, weight, targets, low, logits_into, grad_into)
    return head_loss_in_blocks(hidden, weight if low is None else low, targets)


class ComputeDtypeCopy:
    """A weight cast to the compute dtype into one buffer kept from step to step.

    Autocast makes its cast of a float32 weight in a new tensor every step; for a 55,296 x 512
    ``lm_head`` that is 56 MB of fresh memory whose pages fault in, far slower than a copy into a
    buffer already in memory. ``LabelledHeadCrossEntropy`` then reuses the buffer for the
    weight's gradient product (another 56 MB it no longer allocates), so each call copies the
    weight again. The buffer stays between steps, which makes whole runs faster for a little more
    peak RSS (docs/performance.md, The speed-ups: `kept_memory`).
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.buffer is None:  # one weight and one autocast dtype for the whole run
            self.buffer = torch.empty_like(weight, dtype=dtype)
        return self.buffer.copy_(weight.detach())


# Architectures whose logits are exactly lm_head(last hidden state): no logit scale or soft-capping
# after the projection (Gemma 2, Cohere and others have one), so the fused projection is the same.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3"})


class HeadSkippingEmptyInput(torch.nn.Linear):
    """The output projection when ``LabelledHeadCrossEntropy`` applies it: the model calls it on no
    positions (``labelled_loss_sum``), and that empty product runs outside autocast.

    Why: autocast casts the whole weight to the compute dtype even for an empty product, in a new
    tensor, every step (docs/performance.md, The speed-ups: `fused_head`). The empty product
    itself costs nothing, and keeps the weight in the graph of the model's outputs, where DDP
    looks for the parameters a step does not use.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(self.weight.dtype), self.weight)
        return super().forward(x)


def head_projection(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output projection when the architecture's logits are just that projection and
    it is a plain bias-free ``nn.Linear`` (also inside PEFT's ``modules_to_save``); None for
    anything else (a LoRA layer on ``lm_head``, another architecture)."""
    if model.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = serving_module(model.get_output_embeddings())
    if type(head) in (torch.nn.Linear, HeadSkippingEmptyInput) and head.bias is None:
        return head
    return None


def labelled_loss_sum(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    weight: torch.nn.Parameter | None = None,
    low: torch.Tensor | None = None,
    kept: HeadMemory | None = None,
):
    """(summed loss, number of labelled tokens, model outputs) of one batch; ``inputs`` holds labels.

    With ``weight``, the output projection's weight (``head_projection``), the model stops at its
    last hidden state and ``head_loss_sum`` projects and scores it (with ``low``, that weight in the
    compute dtype, and ``kept``, memory for its logits and gradient, if given); otherwise the model
    computes the logits and ``LabelledCrossEntropy`` scores them.
    """
    inputs = dict(inputs)
    targets = inputs.pop("labels")[:, 1:]
    # Sequence positions whose next token is labelled in at least one row: the only logits needed.
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    picked = targets[:, keep]
    count = (picked != IGNORE_INDEX).sum()
    if weight is None:
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        loss = LabelledCrossEntropy.apply(outputs.logits.flatten(0, 1), picked.flatten())
        return loss, count, outputs
    # No logits from the model (its lm_head sees no position and, off the loss, gets no backward;
    # SftTrainer makes that empty call skip autocast's cast of the weight: HeadSkippingEmptyInput).
    outputs = model(**inputs, logits_to_keep=keep[:0], output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1][:, keep]
    loss = head_loss_sum(hidden.flatten(0, 1), weight, picked.flatten(), low, kept)
    return loss, count, outputs


class LabelledLoss:
    """The loss component (see the module's contract). ``head`` is the output projection to fuse
    with the loss (``head_projection``), or None; ``autocast_dtype`` the dtype of llama-sft's own
    autocast, whose cast of the head's weight is made into one kept buffer (``ComputeDtypeCopy``);
    ``kept`` memory for the head's logits and gradient (CPU) or None."""

    def __init__(
        self,
        head: torch.nn.Linear | None = None,
        autocast_dtype: torch.dtype | None = None,
        kept: HeadMemory | None = None,
    ):
        self.head = head
        self.autocast_dtype = autocast_dtype
        self.kept = kept
        self.head_copy = ComputeDtypeCopy()
        if head is not None:
            head.__class__ = HeadSkippingEmptyInput

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        weight, low = None if self.head is None else self.head.weight, None
        if weight is not None and self.autocast_dtype not in (None, weight.dtype):
            low = self.head_copy(weight, self.autocast_dtype)
        return labelled_loss_sum(model, inputs, weight, low, self.kept)
