"""The OpenAI request and response shapes of ``llama-sft serve``: validation, prompts, answer bodies."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ...data.templates import Template, prompt_ids
from ...data.text import UnencodableText, clean_text
from ...data.tokenizer import TextTokenizer
from ..chat import GenerationSettings
from .engine import Engine, Sampling

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A bad request: answered with this status and an OpenAI-shaped error body."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServerState:
    engine: Engine
    tokenizer: TextTokenizer
    template: Template
    model_name: str
    max_model_len: int
    defaults: GenerationSettings
    stop_ids: list[int]  # Template.stop_ids: EOS and the template's end-of-turn id
    api_key: str | None = None
    max_request_bytes: int = 1_000_000
    created: int = field(default_factory=lambda: int(time.time()))


# Parameters honoured besides the endpoint's own (messages or prompt); any other is refused by name.
SAMPLING_PARAMS = {
    "model", "stream", "stream_options", "temperature", "top_p", "top_k", "repetition_penalty",
    "max_tokens", "max_completion_tokens", "min_tokens", "stop", "seed", "n", "user",
}  # fmt: skip


def _number(body: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'above' if low_open else 'at least'} {low} and at most {high}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return value


def parse_sampling(body: dict, state: ServerState, endpoint_params: set[str], prompt_len: int) -> Sampling:
    for name in body:
        if name not in SAMPLING_PARAMS | endpoint_params:
            raise RequestError(f"unsupported parameter '{name}': llama-sft serve does not implement it", name)
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise RequestError("'n' must be 1", "n")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", "user")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise RequestError("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    room = state.max_model_len - prompt_len
    if room < 1:
        raise RequestError(
            f"the prompt takes {prompt_len} tokens, leaving none of the {state.max_model_len} of "
            "--max_model_len for an answer; shorten the messages",
            "messages" if "messages" in endpoint_params else "prompt",
            code="context_length_exceeded",
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, 1, float("inf"), integer=True)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(
            f"the prompt's {prompt_len} tokens plus '{name}' {max_tokens} exceed --max_model_len "
            f"{state.max_model_len}; ask for at most {room}",
            name,
            code="context_length_exceeded",
        )
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    defaults = state.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return Sampling(
        max_tokens=pick(max_tokens, min(defaults.max_new_tokens, room)),
        temperature=float(pick(_number(body, "temperature", 0, 2), defaults.temperature)),
        top_p=float(pick(_number(body, "top_p", 0, 1, low_open=True), defaults.top_p)),
        top_k=int(pick(_number(body, "top_k", 0, 1 << 30, integer=True), defaults.top_k)),
        repetition_penalty=float(
            pick(_number(body, "repetition_penalty", 0, 100, low_open=True), defaults.repetition_penalty)
        ),
        stop=stop or [],
        seed=None if seed is None else seed % 2**63,
        min_tokens=_number(body, "min_tokens", 0, max_tokens or room, integer=True) or 0,
    )


def _text(value, param: str) -> str:
    if isinstance(value, list):  # the content-parts form: [{"type": "text", "text": "..."}]
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            raise RequestError(f'\'{param}\' parts must all be {{"type": "text", "text": str}}', param)
        value = "".join(part["text"] for part in value)
    if not isinstance(value, str):
        raise RequestError(f"'{param}' must be a string", param)
    try:
        return clean_text(value)
    except UnencodableText as exc:
        raise RequestError(f"'{param}' {exc}", param) from None


def chat_prompt(body: dict, state: ServerState) -> list[int]:
    """The prompt ids of a chat request's messages: [system], user, assistant, ..., user."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    system, turns = None, []
    for number, message in enumerate(messages):
        param = f"messages[{number}]"
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise RequestError(f"'{param}' must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"'{param}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role"
            )
        content = _text(message.get("content"), f"{param}.content")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role == "system" and number == 0:
            if "{system_prompt}" not in state.template.prompt:
                raise RequestError(
                    f"the model's template {state.template.name!r} has no system prompt; leave out the "
                    "system message",
                    f"{param}.role",
                )
            system = content
        elif role != expected:
            raise RequestError(
                f"'{param}.role' is {role!r} but {expected!r} comes next: an optional system message first, "
                "then user and assistant in turn, ending with user",
                f"{param}.role",
            )
        else:
            turns.append(content)
    if len(turns) % 2 == 0:
        raise RequestError("the last message must be the user's", f"messages[{len(messages) - 1}].role")
    history = list(zip(turns[0:-1:2], turns[1:-1:2], strict=True))
    if state.template.followup_prompt is None:
        # As in chat: a template without a multi-turn format sees only the latest instruction.
        history = []
    return prompt_ids(state.template, state.tokenizer, turns[-1], history, system)


def completion_prompt(body: dict, state: ServerState) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", "prompt")
    return [state.tokenizer.bos_id] + state.tokenizer.encode(_text(prompt, "prompt"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The response shapes of one request: the answer body, or the server-sent chunks of a stream."""

    def __init__(self, model_name: str, chat: bool):
        self.model_name, self.chat = model_name, chat
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def choice(self, text: str | None, reason: str | None, first: bool = False) -> dict:
        """A stream chunk's choice: a chat delta (the role first), or a completion's text."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def chunk(self, choices: list, with_usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        data = {
            "id": self.ident,
            "object": kind,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }
        if with_usage is not None:
            data["usage"] = with_usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def body(self, text: str, reason: str, answer_usage: dict) -> dict:
        """The whole answer of a request that is not streamed."""
        if self.chat:
            result = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            result = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": [{**result, "logprobs": None}],
            "usage": answer_usage,
        }
