"""``llama-sft chat``: talk to a model, interactively or over a file of instructions.

Contract: ``--base_model DIR [--lora_model DIR ...]`` (a base plus LoRAs, or a merged model
alone), loaded by ``llama_sft.loading.load``: the prompt template defaults to the ``template.json``
saved with the LoRA (or copied into a merged model by ``llama-sft merge``), so prompts at inference
match training; the tokenizer defaults to the LoRA's, then the model's. Prompts are encoded by
``TextTokenizer`` exactly as in training: ``[BOS] + encode(template.render(instruction))``.

* Interactive (no ``--data_file``): reads one instruction a line from stdin and streams the answer
  to stdout as it is generated. With a multi-turn template (``llama2-chat``) earlier turns stay in
  the prompt as ``[BOS] prompt answer [EOS] [BOS] [INST] next [/INST]``, the oldest dropped first when
  the context is full. ``/clear`` forgets the history, ``/exit`` (or end of input) quits.
* Batch: ``--data_file`` (one instruction a line, an Alpaca JSON/JSONL file, or a ShareGPT or
  OpenAI-messages file) -> ``--predictions_file``: a JSON list with one ``{"instruction", "input"
  (when given), "output"}`` object per input, in input order, written only once complete. A
  conversation's last user turn is answered after its earlier turns (rendered as training renders
  them; a last assistant turn is left out), and its entry also holds ``"history"`` (the earlier
  ``[user, assistant]`` pairs) and ``"system"`` when it has one.

Generation stops at EOS, at the template's end-of-turn token (chatml's ``<|im_end|>``, llama3's
``<|eot_id|>``; ``Template.stop_ids``, which the server uses too) or at ``--max_new_tokens``.

Sampling uses the usual defaults (temperature 0.2, top_k 40, top_p 0.9, repetition_penalty 1.1); ``--do_sample false`` decodes greedily. A GPU is used
when there is one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

import torch

from ..checks import ModelError
from ..data.records import DataError, read_messages, record_format
from ..data.templates import Template, TemplateError, prompt_ids
from ..data.text import TextCleaning, UnencodableText, clean_text
from ..data.tokenizer import TextTokenizer, TokenizerError
from ..loading import ModelSpec, load
from ..options import ArgumentError, add_config, add_lora_model, add_model_flags, parse_command

logger = logging.getLogger(__name__)


class ChatError(ValueError):
    """A bad chat flag or instruction file. Problems with the model, adapter or vocabulary are
    ``ModelError``, as in train and merge."""


def str2bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y"):
        return True
    if value in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass
class GenerationSettings:
    """How answers are generated; each field is also a `llama-sft chat` option of the same name."""

    max_new_tokens: int = field(default=400, metadata={"help": "Most tokens generated per answer."})
    do_sample: bool = field(
        default=True, metadata={"help": "true: sample (default); false: greedy decoding."}
    )
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=40, metadata={"help": "Sample from the k most likely tokens."})
    top_p: float = field(
        default=0.9, metadata={"help": "Sample from the smallest set with this probability mass."}
    )
    repetition_penalty: float = field(default=1.1, metadata={"help": "Above 1 discourages repeating tokens."})

    def generate_kwargs(self) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            # The model's generation_config may carry sampling values that greedy search would warn about.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs


# ---------------------------------------------------------------------------------------------
# Generation


class TextStream:
    """A ``generate`` streamer that writes each new piece of decoded text as soon as it is complete."""

    def __init__(self, tokenizer: TextTokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # generate() first passes the prompt itself
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        # A character split over byte-fallback tokens decodes as U+FFFD until its last byte arrives.
        if text.endswith("\ufffd"):
            return
        self._show(text)

    def end(self) -> None:
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            self.write(text[len(self.shown) :])
        self.shown = text


@torch.no_grad()
def generate_ids(
    model,
    tokenizer: TextTokenizer,
    prompt: list[int],
    settings: GenerationSettings,
    streamer=None,
    stop_ids: list[int] | None = None,
) -> list[int]:
    """The answer's ids, without the id that ended it: one of ``stop_ids`` (``Template.stop_ids``:
    EOS and the template's end-of-turn id), EOS alone when not given."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    stops = list(stop_ids or [tokenizer.eos_id])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_id,
        streamer=streamer,
        **settings.generate_kwargs(),
    )
    return cut_at_stop(output[0, len(prompt) :].tolist(), stops)[0]


