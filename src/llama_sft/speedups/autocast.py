"""llama-sft's own bfloat16 autocast, and the residual stream kept in the frozen weights' dtype.

Contract: ``OwnAutocast(model, device_type, dtype)(cache_enabled)`` is the context every forward
runs in: ``torch.autocast`` of that dtype, with PEFT's cast of each LoRA input to float32 switched
off (autocast casts it back before the LoRA product anyway). ``keep_residual_in_base_dtype`` casts
a trained float32 embedding's output to the frozen layers' dtype under autocast.

Why: accelerate's autocast returns every output as a float32 copy, for the logits tokens x
vocabulary floats per pass; and PEFT's float32 copy of every LoRA input also makes LoRA dropout
run on twice the bytes.
"""

from __future__ import annotations

import contextlib

import torch
from peft.helpers import disable_input_dtype_casting


class OwnAutocast:
    def __init__(self, model: torch.nn.Module, device_type: str, dtype: torch.dtype):
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def __call__(self, cache_enabled: bool | None = True) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache_enabled))
        stack.enter_context(disable_input_dtype_casting(self.model, active=True))
        return stack


def keep_residual_in_base_dtype(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Under autocast, cast the trainable (float32) embedding's output to the frozen layers' dtype.

    Without it a bfloat16 model with ``embed_tokens`` in ``modules_to_save`` runs its whole residual
    stream, norms and rotary embeddings in float32: every projection casts its input again, and
    the saved activations take twice the memory, unlike the same model without LoRA. Without
    autocast the output is left alone (float32 LoRA and ``modules_to_save`` need float32 inputs).
    """
    frozen = next(
        (p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None
    )
    embedding = model.get_input_embeddings()
    if frozen is None or frozen == torch.float32 or not any(p.requires_grad for p in embedding.parameters()):
        return None

    def cast(module, args, output):
        return output.to(frozen) if torch.is_autocast_enabled(output.device.type) else output

    return embedding.register_forward_hook(cast)
