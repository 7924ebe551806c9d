"""LoRA dropout whose random bits are cheap on a CPU.

Contract: ``BitsDropout(p)`` is ``torch.nn.Dropout(p)`` in distribution and in its gradient: in
training each element is kept with probability 1 - p (to within 2**-32) and scaled by 1 / (1 - p),
and the backward applies the same mask and scale; in eval, or on a GPU, it is ``nn.Dropout``
itself. The mask comes from 32 random bits per element, from a seed drawn for every call from
torch's default generator, so ``set_seed`` and the Trainer's saved RNG states make runs and
resumed runs repeat exactly (on one machine: the bits come from the fused kernel of
``cpu_kernels`` where it can be built, else from NumPy's SFC64, two different streams).

Why: PyTorch's CPU dropout draws its mask with a Mersenne twister, element by element. With LoRA
on the seven projections of every layer that is 35,000 draws per token, a large share of a training
step of a small model. NumPy's SFC64 bits with torch's select and scale are cheaper but keep a
boolean mask; the fused kernel is cheaper still, and keeps only the seed (docs/performance.md, The
speed-ups: `bits_dropout`).
"""

from __future__ import annotations

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from . import cpu_kernels


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


class _SeededMaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
        ctx.mask = (seed, threshold, scale)
        return cpu_kernels.masked_scale(x, seed, threshold, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return cpu_kernels.masked_scale(grad, *ctx.mask), None, None, None


class BitsDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
        if cpu_kernels.supports(x):
            # Dropped where the 32 random bits, read unsigned, fall in the lowest p share.
            threshold = min(round(self.p * 2**32), 2**32 - 1)
            return _SeededMaskedScale.apply(x, seed, threshold, 1.0 / (1.0 - self.p))
        count = x.numel()
        bits = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.int32)[:count]
        # An element is dropped when its 32 random bits, read as a signed integer, fall in the
        # lowest p share of the int32 range.
        keep = torch.from_numpy(bits).view(x.shape) >= round(self.p * 2**32) - 2**31
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))


def set_lora_dropout(model: torch.nn.Module, dropout_class: type[torch.nn.Dropout]) -> int:
    """Give every LoRA dropout of a PEFT model the class ``dropout_class`` with the same p (LoRA
    without dropout keeps its ``nn.Identity``); returns how many were set."""
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout):
                module.lora_dropout[name] = dropout_class(dropout.p)
                count += 1
    return count


def use_bits_dropout(model: torch.nn.Module) -> int:
    return set_lora_dropout(model, BitsDropout)
