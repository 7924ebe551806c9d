"""Memory a CPU training run gives back: freed heap pages (``ReturnFreedMemory``) and the frozen
base weights that ``modules_to_save`` copies replace (``DropReplacedBaseWeights``)."""

from __future__ import annotations

import ctypes

from peft import PeftModel, get_peft_model_state_dict
from transformers import TrainerCallback

from ..peft_modules import replaced_base_modules

# Optimizer steps between two returns of freed heap pages (``ReturnFreedMemory``) under bfloat16
# autocast; in float32 the heap is trimmed after every step.
TRIM_EVERY_STEPS = 8


class ReturnFreedMemory(TrainerCallback):
    """Give the pages of freed tensors back to the system (glibc's ``malloc_trim``) every
    ``TRIM_EVERY_STEPS`` optimizer steps under bfloat16 autocast, after every step otherwise; a
    no-op where the C library has no such call. ``--return_freed_memory False`` leaves it out.

    Why: packed rows change length every step, so activations of new sizes land in new places of
    glibc's heap, and the holes left by earlier steps stay resident. The price: the next step
    faults every page it reuses in again, so under bfloat16 it runs every 8 steps; float32's
    larger activations would then pass the original pipeline's peak, so there it runs every step
    (docs/performance.md, "heap_trim").
    """

    def __init__(self, under_bf16_autocast: bool):
        self.every = TRIM_EVERY_STEPS if under_bf16_autocast else 1
        try:
            self.trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):
            self.trim = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.trim is not None and state.global_step % self.every == 0:
            self.trim(0)


class DropReplacedBaseWeights(TrainerCallback):
    """When training begins, ``model.drop_replaced_base_weights``: the base copies of
    ``embed_tokens``/``lm_head`` that ``modules_to_save`` replaces leave memory.

    At the start of training, not before: DDP broadcasts every weight of the model when the
    Trainer wraps it, which a weight on the meta device cannot take part in. Not under DeepSpeed,
    whose checkpoints copy every weight of the model, nor FSDP, whose weights are pieces of flat
    shards.
    """

    def __init__(self):
        self.freed = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not args.deepspeed and not args.fsdp:
            self.freed = drop_replaced_base_weights(model)


def drop_replaced_base_weights(model: PeftModel) -> int:
    """Move the weights of ``replaced_base_modules`` to the meta device, unless the adapter saves
    them; returns the bytes freed.

    PEFT keeps each module of ``modules_to_save`` twice: the trained copy, and the base module to
    serve when the adapter is switched off. Training never switches it off and merging reads the
    base from disk. With ``embed_tokens,lm_head`` and a 55,296-row vocabulary of width 512 the
    originals are 113 MB in bfloat16 (the benchmark's model); with LLaMA-7B's 49,954 rows of
    4,096, 818 MB in float16. Their shapes stay, so parameter counts do not change. PEFT also saves
    them when the vocabulary was resized or an embedding has LoRA; they stay then. For a model whose
    weights are all its own (``trainer.DropReplacedBaseWeights`` says when).
    """
    saved = {tensor.data_ptr() for tensor in get_peft_model_state_dict(model).values()}
    freed = 0
    for module in replaced_base_modules(model):
        weights = [p for p in module.parameters() if not p.is_meta]
        if any(p.data_ptr() in saved for p in weights):
            continue
        freed += sum(p.numel() * p.element_size() for p in weights)
        module.to("meta")
    return freed
