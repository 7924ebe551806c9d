"""``llama-sft chat``: talk to a model, interactively or over a file of instructions.

Contract: ``--base_model DIR [--lora_model DIR]`` (a base plus a LoRA, or a merged model alone).
The prompt template defaults to the ``template.json`` saved with the LoRA (or copied into a merged
model by ``llama-sft merge``), so prompts at inference match training; the tokenizer defaults to the
LoRA's, then the model's. Prompts are encoded by ``TextTokenizer`` exactly as in training:
``[BOS] + encode(template.render(instruction))``.

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

from ..checks import (
    ModelError,
    adapter_vocab_rows,
    check_adapter_dir,
    check_model_dir,
    check_vocab,
    first_line,
    has_tokenizer,
    model_vocab_size,
    read_adapter_config,
)
from ..data.records import DataError, read_messages, record_format
from ..data.templates import TEMPLATE_FILE, Template, TemplateError, load_template, prompt_ids
from ..data.text import TextCleaning, UnencodableText, clean_text
from ..data.tokenizer import TextTokenizer, TokenizerError

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "alpaca"


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
# Loading


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    base_model: str | Path,
    lora_model: str | Path | list[str | Path] | None,
    device: torch.device,
    dtype: str = "auto",
    load_in_kbits: int = 16,
):
    """The base with the LoRA (or several, applied in the order given, as merge does) merged in;
    with ``load_in_kbits`` 4 or 8, the base quantised and one LoRA kept beside it, unmerged (folding
    it into quantised weights would round it away)."""
    from transformers import AutoModelForCausalLM

    from ..training.args import ModelArguments
    from ..training.model import quantization_config

    base = Path(base_model)
    check_model_dir(base, "--base_model")
    loras = [] if lora_model is None else lora_model if isinstance(lora_model, list) else [lora_model]
    for lora in loras:
        check_adapter_dir(lora, "--lora_model")
    if dtype == "auto":
        # float16 matrix products are very slow on a CPU; on a GPU half precision halves memory.
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    extra = {}
    if load_in_kbits != 16:
        if len(loras) > 1:
            raise ModelError(
                f"--load_in_kbits {load_in_kbits} takes one --lora_model; merge the others into the base first"
            )
        compute = torch_dtype if device.type == "cuda" else torch.float32
        # What the adapter trained in full replaces whole modules, which must stay unquantised.
        keep = read_adapter_config(loras[0], "--lora_model").get("modules_to_save") or [] if loras else []
        extra["quantization_config"] = quantization_config(
            ModelArguments(load_in_kbits=load_in_kbits), compute, list(keep)
        )
        if device.type == "cuda":  # quantised weights are placed when loaded and cannot move
            extra["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype, **extra)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(
            f"{base}: cannot load the model ({first_line(exc)}); re-save it with save_pretrained"
        ) from None
    for lora in map(Path, loras):
        from peft import PeftModel

        rows = adapter_vocab_rows(lora, "--lora_model")
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            # The saved embed_tokens/lm_head replace these rows, so how they are initialised is moot.
            model.resize_token_embeddings(rows, mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(model, str(lora))
            model = model if load_in_kbits != 16 else model.merge_and_unload()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(
                f"{lora}: the LoRA does not fit {base} ({first_line(exc)}); was it trained on another base?"
            ) from None
    return (model if load_in_kbits != 16 else model.to(device)).eval()


def resolve_tokenizer(tokenizer_path: str | None, lora_model: str | None, base_model: str) -> TextTokenizer:
    if tokenizer_path is not None:
        return TextTokenizer.load(tokenizer_path)
    for folder in (lora_model, base_model):
        if folder is not None and has_tokenizer(folder):
            return TextTokenizer.load(folder)
    raise TokenizerError(
        f"no tokenizer in {lora_model or base_model}: pass --tokenizer_path (the folder with tokenizer.model)"
    )


def pretrained_only(folder: Path) -> bool:
    """Whether a LoRA folder's training_args.json says it was trained by ``llama-sft pretrain``."""
    try:
        return (
            json.loads((folder / "training_args.json").read_text(encoding="utf-8")).get("task")
            == "pre-training"
        )
    except (OSError, ValueError, AttributeError):
        return False


