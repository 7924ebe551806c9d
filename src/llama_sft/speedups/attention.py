"""Attention for packed rows: each record attends within itself.

Contract: ``PACKED_SDPA`` names an attention implementation registered with transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (their public registration API). Loaded
with ``attn_implementation=PACKED_SDPA``, a model given a packed row (batch 1, ``position_ids``
restarting at 0 at each record, no ``attention_mask``, see ``packing.py``) runs causal
scaled-dot-product attention within each record; its outputs equal those of ``sdpa`` with
transformers' block-diagonal mask. How, by device:

- on a CPU, record by record, so the cost is the sum of the squared record lengths instead of the
  square of their sum and no (n, n) mask is built: where ``cpu_kernels`` takes the tensors, there
  is no attention dropout and no record is longer than ``CPU_KERNEL_MAX_LEN``, one kernel call
  runs every record of the row (``PackedCausalAttention``; forward and backward within float32
  rounding of sdpa's), otherwise one sdpa call per record;
- on a GPU, where a step is bound by kernel launches rather than arithmetic, a row of at most
  ``GPU_ROW_AT_ONCE_MAX_LEN`` tokens in one sdpa call with a block-diagonal causal mask built
  once per forward (``attends_row_at_once``); a longer row one sdpa call per record.

Anything else (a padding mask, several rows, a cache during generation) goes to transformers' own
``sdpa`` path unchanged; several rows whose ``position_ids`` restart mid-row are not supported
(``packing.py`` never makes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..data.packing import record_starts
from . import cpu_kernels

PACKED_SDPA = "llama_sft_packed_sdpa"


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    # query: (1, heads, n, head_dim); key and value: (1, kv_heads, n, head_dim).
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    if packed and attends_row_at_once(query.device, query.shape[2]):
        mask = forward_block_causal_mask(position_ids, query.dtype)
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = forward_record_starts(position_ids) if packed else []
    if not bounds or bounds[0] != 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if (
        query.device.type == "cpu"
        and dropout == 0.0
        and max(lengths) <= CPU_KERNEL_MAX_LEN
        and cpu_kernels.attention_takes(query, key, value)
    ):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return PackedCausalAttention.apply(query, key, value, torch.tensor(bounds), scale), None
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of a slice writes a zero tensor of the whole row per record.
    pieces = [
        _causal_sdpa(q, k, v, dropout, scaling, gqa)
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


# PackedCausalAttention beats one sdpa call per record up to a record length; past it PyTorch's
# flash kernel's blocking pays, so a row with a longer record goes to sdpa (docs/performance.md,
# The speed-ups: `packed_attention`).
CPU_KERNEL_MAX_LEN = 640


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each record of a packed row through ``cpu_kernels``: the
    (1, n, heads, head_dim) output from (1, heads, n, head_dim) queries and (1, kv_heads, n,
    head_dim) keys and values. Keeps the inputs, the output and one float per row and head.

    Why: PyTorch's math and flash kernels run a short record's attention with a dozen ops and new
    tensors each, far below the machine's arithmetic rate; one call for the whole row avoids them
    (docs/performance.md, The speed-ups: `packed_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, starts: torch.Tensor, scale: float):
        out, lse = cpu_kernels.causal_attention(q, k, v, starts, scale)
        ctx.save_for_backward(q, k, v, out, lse, starts)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse, starts = ctx.saved_tensors
        dq, dk, dv = cpu_kernels.causal_attention_backward(grad, q, k, v, out, lse, starts, ctx.scale)
        return dq, dk, dv, None, None


# What is derived from the position_ids of the packed row being run, by name: every layer of a
# forward is given the same position_ids tensor, so each is made once per forward, not once per
# layer (reading the record starts back from a GPU waits for the GPU to finish its queue).
_this_row: tuple[torch.Tensor, dict] | None = None


def _once_per_row(position_ids: torch.Tensor, key, make):
    global _this_row
    if _this_row is None or _this_row[0] is not position_ids:
        _this_row = (position_ids, {})
    derived = _this_row[1]
    if key not in derived:
        derived[key] = make()
    return derived[key]


def forward_record_starts(position_ids: torch.Tensor) -> list[int]:
    return _once_per_row(position_ids, "starts", lambda: record_starts(position_ids))


# On a GPU a training step is bound by kernel launches, so a row attends in one masked sdpa call
# rather than one call per record (docs/performance.md, What does not hold, and why). The masked
# call computes the whole (n, n) product: past this length the arithmetic it wastes (an estimate)
# outgrows the launches it saves.
GPU_ROW_AT_ONCE_MAX_LEN = 2048


def attends_row_at_once(device: torch.device, row_length: int) -> bool:
    """Whether a packed row runs in one masked sdpa call instead of one call per record."""
    return device.type != "cpu" and row_length <= GPU_ROW_AT_ONCE_MAX_LEN


# The mask is additive, in the queries' dtype, with rows a multiple of 16 elements apart: what
# PyTorch's memory-efficient kernel (the GPU kernel that takes a mask) reads; a boolean mask would
# be converted, and an unaligned one padded, in every layer's call.
MASK_ROW_ALIGN = 16


def forward_block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, n, n) additive mask for a packed row: 0 where a position may attend to another, i.e.
    to itself and to earlier positions of its own record, -inf elsewhere. Made once per forward."""

    def make() -> torch.Tensor:
        record = (position_ids[0] == 0).cumsum(0)
        n = record.shape[0]
        allowed = torch.tril(record[:, None] == record[None, :])
        width = -(-n // MASK_ROW_ALIGN) * MASK_ROW_ALIGN
        mask = torch.full((n, width), float("-inf"), dtype=dtype, device=position_ids.device)
        mask[:, :n].masked_fill_(allowed, 0.0)
        return mask[None, None, :, :n]

    return _once_per_row(position_ids, ("mask", dtype), make)


# On a CPU, PyTorch's math kernel runs forward and backward faster than its flash kernel for short
# records and slower for long ones (docs/performance.md, The speed-ups: `packed_attention`).
CPU_MATH_MAX_LEN = 256


def _causal_sdpa(q, k, v, dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    def attend():
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=q.shape[2] > 1, scale=scaling, enable_gqa=gqa
        )

    if q.device.type == "cpu" and q.shape[2] <= CPU_MATH_MAX_LEN:
        with sdpa_kernel(SDPBackend.MATH):
            return attend()
    return attend()


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a row without padding (records are separated by ``position_ids``); otherwise
    the mask transformers builds for sdpa."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
