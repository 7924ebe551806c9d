"""The training run, top to bottom: arguments, tokenizer and data, model, LoRA, trainer, save.

Instruction tuning (``task="sft"``) and continued pre-training (``task="pt"``) are one run that
differs only in its data: Alpaca records and conversations rendered through a template, or plain
text cut into blocks where every token is labelled. Preference training (``task="dpo"``) is the
same run on chosen/rejected pairs with its own loss and trainer (``preference.py``). The entry
points all land here: ``scripts/training/run_clm_sft_with_peft.py`` and ``run_clm_pt_with_peft.py``
(under torchrun, with or without DeepSpeed), ``llama-sft train``, ``llama-sft pretrain`` and
``llama-sft dpo``. One code path serves 1 or N processes; the distributed set-up comes from
torchrun's environment through the Trainer.

Everything a user can get wrong (data, template, tokenizer, model folder, LoRA flags, output
folder) is checked before ``output_dir`` is touched. The command-line entry is
``command_line.main``; ``train(argv)`` is the same run from Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from .. import speedups  # the one way to the speed-ups
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
from ..data.preference import load_pair_dir, load_pairs
from ..data.pretrain import build_blocks, check_block_size, find_text_files
from ..data.records import BadRecords, DataError, Record, find_data_files, load_records
from ..data.templates import Template, TemplateError, load_template
from ..data.tokenizer import PROBE_TEXTS, TextTokenizer, TokenizerError
from .args import ArgumentError, TrainArgs, ignored_flag_notices, parse_train_args
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
from .precision import Machine
from .preference import (
    PairCollator,
    PairSet,
    PreferenceTrainer,
    attach_reference,
    check_preference_flags,
    preference_options,
)
from .saving import TASKS, atomic_dir, output_name, write_lora_folder, write_model_folder
from .trainer import SftTrainer

logger = logging.getLogger("llama_sft")

INPUT_ERRORS = (ArgumentError, DataError, ModelError, TemplateError, TokenizerError, TrainingStopped)
DEFAULT_CACHE = Path.home() / ".cache" / "llama_sft" / "data"


def resolve_dtype(name: str | None) -> torch.dtype | str:
    return {None: torch.float32, "auto": "auto"}.get(name) or getattr(torch, name)


def load_data(args: TrainArgs, tokenizer: TextTokenizer, template: Template) -> LoadedData:
    """Read and validate every data file; under --on_bad_records skip, bad records are left out
    and counted (training and validation files each by their own count)."""
    data = args.data
    if args.training.do_train and data.dataset_dir is None:
        raise ArgumentError("--dataset_dir is required with --do_train: a folder of Alpaca-format JSON files")
    train_files = find_data_files(data.dataset_dir) if data.dataset_dir else []
    bad = {"train": BadRecords(data.on_bad_records, data.max_bad_fraction)}
    train_records = [r for path in train_files for r in load_records(path, bad["train"])]
    if train_files:
        bad["train"].check(len(train_records))
    eval_files, eval_records = [], []
    wants_eval = args.training.do_eval or args.training.eval_strategy != "no"
    if data.validation_file:
        eval_files = [Path(data.validation_file)]
        bad["eval"] = BadRecords(data.on_bad_records, data.max_bad_fraction)
        eval_records = load_records(data.validation_file, bad["eval"])
        bad["eval"].check(len(eval_records))
    elif wants_eval:
        train_records, eval_records = split_records(train_records, data.validation_split_percentage)
        if not eval_records:
            raise ArgumentError(
                "evaluation is asked for (--do_eval / --evaluation_strategy) but there is no validation data: "
                "give --validation_file, or a --validation_split_percentage above 0"
            )
    check_template_fits(template, tokenizer, data.max_seq_length)
    seed, sampled = args.training.seed, {}
    if data.max_train_samples is not None:
        train_records, sampled["train"] = sample_records(train_records, data.max_train_samples, seed)
    if data.max_eval_samples is not None and eval_records:
        eval_records, sampled["eval"] = sample_records(eval_records, data.max_eval_samples, seed)
    return LoadedData(train_files, train_records, eval_files, eval_records, bad, sampled)


def load_pair_data(args: TrainArgs, tokenizer: TextTokenizer, template: Template) -> LoadedData:
    """``load_data`` for preference pairs: read, check and tokenize every pair file, hold out the
    validation share, sample; bad pairs follow --on_bad_records as bad records do."""
    data, max_len = args.data, args.data.max_seq_length
    if args.training.do_train and data.dataset_dir is None:
        raise ArgumentError(
            "--dataset_dir is required with --do_train: a folder of preference files (chosen/rejected pairs)"
        )
    check_template_fits(template, tokenizer, max_len)
    bad = {"train": BadRecords(data.on_bad_records, data.max_bad_fraction)}
    train_files, train_pairs, stats = [], [], {}
    if data.dataset_dir:
        train_files = [Path(data.dataset_dir)]
        train_pairs, stats["train"] = load_pair_dir(
            data.dataset_dir, tokenizer, template, max_len, bad["train"]
        )
        bad["train"].check(len(train_pairs))
    eval_files, eval_pairs = [], []
    if data.validation_file:
        eval_files = [Path(data.validation_file)]
        bad["eval"] = BadRecords(data.on_bad_records, data.max_bad_fraction)
        eval_pairs, stats["eval"] = load_pairs(
            data.validation_file, tokenizer, template, max_len, bad["eval"]
        )
        bad["eval"].check(len(eval_pairs))
    elif args.training.do_eval or args.training.eval_strategy != "no":
        train_pairs, eval_pairs = split_records(train_pairs, data.validation_split_percentage)
        if not eval_pairs:
            raise ArgumentError(
                "evaluation is asked for (--do_eval / --evaluation_strategy) but there is no validation data: "
                "give --validation_file, or a --validation_split_percentage above 0"
            )
    seed, sampled = args.training.seed, {}
    if data.max_train_samples is not None:
        train_pairs, sampled["train"] = sample_records(train_pairs, data.max_train_samples, seed)
    if data.max_eval_samples is not None and eval_pairs:
        eval_pairs, sampled["eval"] = sample_records(eval_pairs, data.max_eval_samples, seed)
    return LoadedData(train_files, train_pairs, eval_files, eval_pairs, bad, sampled, stats)


@dataclass
class LoadedData:
    train_files: list[Path]
    train_records: list[Record]
    eval_files: list[Path]
    eval_records: list[Record]
    bad: dict[str, BadRecords]
    # --max_train_samples / --max_eval_samples: data_stats.json's "max_samples" ("train", "eval").
    sampled: dict[str, dict] = field(default_factory=dict)
    # Preference runs: what loading the pairs counted, per split.
    pair_stats: dict = field(default_factory=dict)


def sample_records(records: list[Record], count: int, seed: int) -> tuple[list[Record], dict]:
    """The first ``count`` records of a shuffle by ``seed``, kept in file order (all when there are no
    more), and what data_stats.json records of it."""
    available = len(records)
    if count < available:
        chosen = np.sort(np.random.default_rng(seed).permutation(available)[:count])
        records = [records[i] for i in chosen]
    return records, sample_stats(count, available, len(records))


def sample_stats(limit: int, available: int, used: int) -> dict:
    return {"limit": limit, "available": available, "used": used}


def bad_record_report(bad: dict[str, BadRecords]) -> tuple[dict, list[str]]:
    """data_stats.json's ``bad_records`` (under skip) and the log lines of what was left out."""
    stats = {name: collector.to_dict() for name, collector in bad.items() if collector.skipping}
    lines = [line for collector in bad.values() for line in collector.report_lines()]
    return stats, lines


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


