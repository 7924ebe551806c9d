"""RMSNorm, the SwiGLU MLP and the rotary embedding of LLaMA-family models with fused CPU kernels,
and LoRA layers whose update is summed inside their second product.

Contract: ``FusedRMSNorm`` computes what transformers' ``LlamaRMSNorm`` computes (float32 inside,
the normalised row rounded to the input dtype, then times the weight), and ``FusedSwiGLUMLP`` what
``LlamaMLP`` computes (``down(silu(gate(x)) * up(x))``, the SiLU rounded to the input dtype before
the product): the same values, and the same gradients to within float32 rounding, the projections
(and their LoRA) called in the same order, so LoRA dropout draws the same bits. The norm keeps its
input and one float per row for the backward, the product its two inputs, where PyTorch keeps
float32 copies and the SiLU's output too. Each uses ``cpu_kernels`` where they take the tensors (on
a CPU, float32 or bfloat16, for the norm a frozen weight of the input's dtype) and otherwise
PyTorch's ops. ``use_fused_modules(model)`` puts them in place of every norm and MLP whose class
has LLaMA's forward (``LLAMA_RMS_NORMS``, ``LLAMA_MLPS``), with the same weights and submodules, so
state dict keys and PEFT's LoRA layers stay as they are. It also gives PEFT's LoRA ``Linear``
layers the class ``FusedLoraLinear`` and ``LlamaAttention`` layers ``FusedRotaryLlamaAttention``
(subclasses; see their docstrings for what they compute and when).

Why: PyTorch runs the norm as seven passes over a float32 copy of the row in the forward and more
in the backward, and the SiLU, the product and their backward as five passes, each with a new
output, in every layer (docs/performance.md, "fused_norm_mlp", gives the times).
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from . import cpu_kernels

# Classes whose forward is LlamaRMSNorm's / LlamaMLP's word for word (Gemma's norm, which scales by
# 1 + weight, and Mixtral's experts are not).
LLAMA_RMS_NORMS = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm"}
)
LLAMA_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = cpu_kernels.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        return cpu_kernels.rms_norm_backward(grad, x, weight, rstd), None, None


class FusedRMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            hidden_states.dtype == weight.dtype
            and not weight.requires_grad
            and hidden_states.shape[-1] == weight.numel()
            and cpu_kernels.supports(hidden_states, weight)
        ):
            return _RMSNorm.apply(hidden_states, weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class SwiGLUProduct(torch.autograd.Function):
    """``silu(gate) * up`` through ``cpu_kernels``; keeps ``gate`` and ``up`` for the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return cpu_kernels.swiglu(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return cpu_kernels.swiglu_backward(grad, gate, up)


class FusedSwiGLUMLP(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        if gate.dtype == up.dtype and gate.shape == up.shape and cpu_kernels.supports(gate, up):
            return self.down_proj(SwiGLUProduct.apply(gate, up))
        return self.down_proj(self.act_fn(gate) * up)


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose update is added inside the second LoRA product.

    For one active vanilla LoRA adapter on an ``nn.Linear``, not merged, with the base output,
    the LoRA input and the LoRA weights in one dtype (or under autocast, which puts the products in
    one): ``base(x).addmm_(lora_A(dropout(x)), lora_B.weight.T, alpha=scaling)``, the value PEFT
    computes as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` to within one rounding (the sum is
    rounded once instead of twice). Anything else goes to PEFT's forward. Only its class changes:
    the weights, submodules, state dict keys and PEFT's merging stay PEFT's.

    Why: PEFT's sum makes two new (tokens x out_features) tensors in the forward (the scaled update
    and the sum) and one in the backward (the update's gradient times the scale), each faulted in
    and written once. The accumulating product writes into the base output, and autograd scales
    only the (tokens x r) and (r x out_features) gradients (docs/performance.md, "fused_lora").
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (
            args
            or kwargs
            or adapter not in self.lora_A
            or adapter in self.lora_variant
            or self.disable_adapters
            or self.merged
            or not isinstance(self.base_layer, torch.nn.Linear)
            or self.lora_B[adapter].bias is not None
        ):
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not (
            x.dtype == self.base_layer.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
        ):
            return super().forward(x, *args, **kwargs)
        rows = x.reshape(-1, x.shape[-1])
        # A new tensor, not a view of the caller's, so the in-place sum below needs no CopySlices.
        result = self.base_layer(rows)
        update = lora_a(self.lora_dropout[adapter](rows))
        # In-place ops are not autocast: the cast autocast would make, made here.
        result.addmm_(update, lora_b.weight.t().to(result.dtype), alpha=self.scaling[adapter])
        return result.view(*x.shape[:-1], result.shape[-1])


class RotaryEmbedding(torch.autograd.Function):
    """transformers' ``apply_rotary_pos_emb`` for one tensor through ``cpu_kernels.rotary``: the
    same values (bit for bit in bfloat16), one pass forward and one backward, keeping only cos and
    sin."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return cpu_kernels.rotary(x, cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:  # the kernel reads whole rows; the attention may hand back any layout
            grad = grad.contiguous()
        return cpu_kernels.rotary(grad, cos, sin, backward=True), None, None


class FusedRotaryLlamaAttention(LlamaAttention):
    """transformers' ``LlamaAttention`` with the rotary embedding of queries and keys as one kernel
    pass each (``RotaryEmbedding``) where ``cpu_kernels`` takes them (a packed row or any batch of
    one on a CPU, without a cache); otherwise, and for anything it does not know, its own forward.
    The forward below is ``LlamaAttention.forward`` of transformers 5.24 with that one call
    replaced; ``use_fused_modules`` gives the class only where the installed forward's source is
    that one (``LLAMA_ATTENTION_FORWARD_SHA256``). Only the class changes.

    Why: transformers rotates with two products, a negation, a concatenation and a sum per tensor,
    and its backward with zero-filled slices and sums, each a new tensor: a noticeable share of a
    training step (docs/performance.md, The speed-ups: `rotary_kernel`)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is not None or position_embeddings is None or "past_key_values" in kwargs:
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                cache=cache, **kwargs,
            )  # fmt: skip
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        if cpu_kernels.rotary_takes(query_states, cos, sin) and cpu_kernels.rotary_takes(
            key_states, cos, sin
        ):
            query_states = RotaryEmbedding.apply(query_states, cos, sin)
            key_states = RotaryEmbedding.apply(key_states, cos, sin)
        else:
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


# sha256 of the source of transformers 5.24's LlamaAttention.forward, which
# FusedRotaryLlamaAttention.forward mirrors; another source keeps transformers' own class.
LLAMA_ATTENTION_FORWARD_SHA256 = "e080b5cc468cd0a507951a329a0b79aa69d8ec0cc2a6c0861f46f96ae00be531"


@functools.cache
def mirrors_llama_attention() -> bool:
    """Whether the installed transformers' ``LlamaAttention.forward`` is the one mirrored."""
    try:
        source = inspect.getsource(LlamaAttention.forward)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest() == LLAMA_ATTENTION_FORWARD_SHA256


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def use_fused_modules(
    model: torch.nn.Module, norms_mlps: bool = True, lora_linears: bool = True, rotary: bool = True
) -> dict[str, int]:
    """Put ``FusedRMSNorm`` and ``FusedSwiGLUMLP`` in place of the model's LLaMA norms and SiLU
    MLPs (``norms_mlps``), give PEFT's LoRA ``Linear`` layers ``FusedLoraLinear``'s class
    (``lora_linears``) and ``LlamaAttention`` layers ``FusedRotaryLlamaAttention``'s where the
    installed forward is the mirrored one (``rotary``); returns how many of each."""
    counts = {"norms": 0, "mlps": 0, "lora_linears": 0, "attentions": 0}
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if lora_linears and type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            counts["lora_linears"] += 1
        elif rotary and type(module) is LlamaAttention and mirrors_llama_attention():
            module.__class__ = FusedRotaryLlamaAttention
            counts["attentions"] += 1
        elif norms_mlps and kind in LLAMA_RMS_NORMS:
            _replace(model, name, FusedRMSNorm(module.weight, module.variance_epsilon))
            counts["norms"] += 1
        elif norms_mlps and kind in LLAMA_MLPS and isinstance(module.act_fn, torch.nn.SiLU | SiLUActivation):
            _replace(model, name, FusedSwiGLUMLP(module))
            counts["mlps"] += 1
    return counts
