"""Everything that only makes training faster or smaller, behind one entry point: ``apply``.

Contract: ``prepare_process(skipped)`` sets the process environment of ``environment.py``; the
training command-line entry calls it before PyTorch allocates (a run started from Python sets
nothing, and the report says so). ``apply(args, build_model)`` builds the model with ``build_model()`` and returns an
``Applied``: the model, the trainer's loss component and autocast (None: transformers' own), the
callbacks to add, and a report naming every speed-up applied and every one skipped with the
reason, which it also logs as one block. ``--speedups off`` applies none: stock transformers and
PEFT modules, attention and loss (packing is its own flag), the same losses and gradients within
float32 rounding. ``--skip_speedups NAME,...`` leaves out single ones (``NAMES``); a combination
that cannot work raises ``ArgumentError``. ``args`` is the training run's parsed arguments
(``TrainArgs``); this package reads them and changes none. A run without this package (its calls
removed, ``build_model()`` in place of ``apply``) is the same training, slower.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..options import ArgumentError
from . import environment

logger = logging.getLogger("llama_sft")

# name: what it does (the report's wording; docs/performance.md says why and what each saves)
NAMES = {
    "cpu_environment": "oneDNN kernel caches capped at 64 shapes, transparent huge pages",
    "cpu_kernels": "fused C kernels for dropout bits, cross-entropy, RMSNorm, SwiGLU, rotary, attention",
    "packed_attention": "each record of a packed row attends within itself, no (n, n) mask",
    "no_cudnn_attention": "cuDNN's attention off (it builds a graph for every new length)",
    "own_autocast": "llama-sft's bfloat16 autocast: no float32 copies of outputs or LoRA inputs",
    "bf16_residual": "the trained embedding's output cast to the frozen weights' dtype",
    "bits_dropout": "LoRA dropout masks from cheap random bits",
    "fused_norm_mlp": "RMSNorm and SwiGLU as fused modules",
    "fused_lora": "the LoRA update summed inside its second product",
    "rotary_kernel": "the rotary embedding as one kernel pass per tensor",
    "labelled_logits": "logits only where a label is kept, the loss gradient made in the forward",
    "fused_head": "the output projection fused with the loss and both gradients",
    "kept_memory": "logits and vocabulary-sized gradients in memory kept between steps",
    "free_replaced_weights": "frozen base copies of modules_to_save freed",
    "heap_trim": "freed heap pages returned to the system",
}
# A speed-up that cannot run without another.
NEEDS = {"fused_head": "labelled_logits"}


@dataclass
class Applied:
    model: torch.nn.Module
    loss: Callable | None = None
    autocast: Callable | None = None
    callbacks: list = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    compute_dtype: str = "float32"

    def log(self) -> None:
        lines = [f"  {name:22s} {state}" for name, state in self.report.items()]
        logger.info("speed-ups:\n%s", "\n".join(lines))


def prepare_process(skipped: set[str]) -> None:
    """Set the environment variables PyTorch reads at its first allocation, unless ``skipped``
    names ``cpu_environment`` or is ``{"*"}`` (``--speedups off``)."""
    if not {"*", "cpu_environment"} & skipped:
        environment.set_defaults()


def chosen(args) -> set[str]:
    """The speed-ups asked for: every one under ``auto`` less ``--skip_speedups``, none under off."""
    training = args.training
    skipped = [name.strip() for name in (training.skip_speedups or "").split(",") if name.strip()]
    unknown = [name for name in skipped if name not in NAMES]
    if unknown:
        raise ArgumentError(
            f"--skip_speedups names {', '.join(unknown)}, which is not a speed-up; choose from {', '.join(NAMES)}"
        )
    if training.speedups == "off":
        return set()
    wanted = set(NAMES) - set(skipped)
    for name, needed in NEEDS.items():
        if name in wanted and needed not in wanted:
            raise ArgumentError(
                f"--skip_speedups {needed} without {name}: {name} needs {needed}; skip both, or neither"
            )
    return wanted


def apply(args, build_model: Callable[[], torch.nn.Module]) -> Applied:
    wanted = chosen(args)
    training = args.training
    device = training.device
    on_cpu = device.type == "cpu"
    report: dict[str, str] = {}

    def decide(name: str, ok: bool, why_not: str = "") -> bool:
        if name not in wanted:
            report[name] = "skipped: " + (
                "--speedups off" if training.speedups == "off" else "--skip_speedups"
            )
            return False
        report[name] = f"applied: {NAMES[name]}" if ok else f"skipped: {why_not}"
        return ok

    if decide("cpu_environment", on_cpu and bool(environment.applied), _environment_why_not(on_cpu)):
        report["cpu_environment"] += (
            " (" + ", ".join(f"{k}={v}" for k, v in environment.applied.items()) + ")"
        )

    # Before the model exists: what changes how it is built or what PyTorch does.
    if decide("no_cudnn_attention", device.type == "cuda", "not on a CUDA GPU"):
        # cuDNN's attention builds an execution graph for every new sequence length, and records
        # bring new lengths every step; flash and memory-efficient attention take any length as it
        # comes (docs/performance.md, The speed-ups: `no_cudnn_attention`).
        torch.backends.cuda.enable_cudnn_sdp(False)
    from . import cpu_kernels

    kernels = False
    if "cpu_kernels" in wanted and on_cpu:
        cpu_kernels.set_enabled(True)
        with training.main_process_first(desc="CPU kernels"):
            kernels = cpu_kernels.kernels() is not None
    else:
        cpu_kernels.set_enabled(False)
    decide("cpu_kernels", kernels, "not on a CPU" if not on_cpu else "no C compiler or the build failed")
    bf16 = training.bf16 and not training.deepspeed
    # The trainer then enters this autocast in place of accelerate's (trainer.SftTrainer).
    decide(
        "own_autocast",
        bf16,
        "DeepSpeed runs the mixed precision" if training.bf16 else "not training in bfloat16",
    )
    autocast_dtype = torch.bfloat16 if bf16 and "own_autocast" in wanted else None

    model = build_model()

    from .attention import PACKED_SDPA

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model or not
    attn = base.config._attn_implementation
    if decide(
        "packed_attention",
        args.data.packing and attn == "sdpa",
        "--packing False" if not args.data.packing else f"attention is {attn}, not sdpa",
    ):
        base.set_attn_implementation(PACKED_SDPA)
    from .autocast import OwnAutocast, keep_residual_in_base_dtype

    hook = keep_residual_in_base_dtype(model) if "bf16_residual" in wanted else None
    decide("bf16_residual", hook is not None, "no trained embedding over frozen 16-bit weights")
    from .dropout import use_bits_dropout

    dropouts = use_bits_dropout(model) if "bits_dropout" in wanted and on_cpu else 0
    if decide("bits_dropout", dropouts > 0, "not on a CPU" if not on_cpu else "LoRA dropout is 0"):
        report["bits_dropout"] += f" ({dropouts} layers)"

    from transformers.integrations import is_deepspeed_zero3_enabled

    from .fused_modules import mirrors_llama_attention, use_fused_modules

    zero3 = is_deepspeed_zero3_enabled()
    counts = use_fused_modules(
        model,
        norms_mlps="fused_norm_mlp" in wanted,
        lora_linears="fused_lora" in wanted and not zero3,
        rotary="rotary_kernel" in wanted,
    )
    if decide("fused_norm_mlp", counts["norms"] + counts["mlps"] > 0, "no LLaMA-style RMSNorm or SwiGLU MLP"):
        report["fused_norm_mlp"] += f" ({counts['norms']} norms, {counts['mlps']} MLPs)"
    if decide(
        "fused_lora",
        counts["lora_linears"] > 0,
        "ZeRO-3 gathers LoRA weights inside their own modules"
        if zero3
        else "k-bit LoRA layers are bitsandbytes'"
        if args.model.load_in_kbits != 16
        else "no LoRA Linear layer",
    ):
        report["fused_lora"] += f" ({counts['lora_linears']} layers)"
    decide(
        "rotary_kernel",
        counts["attentions"] > 0,
        "no LlamaAttention layer"
        if mirrors_llama_attention()
        else "the installed LlamaAttention.forward is not the mirrored one (transformers 5.24's)",
    )

    from .fused_head import LabelledLoss, head_projection
    from .kept_memory import HeadMemory, keep_embedding_gradients

    kept = None
    if decide("kept_memory", on_cpu, "not on a CPU (the GPU's caching allocator reuses memory)"):
        kept = HeadMemory()
        keep_embedding_gradients(model, kept.logits)
    loss = None
    if decide("labelled_logits", True):
        head = head_projection(model) if not zero3 else None
        fused = decide(
            "fused_head",
            head is not None,
            "ZeRO-3 shards the output weight"
            if zero3
            else "lm_head is not a plain Linear of a LLaMA-like model",
        )
        loss = LabelledLoss(head if fused else None, autocast_dtype, kept)
    else:
        decide("fused_head", False)

    from .memory import DropReplacedBaseWeights, ReturnFreedMemory

    callbacks = []
    sharded = bool(training.deepspeed or training.fsdp)
    replaced = hasattr(model, "get_base_model") and (
        bool(args.lora.modules_to_save_list) or bool(args.lora.peft_path)
    )
    if decide(
        "free_replaced_weights",
        replaced and not sharded,
        "DeepSpeed or FSDP owns the weights" if sharded else "no modules_to_save copies",
    ):
        callbacks.append(DropReplacedBaseWeights())
    trim = ReturnFreedMemory(under_bf16_autocast=training.bf16)
    if decide(
        "heap_trim",
        on_cpu and training.return_freed_memory and trim.trim is not None,
        "not on a CPU"
        if not on_cpu
        else ("--return_freed_memory False" if not training.return_freed_memory else "no malloc_trim"),
    ):
        callbacks.append(trim)
    autocast = OwnAutocast(model, device.type, autocast_dtype) if autocast_dtype is not None else None
    dtype = "bfloat16" if training.bf16 else "float16" if training.fp16 else "float32"
    applied = Applied(model, loss, autocast, callbacks, report, dtype)
    applied.log()
    return applied


def _environment_why_not(on_cpu: bool) -> str:
    if not on_cpu:
        return "not on a CPU"
    if environment.applied is None:
        names = " ".join(f"{k}={v}" for k, v in environment.DEFAULTS.items())
        return f"set only by the command-line entry, before PyTorch starts (from Python, export {names})"
    return "every variable already set by the user"