def tokenize_sft(
    args: TrainArgs, tokenizer: TextTokenizer, template: Template, data: LoadedData
) -> Tokenized:
    train_files, train_records, eval_files, eval_records = (
        data.train_files,
        data.train_records,
        data.eval_files,
        data.eval_records,
    )
    cache_dir = args.data.data_cache_dir or DEFAULT_CACHE
    workers = args.data.preprocessing_num_workers or 1
    max_len = args.data.max_seq_length

    overwrite = overwrite_cache(args)

    def encode(records, files, name):
        # A sample's records depend on --seed as well as on the files: its entry is its own.
        sampled = data.sampled.get(name)
        picked = (
            f"-first{sampled['used']}-seed{args.training.seed}"
            if sampled and sampled["used"] < sampled["available"]
            else ""
        )
        return encode_cached(
            records,
            files,
            template,
            tokenizer,
            max_len,
            cache_dir,
            workers,
            extra_key=f"{name}{len(records)}{picked}",
            train_on_turns=args.data.train_on_turns,
            overwrite=overwrite,
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
    bad_stats, bad_lines = bad_record_report(data.bad)
    if bad_stats:
        stats["bad_records"] = bad_stats
    if data.sampled:
        stats["max_samples"] = data.sampled
        reports += sample_report_lines(data.sampled, "records")
    return Tokenized(train_set, eval_set, stats, bad_lines + reports, from_cache)


def pair_sets(data: LoadedData) -> Tokenized:
    """The pairs arrive tokenized: the datasets, with what loading them counted."""
    stats = {name: value.to_dict() for name, value in data.pair_stats.items()}
    bad_stats, bad_lines = bad_record_report(data.bad)
    if bad_stats:
        stats["bad_records"] = bad_stats
    reports = [value.report(f"{name} data") for name, value in data.pair_stats.items()]
    if data.sampled:
        stats["max_samples"] = data.sampled
        reports += sample_report_lines(data.sampled, "pairs")
    eval_set = PairSet(data.eval_records) if data.eval_records else None
    return Tokenized(PairSet(data.train_records), eval_set, stats, bad_lines + reports)


def overwrite_cache(args: TrainArgs) -> bool:
    """--overwrite_cache: the first process of each node tokenizes again; the others then read what
    it wrote, as they do without the flag."""
    return args.data.overwrite_cache and args.training.local_process_index == 0


def sample_report_lines(sampled: dict[str, dict], unit: str) -> list[str]:
    flags = {"train": "--max_train_samples", "eval": "--max_eval_samples"}
    return [
        f"{flags[name]} {s['limit']}: {name} on {s['used']} of the {s['available']} {unit}"
        for name, s in sampled.items()
    ]


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
    data = args.data
    bad = {"train": BadRecords(data.on_bad_records, data.max_bad_fraction)}
    overwrite = overwrite_cache(args)
    train_set, train_stats, from_cache = build_blocks(
        train_files, tokenizer, block_size, cache_dir, workers, bad=bad["train"], overwrite=overwrite
    )
    bad["train"].check(train_stats.documents)
    reports = [train_stats.report("train data")]
    stats = {"train": asdict(train_stats)}
    eval_set = None
    if eval_files:
        bad["eval"] = BadRecords(data.on_bad_records, data.max_bad_fraction)
        eval_set, eval_stats, _ = build_blocks(
            eval_files, tokenizer, block_size, cache_dir, workers, bad=bad["eval"], overwrite=overwrite
        )
        bad["eval"].check(eval_stats.documents)
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
    sampled, seed = {}, args.training.seed
    if data.max_train_samples is not None:
        available, train_set = len(train_set), train_set.sample(data.max_train_samples, seed)
        sampled["train"] = sample_stats(data.max_train_samples, available, len(train_set))
    if data.max_eval_samples is not None and eval_set is not None:
        available, eval_set = len(eval_set), eval_set.sample(data.max_eval_samples, seed)
        sampled["eval"] = sample_stats(data.max_eval_samples, available, len(eval_set))
    if sampled:
        stats["max_samples"] = sampled
        reports += sample_report_lines(sampled, "blocks")
    bad_stats, bad_lines = bad_record_report(bad)
    if bad_stats:
        stats["bad_records"] = bad_stats
    return Tokenized(train_set, eval_set, stats, bad_lines + reports, from_cache)


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


def plot_losses(log_history: list[dict], path: Path) -> bool:
    """Draw the logged train and eval losses into ``path``; no file when none was logged (returns
    whether one was written)."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return False
    # The run logs at INFO through the root logger; matplotlib's INFO lines (a font cache built on
    # first use) are not the run's news.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return True


def setup_logging(args: TrainArgs) -> None:
    level = logging.INFO if args.training.should_log else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level
    )
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)


def train(
    argv: list[str] | TrainArgs,
    callbacks: list[TrainerCallback] | None = None,
    task: str = "sft",
    normalized: bool = False,
) -> Path | None:
    """Run one training; returns the output folder (sft_lora_model, pt_lora_model, ...; None for
    --dry_run). ``argv``: a command line (``normalized``: already through ``normalize_argv``), or
    arguments already parsed for this machine."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {TASKS}")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if isinstance(argv, TrainArgs):
            args = argv
        else:
            args = parse_train_args(argv, Machine.detect(), normalized=normalized)
        return run_training(args, callbacks, task)
    finally:
        # Parsing --deepspeed registers its config process-wide until garbage collection; a model
        # loaded later in this process (chat, merge, a second run) would otherwise be built under ZeRO-3.
        unset_hf_deepspeed_config()


