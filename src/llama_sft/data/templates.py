"""Prompt templates are data: JSON files with a ``prompt`` containing ``{instruction}`` (and
optionally ``{system_prompt}``).

Contract: ``load_template(name_or_path) -> Template``; ``Template.render(instruction) -> str`` is the
exact prompt text the model sees before the response. The template used by a run is saved beside
its adapter (``template.json``) so inference renders prompts exactly as training did.
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


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    system_prompt: str | None = None
    followup_prompt: str | None = None
    description: str = ""

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
        # str.replace, not str.format: instructions and templates may contain literal braces.
        return self.prompt.replace("{system_prompt}", system or "").replace("{instruction}", instruction)

    def render_followup(self, instruction: str) -> str:
        """Prompt of a later turn in a multi-turn chat (appended after the previous answer)."""
        if self.followup_prompt is None:
            raise TemplateError(f"template {self.name!r} has no multi-turn format")
        return self.followup_prompt.replace("{instruction}", instruction)

    def to_dict(self) -> dict:
        return asdict(self)

    def chat_template(self) -> str:
        """The same prompts as a Jinja chat template over ``messages`` (an optional system message,
        then user and assistant turns), for tools that read ``chat_template`` from
        tokenizer_config.json (transformers' ``apply_chat_template``, vLLM): ``bos_token`` + the first
        prompt, each answer + ``eos_token``, ``bos_token`` + the follow-up prompt of each later turn,
        as ``prompt_ids`` puts them in ids. An answer follows its prompt after a space where the
        prompt does not end in one: SentencePiece starts a separately encoded answer with one. A
        template without a follow-up format renders later turns with its first prompt."""
        literal = json.dumps  # a JSON string is a Jinja string literal, escapes included
        followup = self.followup_prompt if self.followup_prompt is not None else self.prompt
        space = "" if self.prompt[-1:].isspace() else "{{ ' ' }}"  # an expression: -%} strips spaces
        return (
            f"{{%- set first = {literal(self.prompt)} -%}}"
            f"{{%- set later = {literal(followup)} -%}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system = {literal(self.system_prompt or '')} -%}}"
            "{%- set turns = messages -%}{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if message['role'] == 'user' -%}{{ bos_token }}"
            "{%- if loop.first -%}"
            "{{ first | replace('{system_prompt}', system) | replace('{instruction}', message['content']) }}"
            "{%- else -%}{{ later | replace('{instruction}', message['content']) }}{%- endif -%}"
            f"{{%- elif message['role'] == 'assistant' -%}}{space}{{{{ message['content'] }}}}{{{{ eos_token }}}}"
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
    or the ids generated for it (used as they are). The result is ``[BOS] + encode(render(first,
    system_prompt)) + answer + [EOS]``, then ``[BOS] + encode(render_followup(next)) + answer + [EOS]``
    per later turn, then the new instruction's turn in the same form: with no history, exactly what
    training puts before a response. ``tokenizer`` needs ``encode``, ``bos_id`` and ``eos_id``; a
    history with a template that has no multi-turn format is a ``TemplateError``.
    """
    ids: list[int] = []
    for position, (text, answer) in enumerate([*history, (instruction, None)]):
        prompt = template.render(text, system_prompt) if position == 0 else template.render_followup(text)
        ids += [tokenizer.bos_id] + tokenizer.encode(prompt)
        if answer is not None:
            answer_ids = tokenizer.encode(answer) if isinstance(answer, str) else list(answer)
            ids += answer_ids + [tokenizer.eos_id]
    return ids


def builtin_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name_or_path: str | Path) -> Template:
    """A built-in name (``alpaca``, ``llama2-chat``), a JSON file, or a folder holding template.json."""
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read the prompt template: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise TemplateError(f"{path}: a template is a JSON object with a string 'prompt'")
    if "{instruction}" not in data["prompt"]:
        raise TemplateError(f"{path}: the template's 'prompt' must contain '{{instruction}}'")
    fields = {k: data[k] for k in ("prompt", "system_prompt", "followup_prompt", "description") if k in data}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise TemplateError(
                f"{path}: the template's {key!r} must be a string, found {type(value).__name__}"
            )
    return Template(name=str(data.get("name", path.stem)), **fields)