def resolve_template(name: str | None, lora_model: str | None, base_model: str) -> Template:
    if name is not None:
        return load_template(name)
    for folder in (lora_model, base_model):
        if folder is not None and (Path(folder) / TEMPLATE_FILE).is_file():
            return load_template(Path(folder))
    if lora_model is not None and pretrained_only(Path(lora_model)):
        # A pre-training LoRA learned plain text: it continues text rather than answering prompts.
        logger.info(
            "%s is a pre-training LoRA: its text is continued as written (--prompt_template none)", lora_model
        )
        return load_template("none")
    logger.warning(
        "no %s beside the model; using the %r template (--prompt_template)", TEMPLATE_FILE, DEFAULT_TEMPLATE
    )
    return load_template(DEFAULT_TEMPLATE)


def check_tokenizer(tokenizer: TextTokenizer, base_model: str | Path, lora_model: str | Path | None) -> None:
    """Refuse a tokenizer that does not fit the model, from the config files, before it is loaded."""
    rows = adapter_vocab_rows(lora_model, "--lora_model") if lora_model is not None else None
    # A LoRA that saved embed_tokens decides the vocabulary; otherwise the base does.
    source = lora_model if rows is not None else base_model
    if rows is None:
        rows = model_vocab_size(base_model, "--base_model")
    if check_vocab(rows, len(tokenizer), source, tokenizer.directory, virtual_pad=tokenizer.added_pad):
        usable = len(tokenizer) - (1 if tokenizer.added_pad else 0)
        # Generation cannot grow the embedding: ids past its last row would index out of range.
        raise ModelError(
            f"{tokenizer.directory}: the tokenizer has {usable} tokens but the model {source} has {rows} "
            "embedding rows; pass the tokenizer the model was trained with (--tokenizer_path)"
        )


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
    answer = output[0, len(prompt) :].tolist()
    ends = [answer.index(stop) for stop in stops if stop in answer]
    return answer[: min(ends)] if ends else answer


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
    add("--base_model", required=True, help="Hugging Face model folder: the base, or a merged model.")
    add("--lora_model", default=None, help="LoRA folder (sft_lora_model) to apply to --base_model.")
    add("--tokenizer_path", default=None, help="Tokenizer folder. Default: the LoRA's, then the model's.")
    add(
        "--prompt_template",
        default=None,
        help="Template name or JSON file. Default: template.json saved with the LoRA/model, else alpaca.",
    )
    add("--system_prompt", default=None, help="Replace the template's system prompt (llama2-chat).")
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
    add("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    add(
        "--load_in_kbits",
        type=int,
        default=16,
        choices=[4, 8, 16],
        help="Load the base in 4 or 8 bits (bitsandbytes), the LoRA beside it unmerged; 16: as saved.",
    )
    add(
        "--torch_dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype. auto: float16 on a GPU, float32 on a CPU.",
    )
    add("--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
    return parser


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    settings = GenerationSettings(
        **{option.name: vars(args)[option.name] for option in fields(GenerationSettings)}
    )
    try:
        check_model_dir(args.base_model, "--base_model")
        if args.lora_model is not None:
            check_adapter_dir(args.lora_model, "--lora_model")
        tokenizer = resolve_tokenizer(args.tokenizer_path, args.lora_model, args.base_model)
        check_tokenizer(tokenizer, args.base_model, args.lora_model)
        template = resolve_template(args.prompt_template, args.lora_model, args.base_model)
        if args.system_prompt is not None:
            template = Template(**{**template.to_dict(), "system_prompt": args.system_prompt})
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = load_model(
            args.base_model, args.lora_model, pick_device(args.device), args.torch_dtype, args.load_in_kbits
        )
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
    except (ModelError, ChatError, TemplateError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