@dataclass
class Inputs:
    """What step 2 checked: the tokenizer, the template (None for plain text) and the data files."""

    tokenizer: TextTokenizer
    template: Template | None
    files: tuple
    resume_from: str | None


def run_training(args: TrainArgs, callbacks: list[TrainerCallback] | None, task: str) -> Path | None:
    # 1. Arguments: parsed once, resolved for this machine (train()).
    setup_logging(args)
    for line in ignored_flag_notices(args, task):
        logger.info(line)
    check_training_mode(args)
    if args.training.full_finetuning:
        logger.warning(
            "--full_finetuning: every weight trains; the LoRA flags (--lora_rank, --lora_alpha, --lora_dropout, "
            "--trainable, --modules_to_save) are ignored"
        )
    # 2. Tokenizer, template, data files, model folder and output folder: checked before any model is loaded.
    inputs = check_inputs(args, task)
    # 3. Tokenize: the main process encodes and caches, the others then read the cache.
    data = tokenize(args, task, inputs)
    if args.training.dry_run:
        print(dry_run(args, task, inputs.tokenizer, data))
        return None
    # 4. Model and LoRA, with the speed-ups that fit.
    fast = load_for_training(args, len(inputs.tokenizer))
    # 5. Trainer.
    run_args = describe_run(args, task, data, fast)
    trainer, stop = make_trainer(args, task, inputs, data, fast, run_args, callbacks)
    # 6. Train and evaluate.
    fit(args, trainer, stop, inputs.resume_from, data)
    # 7. Save the ready-to-merge LoRA (or, after full fine-tuning, the whole model), atomically.
    return save(args, task, trainer, inputs, run_args)


