"""The ``llama-sft eval`` command: flags, checks of every input before the weights are read, the
run, and the results written into ``--output_dir`` in one step at the end."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from ...checks import ModelError
from ...data.pretrain import TEXT_SUFFIXES
from ...data.records import DataError
from ...data.templates import TemplateError
from ...data.tokenizer import TokenizerError
from ...loading import ModelSpec, load, load_model, pick_device
from ...options import ArgumentError, add_config, add_lora_model, add_model_flags, parse_command
from ..chat import str2bool
from .choice import MAX_SHOTS, SPLITS, TASKS, EvalError, letter_ids, predict, read_benchmark, subject_prompts
from .perplexity import DEFAULT_BLOCK_SIZE, block_nll, perplexity_result, text_blocks

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.json", "predictions.jsonl", "submission.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft eval",
        description="Score a model on C-Eval, CMMLU or MMLU, perplexity on text, or generated answers.",
    )
    add = parser.add_argument
    add_config(parser)
    add("--task", required=True, choices=[*TASKS, "perplexity", "generate"], help="What to evaluate.")
    add("--model", default=None, help="Merged or fully fine-tuned model folder.")
    add("--base_model", default=None, help="Base model folder, with --lora_model.")
    add_lora_model(parser, "LoRA folder(s) merged into --base_model.")
    add_model_flags(parser, kbits=True)
    add("--output_dir", required=True, help="Where results.json and predictions.jsonl go.")
    add(
        "--overwrite_output_dir",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="Replace the results already in --output_dir.",
    )
    add("--batch_size", type=int, default=8, help="Questions, blocks or prompts run together.")
    add("--data_dir", default=None, help="The benchmark's folder (ceval, cmmlu, mmlu), or text (perplexity).")
    add("--split", default=None, help="Split to score. Default: val for ceval, test for cmmlu and mmlu.")
    add("--n_shot", type=int, default=5, help=f"Answered dev questions before each question (0-{MAX_SHOTS}).")
    add("--subjects", default=None, help="Comma-separated subjects (file names). Default: all of the split.")
    add(
        "--with_prompt",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="Wrap each question in the model's prompt template (for instruction-tuned models).",
    )
    add(
        "--repetition_penalty",
        type=float,
        default=1.1,
        help="C-Eval/CMMLU/MMLU: the penalty the original evaluator's generate call put on letter ids "
        "already in the prompt (1.1); 1.0 scores the raw logits.",
    )
    add(
        "--block_size",
        type=int,
        default=None,
        help="Perplexity: tokens a block. Default: min(1024, context).",
    )
    add("--validation_file", default=None, help="Generate: the records whose answers are scored.")
    add("--max_new_tokens", type=int, default=128, help="Generate: most tokens an answer.")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if (args.model is None) == (args.base_model is None):
        raise ArgumentError("give --model DIR (a merged model), or --base_model DIR with --lora_model DIR")
    if args.model is not None and args.lora_model:
        raise ArgumentError("--lora_model goes with --base_model, not --model")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch_size {args.batch_size}: give 1 or more")
    if args.task == "generate":
        if args.validation_file is None:
            raise ArgumentError(
                "--task generate needs --validation_file (the records whose answers are scored)"
            )
        if not Path(args.validation_file).is_file():
            raise ArgumentError(f"{args.validation_file}: --validation_file not found")
    elif args.data_dir is None:
        what = (
            "a folder of .txt/.jsonl text"
            if args.task == "perplexity"
            else f"the unpacked {args.task} folder"
        )
        raise ArgumentError(f"--task {args.task} needs --data_dir ({what})")
    if args.task in TASKS and args.split is not None and args.split not in SPLITS[args.task]:
        raise ArgumentError(
            f"--split {args.split}: {args.task} has the splits {', '.join(SPLITS[args.task])}"
        )


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ArgumentError(f"{output_dir}: --output_dir is a file; give a folder")
    held = [name for name in RESULT_FILES if (output_dir / name).exists()]
    if held and not overwrite:
        raise ArgumentError(
            f"{output_dir}: --output_dir already holds {held[0]}; pass --overwrite_output_dir to replace "
            "the results, or choose another folder"
        )


def check_text_dir(data_dir: Path) -> None:
    """The perplexity folder, named by this command's flag (pretrain's reader says --dataset_dir)."""
    if not data_dir.exists():
        raise DataError(f"{data_dir}: --data_dir does not exist")
    if data_dir.is_dir() and not any(p.is_file() and p.suffix in TEXT_SUFFIXES for p in data_dir.iterdir()):
        raise DataError(
            f"{data_dir}: no *.txt or *.jsonl files in --data_dir; put plain-text files there (one document "
            'a line) or JSON lines with a "text" field'
        )


def model_context(folder: str | Path) -> int | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def progress_bar(total: int, description: str):
    from tqdm.auto import tqdm

    # disable=None: drawn on a terminal only, so redirected logs hold no carriage-return lines.
    return tqdm(total=total, desc=description, unit="q", file=sys.stderr, disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# Running each task; each returns (results, prediction rows, extra files)


def run_choice(args, loaded, subjects) -> tuple[dict, list[dict], dict[str, object]]:
    template = loaded.template if args.with_prompt else None
    letters = letter_ids(loaded.tokenizer, args.task)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    rows, per_subject = [], {}
    for subject in subjects:
        prompts = subject_prompts(subject, args.task, loaded.tokenizer, template)
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if context is not None and len(prompts[longest]) > context:
            raise EvalError(
                f"{subject.key}, question {subject.questions[longest].id}: the prompt takes "
                f"{len(prompts[longest])} tokens, more than the model's {context}; lower --n_shot"
            )
        with progress_bar(len(prompts), subject.key) as bar:
            predicted = predict(
                loaded.model,
                prompts,
                letters,
                args.batch_size,
                loaded.tokenizer.eos_id,
                bar.update,
                repetition_penalty=args.repetition_penalty,
            )
        scored = [q for q in subject.questions if q.answer is not None]
        correct = sum(p == q.answer for p, q in zip(predicted, subject.questions, strict=True))
        per_subject[subject.key] = {
            "name": subject.title or subject.name,
            "categories": list(subject.categories),
            "questions": len(subject.questions),
            "scored": len(scored),
            "correct": correct if scored else None,
            "accuracy": correct / len(scored) if scored else None,
        }
        rows += [
            {"subject": subject.key, "id": q.id, "answer": q.answer, "prediction": p}
            for q, p in zip(subject.questions, predicted, strict=True)
        ]
    categories: dict[str, dict] = {}
    for entry in per_subject.values():
        for category in entry["categories"]:
            group = categories.setdefault(category, {"subjects": 0, "scored": 0, "correct": 0})
            group["subjects"] += 1
            group["scored"] += entry["scored"]
            group["correct"] += entry["correct"] or 0
    for group in categories.values():
        group["accuracy"] = group["correct"] / group["scored"] if group["scored"] else None
    scored = sum(entry["scored"] for entry in per_subject.values())
    correct = sum(entry["correct"] or 0 for entry in per_subject.values())
    results = {
        "split": args.split,
        "n_shot": args.n_shot,
        "with_prompt": args.with_prompt,
        "repetition_penalty": args.repetition_penalty,
        "template": loaded.template.name if args.with_prompt else None,
        "subjects": per_subject,
        "categories": dict(sorted(categories.items())),
        "average": {
            "questions": sum(entry["questions"] for entry in per_subject.values()),
            "scored": scored,
            "correct": correct if scored else None,
            "accuracy": correct / scored if scored else None,
        },
    }
    extra = {}
    if args.task == "ceval":
        submission: dict[str, dict[str, str]] = {}
        for row in rows:
            submission.setdefault(row["subject"], {})[row["id"]] = row["prediction"]
        extra["submission.json"] = submission
    return results, rows, extra


def run_perplexity(args, loaded, files) -> tuple[dict, list[dict], dict[str, object]]:
    sums = []
    for path, blocks in files:
        with progress_bar(len(blocks), path.name) as bar:
            nll, tokens = block_nll(loaded.model, blocks, args.batch_size, bar.update)
        sums.append((path, nll, tokens))
    results = perplexity_result(sums)
    for path, blocks in files:
        results["files"][str(path)]["blocks"] = len(blocks)
    return {"block_size": args.block_size, **results}, [], {}


def run_generate(args, loaded) -> tuple[dict, list[dict], dict[str, object]]:
    from .generation import run_generation

    results, rows = run_generation(
        loaded,
        Path(args.validation_file),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=sys.stderr.isatty(),
    )
    return results, rows, {}


# ---------------------------------------------------------------------------------------------
# Output


def write_results(output_dir: Path, files: dict[str, object], rows: list[dict] | None) -> None:
    """Everything is written into a new folder beside ``output_dir`` and moved in only when
    complete, so a failed run leaves the folder as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        for name, content in files.items():
            text = json.dumps(content, ensure_ascii=False, indent=2) + "\n"
            (staging / name).write_text(text, encoding="utf-8")
        if rows is not None:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (staging / "predictions.jsonl").write_text(lines, encoding="utf-8")
        if not output_dir.exists():
            os.replace(staging, output_dir)
            return
        for name in RESULT_FILES:  # a replaced run's files go, so none is left from it
            if (output_dir / name).exists() and not (staging / name).exists():
                (output_dir / name).unlink()
        for path in staging.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def table(task: str, results: dict) -> str:
    if task == "perplexity":
        lines = [f"{'file':<40} {'tokens':>10} {'perplexity':>12}"]
        for name, entry in results["files"].items():
            lines.append(f"{Path(name).name:<40} {entry['tokens']:>10} {entry['perplexity']:>12.4f}")
        overall = results["overall"]
        lines.append(f"{'overall':<40} {overall['tokens']:>10} {overall['perplexity']:>12.4f}")
        return "\n".join(lines)
    if task == "generate":
        return "\n".join(
            f"{key}: {value}" for key, value in results.items() if isinstance(value, int | float)
        )
    lines = [f"{'subject':<40} {'questions':>9} {'accuracy %':>10}"]
    for key, entry in results["subjects"].items():
        lines.append(f"{key:<40} {entry['questions']:>9} {percent(entry['accuracy']):>10}")
    for name, entry in results["categories"].items():
        lines.append(f"{'[' + name + ']':<40} {entry['scored']:>9} {percent(entry['accuracy']):>10}")
    average = results["average"]
    lines.append(
        f"{'average (by question)':<40} {average['questions']:>9} {percent(average['accuracy']):>10}"
    )
    return "\n".join(lines)


def machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    info["device"] = str(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["torch"] = torch.__version__
    return info


# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    args = parse_command(build_parser(), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        check_flags(args)
        output_dir = Path(args.output_dir)
        check_output_dir(output_dir, args.overwrite_output_dir)
        base_flag = "--model" if args.model else "--base_model"
        spec = ModelSpec.from_flags(args, args.model, base_flag)
        if args.prompt_template is None and args.task != "generate" and not args.with_prompt:
            # Text goes in as written: no template is used, so none is looked for or warned about.
            spec.prompt_template = "none"
        # The tokenizer and template first: every input is checked before any weight is read.
        loaded = load(spec, with_model=False)
        inputs = None
        if args.task in TASKS:
            args.split = args.split or SPLITS[args.task][0]
            subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
            inputs = read_benchmark(args.task, args.data_dir, args.split, args.n_shot, subjects)
        elif args.task == "perplexity":
            context = model_context(spec.base_model)
            args.block_size = args.block_size or min(DEFAULT_BLOCK_SIZE, context or DEFAULT_BLOCK_SIZE)
            if context is not None and args.block_size > context:
                raise ArgumentError(
                    f"--block_size {args.block_size} is larger than the model's context ({context}); "
                    f"use {context} or less"
                )
            check_text_dir(Path(args.data_dir))
            inputs = text_blocks(loaded.tokenizer, args.data_dir, args.block_size)
        else:
            try:
                from .generation import read_examples
                from .metrics import require_libraries
            except ImportError as exc:
                raise ArgumentError(f"--task generate is not available in this install ({exc})") from None
            require_libraries()
            read_examples(args.validation_file, loaded.template, loaded.tokenizer)

        device = pick_device(spec.device)
        loaded.model = load_model(
            spec.base_model, spec.lora_models, device, spec.torch_dtype, spec.load_in_kbits
        )
        started = time.time()
        if args.task in TASKS:
            results, rows, extra = run_choice(args, loaded, inputs)
        elif args.task == "perplexity":
            results, rows, extra = run_perplexity(args, loaded, inputs)
            rows = None
        else:
            results, rows, extra = run_generate(args, loaded)
    except (EvalError, DataError, ModelError, TemplateError, TokenizerError, ArgumentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    results = {
        "task": args.task,
        **results,
        "model": {
            base_flag.removeprefix("--"): str(spec.base_model),
            "lora_model": [str(lora) for lora in spec.lora_models],
            # The embedding stays in the compute dtype when the other weights are quantised.
            "torch_dtype": str(loaded.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "load_in_kbits": spec.load_in_kbits,
        },
        "command": shlex.join(["llama-sft", "eval", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 2),
        "machine": machine(device),
    }
    write_results(output_dir, {"results.json": results, **extra}, rows)
    print(table(args.task, results))
    print(f"results written to {output_dir}")
