"""Typed arguments for training. One set of dataclasses behind both entry points
(``run_clm_sft_with_peft.py`` and ``llama-sft train``); a YAML file and flags can set any field.

Contract: ``parse_train_args(argv) -> TrainArgs``. ``--config FILE.yaml`` supplies values that
flags given after it override. Spellings that transformers 5 renamed are accepted and translated
(``--evaluation_strategy``, ``--warmup_ratio``, ``--group_by_length``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments


class ArgumentError(ValueError):
    """A bad flag value. The message names the flag and says what to do, on one line: flag values
    quoted in it have their line breaks and other control characters escaped."""

    def __init__(self, message: str):
        super().__init__(_escaped(message))


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
        default="sdpa", metadata={"help": "Attention kernel: sdpa (default), eager, or flash_attention_2."}
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
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenized data is cached, keyed by content. Default: ~/.cache/llama_sft/data."
        },
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


@dataclass
class TrainArgs:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: SftTrainingArguments

    def to_dict(self) -> dict:
        training = {k: v for k, v in self.training.to_dict().items() if not k.startswith("_")}
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "lora": asdict(self.lora),
            "training": training,
        }


def _comma_list(value: str | None) -> list[str]:
    if value is None or value.strip().lower() in ("", "null", "none"):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


# transformers 5 renamed or removed these TrainingArguments; the documented command still uses them.
_RENAMED = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}


def translate_legacy(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        bare = not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        if name == "--resume_from_checkpoint" and bare:
            out += [name, "latest"]
        elif name == "--debug" and bare:
            out.append("--debug_errors")
        elif name in _RENAMED:
            out.append(_RENAMED[name] + eq + value)
        elif name == "--group_by_length":
            out += (
                ["--train_sampling_strategy", "group_by_length"]
                if value.lower() not in ("false", "0")
                else []
            )
        else:
            out.append(arg)
    return out


def yaml_to_argv(path: str | Path) -> list[str]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # YAML's messages span lines (the problem, then where); the error is one line.
        raise ArgumentError(
            f"{path}: cannot read the --config YAML file: {' '.join(str(exc).split())}"
        ) from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: a --config file is a mapping of argument names to values")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: list[str]) -> list[str]:
    """Replace ``--config FILE`` by the file's settings, so later flags override them."""
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--config":
            if not eq:
                if i + 1 >= len(argv):
                    raise ArgumentError("--config needs a YAML file")
                value, i = argv[i + 1], i + 1
            out += yaml_to_argv(value)
        else:
            out.append(argv[i])
        i += 1
    return out


def _escaped(text: str) -> str:
    """User text quoted in an error, with line breaks and other control characters escaped: one line."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


class _Parser(HfArgumentParser):
    def error(self, message: str):
        # argparse's default prints the usage of ~200 flags first, burying the one line that matters.
        self.exit(2, f"error: {_escaped(message)} (see --help for every flag)\n")


def make_parser() -> HfArgumentParser:
    return _Parser((ModelArguments, DataArguments, LoraArguments, SftTrainingArguments))


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a raw argv (the last one wins), else None."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == flag:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return found


def check_deepspeed_config(argv: list[str]) -> None:
    value = flag_value(argv, "--deepspeed")
    if value is not None and not value.lstrip().startswith("{"):
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


def parse_train_args(argv: list[str] | None = None) -> TrainArgs:
    argv = translate_legacy(expand_config(list(sys.argv[1:] if argv is None else argv)))
    check_deepspeed_config(argv)
    try:
        model, data, lora, training, rest = make_parser().parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except (ValueError, OverflowError) as exc:
        # TrainingArguments validates on construction (a missing or non-JSON --deepspeed config, say)
        # and turns step counts into integers (OverflowError for an infinite --save_steps).
        raise ArgumentError(f"bad training arguments: {exc}") from None
    if rest:
        raise ArgumentError(f"unrecognized arguments: {' '.join(rest)} (see --help for every flag)")
    if model.model_name_or_path is None:
        raise ArgumentError("--model_name_or_path is required: the local folder of the base model")
    if model.tokenizer_name_or_path is None:
        model.tokenizer_name_or_path = model.model_name_or_path
    check_numbers(data, lora, training)
    return TrainArgs(model, data, lora, training)


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
    if data.validation_split_percentage >= 100:
        raise ArgumentError(
            f"--validation_split_percentage {data.validation_split_percentage}: give a fraction below 1 "
            "or a percentage below 100"
        )
    if training.seed >= 2**32:
        raise ArgumentError(f"--seed {training.seed}: must be below 2**32 (42 is usual)")
