"""Prompt templates are data: JSON files with a ``prompt`` containing ``{instruction}`` (and
optionally ``{system_prompt}``).

Contract: ``load_template(name_or_path) -> Template``; ``Template.render(instruction) -> str`` is the
exact prompt text the model sees before the response. The template used by a run is saved beside
its adapter (``template.json``) so inference renders prompts exactly as training did.

A conversation (an optional system prompt, then user/assistant exchanges) is laid out by
``exchanges`` and turned into ids by ``exchange_ids``; ``prompt_ids`` (chat, the server) and
training's encoder (``encode.py``) both go through these two, so a conversation is the same ids in
training and at inference. Per exchange: ``[BOS]`` (every exchange, the first only, or never:
``bos``) + ``encode(prompt)`` + ``encode(answer)`` + the end-of-turn id (``end_of_turn``, the
tokenizer's EOS when null) + ``encode(after_answer)``. The first exchange's prompt is ``prompt``
(``prompt_no_system`` when there is no system prompt at all), later ones ``followup_prompt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .text import UnencodableText, clean_text

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_FILE = "template.json"


class TemplateError(ValueError):
    pass


BOS_PLACES = ("every_turn", "first", "none")


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    system_prompt: str | None = None
    followup_prompt: str | None = None
    description: str = ""
    # The fields below default to the Llama-2 layout, so template.json files saved before they
    # existed load and render as they did.
    prompt_no_system: str | None = None
    end_of_turn: str | None = None
    after_answer: str = ""
    bos: str = "every_turn"
    trim: bool = False

    def __post_init__(self):
        # Every way a template is made (a file, --system_prompt) passes the text policy of text.py.
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str):
                continue
            try:
                cleaned = clean_text(value)
            except UnencodableText as exc:
                raise TemplateError(f"prompt template {self.name!r}: {item.name!r} {exc}") from None
            if cleaned != value:
                logger.warning(
                    "prompt template %r: removed lone surrogates or control characters from %r",
                    self.name,
                    item.name,
                )
                object.__setattr__(self, item.name, cleaned)

    def render(self, instruction: str, system_prompt: str | None = None) -> str:
        system = self.system_prompt if system_prompt is None else system_prompt
        if system is None and self.prompt_no_system is not None:
            return self.prompt_no_system.replace("{instruction}", instruction)
        # str.replace, not str.format: instructions and templates may contain literal braces.
        return self.prompt.replace("{system_prompt}", system or "").replace("{instruction}", instruction)

    @property
    def multi_turn(self) -> bool:
        return self.followup_prompt is not None

    def end_id(self, tokenizer) -> int:
        """The id that ends an answer: the tokenizer's EOS, or the template's ``end_of_turn`` token."""
        if self.end_of_turn is None:
            return tokenizer.eos_id
        token_id = tokenizer.token_id(self.end_of_turn)
        if token_id is None:
            raise TemplateError(
                f"prompt template {self.name!r} ends each answer with the token {self.end_of_turn!r}, which the "
                "tokenizer does not have as one token; use the tokenizer of the model this template belongs to, "
                "or another --prompt_template"
            )
        return token_id

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end an answer when generating (``chat``, ``serve``): the tokenizer's EOS and,
        when the template ends a turn with another token (chatml's ``<|im_end|>``, llama3's
        ``<|eot_id|>``), that token too. Neither is part of the answer."""
        end = self.end_id(tokenizer)
        return [tokenizer.eos_id] if end == tokenizer.eos_id else [tokenizer.eos_id, end]

    def render_followup(self, instruction: str) -> str:
        """Prompt of a later turn in a multi-turn chat (appended after the previous answer)."""
        if self.followup_prompt is None:
            raise TemplateError(f"template {self.name!r} has no multi-turn format")
        return self.followup_prompt.replace("{instruction}", instruction)

    def with_system_prompt(self, system_prompt: str) -> Template:
        """This template with its default system prompt replaced (``--system_prompt``)."""
        return Template(**{**self.to_dict(), "system_prompt": system_prompt})

    def to_dict(self) -> dict:
        return asdict(self)

    def chat_template(self) -> str:
        """The same prompts as a Jinja chat template over ``messages`` (an optional system message,
        then user and assistant turns), for tools that read ``chat_template`` from
        tokenizer_config.json (transformers' ``apply_chat_template``, vLLM): what ``exchanges`` lays
        out, with ``bos_token`` where the template puts BOS, each answer followed by ``eos_token`` (or
        the template's ``end_of_turn``) and ``after_answer``. An answer follows its prompt after a
        space where the prompt does not end in whitespace: SentencePiece starts a separately encoded
        answer with one. A template without a follow-up format renders later turns with its first
        prompt."""
        literal = json.dumps  # a JSON string is a Jinja string literal, escapes included
        followup = self.followup_prompt if self.followup_prompt is not None else self.prompt
        no_system = self.prompt_no_system if self.prompt_no_system is not None else self.prompt
        default = literal(self.system_prompt) if self.system_prompt is not None else "none"
        space = "" if self.prompt[-1:].isspace() else "{{ ' ' }}"  # an expression: -%} strips spaces
        trim = " | trim" if self.trim else ""
        end = literal(self.end_of_turn) if self.end_of_turn is not None else "eos_token"
        bos = {"every_turn": "{{ bos_token }}", "first": "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"}
        return (
            f"{{%- set first = {literal(self.prompt)} -%}}"
            f"{{%- set first_no_system = {literal(no_system)} -%}}"
            f"{{%- set later = {literal(followup)} -%}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            f"{{%- set system = messages[0]['content']{trim} -%}}{{%- set turns = messages[1:] -%}}"
            f"{{%- else -%}}{{%- set system = {default} -%}}"
            "{%- set turns = messages -%}{%- endif -%}"
            "{%- for message in turns -%}"
            f"{{%- if message['role'] == 'user' -%}}{bos.get(self.bos, '')}"
            f"{{%- set content = message['content']{trim} -%}}"
            "{%- if loop.first and system is none -%}"
            "{{ first_no_system | replace('{instruction}', content) }}"
            "{%- elif loop.first -%}"
            "{{ first | replace('{system_prompt}', system) | replace('{instruction}', content) }}"
            "{%- else -%}{{ later | replace('{instruction}', content) }}{%- endif -%}"
            f"{{%- elif message['role'] == 'assistant' -%}}{space}{{{{ message['content']{trim} }}}}"
            f"{{{{ {end} }}}}{{{{ {literal(self.after_answer)} }}}}"
            "{%- endif -%}{%- endfor -%}"
        )

    def write_chat_template(self, directory: str | Path) -> None:
        """Add ``chat_template`` to the folder's tokenizer_config.json (when there is one)."""
        config_file = Path(directory) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["chat_template"] = self.chat_template()
            config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TEMPLATE_FILE
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Exchange:
    """One user turn and its answer as the template lays them out. ``answer`` is text, the ids
    generated for it, or None for the turn still to be answered (its prompt ends the sequence)."""

    bos: bool
    prompt: str
    answer: str | list[int] | None