def cut_at_stop(answer: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The generated ids before the first stop id, and whether one was reached."""
    ends = [answer.index(stop) for stop in stop_ids if stop in answer]
    return (answer[: min(ends)], True) if ends else (answer, False)


class Conversation:
    """The token ids of a chat so far; the oldest turns go first when the context is full."""

    def __init__(
        self,
        template: Template,
        tokenizer: TextTokenizer,
        max_prompt_tokens: int,
        system_prompt: str | None = None,
    ):
        self.template, self.tokenizer = template, tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt
        self.turns: list[tuple[str, list[int] | str]] = []

    @property
    def multi_turn(self) -> bool:
        return self.template.followup_prompt is not None

    def prompt(self, instruction: str) -> list[int]:
        history = self.turns if self.multi_turn else []
        for start in range(len(history) + 1):
            ids = prompt_ids(self.template, self.tokenizer, instruction, history[start:], self.system_prompt)
            if len(ids) <= self.max_prompt_tokens:
                if start:
                    logger.info("dropped the %d oldest turn(s) to fit the context", start)
                return ids
        logger.warning(
            "the instruction takes %d tokens, more than the %d the context leaves; its beginning is cut",
            len(ids),
            self.max_prompt_tokens,
        )
        return [self.tokenizer.bos_id] + ids[len(ids) - self.max_prompt_tokens + 1 :]

    def add(self, instruction: str, answer: list[int]) -> None:
        if self.multi_turn:
            self.turns.append((instruction, answer))

    def clear(self) -> None:
        self.turns.clear()


def context_budget(model, settings: GenerationSettings, max_context: int | None) -> int:
    context = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
    if settings.max_new_tokens >= context:
        raise ChatError(
            f"--max_new_tokens {settings.max_new_tokens} leaves no room in a {context}-token context"
        )
    return context - settings.max_new_tokens


def interactive(
    model,
    tokenizer: TextTokenizer,
    template: Template,
    settings: GenerationSettings,
    max_prompt_tokens: int,
    stdin: TextIO,
    stdout: TextIO,
) -> int:
    """Chat over ``stdin``/``stdout``; returns the number of answers given."""
    conversation = Conversation(template, tokenizer, max_prompt_tokens)
    mode = "multi-turn" if conversation.multi_turn else "single-turn (the template has no multi-turn format)"
    stdout.write(f"template {template.name}, {mode}. /clear forgets the history, /exit quits.\n")

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    answers = 0
    while True:
        write(">>> ")
        line = stdin.readline()
        if not line:
            write("\n")
            break
        instruction = line.strip()
        if not instruction:
            continue
        if instruction in ("/exit", "/quit"):
            break
        if instruction == "/clear":
            conversation.clear()
            write("(history cleared)\n")
            continue
        try:
            cleaned = clean_text(instruction)
        except UnencodableText as exc:
            write(f"(not sent: the instruction {exc})\n")
            continue
        if cleaned != instruction:
            logger.warning("removed lone surrogates or control characters from the instruction")
            instruction = cleaned
        try:
            prompt = conversation.prompt(instruction)
            answer = generate_ids(
                model, tokenizer, prompt, settings, TextStream(tokenizer, write), template.stop_ids(tokenizer)
            )
        except KeyboardInterrupt:
            # Ctrl-C stops a long answer, not the chat; the cut answer stays out of the history.
            write("\n(interrupted)\n")
            continue
        write("\n")
        conversation.add(instruction, answer)
        answers += 1
    return answers


def read_instructions(path: str | Path) -> list[dict]:
    """``[{"instruction": ..., "input": ...}]`` from an Alpaca JSON/JSONL file or a text file, its text
    cleaned by the policy of ``data.text`` (as training's records are)."""
    path = Path(path)
    if not path.is_file():
        raise ChatError(f"{path}: --data_file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChatError(f"{path}: not valid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    except OSError as exc:
        raise ChatError(f"{path}: cannot read --data_file ({exc.strerror})") from None
    cleaning = TextCleaning(str(path))
    if path.suffix not in (".json", ".jsonl"):
        items = [
            _instruction(path, f"line {number}", cleaning, line.strip(), "")
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    else:
        try:
            if path.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or a number of 4300+ digits
            raise ChatError(
                f"{path}: not valid JSON ({exc}); give an Alpaca file or one instruction a line (.txt)"
            ) from None
        if not isinstance(rows, list):
            raise ChatError(f"{path}: expected a JSON list of objects with an 'instruction'")
        items = []
        for number, row in enumerate(rows):
            kind = record_format(row)
            if kind != "alpaca":
                items.append(_conversation_item(path, row, kind, number, cleaning))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
                raise ChatError(f"{path}: record {number} has no string 'instruction'")
            if not isinstance(row.get("input") or "", str):
                raise ChatError(f"{path}: record {number}: 'input' must be a string")
            items.append(
                _instruction(path, f"record {number}", cleaning, row["instruction"], row.get("input") or "")
            )
    if cleaning.summary():
        logger.warning(cleaning.summary())
    return items


def _conversation_item(path: Path, row: object, kind: str, number: int, cleaning: TextCleaning) -> dict:
    """A ShareGPT or messages record as the last user turn to answer, after the earlier exchanges."""
    try:
        system, messages = read_messages(row, kind, f"{path}, record {number}", cleaning, number)
    except DataError as exc:
        raise ChatError(str(exc)) from None
    if messages[-1][0] == "assistant":
        messages = messages[:-1]
    texts = [text for _, text in messages]
    history = [list(pair) for pair in zip(texts[0:-1:2], texts[1:-1:2], strict=True)]
    return {"instruction": texts[-1], "input": "", "history": history, "system": system}


def _instruction(path: Path, item: str, cleaning: TextCleaning, instruction: str, input_: str) -> dict:
    try:
        return {"instruction": cleaning.clean(instruction, item), "input": cleaning.clean(input_, item)}
    except UnencodableText as exc:
        raise ChatError(f"{path}, {item}: {exc}") from None


def predict_file(
    model,
    tokenizer: TextTokenizer,
    template: Template,
    settings: GenerationSettings,
    max_prompt_tokens: int,
    data_file: str | Path,
    predictions_file: str | Path,
) -> list[dict]:
    items = read_instructions(data_file)
    target = Path(predictions_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    predictions = []
    for number, item in enumerate(items, 1):
        text = f"{item['instruction']}\n{item['input']}" if item["input"] else item["instruction"]
        # Each record is a fresh prompt, its earlier turns (if any) rendered as in training.
        conversation = Conversation(template, tokenizer, max_prompt_tokens, item.get("system"))
        conversation.turns = [tuple(pair) for pair in item.get("history", [])]
        prompt = conversation.prompt(text)
        answer = generate_ids(model, tokenizer, prompt, settings, stop_ids=template.stop_ids(tokenizer))
        answer = tokenizer.decode(answer).strip()
        entry = {"instruction": item["instruction"]}
        if item["input"]:
            entry["input"] = item["input"]
        if item.get("history"):
            entry["history"] = item["history"]
        if item.get("system") is not None:
            entry["system"] = item["system"]
        entry["output"] = answer
        predictions.append(entry)
        logger.info("%d/%d: %r -> %r", number, len(items), item["instruction"][:60], answer[:60])
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(predictions, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return predictions


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft chat", description="Chat with a model (base + LoRA, or merged), or answer a file."
    )
    add = parser.add_argument
    add_config(parser)
    add("--base_model", required=True, help="Hugging Face model folder: the base, or a merged model.")
    add_lora_model(parser, "LoRA folder (sft_lora_model) to apply to --base_model.")
    add_model_flags(parser, kbits=True)
    add("--data_file", default=None, help="Batch mode: one instruction a line, or an Alpaca JSON/JSONL file.")
    add("--predictions_file", default="predictions.json", help="Batch mode: where the JSON answers go.")
    for option in fields(GenerationSettings):
        kind = type(option.default)
        add(
            f"--{option.name}",
            type=str2bool if kind is bool else kind,
            default=option.default,
            help=option.metadata["help"],
        )
    add("--max_context", type=int, default=None, help="Context length in tokens. Default: the model's.")
    add("--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
    return parser


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    args = parse_command(build_parser(), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    settings = GenerationSettings(
        **{option.name: vars(args)[option.name] for option in fields(GenerationSettings)}
    )
    spec = ModelSpec.from_flags(args)
    try:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        loaded = load(spec)
        model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
        budget = context_budget(model, settings, args.max_context)
        if args.data_file is not None:
            predictions = predict_file(
                model, tokenizer, template, settings, budget, args.data_file, args.predictions_file
            )
            print(f"{len(predictions)} answers written to {args.predictions_file}")
        else:
            if stdin is None and hasattr(sys.stdin, "reconfigure"):
                # Bytes that are not UTF-8 arrive as lone surrogates, which the text policy removes.
                sys.stdin.reconfigure(errors="surrogateescape")
            interactive(
                model, tokenizer, template, settings, budget, stdin or sys.stdin, stdout or sys.stdout
            )
    except (ModelError, ChatError, TemplateError, TokenizerError, ArgumentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
