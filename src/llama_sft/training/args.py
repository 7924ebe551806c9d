"""Typed arguments for training. One set of dataclasses behind both entry points
(``run_clm_sft_with_peft.py`` and ``llama-sft train``); a YAML file and flags can set any field.

Contract: ``parse_train_args(argv, machine) -> TrainArgs`` parses a command line once, after
``flags.normalize_argv`` (``--config FILE.yaml`` expanded in place so later flags win, and
the spellings transformers 5 renamed translated). With a ``machine`` (``precision.Machine``), the
choices that depend on it (``--fp16`` or ``--bf16`` on a CPU, ``--torch_dtype float16`` on a CPU,
DeepSpeed on a CPU) are resolved on the parsed values before ``TrainingArguments`` is built, each
announced once; ``TrainArgs.requested`` keeps what was asked where it differs from what runs.
Every flag of the original ``run_clm_*_with_peft.py`` (v1 and v2) is accepted; those that change
nothing here (the Hub's, ``--streaming``, ...) are listed in ``NO_EFFECT`` and the run logs
``ignored_flag_notices`` at its start, one line each saying why.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..options import ArgumentError, escaped
from .flags import normalize_argv
from .precision import resolve_for_machine

# Why each flag of the original scripts that changes nothing here is accepted: its help text and the
# one line a run logs when it is given (``ignored_flag_notices``).
NO_EFFECT_WHY = {
    "low_cpu_mem_usage": "transformers 5 always loads the weights with low CPU memory use",
    "cache_dir": "nothing is downloaded: the model and tokenizer are local folders",
    "model_revision": "nothing is downloaded: the model folder holds one revision",
    "use_auth_token": "nothing is downloaded from the Hugging Face Hub",
    "use_fast_tokenizer": (
        "text is encoded by SentencePiece itself, as the model was trained, not by a fast or slow "
        "transformers tokenizer"
    ),
    "config_name": "the model is built from the config.json of --model_name_or_path",
    "config_overrides": (
        "it changes a model trained from scratch; the model here is --model_name_or_path as it is"
    ),
    "keep_linebreaks": (
        "each non-blank line of a .txt file is one document ended by EOS, so EOS marks the line break "
        "(the original passed this to the datasets 'text' loader)"
    ),
    "streaming": (
        "pre-training always streams the text files into a memory-mapped token cache, so memory stays "
        "flat whatever the corpus size"
    ),
    "debug_mode": "for the full traceback of an input error, pass --debug_errors",
}


def no_effect(name: str, switch: bool = False):
    """A field for a flag of the original scripts that changes nothing here: accepted so their
    command lines run, None when not given. A ``switch`` may be given bare or with True/False."""
    metadata = {"help": f"Accepted for the original scripts; no effect ({NO_EFFECT_WHY[name]})."}
    if switch:
        metadata.update(nargs="?", const=True)
    return field(default=None, metadata=metadata)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "Local Hugging Face model folder (safetensors or .bin weights)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder with tokenizer.model (SentencePiece) and/or tokenizer.json. Default: the model."
        },
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load the base weights in: auto, bfloat16, float16 or float32 (default float32). "
            "On a CPU, float16 is replaced by float32: CPU float16 matrix products are ~100x slower.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel: sdpa (default), eager, or flash_attention_2 (also --use_flash_attention_2 "
            "or --flash_attn; sdpa instead where there is no CUDA GPU or no flash-attn package)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped in the model folder. Off: only for models you trust."},
    )
    load_in_kbits: int = field(
        default=16,
        metadata={
            "help": "Bits of the frozen base weights: 4 (QLoRA, NF4 or FP4), 8 (LLM.int8) or 16 (no quantisation). "
            "The modules in --modules_to_save stay unquantised. Needs bitsandbytes."
        },
    )
    quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (default) or fp4.", "choices": ["nf4", "fp4"]}
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "4-bit: quantise the quantisation constants too (about 0.4 bits a weight less)."},
    )
    # The original scripts' Hugging Face Hub and loading flags, each announced as having no effect.
    low_cpu_mem_usage: bool | None = no_effect("low_cpu_mem_usage", switch=True)
    cache_dir: str | None = no_effect("cache_dir")
    model_revision: str | None = no_effect("model_revision")
    use_auth_token: bool | None = no_effect("use_auth_token", switch=True)
    use_fast_tokenizer: bool | None = no_effect("use_fast_tokenizer", switch=True)
    config_name: str | None = no_effect("config_name")
    config_overrides: str | None = no_effect("config_overrides")


@dataclass
class DataArguments:
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of Alpaca-format *.json (a list) and *.jsonl files, or one file."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "One Alpaca-format file for evaluation."}
    )
    validation_split_percentage: float = field(
        default=0.05,
        metadata={
            "help": "Share of the training records held out for evaluation when there is no --validation_file "
            "and evaluation is asked for: a fraction below 1 (0.05 = 5%%), else a percentage (5 = 5%%)."
        },
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Longest sequence in tokens (BOS + prompt + response + EOS)."}
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Pre-training only: tokens a block (documents joined with EOS and cut into blocks). "
            "Default: the model's context, at most 1024."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Threads used to tokenize the data."}
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Tokenize the data again and replace its entry in --data_cache_dir instead of reading it."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Train on this many records (pre-training: blocks), the first of a shuffle by --seed, taken "
            "after bad records are skipped and the validation share is held out. Default: all."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on this many records (pre-training: blocks), chosen as --max_train_samples."
        },
    )
    keep_linebreaks: bool | None = no_effect("keep_linebreaks", switch=True)
    streaming: bool | None = no_effect("streaming", switch=True)
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenized data is cached, keyed by content. Default: ~/.cache/llama_sft/data."
        },
    )
    on_bad_records: str = field(
        default="stop",
        metadata={
            "help": "What a bad record does: stop (the run stops at the first, naming it) or skip (it is left "
            "out, counted by reason in the log and data_stats.json; the run still stops when none is left or "
            "more than --max_bad_fraction are bad).",
            "choices": ["stop", "skip"],
        },
    )
    max_bad_fraction: float = field(
        default=0.5,
        metadata={"help": "With --on_bad_records skip: the largest share of bad records a run accepts."},
    )
    prompt_template: str = field(
        default="alpaca", metadata={"help": "Prompt template: alpaca, llama2-chat, or a JSON template file."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt for templates that have one (default: the template's)."},
    )
    train_on_turns: str = field(
        default="all",
        metadata={
            "help": "Which assistant turns of a conversation are trained: all, or only the last one kept.",
            "choices": ["all", "last"],
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Pack the records of each micro-batch (--per_device_train_batch_size) into one row without "
            "padding; position ids restart per record and no record attends to another. False: right-pad each "
            "micro-batch to its longest record, as the original scripts did."
        },
    )


@dataclass
class LoraArguments:
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(
        default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    trainable: str = field(
        default="q_proj,v_proj",
        metadata={
            "help": "Comma list of module names that get LoRA adapters, e.g. q_proj,v_proj,k_proj,o_proj."
        },
    )
    modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of modules trained in full and saved, e.g. embed_tokens,lm_head; null for none."
        },
    )
    peft_path: str | None = field(
        default=None, metadata={"help": "An existing LoRA folder to continue training (its own config wins)."}
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA: also train a magnitude per output row of each adapted weight. With --lora_dropout "
            "above 0 PEFT computes each adapted base product twice: use 0 for speed."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={
            "help": "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (for large ranks)."
        },
    )

    @property
    def target_modules(self) -> list[str]:
        return _comma_list(self.trainable)

    @property
    def modules_to_save_list(self) -> list[str] | None:
        return _comma_list(self.modules_to_save) or None


@dataclass
class SftTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh even if output_dir holds checkpoints (without it, a run resumes from the latest "
            "checkpoint, and a non-empty output_dir without checkpoints is an error)."
        },
    )
    save_safetensors: bool = field(
        default=True,
        metadata={"help": "Save adapters as adapter_model.safetensors (False: adapter_model.bin)."},
    )
    nan_policy: str = field(
        default="stop",
        metadata={
            "help": "What a NaN/inf loss does: stop (with a message naming the step; the last good checkpoint "
            "is kept) or skip (drop that batch's update and go on).",
            "choices": ["stop", "skip"],
        },
    )
    full_finetuning: bool = field(
        default=False,
        metadata={
            "help": "Train every weight instead of a LoRA (the LoRA flags are then ignored); the output is a "
            "complete model folder, OUTPUT_DIR/sft_full_model."
        },
    )
    speedups: str = field(
        default="auto",
        metadata={
            "help": "auto: every speed-up that fits this machine and run (listed at start, each skipped one with "
            "the reason); off: stock transformers and PEFT modules, attention and loss (--packing stays as set).",
            "choices": ["auto", "off"],
        },
    )
    skip_speedups: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of speed-ups to leave out under --speedups auto, by the names the start-up report "
            "gives (e.g. fused_head,heap_trim)."
        },
    )
    max_tokens_per_pass: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one forward/backward pass: a packed micro-batch longer than this is trained "
            "in pieces of whole records within the same optimizer step (bounds activation memory; the records "
            "of each step are unchanged). Default: the whole micro-batch in one pass."
        },
    )
    return_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "On a CPU, hand freed heap pages back to the system every 8 optimizer steps under bfloat16 "
            "autocast, after every step in float32. False keeps them, and RSS grows with the holes that rows "
            "of new lengths leave in the heap, for fewer page faults (faster steps)."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Build the model on the meta device (no weights loaded), print the parameter counts, the data "
            "statistics and the estimated peak memory per device, then exit."
        },
    )
    debug_errors: bool = field(
        default=False,
        metadata={"help": "Show the full traceback of an input error instead of the one-line message."},
    )
    # Preference training (llama-sft dpo); None: not given, and refused by the other tasks.
    pref_loss: str | None = field(
        default=None,
        metadata={
            "help": "dpo: the preference loss: sigmoid (DPO, the default), ipo, orpo or simpo (orpo and simpo "
            "need no reference model).",
            "choices": ["sigmoid", "ipo", "orpo", "simpo"],
        },
    )
    pref_beta: float | None = field(
        default=None,
        metadata={"help": "dpo: beta, how far the policy may move from the reference (default 0.1)."},
    )
    simpo_gamma: float | None = field(
        default=None,
        metadata={"help": "dpo --pref_loss simpo: the target reward margin gamma (default 0.5)."},
    )
    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": "dpo --pref_loss sigmoid/simpo: the probability that a pair's preference is flipped "
            "(conservative DPO; default 0)."
        },
    )
    pref_ftx: float | None = field(
        default=None,
        metadata={"help": "dpo: weight of an SFT loss on the chosen answers added to the loss (default 0)."},
    )
    debug_mode: bool | None = no_effect("debug_mode", switch=True)


@dataclass
class TrainArgs:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: SftTrainingArguments
    # What the command line asked for, where this machine runs something else (flag: value).
    requested: dict = field(default_factory=dict)
    # The machine the flags were resolved against (precision.Machine); None: taken as given.
    machine: object = None

    def to_dict(self) -> dict:
        training = {k: v for k, v in self.training.to_dict().items() if not k.startswith("_")}
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "lora": asdict(self.lora),
            "training": training,
            "requested": dict(self.requested),
        }


def _comma_list(value: str | None) -> list[str]:
    if value is None or value.strip().lower() in ("", "null", "none"):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


class _Parser(HfArgumentParser):
    def error(self, message: str):
        # argparse's default prints the usage of ~200 flags first, burying the one line that matters.
        self.exit(2, f"error: {escaped(message)} (see --help for every flag)\n")


def make_parser() -> HfArgumentParser:
    return _Parser((ModelArguments, DataArguments, LoraArguments, SftTrainingArguments))


def check_deepspeed_config(value: str | dict | None) -> None:
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        try:
            raw = Path(value).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            # ValueError: a name the file system cannot hold (a lone surrogate, a NUL).
            raise ArgumentError(
                f"{value}: --deepspeed config file not found (e.g. scripts/training/ds_zero2_no_offload.json)"
            ) from None
        except OSError as exc:  # a name too long for the file system, no permission, ...
            raise ArgumentError(
                f"{value}: --deepspeed config file cannot be read ({exc.strerror}); give the path of a JSON "
                "file such as scripts/training/ds_zero2_no_offload.json"
            ) from None
        try:
            json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError and huge integers
            raise ArgumentError(f"{value}: --deepspeed config is not valid JSON ({exc})") from None


def zero_stage(deepspeed_config: str | dict | None) -> int:
    if not deepspeed_config:
        return 0
    config = deepspeed_config
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return int((config.get("zero_optimization") or {}).get("stage", 0))


# TrainingArguments fields transformers 5 renamed (old: new); the old names then mirror the new.
RENAMED_FIELDS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
GROUPS = (ModelArguments, DataArguments, LoraArguments, SftTrainingArguments)


def parse_train_args(argv: list[str], machine=None, normalized: bool = False) -> TrainArgs:
    """The one parse of a training command line. ``machine`` (``precision.Machine``): resolve the
    flags that depend on it before ``TrainingArguments`` is built; None parses the flags as given.
    ``normalized``: ``argv`` already went through ``normalize_argv`` (the command-line entry does it
    first, to set up the process before PyTorch starts)."""
    argv = list(argv) if normalized else normalize_argv(list(argv))
    namespace, rest = make_parser().parse_known_args(argv)
    if rest:
        raise ArgumentError(f"unrecognized arguments: {' '.join(rest)} (see --help for every flag)")
    values = vars(namespace)
    for old, new in RENAMED_FIELDS.items():
        # The documented command's spelling, taken as the new name (transformers warns on the old).
        if values[new] is None and values[old] is not None:
            values[new], values[old] = values[old], None
    if values["model_name_or_path"] is None:
        raise ArgumentError("--model_name_or_path is required: the local folder of the base model")
    check_deepspeed_config(values["deepspeed"])
    requested = {}
    if machine is not None:
        changes = resolve_for_machine(values, machine)
        requested = {name: values[name] for name in changes}
        values.update(changes)
    if values["label_names"] is None:
        values["label_names"] = ["labels"]
    if values["activation_checkpointing"] and values["activation_checkpointing_kwargs"] is None:
        # Reentrant checkpointing needs an input that requires grad; with a frozen embedding it has
        # none and backward fails ("element 0 of tensors does not require grad").
        values["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    try:
        model, data, lora, training = (
            group(**{f.name: values[f.name] for f in fields(group) if f.init and f.name in values})
            for group in GROUPS
        )
    except (ValueError, OverflowError) as exc:
        # TrainingArguments validates on construction (a missing or non-JSON --deepspeed config, say)
        # and turns step counts into integers (OverflowError for an infinite --save_steps).
        raise ArgumentError(f"bad training arguments: {exc}") from None
    if model.tokenizer_name_or_path is None:
        model.tokenizer_name_or_path = model.model_name_or_path
    check_numbers(data, lora, training)
    return TrainArgs(model, data, lora, training, requested, machine)


# (TrainArgs group, flag, why), in the order the groups declare them.
NO_EFFECT = tuple(
    (group, f.name, NO_EFFECT_WHY[f.name])
    for group, cls in zip(("model", "data", "lora", "training"), GROUPS, strict=True)
    for f in fields(cls)
    if f.name in NO_EFFECT_WHY
)
SFT_NO_EFFECT = {
    "keep_linebreaks": "it is a pre-training option; line breaks inside records are kept as written",
    "streaming": "it is a pre-training option; the instruction records are read whole",
}


def ignored_flag_notices(args: TrainArgs, task: str = "sft") -> list[str]:
    """One line for each flag of the original scripts given on this command line that has no effect
    here, saying why. The run logs them once at its start."""
    lines = []
    for group, name, why in NO_EFFECT:
        value = getattr(getattr(args, group), name)
        if value is not None:
            why = SFT_NO_EFFECT.get(name, why) if task != "pt" else why
            lines.append(f"--{name} {value}: no effect here; {why}")
    return lines


# flag: (smallest allowed value, whether the smallest is allowed, what is usual); None values are defaults.
NUMBER_RANGES = {
    "per_device_train_batch_size": (1, True, "1-8"),
    "per_device_eval_batch_size": (1, True, "1-8"),
    "gradient_accumulation_steps": (1, True, "1-32"),
    "preprocessing_num_workers": (1, True, "the number of CPU cores"),
    "max_tokens_per_pass": (1, True, "a few thousand"),
    "block_size": (2, True, "512"),
    "validation_split_percentage": (0, True, "0.05"),
    "lora_alpha": (0, False, "twice --lora_rank"),
    "learning_rate": (0, True, "1e-4"),
    "weight_decay": (0, True, "0"),
    "warmup_steps": (0, True, "0.03"),
    "num_train_epochs": (0, True, "1-3"),
    "logging_steps": (0, False, "10"),
    "save_steps": (0, False, "100-1000"),
    "eval_steps": (0, False, "100-1000"),
    "seed": (0, True, "42"),
    "max_train_samples": (1, True, "a few hundred, for a quick trial"),
    "max_eval_samples": (1, True, "a few hundred"),
}


def check_numbers(data: DataArguments, lora: LoraArguments, training: SftTrainingArguments) -> None:
    """Numbers out of range fail here with the flag named, not as a traceback hours into the run."""
    for group in (data, lora, training):
        for name, (lowest, inclusive, usual) in NUMBER_RANGES.items():
            value = getattr(group, name, None)
            if value is None:
                continue
            fits = value >= lowest if inclusive else value > lowest
            if not math.isfinite(value) or not fits:
                bound = f"at least {lowest}" if inclusive else f"above {lowest}"
                raise ArgumentError(f"--{name} {value}: must be a finite number {bound} ({usual} is usual)")
    if not 0 <= data.max_bad_fraction <= 1:
        raise ArgumentError(
            f"--max_bad_fraction {data.max_bad_fraction}: give a fraction from 0 to 1 (0.5 is usual)"
        )
    if data.validation_split_percentage >= 100:
        raise ArgumentError(
            f"--validation_split_percentage {data.validation_split_percentage}: give a fraction below 1 "
            "or a percentage below 100"
        )
    if training.seed >= 2**32:
        raise ArgumentError(f"--seed {training.seed}: must be below 2**32 (42 is usual)")