def check_inputs(args: TrainArgs, task: str) -> Inputs:
    check_preference_flags(args, task)
    tokenizer = TextTokenizer.load(args.model.tokenizer_name_or_path)
    if task == "pt":
        template = None  # plain text: no prompt, every token is trained
        files = find_pretrain_files(args)
    else:
        check_sft_flags(args)
        template = load_template(args.data.prompt_template)
        if args.data.system_prompt is not None:
            template = template.with_system_prompt(args.data.system_prompt)
        files = (load_pair_data if task == "dpo" else load_data)(args, tokenizer, template)
    model_path = args.model.model_name_or_path
    model_config = check_model_dir(model_path, "--model_name_or_path", need_weights=not args.training.dry_run)
    check_vocab(model_vocab_size(model_path), len(tokenizer), model_path, args.model.tokenizer_name_or_path)
    if task == "pt":
        # A block is one sequence: everything sized by --max_seq_length (the memory plan, the fused
        # head's chunks) is sized by the block, whose default is the model's context.
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
    return Inputs(tokenizer, template, files, resume_from)


def tokenize(args: TrainArgs, task: str, inputs: Inputs) -> Tokenized:
    training = args.training
    with training.main_process_first(desc="tokenizing"):
        if task == "pt":
            data = tokenize_pretrain(args, inputs.tokenizer, inputs.files, args.data.block_size)
        elif task == "dpo":
            data = pair_sets(inputs.files)
        else:
            data = tokenize_sft(args, inputs.tokenizer, inputs.template, inputs.files)
    if training.local_process_index != 0 and not data.from_cache:
        logger.warning(
            "process %d tokenized the data itself: the cache its node's first process wrote was not there "
            "(is --data_cache_dir writable?)",
            training.process_index,
        )
    for line in data.reports:
        logger.info(line)
    return data


def dry_run(args: TrainArgs, task: str, tokenizer: TextTokenizer, data: Tokenized) -> str:
    # Every token of a block is a label; SFT labels only the answers, preference training both of a pair's.
    if task == "pt":
        labelled = data.train_set.num_tokens()
    elif task == "dpo":
        labelled = data.train_set.labelled()
    else:
        labelled = int((data.train_set.labels != IGNORE_INDEX).sum())
    return dry_run_report(args, len(tokenizer), data.train_set.lengths(), labelled)


def compute_dtype(args: TrainArgs) -> torch.dtype:
    training = args.training
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def load_for_training(args: TrainArgs, tokenizer_size: int):
    """The base model with its LoRA (or made fully trainable), through the speed-ups that fit. Seeded
    first: the LoRA A matrices are drawn from the global RNG."""
    transformers.set_seed(args.training.seed)
    training, dtype = args.training, compute_dtype(args)

    def build_model():
        model = load_base_model(
            args.model,
            tokenizer_size,
            resolve_dtype(args.model.torch_dtype),
            dtype,
            # A continued adapter's own modules_to_save win, as its configuration does.
            keep_unquantised=read_adapter_config(args.lora.peft_path, "--peft_path").get("modules_to_save")
            if args.lora.peft_path
            else args.lora.modules_to_save_list,
        )
        if training.full_finetuning:
            return make_fully_trainable(model)
        check_lora_args(model, args.lora)
        if args.model.load_in_kbits != 16:
            model = prepare_kbit(
                model, training.gradient_checkpointing, training.gradient_checkpointing_kwargs, dtype
            )
        return attach_lora(model, args.lora)

    fast = speedups.apply(args, build_model)
    trainable = sum(p.numel() for p in fast.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in fast.model.parameters())
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    return fast


