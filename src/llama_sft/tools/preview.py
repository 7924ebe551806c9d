"""``llama-sft preview``: what training sees, before training.

Contract: ``--tokenizer_name_or_path T --dataset_dir D [--prompt_template X] [--system_prompt S]
[--max_seq_length N] [--train_on_turns all|last] [--num_records K] [--output_file F.jsonl]`` reads
the data files as training does (``records.load_records``), encodes the first K records with
training's encoder (``encode.encode_records``, the same function, not a copy) and prints each as
text with the trained spans marked (green on a terminal, ``[[...]]`` otherwise), its truncation
outcome and token counts. ``--output_file`` writes one JSON line per example,
``{"file", "index", "status", "input_ids", "labels"}``: the ids and labels training would use (a
dropped record has empty lists). Bad input stops with one line and exit code 2, as ``train`` does.
``--on_bad_records skip [--max_bad_fraction F]`` leaves bad records out as training does
(``records.BadRecords``): every file is read to count them, the examples shown are the first K kept
records (with their index in the file), and the counts and a few examples per reason go to stderr.
A preference file (``llama-sft dpo`` data, ``data.preference``) is shown pair by pair: the prompt,
then the chosen and the rejected answer marked as trained; its JSON line is ``{"file", "index",
"status", "prompt", "chosen", "rejected"}`` with the ids of ``preference.load_pairs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.encode import IGNORE_INDEX, TRAIN_ON_TURNS, check_template_fits, encode_records
from ..data.preference import is_preference_file, load_numbered_pairs
from ..data.records import POLICIES, BadRecords, DataError, find_data_files, load_numbered
from ..data.templates import Template, TemplateError
from ..data.tokenizer import TextTokenizer, TokenizerError
from ..loading import ModelSpec, load
from ..options import ArgumentError, add_config, parse_command

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft preview",
        description="Show the first records as training sees them, trained spans marked.",
    )
    add = parser.add_argument
    add_config(parser)
    add("--tokenizer_name_or_path", required=True, help="The tokenizer folder training uses.")
    add("--dataset_dir", required=True, help="Folder of data files, or one file.")
    add("--prompt_template", default="alpaca", help="Template name or JSON file (as for train).")
    add("--system_prompt", default=None, help="System prompt for templates that have one.")
    add("--max_seq_length", type=int, default=512, help="As for train: longer examples are cut.")
    add("--train_on_turns", choices=TRAIN_ON_TURNS, default="all", help="As for train.")
    add("--num_records", type=int, default=3, help="How many records to show.")
    add("--output_file", default=None, help="Also write the examples as JSON lines here.")
    add(
        "--on_bad_records",
        choices=POLICIES,
        default="stop",
        help="As for train: stop at or skip bad records.",
    )
    add(
        "--max_bad_fraction",
        type=float,
        default=0.5,
        help="As for train: skipping, the most that may be bad.",
    )
    return parser


def preview(
    tokenizer: TextTokenizer,
    template: Template,
    dataset_dir: str | Path,
    max_seq_length: int,
    num_records: int,
    train_on_turns: str = "all",
    bad: BadRecords | None = None,
) -> list[dict]:
    """The first ``num_records`` records as ``{"file", "index", "status", "input_ids", "labels"}``.
    Skipping bad records (``bad``), every file is read, so that its counts and check are training's."""
    check_template_fits(template, tokenizer, max_seq_length)
    skipping = bad is not None and bad.skipping
    examples, kept = [], 0
    for path in find_data_files(dataset_dir):
        if is_preference_file(path):
            pairs = load_numbered_pairs(path, tokenizer, template, max_seq_length, bad)
            kept += len(pairs)
            for index, pair in pairs[: num_records - len(examples)]:
                status = "truncated" if pair.truncated else "whole"
                sides = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                examples.append({"file": str(path), "index": index, "status": status, **sides})
            if len(examples) == num_records and not skipping:
                return examples
            continue
        numbered = load_numbered(path, bad)
        kept += len(numbered)
        for index, record in numbered:
            if len(examples) == num_records:
                if skipping:
                    break
                return examples
            dataset, stats = encode_records([record], template, tokenizer, max_seq_length, 1, train_on_turns)
            status = next(s for s in ("whole", "shortened", "truncated", "dropped") if getattr(stats, s))
            example = dataset[0] if len(dataset) else {"input_ids": [], "labels": []}
            examples.append({"file": str(path), "index": index, "status": status, **example})
    if bad is not None:
        bad.check(kept)
    return examples


