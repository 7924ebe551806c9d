"""Base model and LoRA.

Contract: ``load_base_model(model_args, tokenizer_size, dtype)`` returns a causal LM whose
embedding has one row per tokenizer id (resized up when the tokenizer is larger; the checks in
``llama_sft.checks`` refuse a smaller one). ``attach_lora(model, lora_args)`` returns a
``PeftModel`` whose trainable parameters are exactly the LoRA matrices (with ``use_dora``, DoRA's
magnitudes too) and ``modules_to_save``, in float32, with the base frozen: stock transformers and PEFT
modules (``use_rslora`` scales by alpha/sqrt(r)). With ``peft_path`` the saved
adapter is loaded trainable and its own configuration wins.
"""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from ..checks import ModelError, first_line, model_vocab_size, read_adapter_config
from ..loading import KBITS, quantization_config
from ..quiet import loading_bar_on_terminal_only
from .args import ArgumentError, LoraArguments, ModelArguments, zero_stage

logger = logging.getLogger(__name__)


def check_training_mode(args) -> None:
    """Refuse a k-bit or full fine-tuning set-up that cannot work, before any weight is loaded."""
    kbits, training = args.model.load_in_kbits, args.training
    if kbits not in KBITS:
        raise ArgumentError(
            f"--load_in_kbits {kbits}: supported are 4 (QLoRA: NF4 or FP4), 8 (LLM.int8) and 16 (no quantisation)"
        )
    if training.full_finetuning and args.lora.peft_path:
        raise ArgumentError(
            "--full_finetuning with --peft_path: a LoRA cannot be continued by training every weight; "
            "merge it first (llama-sft merge), then fine-tune the merged model"
        )
    if kbits == 16:
        return
    if training.full_finetuning:
        raise ArgumentError(
            f"--load_in_kbits {kbits} with --full_finetuning: quantised weights cannot be trained; use "
            "--load_in_kbits 16 for full fine-tuning, or drop --full_finetuning to train a QLoRA adapter"
        )
    if zero_stage(training.deepspeed) == 3:
        raise ArgumentError(
            f"--load_in_kbits {kbits} with DeepSpeed ZeRO-3: ZeRO-3 shards the weights, which quantised layers "
            "cannot be; use ds_zero2_no_offload.json or no --deepspeed"
        )
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise ArgumentError(
            f"--load_in_kbits {kbits} needs bitsandbytes: pip install bitsandbytes==0.50.2 "
            "(or --load_in_kbits 16)"
        ) from None
    try:  # a build without kernels for this device fails here, not after the weights are loaded
        bnb_functional.quantize_4bit(torch.ones(64, 64, device=training.device))
    except Exception as exc:  # any failure of the probe means the same: no k-bit layers here
        raise ArgumentError(
            f"--load_in_kbits {kbits}: bitsandbytes cannot run on this {training.device.type} "
            f"({first_line(exc)}); use --load_in_kbits 16"
        ) from None


def load_base_model(
    args: ModelArguments,
    tokenizer_size: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float32,
    keep_unquantised: list[str] | None = None,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    keep = list(keep_unquantised or [])
    if args.load_in_kbits != 16 and tokenizer_size > model_vocab_size(args.model_name_or_path):
        keep.append("lm_head")  # it grows to the tokenizer's rows below, which a quantised layer cannot
    quantization = quantization_config(
        args.load_in_kbits, compute_dtype, keep, args.quant_type, args.double_quant
    )
    extra = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
        if torch.cuda.is_available():  # quantised weights are placed when loaded; they cannot move later
            extra["device_map"] = {"": torch.cuda.current_device()}
    loading_bar_on_terminal_only()
    # transformers' sdpa attention keeps the records of a packed row apart by their position_ids.
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        dtype=dtype,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
        use_safetensors=None,
        **extra,
    )
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer_size > rows:
        logger.warning(
            "resizing the model's embeddings from %d to %d rows to match the tokenizer; the new rows "
            "start near the old rows' mean (drawn from their mean and covariance) and need training "
            "(put embed_tokens,lm_head in --modules_to_save, or the merged model keeps them untrained)",
            rows,
            tokenizer_size,
        )
        model.resize_token_embeddings(tokenizer_size, mean_resizing=True)
    return model


