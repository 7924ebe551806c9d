"""The training run, top to bottom: arguments, tokenizer and data, model, LoRA, trainer, save.

Instruction tuning (``task="sft"``) and continued pre-training (``task="pt"``) are one run that
differs only in its data: Alpaca records and conversations rendered through a template, or plain
text cut into blocks where every token is labelled. The entry points all land here:
``scripts/training/run_clm_sft_with_peft.py`` and ``run_clm_pt_with_peft.py`` (under torchrun, with
or without DeepSpeed), ``llama-sft train`` and ``llama-sft pretrain``. One code path serves 1 or N processes; the
distributed set-up comes from torchrun's environment through the Trainer.

Everything a user can get wrong (data, template, tokenizer, model folder, LoRA flags, output
folder) is checked before ``output_dir`` is touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

# isort: off
from .. import speedups  # the one way to the speed-ups; first, as it sets the environment PyTorch reads
# isort: on

import torch  # noqa: E402
import transformers
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..checks import (
    ModelError,
    check_adapter_dir,
    check_model_dir,
    check_vocab,
    model_vocab_size,
    read_adapter_config,
)
from ..data.collate import Collator
from ..data.encode import IGNORE_INDEX, EncodeStats, check_template_fits, encode_cached
from ..data.packing import PackingCollator
from ..data.pretrain import build_blocks, check_block_size, find_text_files
from ..data.records import DataError, Record, find_data_files, load_records
from ..data.templates import Template, TemplateError, load_template
from ..data.tokenizer import PROBE_TEXTS, TextTokenizer, TokenizerError
from .args import ArgumentError, TrainArgs, expand_config, flag_value, parse_train_args, translate_legacy
from .checkpoints import (
    CheckpointCallback,
    FiniteGradCallback,
    StopCallback,
    TrainingStopped,
    last_complete_checkpoint,
    set_aside_old_checkpoints,
)
from .model import (
    attach_lora,
    check_lora_args,
    check_training_mode,
    load_base_model,
    make_fully_trainable,
    prepare_kbit,
)
from .planner import dry_run_report
from .precision import plan_cpu_precision
from .saving import TASKS, atomic_dir, output_name, write_lora_folder, write_model_folder
from .trainer import SftTrainer

logger = logging.getLogger("llama_sft")

INPUT_ERRORS = (ArgumentError, DataError, ModelError, TemplateError, TokenizerError, TrainingStopped)
DEFAULT_CACHE = Path.home() / ".cache" / "llama_sft" / "data"


def resolve_dtype(name: str | None) -> torch.dtype | str:
    return {None: torch.float32, "auto": "auto"}.get(name) or getattr(torch, name)


def setup_cpu_deepspeed(argv: list[str]) -> list[str]:
    """DeepSpeed under torchrun on a CPU-only machine: start the process group over gloo ourselves.

    accelerate gives DeepSpeed no backend when there is no GPU, and then every process believes it
    is rank 0 of 1 (DeepSpeed's batch-size check fails with N processes). A PartialState made first
    with gloo, and TrainingArguments told to use it, gives every process its real rank.
    """
    if torch.cuda.is_available() or "LOCAL_RANK" not in os.environ or flag_value(argv, "--deepspeed") is None:
        return []
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timedelta(seconds=float(flag_value(argv, "--ddp_timeout") or 1800)))
    return ["--accelerator_config", json.dumps({"use_configured_state": True})]


def parse_for_this_machine(argv: list[str]) -> TrainArgs:
    argv = translate_legacy(expand_config(list(argv)))
    argv += setup_cpu_deepspeed(argv)
    if not torch.cuda.is_available():
        # Without use_cpu, transformers refuses --bf16 on a CPU-only machine (the probe only reads flags).
        probe = parse_train_args(argv + ["--use_cpu", "True"])
        if not probe.training.deepspeed:
            argv += ["--use_cpu", "True"]
        argv += plan_cpu_precision(probe)
    return parse_train_args(argv)


def load_data(
    args: TrainArgs, tokenizer: TextTokenizer, template: Template
) -> tuple[list[Path], list[Record], list[Path], list[Record]]:
    """Read and validate every data file. Returns (train files, train records, eval files, eval records)."""
    data = args.data
    if args.training.do_train and data.dataset_dir is None:
        raise ArgumentError("--dataset_dir is required with --do_train: a folder of Alpaca-format JSON files")
    train_files = find_data_files(data.dataset_dir) if data.dataset_dir else []
    train_records = [r for path in train_files for r in load_records(path)]
    eval_files, eval_records = [], []
    wants_eval = args.training.do_eval or args.training.eval_strategy != "no"
    if data.validation_file:
        eval_files = [Path(data.validation_file)]
        eval_records = load_records(data.validation_file)
    elif wants_eval:
        train_records, eval_records = split_records(train_records, data.validation_split_percentage)
        if not eval_records:
            raise ArgumentError(
                "evaluation is asked for (--do_eval / --evaluation_strategy) but there is no validation data: "
                "give --validation_file, or a --validation_split_percentage above 0"
            )
    check_template_fits(template, tokenizer, data.max_seq_length)
    return train_files, train_records, eval_files, eval_records


def check_sft_flags(args: TrainArgs) -> None:
    if args.data.block_size is not None:
        raise ArgumentError(
            f"--block_size {args.data.block_size} is for pre-training (llama-sft pretrain, run_pt.sh); "
            "instruction tuning cuts each record at --max_seq_length: drop --block_size"
        )


def split_records(records: list[Record], share: float) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out: a fixed-seed shuffle of record indices, independent of --seed."""
    fraction = share if share < 1 else share / 100
    count = min(len(records) - 1, math.ceil(len(records) * fraction)) if fraction > 0 else 0
    if count <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


@dataclass
class Tokenized:
    """What step 3 hands the trainer: the datasets and the figures for the report and data_stats.json."""

    train_set: torch.utils.data.Dataset
    eval_set: torch.utils.data.Dataset | None
    stats: dict = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    from_cache: bool = True


def tokenize_sft(args: TrainArgs, tokenizer: TextTokenizer, template: Template, data) -> Tokenized:
    train_files, train_records, eval_files, eval_records = data
    cache_dir = args.data.data_cache_dir or DEFAULT_CACHE
    workers = args.data.preprocessing_num_workers or 1
    max_len = args.data.max_seq_length

    def encode(records, files, name):
        return encode_cached(
            records,
            files,
            template,
            tokenizer,
            max_len,
            cache_dir,
            workers,
            extra_key=f"{name}{len(records)}",
            train_on_turns=args.data.train_on_turns,
        )

    train_set, train_stats, from_cache = encode(train_records, train_files, "train")
    eval_set, eval_stats = None, EncodeStats()
    if eval_records:
        eval_set, eval_stats, _ = encode(eval_records, eval_files or train_files, "eval")
    reports = [train_stats.report("train data", max_len)]
    if eval_records:
        reports.append(eval_stats.report("eval data", max_len))
    if args.training.do_train and len(train_set) == 0:
        where = ", ".join(str(path) for path in train_files[:3]) + (" ..." if len(train_files) > 3 else "")
        raise DataError(
            f"{where}: every training record's prompt fills --max_seq_length {max_len}, leaving no answer "
            "to train on; raise --max_seq_length or shorten the prompts"
        )
    stats = {"train": train_stats.to_dict(), "eval": eval_stats.to_dict()}
    return Tokenized(train_set, eval_set, stats, reports, from_cache)


def find_pretrain_files(args: TrainArgs) -> tuple[list[Path], list[Path]]:
    """The text files of a pre-training run: (training files, validation files)."""
    data = args.data
    if data.dataset_dir is None:
        raise ArgumentError(
            "--dataset_dir is required: a folder of plain-text *.txt files (one document a line) "
            'or *.jsonl files with a "text" field'
        )
    train_files = find_text_files(data.dataset_dir)
    eval_files = find_text_files(data.validation_file) if data.validation_file else []
    return train_files, eval_files


def pretrain_block_size(args: TrainArgs, model_path: str, config: dict) -> int:
    """--block_size, or the model's context (``config.json``'s) up to 1024 (the original run_clm's default)."""
    context = config.get("max_position_embeddings")
    context = context if isinstance(context, int) and context > 0 else None
    block_size = args.data.block_size or min(1024, context or 1024)
    try:
        check_block_size(block_size, context)
    except DataError as exc:
        raise ArgumentError(f"{model_path}: {exc}") from None
    return block_size


def tokenize_pretrain(args: TrainArgs, tokenizer: TextTokenizer, files, block_size: int) -> Tokenized:
    train_files, eval_files = files
    cache_dir = args.data.data_cache_dir or DEFAULT_CACHE
    workers = args.data.preprocessing_num_workers or 1
    train_set, train_stats, from_cache = build_blocks(train_files, tokenizer, block_size, cache_dir, workers)
    reports = [train_stats.report("train data")]
    stats = {"train": asdict(train_stats)}
    eval_set = None
    if eval_files:
        eval_set, eval_stats, _ = build_blocks(eval_files, tokenizer, block_size, cache_dir, workers)
        reports.append(eval_stats.report("eval data"))
        stats["eval"] = asdict(eval_stats)
    elif args.training.do_eval or args.training.eval_strategy != "no":
        train_set, eval_set = train_set.split(args.data.validation_split_percentage)
        if eval_set is None:
            raise ArgumentError(
                f"evaluation is asked for but the text makes only {len(train_set)} block(s), too few to hold "
                "one out: give --validation_file, or add text"
            )
        reports.append(f"eval data: {len(eval_set)} of the {train_stats.blocks} blocks held out")
        stats["eval"] = {"blocks": len(eval_set), "held_out_of": train_stats.blocks}
    return Tokenized(train_set, eval_set, stats, reports, from_cache)


def check_output_dir(args: TrainArgs) -> str | None:
    """Validate output_dir; return the checkpoint to resume from (None: start afresh)."""
    out = Path(args.training.output_dir)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{out}: --output_dir is a file; give a folder")
    requested = args.training.resume_from_checkpoint
    if requested and requested.lower() not in ("true", "latest"):
        if not Path(requested).is_dir():
            raise ArgumentError(f"{requested}: --resume_from_checkpoint is not a folder")
        return requested
    last = last_complete_checkpoint(out)
    last = str(last) if last else None
    if requested:
        if last is None:
            raise ArgumentError(
                f"{out}: --resume_from_checkpoint given but output_dir holds no checkpoint-N folder"
            )
        return last
    if args.training.overwrite_output_dir or not out.is_dir():
        return None
    if last is not None:
        logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", last)
        return last
    leftovers = [
        p.name for p in out.iterdir() if p.name not in ("runs",) and not p.name.startswith("checkpoint-")
    ]
    if leftovers and args.training.do_train:
        raise ArgumentError(
            f"{out}: --output_dir is not empty ({', '.join(sorted(leftovers)[:5])}) and holds no checkpoint; "
            "pass --overwrite_output_dir to write into it, or choose another folder"
        )
    return None


def check_writable(folder: Path, needed_bytes: int) -> None:
    """Fail before training, not at the first checkpoint hours later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ArgumentError(f"{folder}: --output_dir is not writable ({exc.strerror})") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ArgumentError(
            f"{folder}: {free / 2**30:.1f} GiB free, but checkpoints of this run need about "
            f"{needed_bytes / 2**30:.1f} GiB; free some space or choose another --output_dir"
        )


def checkpoint_bytes(trainable_params: int, keep: int | None) -> int:
    """Adapter (twice: checkpoint and its sft_lora_model) plus Adam's two moments, all float32, for
    the checkpoints kept at once (one more while the newest is written)."""
    return trainable_params * 4 * 4 * ((keep or 1) + 1)


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (evals, "eval loss")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_logging(args: TrainArgs) -> None:
    level = logging.INFO if args.training.should_log else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level
    )
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)


def train(
    argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None, task: str = "sft"
) -> Path | None:
    """Run one training; returns the output folder (sft_lora_model, pt_lora_model, ...; None for --dry_run)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {TASKS}")
    try:
        return run_training(argv, callbacks, task)
    finally:
        # Parsing --deepspeed registers its config process-wide until garbage collection; a model
        # loaded later in this process (chat, merge, a second run) would otherwise be built under ZeRO-3.
        unset_hf_deepspeed_config()


def run_training(argv: list[str] | None, callbacks: list[TrainerCallback] | None, task: str) -> Path | None:
    # 1. Arguments.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_for_this_machine(sys.argv[1:] if argv is None else argv)
    setup_logging(args)
    training = args.training
    if training.label_names is None:
        training.label_names = ["labels"]
    if training.gradient_checkpointing and training.gradient_checkpointing_kwargs is None:
        # Reentrant checkpointing needs an input that requires grad; with a frozen embedding it has
        # none and backward fails ("element 0 of tensors does not require grad").
        training.gradient_checkpointing_kwargs = {"use_reentrant": False}

    check_training_mode(args)
    if training.full_finetuning:
        logger.warning(
            "--full_finetuning: every weight trains; the LoRA flags (--lora_rank, --lora_alpha, --lora_dropout, "
            "--trainable, --modules_to_save) are ignored"
        )

    # 2. Tokenizer, template and data: validated before any model is loaded.
    tokenizer = TextTokenizer.load(args.model.tokenizer_name_or_path)
    if task == "pt":
        template = None  # plain text: no prompt, every token is trained
        files = find_pretrain_files(args)
    else:
        check_sft_flags(args)
        template = load_template(args.data.prompt_template)
        if args.data.system_prompt is not None:
            template = Template(**{**template.to_dict(), "system_prompt": args.data.system_prompt})
        files = load_data(args, tokenizer, template)
    model_path = args.model.model_name_or_path
    model_config = check_model_dir(model_path, "--model_name_or_path", need_weights=not training.dry_run)
    check_vocab(model_vocab_size(model_path), len(tokenizer), model_path, args.model.tokenizer_name_or_path)
    if task == "pt":
        # A block is one sequence: everything sized by --max_seq_length (the memory plan, the fused
        # head's chunks) is sized by the block.
        args.data.block_size = args.data.max_seq_length = pretrain_block_size(args, model_path, model_config)
    if args.lora.peft_path:
        check_adapter_dir(args.lora.peft_path, "--peft_path")
    resume_from = check_output_dir(args)
    if tokenizer.added_pad:
        logger.warning("the tokenizer has no pad token; added %r as id %d", "<pad>", tokenizer.pad_id)
    mismatches = tokenizer.mismatches_with_transformers()
    if mismatches:
        logger.info(
            "transformers' converted tokenizer segments %d of %d probe texts differently from SentencePiece; "
            "llama-sft encodes with SentencePiece, as the model was trained",
            mismatches,
            len(PROBE_TEXTS),
        )

    # 3. Tokenize: the main process encodes and caches, the others then read the cache.
    with training.main_process_first(desc="tokenizing"):
        if task == "pt":
            data = tokenize_pretrain(args, tokenizer, files, args.data.block_size)
        else:
            data = tokenize_sft(args, tokenizer, template, files)
    if training.local_process_index != 0 and not data.from_cache:
        logger.warning(
            "process %d tokenized the data itself: the cache its node's first process wrote was not there "
            "(is --data_cache_dir writable?)",
            training.process_index,
        )
    for line in data.reports:
        logger.info(line)
    if training.dry_run:
        # Every token of a block is a label; SFT labels only the answers.
        labelled = (
            data.train_set.num_tokens()
            if task == "pt"
            else int((data.train_set.labels != IGNORE_INDEX).sum())
        )
        print(dry_run_report(args, len(tokenizer), data.train_set.lengths(), labelled))
        return None

    # 4. Model and LoRA, with the speed-ups that fit (seeded first: the LoRA A matrices are drawn
    # from the global RNG).
    transformers.set_seed(training.seed)

    compute_dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32
    full = training.full_finetuning

    def build_model():
        model = load_base_model(
            args.model,
            len(tokenizer),
            resolve_dtype(args.model.torch_dtype),
            compute_dtype,
            # A continued adapter's own modules_to_save win, as its configuration does.
            keep_unquantised=read_adapter_config(args.lora.peft_path, "--peft_path").get("modules_to_save")
            if args.lora.peft_path
            else args.lora.modules_to_save_list,
        )
        if full:
            return make_fully_trainable(model)
        check_lora_args(model, args.lora)
        if args.model.load_in_kbits != 16:
            model = prepare_kbit(
                model, training.gradient_checkpointing, training.gradient_checkpointing_kwargs, compute_dtype
            )
        return attach_lora(model, args.lora)

    fast = speedups.apply(args, build_model)
    model = fast.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )

    # 5. Trainer.
    out = Path(training.output_dir)
    check_writable(out, checkpoint_bytes(trainable, training.save_total_limit) if training.do_train else 0)
    if training.do_train and resume_from is None and training.process_index == 0:
        set_aside_old_checkpoints(out)
    described = args.to_dict()
    if task == "pt":
        for name in ("prompt_template", "system_prompt", "train_on_turns"):
            described["data"].pop(name, None)
    run_args = {
        "task": {"sft": "instruction tuning", "pt": "pre-training"}[task],
        **described,
        "data_stats": data.stats,
        "compute_dtype": fast.compute_dtype,
        "speedups": fast.report,
    }
    # Rotation is ours (CheckpointCallback): it runs once a checkpoint is complete and spares the
    # checkpoint being resumed from.
    keep, training.save_total_limit = training.save_total_limit, None
    stop = StopCallback()
    trainer = SftTrainer(
        model=model,
        args=training,
        train_dataset=data.train_set,
        eval_dataset=data.eval_set,
        data_collator=PackingCollator() if args.data.packing else Collator(tokenizer.pad_id),
        callbacks=[
            *(callbacks or []),
            CheckpointCallback(
                tokenizer,
                template,
                run_args,
                training.save_safetensors,
                keep,
                resume_from,
                full=full,
                task=task,
            ),
            stop,
            FiniteGradCallback(training.nan_policy),
            *fast.callbacks,
        ],
        max_tokens_per_pass=training.max_tokens_per_pass,
        loss=fast.loss,
        autocast=fast.autocast,
    )
    if training.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stop.stopped_at is not None:
            raise TrainingStopped(
                f"stopped by {stop.signal_name} at step {stop.stopped_at}; checkpoint saved in "
                f"{out / f'checkpoint-{stop.stopped_at}'}. Run the same command again to resume "
                "(add --resume_from_checkpoint if it passes --overwrite_output_dir)"
            )
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training.do_eval and data.eval_set is not None:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # 6. Save the ready-to-merge LoRA (or, after full fine-tuning, the whole model), atomically.
    name = output_name(full, task)
    final_dir = out / name
    if training.do_train:
        tmp = out / f".{name}.trainer-{os.getpid()}"
        trainer.save_model(str(tmp))
        if trainer.is_world_process_zero():
            with atomic_dir(final_dir) as staging:
                for item in tmp.iterdir():
                    if item.name != "training_args.bin":
                        shutil.move(str(item), staging / item.name)
                if full:
                    write_model_folder(staging, tokenizer, template, run_args)
                else:
                    write_lora_folder(staging, tokenizer, template, run_args, training.save_safetensors)
            shutil.rmtree(tmp, ignore_errors=True)
            plot_losses(trainer.state.log_history, out / "loss_curve.png")
            (out / "data_stats.json").write_text(json.dumps(run_args["data_stats"], indent=2) + "\n")
            logger.info("%s: %s", "model ready for chat" if full else "LoRA ready for merging", final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def main(argv: list[str] | None = None, callbacks: list | None = None, task: str = "sft") -> None:
    """Command-line entry: input errors become one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool({"--debug", "--debug_errors"} & set(argv)) or os.environ.get("LLAMA_SFT_DEBUG") == "1"
    try:
        train(argv, callbacks, task)
    except INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1 if isinstance(exc, TrainingStopped) else 2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Without this, gloo/DeepSpeed runs sometimes abort at interpreter exit.
            torch.distributed.destroy_process_group()