def token_text(tokenizer: TextTokenizer, ids: list[int], at_start: bool = True) -> str:
    """Ids as text, special tokens (BOS, EOS, end-of-turn) written out rather than dropped. A
    SentencePiece word piece's "▁" is a space, except at the start of a sequence or after BOS, where
    it is the dummy prefix SentencePiece puts before every encoded text."""
    if tokenizer.sp is None:
        return tokenizer.hf.decode(ids, skip_special_tokens=False)
    sp, text, run = tokenizer.sp, "", []
    for token in [*ids, None]:
        if token is not None and token < tokenizer.base_size and not sp.is_control(token):
            run.append(token)
            continue
        if run:
            lead = " " if sp.id_to_piece(run[0]).startswith("▁") and not at_start else ""
            text, run = text + lead + sp.decode(run), []
        if token is not None:
            text += sp.id_to_piece(token) if token < tokenizer.base_size else f"<{token}>"
            at_start = token == tokenizer.bos_id
    return text


def show(tokenizer: TextTokenizer, example: dict, colour: bool) -> str:
    if "prompt" in example:
        return show_pair(tokenizer, example, colour)
    ids, labels = example["input_ids"], example["labels"]
    trained = sum(label != IGNORE_INDEX for label in labels)
    head = (
        f"=== {example['file']}, record {example['index']}: {example['status']}, "
        f"{len(ids)} tokens, {trained} trained"
    )
    opened, closed = (GREEN, RESET) if colour else ("[[", "]]")
    body, start = "", 0
    for position in range(1, len(ids) + 1):
        if position == len(ids) or (labels[position] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = token_text(
                tokenizer, ids[start:position], start == 0 or ids[start - 1] == tokenizer.bos_id
            )
            body += text if labels[start] == IGNORE_INDEX else f"{opened}{text}{closed}"
            start = position
    return f"{head}\n{body}\n"


def show_pair(tokenizer: TextTokenizer, example: dict, colour: bool) -> str:
    """A preference pair: its prompt (masked), then each answer (trained) as it follows the prompt."""
    prompt = example["prompt"]
    opened, closed = (GREEN, RESET) if colour else ("[[", "]]")
    lines = [
        f"=== {example['file']}, record {example['index']}: pair {example['status']}, prompt "
        f"{len(prompt)} tokens, chosen {len(example['chosen'])} trained, rejected "
        f"{len(example['rejected'])} trained",
        f"prompt: {token_text(tokenizer, prompt)}",
    ]
    after_bos = not prompt or prompt[-1] == tokenizer.bos_id
    for side in ("chosen", "rejected"):
        lines.append(f"{side}: {opened}{token_text(tokenizer, example[side], after_bos)}{closed}")
    return "\n".join(lines) + "\n"


def main(argv: list[str], stdout=None) -> None:
    args = parse_command(build_parser(), argv)
    out = stdout or sys.stdout
    bad = None
    try:
        bad = BadRecords(args.on_bad_records, args.max_bad_fraction)
        # No model: the loader's tokenizer and template, as train reads them.
        loaded = load(
            ModelSpec(
                None,
                tokenizer_path=args.tokenizer_name_or_path,
                prompt_template=args.prompt_template,
                system_prompt=args.system_prompt,
            ),
            with_model=False,
        )
        tokenizer, template = loaded.tokenizer, loaded.template
        examples = preview(
            tokenizer,
            template,
            args.dataset_dir,
            args.max_seq_length,
            args.num_records,
            args.train_on_turns,
            bad,
        )
    except (DataError, TemplateError, TokenizerError, ArgumentError) as exc:
        for line in bad.report_lines() if bad is not None else []:
            print(line, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for line in bad.report_lines():
        print(line, file=sys.stderr)
    colour = out.isatty() if hasattr(out, "isatty") else False
    for example in examples:
        out.write(show(tokenizer, example, colour))
    if args.output_file:
        target = Path(args.output_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as lines:
            for example in examples:
                lines.write(json.dumps(example, ensure_ascii=False) + "\n")
