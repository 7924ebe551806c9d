"""Memory planner behind ``--dry_run``: what a run would hold per device, without loading weights.

Contract: ``build_meta_model(args, tokenizer_size)`` builds the model from its ``config.json`` on
the meta device (no memory, no weight files read), resized to the tokenizer and with LoRA
attached exactly as ``model.attach_lora`` does, so ``count_parameters`` gives the real trainable
and total counts. ``estimate_memory(...)`` returns the estimated peak memory per device, in bytes,
by part: frozen weights (load dtype; less the base copies of ``modules_to_save`` where training
frees them: not under DeepSpeed, nor for a resized vocabulary), trainable weights, gradients and
AdamW state (float32), divided across devices as the ZeRO stage says, activations of one
forward/backward pass (a per-token, per-layer rule for LLaMA with sdpa attention, see
docs/performance.md, Memory planner; or one layer input per layer with gradient checkpointing),
the vocabulary projection and the runtime itself. It is an estimate: allocator fragmentation and
framework buffers are not modelled beyond a fixed runtime share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import model_vocab_size
from ..peft_modules import replaced_base_modules
from .args import TrainArgs, zero_stage
from .model import attach_lora, check_lora_args

GIB = 1024**3
RUNTIME_BYTES = {"cpu": int(0.6 * GIB), "cuda": int(1.0 * GIB)}


def loss_chunk_rows(device: str, vocab: int) -> int:
    """Rows of float32 logits the fused loss holds at a time (``speedups.fused_head``): 16 on a
    CPU, up to 2**26 values on a GPU; an estimate, not an import, so the plan needs no speed-up."""
    return 16 if device == "cpu" else max(1, 2**26 // vocab)


def build_meta_model(args: TrainArgs, tokenizer_size: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        args.model.model_name_or_path, trust_remote_code=args.model.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.model.trust_remote_code)
        if tokenizer_size > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(tokenizer_size, mean_resizing=False)
        if args.training.full_finetuning:
            model.requires_grad_(True)
        elif args.lora.peft_path is None:
            # The same checks as a real run, so that a bad LoRA flag is one line here too.
            check_lora_args(model, args.lora)
            model = attach_lora(model, args.lora)
    return model


# Bytes a weight takes when quantised: 4-bit values plus one float32 constant per 64 (with double
# quantisation one byte per 64 plus a float32 per 256 blocks); 8-bit values plus a float32 per row.
KBIT_BYTES = {
    (4, False): 0.5 + 4 / 64,
    (4, True): 0.5 + 1 / 64 + 4 / (64 * 256),
    (8, False): 1.0,
    (8, True): 1.0,
}


def quantised_weights(model: torch.nn.Module, keep: list[str] | None) -> int:
    """Parameters bitsandbytes quantises: the frozen Linear weights, except those trained in full
    (``keep``, see ``loading.quantization_config``)."""
    skip = set(keep or [])
    count = 0
    for name, module in model.named_modules():
        frozen_linear = type(module) is torch.nn.Linear and not module.weight.requires_grad
        if frozen_linear and not skip & set(name.split(".")):
            count += module.weight.numel()
    return count


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class MemoryPlan:
    parts: dict[str, int]
    tokens_per_pass: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def report(self) -> str:
        lines = [f"  {name:<22}{value / GIB:>8.2f} GiB" for name, value in self.parts.items()]
        lines.append(f"  {'estimated peak':<22}{self.total / GIB:>8.2f} GiB per device")
        return "\n".join(lines)


def estimate_memory(
    model: torch.nn.Module,
    *,
    load_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    tokens_per_pass: int,
    labelled_tokens_per_pass: int,
    gradient_checkpointing: bool,
    zero: int,
    frees_base_copies: bool,
    world_size: int,
    device: str,
    kbits: int = 16,
    double_quant: bool = True,
    keep_unquantised: list[str] | None = None,
) -> MemoryPlan:
    config = model.config if hasattr(model, "config") else model.base_model.model.config
    h, i, layers, vocab = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    trainable, total = count_parameters(model)
    frozen = total - trainable
    if frees_base_copies:  # when training begins (trainer.DropReplacedBaseWeights)
        frozen -= sum(p.numel() for module in replaced_base_modules(model) for p in module.parameters())
    load_bytes = torch.finfo(load_dtype).bits // 8
    half = compute_dtype != torch.float32
    shard = max(1, world_size)
    # Bytes kept for backward per token and layer (LoRA on all projections, sdpa) on LLaMA: float32
    # residual stream and LoRA dropout copies, the rest in the compute dtype (docs/performance.md,
    # Memory planner).
    per_token_layer = 52 * h + 12 * i if half else 72 * h + 20 * i
    if gradient_checkpointing:
        activations = tokens_per_pass * (layers * h * 4 + per_token_layer)
    else:
        activations = tokens_per_pass * layers * per_token_layer
    logit_bytes = 2 if half else 4
    frozen_bytes = frozen * load_bytes
    if kbits != 16:
        # Quantised weights at their k-bit size, the rest in the compute dtype (``model.prepare_kbit``).
        quantised = quantised_weights(model, keep_unquantised)
        rest = 4 if compute_dtype == torch.float32 else 2
        frozen_bytes = int(quantised * KBIT_BYTES[kbits, double_quant]) + (frozen - quantised) * rest
    parts = {
        "frozen weights": frozen_bytes // (shard if zero == 3 else 1),
        "trainable weights": trainable * 4 // (shard if zero == 3 else 1),
        "gradients": trainable * 4 // (shard if zero >= 2 else 1),
        "AdamW state": trainable * 8 // (shard if zero >= 1 else 1),
        "activations": activations,
        # At labelled positions only: one buffer of logits that become their own gradient, the
        # output weight's gradient in the compute dtype before its float32 copy, float32 loss chunks.
        "vocabulary projection": (labelled_tokens_per_pass + h) * vocab * logit_bytes
        + 2 * loss_chunk_rows(device, vocab) * vocab * 4,
        "runtime": RUNTIME_BYTES["cuda" if device == "cuda" else "cpu"],
    }
    return MemoryPlan(parts, tokens_per_pass)


def dry_run_report(args: TrainArgs, tokenizer_size: int, lengths: list[int], labelled: int) -> str:
    """The ``--dry_run`` printout: parameter counts, data statistics and the memory estimate."""
    training = args.training
    model = build_meta_model(args, tokenizer_size)
    trainable, total = count_parameters(model)
    dtype_name = args.model.torch_dtype if args.model.torch_dtype not in (None, "auto") else "float32"
    load_dtype = getattr(torch, dtype_name)
    compute_dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else load_dtype
    batch = training.per_device_train_batch_size
    longest = min(args.data.max_seq_length, max(lengths, default=args.data.max_seq_length))
    # Worst case: a micro-batch of the longest records; packed rows need no padding but are as long.
    tokens = batch * longest
    if args.data.packing and training.max_tokens_per_pass:
        tokens = min(tokens, max(training.max_tokens_per_pass, longest))
    share = labelled / max(1, sum(lengths))
    world = max(1, training.world_size)
    zero = zero_stage(training.deepspeed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = estimate_memory(
        model,
        load_dtype=load_dtype,
        compute_dtype=compute_dtype,
        tokens_per_pass=tokens,
        labelled_tokens_per_pass=int(tokens * share),
        gradient_checkpointing=training.gradient_checkpointing,
        zero=zero,
        # PEFT saves the base embeddings of a resized vocabulary with the adapter, so they stay.
        frees_base_copies=not training.deepspeed
        and tokenizer_size <= model_vocab_size(args.model.model_name_or_path),
        world_size=world,
        device=device,
        kbits=args.model.load_in_kbits,
        double_quant=args.model.double_quant,
        keep_unquantised=args.lora.modules_to_save_list,
    )
    mean = sum(lengths) / max(1, len(lengths))
    return "\n".join(
        [
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(1, total):.4f}",
            f"data: {len(lengths)} training examples, {sum(lengths):,d} tokens, mean {mean:.0f}, "
            f"longest {max(lengths, default=0)}, {share:.1%} of tokens labelled",
            f"plan: {device}, {world} process(es), ZeRO stage {zero}, "
            f"{'full fine-tuning' if training.full_finetuning else 'LoRA'}, weights "
            f"{dtype_name if args.model.load_in_kbits == 16 else f'{args.model.load_in_kbits}-bit'}, compute "
            f"{str(compute_dtype).removeprefix('torch.')}, micro-batch {batch} x up to {longest} tokens "
            f"({'packed' if args.data.packing else 'padded'}), gradient checkpointing "
            f"{'on' if training.gradient_checkpointing else 'off'}",
            plan.report(),
        ]
    )