def exchanges(
    template: Template,
    turns: Sequence[tuple[str, str | list[int] | None]],
    system_prompt: str | None = None,
) -> list[Exchange]:
    """The layout of a conversation: ``turns`` are ``(user, answer)`` pairs, oldest first, the last
    answer possibly None. ``system_prompt`` None means the template's own."""
    system = template.system_prompt if system_prompt is None else system_prompt
    if template.trim:
        # Templates that trim (Llama 3's) strip every message, as their reference chat template does.
        system = system.strip() if system is not None else None
        turns = [
            (user.strip(), answer.strip() if isinstance(answer, str) else answer) for user, answer in turns
        ]
    laid_out = []
    for position, (user, answer) in enumerate(turns):
        if position == 0:
            prompt = template.render(user, system)
        else:
            if template.followup_prompt is None:
                raise TemplateError(f"template {template.name!r} has no multi-turn format")
            prompt = template.render_followup(user)
        bos = template.bos == "every_turn" or (template.bos == "first" and position == 0)
        laid_out.append(Exchange(bos, prompt, answer))
    return laid_out


def exchange_ids(
    exchange: Exchange,
    tokenizer,
    end_id: int,
    after_ids: list[int],
    prompt: list[int] | None = None,
    answer: list[int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """The ids of one exchange in three parts: BOS and the prompt; the answer and the end-of-turn id;
    the template's text after the answer. The last two are empty while the exchange awaits its
    answer. ``prompt`` and ``answer`` are the encoded texts when the caller encoded them in a batch,
    else they are encoded here."""
    ids = [tokenizer.bos_id] if exchange.bos else []
    ids += tokenizer.encode(exchange.prompt) if prompt is None else prompt
    if exchange.answer is None:
        return ids, [], []
    if answer is None:
        answer = (
            tokenizer.encode(exchange.answer) if isinstance(exchange.answer, str) else list(exchange.answer)
        )
    return ids, [*answer, end_id], list(after_ids)


def render_text(
    template: Template,
    turns: Sequence[tuple[str, str | None]],
    system_prompt: str | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """The conversation as one string: the pieces ``exchange_ids`` encodes, joined, with BOS and the
    end-of-turn token written as text. For templates of BPE tokenizers (chatml, llama3) this is the
    string their own chat templates produce; a SentencePiece tokenizer also puts a space before
    each separately encoded piece."""
    end = template.end_of_turn if template.end_of_turn is not None else eos_token
    text = ""
    for exchange in exchanges(template, turns, system_prompt):
        text += (bos_token if exchange.bos else "") + exchange.prompt
        if exchange.answer is not None:
            text += f"{exchange.answer}{end}{template.after_answer}"
    return text


def prompt_ids(
    template: Template,
    tokenizer,
    instruction: str,
    history: Sequence[tuple[str, str | list[int]]] = (),
    system_prompt: str | None = None,
) -> list[int]:
    """The token ids the model sees before its answer to ``instruction``, after the earlier turns.

    The one renderer of prompts as ids, for training's prompts, ``chat`` and the server. ``history``
    holds the earlier ``(instruction, answer)`` turns, oldest first; an answer is text (encoded here)
    or the ids generated for it (used as they are). For the Llama-2 layout the result is
    ``[BOS] + encode(render(first, system_prompt)) + answer + [EOS]``, then ``[BOS] +
    encode(render_followup(next)) + answer + [EOS]`` per later turn, then the new instruction's turn
    in the same form: with no history, exactly what training puts before a response. ``tokenizer``
    needs ``encode``, ``bos_id`` and ``eos_id`` (and ``token_id`` for a template with its own
    end-of-turn token); a history with a template that has no multi-turn format is a ``TemplateError``.
    """
    end_id = template.end_id(tokenizer)
    after = tokenizer.encode(template.after_answer) if template.after_answer else []
    ids: list[int] = []
    for exchange in exchanges(template, [*history, (instruction, None)], system_prompt):
        ids += sum(exchange_ids(exchange, tokenizer, end_id, after), [])
    return ids


def builtin_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name_or_path: str | Path) -> Template:
    """A built-in name (``alpaca``, ``llama2-chat``, ``chatml``, ``llama3``), a JSON file, or a folder
    holding template.json."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    elif not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise TemplateError(
                f"unknown prompt template {str(name_or_path)!r}: give one of {', '.join(builtin_names())} "
                "or the path of a JSON file with a 'prompt' containing '{instruction}'"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, a number of 4300+ digits
        raise TemplateError(f"{path}: cannot read the prompt template: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise TemplateError(f"{path}: a template is a JSON object with a string 'prompt'")
    if "{instruction}" not in data["prompt"]:
        raise TemplateError(f"{path}: the template's 'prompt' must contain '{{instruction}}'")
    texts = ("prompt", "system_prompt", "followup_prompt", "description", "prompt_no_system", "end_of_turn")
    fields = {k: data[k] for k in (*texts, "after_answer", "bos", "trim") if k in data}
    for key, value in fields.items():
        if key == "trim":
            if not isinstance(value, bool):
                raise TemplateError(f"{path}: the template's 'trim' must be true or false")
        elif (value is not None or key in ("after_answer", "bos")) and not isinstance(value, str):
            raise TemplateError(
                f"{path}: the template's {key!r} must be a string, found {type(value).__name__}"
            )
    if fields.get("bos", "every_turn") not in BOS_PLACES:
        raise TemplateError(f"{path}: the template's 'bos' must be one of {', '.join(BOS_PLACES)}")
    for key in ("followup_prompt", "prompt_no_system"):
        if isinstance(fields.get(key), str) and "{instruction}" not in fields[key]:
            raise TemplateError(f"{path}: the template's {key!r} must contain '{{instruction}}'")
    if fields.get("end_of_turn") == "":
        raise TemplateError(f"{path}: the template's 'end_of_turn' is a token's text, or null for EOS")
    return Template(name=str(data.get("name", path.stem)), **fields)