def prepare_kbit(
    model: torch.nn.Module, gradient_checkpointing: bool, checkpointing_kwargs, compute_dtype: torch.dtype
) -> torch.nn.Module:
    """PEFT's preparation of a quantised model for training (inputs that require grad for
    checkpointing, frozen weights cast up for stability), then, under 16-bit compute, the frozen
    unquantised weights back to that dtype: PEFT casts them to float32, which for a 1B model's
    embeddings alone takes more memory than its 4-bit layers."""
    from peft import prepare_model_for_kbit_training

    before = {name: p.dtype for name, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpointing_kwargs,
    )
    if compute_dtype != torch.float32:
        for name, param in model.named_parameters():
            if before.get(name) == compute_dtype and param.dtype == torch.float32:
                param.data = param.data.to(compute_dtype)
    return model


def make_fully_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight trains, in float32 (as LoRA weights do: see attach_lora)."""
    for param in model.parameters():
        param.requires_grad_(True)
        if param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _module_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    linear, every = set(), set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        every.add(leaf)
        if isinstance(module, torch.nn.Linear):
            linear.add(leaf)
    return linear, every


def check_lora_args(model: torch.nn.Module, lora: LoraArguments) -> None:
    if lora.peft_path is not None:
        return
    if lora.lora_rank <= 0:
        raise ArgumentError(f"--lora_rank {lora.lora_rank}: the rank must be a positive integer (8 is usual)")
    if not 0 <= lora.lora_dropout < 1:
        raise ArgumentError(f"--lora_dropout {lora.lora_dropout}: must be in [0, 1)")
    linear, every = _module_names(model)
    if not lora.target_modules:
        raise ArgumentError("--trainable is empty: name the modules that get LoRA, e.g. q_proj,v_proj")
    unknown = [m for m in lora.target_modules if m not in linear]
    if unknown:
        raise ArgumentError(
            f"--trainable names {', '.join(unknown)}, which the model has no linear layer called; "
            f"choose from {', '.join(sorted(linear))}"
        )
    missing = [m for m in lora.modules_to_save_list or [] if m not in every]
    if missing:
        raise ArgumentError(
            f"--modules_to_save names {', '.join(missing)}, which the model has no module called; "
            "for LLaMA use embed_tokens,lm_head (or null for none)"
        )


def attach_lora(model: torch.nn.Module, lora: LoraArguments) -> PeftModel:
    if lora.peft_path is not None:
        saved = read_adapter_config(lora.peft_path, "--peft_path")
        _warn_disagreements(saved, lora)
        try:
            model = PeftModel.from_pretrained(model, lora.peft_path, is_trainable=True)
        except RuntimeError as exc:
            raise ModelError(
                f"{lora.peft_path}: the adapter does not fit this base model ({first_line(exc)}); "
                "was it trained on another base or vocabulary size?"
            ) from None
        # The adapter records the base path it was trained from, often relative to another folder;
        # PEFT looks for that base's config when saving and warns when it is not there. This run's
        # base is the one that is true now.
        model.peft_config["default"].base_model_name_or_path = model.get_base_model().config.name_or_path
    else:
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.lora_rank,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save_list,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            inference_mode=False,
        )
        model = get_peft_model(model, config)
    # Trainable weights live in float32 whatever the base dtype: fp16 gradients cannot be unscaled
    # by the AMP grad scaler, and bf16 master weights lose small updates.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _adapter_options(lora: LoraArguments) -> dict:
    return {
        "r": lora.lora_rank,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": sorted(lora.target_modules),
        "modules_to_save": sorted(lora.modules_to_save_list or []),
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora,
    }


def _warn_disagreements(saved: dict, lora: LoraArguments) -> None:
    # Only options set away from their defaults are the user's: a script that continues an adapter
    # without naming its rank should not be told that the default rank is ignored.
    defaults = _adapter_options(LoraArguments())
    given = {key: value for key, value in _adapter_options(lora).items() if value != defaults[key]}
    for key, value in given.items():
        stored = saved.get(key)
        if isinstance(stored, list | tuple | set):
            stored = sorted(stored)
        elif stored is None:
            # Absent (e.g. from configs written before PEFT had the option): the option is off.
            stored = {"modules_to_save": [], "use_dora": False, "use_rslora": False}.get(key)
        if stored != value and not (
            isinstance(value, float) and stored is not None and float(stored) == value
        ):
            logger.warning(
                "--peft_path %s: its %s is %s; the flag's %s is ignored (a loaded adapter keeps its own config)",
                lora.peft_path,
                key,
                stored,
                value,
            )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