def effective_precision(args: TrainArgs, fast) -> str:
    training = args.training
    if not (training.bf16 or training.fp16):
        return "float32"
    dtype = "bfloat16" if training.bf16 else "float16"
    if fast.autocast is not None:
        return f"{dtype} autocast (llama-sft's)"
    return f"{dtype} mixed precision (DeepSpeed)" if training.deepspeed else f"{dtype} autocast"


def describe_run(args: TrainArgs, task: str, data: Tokenized, fast) -> dict:
    """training_args.json: what was asked (``requested`` where this machine differs) and what ran."""
    described = args.to_dict()
    if task == "pt":
        for name in ("prompt_template", "system_prompt", "train_on_turns"):
            described["data"].pop(name, None)
    training = args.training
    return {
        "task": {"sft": "instruction tuning", "pt": "pre-training", "dpo": "preference training"}[task],
        **described,
        "effective": {
            "device": training.device.type,
            "processes": training.world_size,
            "cpu": args.machine.cpu if args.machine is not None and training.device.type == "cpu" else None,
            "precision": effective_precision(args, fast),
            "weights_dtype": args.model.torch_dtype or "float32",
        },
        "data_stats": data.stats,
        "compute_dtype": fast.compute_dtype,
        "speedups": fast.report,
        **({"preference": asdict(preference_options(training))} if task == "dpo" else {}),
    }


def make_trainer(args, task, inputs: Inputs, data: Tokenized, fast, run_args: dict, callbacks):
    training = args.training
    out = Path(training.output_dir)
    trainable = sum(p.numel() for p in fast.model.parameters() if p.requires_grad)
    check_writable(out, checkpoint_bytes(trainable, training.save_total_limit) if training.do_train else 0)
    if training.do_train and inputs.resume_from is None and training.process_index == 0:
        set_aside_old_checkpoints(out)
    # Rotation is ours (CheckpointCallback): it runs once a checkpoint is complete and spares the
    # checkpoint being resumed from.
    keep, training.save_total_limit = training.save_total_limit, None
    stop = StopCallback()
    if task == "dpo":
        # The fused head of the speed-ups, when they made one, serves the preference log-probs too.
        trainer_class, collator = PreferenceTrainer, PairCollator(inputs.tokenizer.pad_id, args.data.packing)
        task_options = {"options": preference_options(training), "head": getattr(fast.loss, "head", None)}
    else:
        trainer_class, task_options = SftTrainer, {}
        collator = PackingCollator() if args.data.packing else Collator(inputs.tokenizer.pad_id)
    trainer = trainer_class(
        model=fast.model,
        args=training,
        train_dataset=data.train_set,
        eval_dataset=data.eval_set,
        data_collator=collator,
        callbacks=[
            *(callbacks or []),
            CheckpointCallback(
                inputs.tokenizer,
                inputs.template,
                run_args,
                training.save_safetensors,
                keep,
                inputs.resume_from,
                full=training.full_finetuning,
                task=task,
            ),
            stop,
            FiniteGradCallback(training.nan_policy),
            *fast.callbacks,
        ],
        max_tokens_per_pass=training.max_tokens_per_pass,
        loss=None if task == "dpo" else fast.loss,
        autocast=fast.autocast,
        **task_options,
    )
    if task == "dpo":
        attach_reference(trainer, [data.train_set, data.eval_set])
    return trainer, stop


def fit(args: TrainArgs, trainer: SftTrainer, stop: StopCallback, resume_from: str | None, data) -> None:
    training = args.training
    if training.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stop.stopped_at is not None:
            out = Path(training.output_dir)
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
        if not isinstance(trainer, PreferenceTrainer):  # a preference loss is no cross-entropy
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def save(args: TrainArgs, task: str, trainer: SftTrainer, inputs: Inputs, run_args: dict) -> Path:
    training, full = args.training, args.training.full_finetuning
    out = Path(training.output_dir)
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
                    write_model_folder(staging, inputs.tokenizer, inputs.template, run_args)
                else:
                    write_lora_folder(
                        staging, inputs.tokenizer, inputs.template, run_args, training.save_safetensors
                    )
            shutil.rmtree(tmp, ignore_errors=True)
            plot_losses(trainer.state.log_history, out / "loss_curve.png")
            (out / "data_stats.json").write_text(json.dumps(run_args["data_stats"], indent=2) + "\n")
            logger.info("%s: %s", "model ready for chat" if full else "LoRA ready for merging", final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir
