"""``llama-sft serve``: an OpenAI-compatible HTTP API and a web chat page for a trained model.

Contract: ``--model DIR`` (merged or fully fine-tuned) or ``--base_model DIR --lora_model DIR [DIR ...]``
(LoRAs merged in the order given), loaded, and with the tokenizer and template found, as ``chat``
does. Prompts are rendered by ``templates.prompt_ids``, the renderer of training and ``chat``, so
at temperature 0 an answer is the one ``llama-sft chat --do_sample false`` gives.

* ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI request and
  response shapes, ``stream`` as server-sent events ending in ``data: [DONE]``), ``GET /health``,
  and the chat page at ``/``.
* Concurrent requests are decoded together by ``Engine``: one thread owns the model; every step it
  admits waiting requests (each prefilled alone, its KV cache joined to the batch's, left-padded)
  and decodes one token for every running request. A finished, failed or disconnected request
  leaves the batch before the next step. docs/serving.md says why this is not transformers'
  continuous batching.
* An answer ends, with ``finish_reason`` ``"stop"``, at EOS or at the template's end-of-turn token
  (chatml's ``<|im_end|>``, llama3's ``<|eot_id|>``): ``Template.stop_ids``, as in ``chat``; on both
  endpoints, streamed or not. Neither token is part of the text.
* Bad requests get ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; with
  ``--api_key`` every ``/v1`` request needs ``Authorization: Bearer KEY``. A host other than loopback
  is refused without ``--api_key`` unless ``--allow_no_auth`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..checks import ModelError, check_adapter_dir, check_model_dir
from ..data.templates import Template, TemplateError, prompt_ids
from ..data.text import UnencodableText, clean_text
from ..data.tokenizer import TextTokenizer, TokenizerError
from ..training.args import ArgumentError, expand_config
from .chat import (
    GenerationSettings,
    check_tokenizer,
    load_model,
    pick_device,
    resolve_template,
    resolve_tokenizer,
)

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLAMA_SFT_API_KEY"
ROLES = ("system", "user", "assistant")


class ServeError(ValueError):
    """A bad ``llama-sft serve`` flag."""


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


# ---------------------------------------------------------------------------------------------
# The batch


# Below this a temperature divides the logits past float32's range (inf, then NaN probabilities): it
# decodes greedily, as temperature 0 does (vLLM draws the same line).
GREEDY_BELOW = 1e-5


@dataclass
class Sampling:
    """One request's generation settings; temperature 0 (or below GREEDY_BELOW) decodes greedily."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_tokens: int = 0

    @property
    def sampled(self) -> bool:
        return self.temperature >= GREEDY_BELOW

    def processors(self):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        # The order and classes of generate(), so that greedy decoding matches chat's.
        chain = []
        if self.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.sampled:
            chain.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain


class Job:
    """A request in the batch: its prompt, settings, generated ids, and the queue its events go to.

    The answer ends at any of ``stop_ids`` (``Template.stop_ids``: EOS and the template's
    end-of-turn id; EOS alone when not given), which is not part of it. Events put on ``events``
    (from the engine thread, through the event loop): ``("text", piece)``, ``("done",
    finish_reason)``, ``("error", message)``.
    """

    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        tokenizer: TextTokenizer,
        device: torch.device,
        stop_ids: list[int] | None = None,
    ):
        self.prompt, self.sampling, self.tokenizer = prompt, sampling, tokenizer
        self.stop_ids = list(stop_ids or [tokenizer.eos_id])
        self.outbox: list[tuple] = []
        self.generated: list[int] = []
        self.finished = False
        self.cancelled = False
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.sent = ""
        self.chain = sampling.processors()
        self.generator = None
        if sampling.sampled:
            self.generator = torch.Generator(device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, *event) -> None:
        self.outbox.append(event)

    def _deliver(self, events: list[tuple]) -> None:
        for event in events:
            self.events.put_nowait(event)

    def fail(self, message: str) -> None:
        self.finished = True
        self._put("error", message)

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from this row's logits (1, vocab), emit its text, maybe finish."""
        if len(self.generated) < self.sampling.min_tokens:
            logits[:, self.stop_ids] = float("-inf")
        scores, ids = logits, torch.tensor([self.prompt + self.generated], device=logits.device)
        for processor in self.chain:
            scores = processor(ids, scores)
        if self.generator is None:
            token = int(scores.argmax(-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        if token in self.stop_ids:
            return self._finish(self.tokenizer.decode(self.generated), "stop")
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated)
        cuts = [text.find(stop) for stop in self.sampling.stop if stop in text]
        if cuts:
            return self._finish(text[: min(cuts)], "stop")
        if len(self.generated) >= self.sampling.max_tokens:
            return self._finish(text, "length")
        # Hold back a character still missing bytes (U+FFFD) and a tail that may begin a stop string.
        safe = len(text.rstrip("\ufffd"))
        for stop in self.sampling.stop:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - size : safe] == stop[:size]:
                    safe = min(safe, len(text) - size)
                    break
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._put("text", text[len(self.sent) :])
            self.sent = text

    def _finish(self, text: str, reason: str) -> None:
        self._send(text)
        self.finished = True
        self._put("done", reason)


class Engine:
    """Runs every request's decoding in one batch on one thread (see the module docstring)."""

    def __init__(self, model, tokenizer: TextTokenizer, max_batch_size: int):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cached length): 1 for a real token, 0 for padding
        self.pending: list[int] = []  # each row's token chosen last step, not yet in the cache
        self.touched: list[Job] = []  # the jobs of this step, whose events go out after it
        self.peak_running = 0
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="llama-sft-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    def close(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.stopped or self.waiting or self.running)
                if self.stopped:
                    return
            self.touched = list(self.running)
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed forward must not leave requests waiting forever
                logger.exception("generation failed")
                with self.wake:
                    self.touched += self.waiting
                    self.waiting.clear()
                for job in self.touched:
                    job.fail(f"generation failed: {exc}")
                self._keep([])
            self._flush(self.touched)

    @staticmethod
    def _flush(jobs: list[Job]) -> None:
        """Hand each job's new events to its event loop: one wake-up per loop and step, not per token."""
        by_loop: dict = {}
        for job in jobs:
            if job.outbox:
                by_loop.setdefault(job.loop, []).append((job, job.outbox))
                job.outbox = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(lambda batch=batch: [job._deliver(events) for job, events in batch])
            except RuntimeError:  # the event loop is closed: the server is shutting down
                for job, _ in batch:
                    job.cancelled = True

    def _step(self) -> None:
        self._keep([row for row, job in enumerate(self.running) if not (job.finished or job.cancelled)])
        while self.waiting and len(self.running) < self.max_batch_size:
            with self.wake:
                job = self.waiting.popleft()
            if not job.cancelled:
                self._admit(job)
        if self.running:
            self._decode()

    def _keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``, then the padding columns no remaining row needs."""
        if len(rows) == len(self.running):
            return
        self.running = [self.running[row] for row in rows]
        self.pending = [self.pending[row] for row in rows]
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _admit(self, job: Job) -> None:
        from transformers import DynamicCache

        self.touched.append(job)
        cache = DynamicCache(config=self.model.config)
        # Prefilled alone, as generate() does for one prompt: a batch-of-one answer is chat's answer.
        output = self.model(
            input_ids=torch.tensor([job.prompt], device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        token = job.pick(output.logits[:, -1].float())
        if job.finished:
            return
        mask = torch.ones(1, len(job.prompt), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)]
                )
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.running.append(job)
        self.pending.append(token)
        self.peak_running = max(self.peak_running, len(self.running))

    def _decode(self) -> None:
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.running), 1)], dim=1)
        output = self.model(
            input_ids=torch.tensor(self.pending, device=self.device)[:, None],
            attention_mask=mask,
            # Each row's own position: the count of its real tokens, whatever padding precedes them.
            position_ids=self.mask.sum(1, keepdim=True),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.mask = mask
        logits = output.logits[:, -1].float()
        for row, job in enumerate(self.running):
            if not (job.finished or job.cancelled):
                self.pending[row] = job.pick(logits[row : row + 1])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# ---------------------------------------------------------------------------------------------
# Requests


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


# ---------------------------------------------------------------------------------------------
# The app


def create_app(state: ServerState):
    from .serve_page import PAGE

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.engine.close()

    app = FastAPI(title="llama-sft serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error(RequestError(str(exc.detail), status=exc.status_code, code=code))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if state.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error(
                    RequestError(
                        "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api_key",
                        status=401,
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        limit = state.max_request_bytes
        too_large = RequestError(
            f"the request body is over {limit} bytes", status=413, code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise RequestError("'model' must be a string: the id that GET /v1/models lists", "model")
        if body["model"] != state.model_name:
            raise RequestError(
                f"the model {body['model']!r} does not exist; this server has {state.model_name!r}",
                "model",
                status=404,
                code="model_not_found",
            )
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.engine.stats()}

    @app.get("/v1/models")
    async def models():
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llama-sft"}
        return {"object": "list", "data": [entry]}

    async def generate(request: Request, body: dict, prompt: list[int], params: set[str], chat: bool):
        sampling = parse_sampling(body, state, params, len(prompt))
        job = Job(prompt, sampling, state.tokenizer, state.engine.device, state.stop_ids)
        state.engine.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage() -> dict:
            done = len(job.generated)
            return {
                "prompt_tokens": len(prompt),
                "completion_tokens": done,
                "total_tokens": len(prompt) + done,
            }

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta = (
                {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            )
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

        def chunk(choices: list, with_usage: dict | None = None) -> str:
            kind = "chat.completion.chunk" if chat else "text_completion"
            data = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": state.model_name,
                "choices": choices,
            }
            if with_usage is not None:
                data["usage"] = with_usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)

            async def events():
                try:
                    if chat:
                        yield chunk([choice(None, None, first=True)])
                    held = None
                    while True:
                        kind, value = held or await job.events.get()
                        held = None
                        # Text that piled up while this stream waited goes out as one chunk.
                        while kind == "text" and not job.events.empty():
                            held = job.events.get_nowait()
                            if held[0] != "text":
                                break
                            value, held = value + held[1], None
                        if kind == "text":
                            yield chunk([choice(value, None)])
                        elif kind == "done":
                            yield chunk([choice(None, value)])
                            break
                        else:
                            error_body = RequestError(value, status=500, kind="server_error").body()
                            yield f"data: {json.dumps(error_body)}\n\n"
                            break
                    if include_usage:
                        yield chunk([], usage())
                    yield "data: [DONE]\n\n"
                finally:
                    # A client gone mid-stream lands here too: its row leaves the batch before the next step.
                    job.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")

        pieces = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    pieces.append(value)
                elif kind == "done":
                    break
                else:
                    raise RequestError(value, status=500, kind="server_error")
        finally:
            job.cancel()
        text, reason = "".join(pieces), value
        if chat:
            result = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            result = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": [{**result, "logprobs": None}],
            "usage": usage(),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        return await generate(request, body, chat_prompt(body, state), {"messages"}, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        return await generate(request, body, completion_prompt(body, state), {"prompt"}, chat=False)

    return app


# ---------------------------------------------------------------------------------------------
# The command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft serve",
        description="Serve a model over an OpenAI-compatible API with a web chat page at /.",
    )
    add = parser.add_argument
    add("--config", default=None, help="YAML file of these flags (flags given after it win).")
    add("--model", default=None, help="Merged or fully fine-tuned Hugging Face model folder.")
    add("--base_model", default=None, help="Base model folder, with --lora_model.")
    add(
        "--lora_model",
        nargs="+",
        default=None,
        help="LoRA folder(s), merged into --base_model in this order.",
    )
    add(
        "--tokenizer_path", default=None, help="Tokenizer folder. Default: the last LoRA's, then the model's."
    )
    add(
        "--prompt_template",
        default=None,
        help="Template name or JSON file. Default: template.json beside it.",
    )
    add("--system_prompt", default=None, help="Replace the template's default system prompt.")
    add("--served_model_name", default=None, help="Model id in the API. Default: the folder's name.")
    add("--host", default="127.0.0.1", help="Address to bind (default loopback only).")
    add("--port", type=int, default=8000, help="Port (default 8000).")
    add("--api_key", default=os.environ.get(API_KEY_ENV), help=f"Required bearer key (or ${API_KEY_ENV}).")
    add("--allow_no_auth", action="store_true", help="Bind a non-loopback --host without --api_key.")
    add("--max_batch_size", type=int, default=8, help="Requests decoded together (default 8).")
    add("--max_model_len", type=int, default=None, help="Prompt plus answer tokens. Default: the model's.")
    add("--max_request_bytes", type=int, default=1_000_000, help="Largest request body accepted.")
    add("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    add("--torch_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    for option in fields(GenerationSettings):
        if option.name == "do_sample":
            continue  # temperature 0 is greedy decoding
        name = "max_tokens" if option.name == "max_new_tokens" else option.name
        add(f"--{name}", type=type(option.default), default=option.default, dest=option.name,
            help=f"Default for requests that do not set it. {option.metadata['help']}")  # fmt: skip
    return parser


def prepare(argv: list[str]) -> tuple[argparse.Namespace, ServerState]:
    """Parse the flags, load the model and start the engine (the server is not started)."""
    args = build_parser().parse_args(expand_config(argv))
    if (args.model is None) == (args.base_model is None):
        raise ServeError("give --model DIR (a merged model), or --base_model DIR with --lora_model DIR")
    if args.model is not None and args.lora_model:
        raise ServeError("--lora_model goes with --base_model, not --model")
    if not is_loopback(args.host) and args.api_key is None:
        if not args.allow_no_auth:
            raise ServeError(
                f"--host {args.host} is reachable from other machines: set --api_key (or ${API_KEY_ENV}), "
                "or pass --allow_no_auth to serve without one"
            )
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    if args.max_batch_size < 1:
        raise ServeError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    base = args.model or args.base_model
    loras = args.lora_model or []
    check_model_dir(base, "--model" if args.model else "--base_model")
    for lora in loras:
        check_adapter_dir(lora, "--lora_model")
    last = loras[-1] if loras else None
    tokenizer = resolve_tokenizer(args.tokenizer_path, last, base)
    check_tokenizer(tokenizer, base, last)
    template = resolve_template(args.prompt_template, last, base)
    if args.system_prompt is not None:
        template = Template(**{**template.to_dict(), "system_prompt": args.system_prompt})
    # Before the model is loaded: a template whose end-of-turn token the tokenizer lacks stops here.
    stop_ids = template.stop_ids(tokenizer)
    model = load_model(base, loras, pick_device(args.device), args.torch_dtype)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_model_len = args.max_model_len or context
    if not 1 < max_model_len <= context:
        raise ServeError(f"--max_model_len must be between 2 and the model's {context}, got {max_model_len}")
    defaults = GenerationSettings(
        **{o.name: getattr(args, o.name, o.default) for o in fields(GenerationSettings)}
    )
    state = ServerState(
        engine=Engine(model, tokenizer, args.max_batch_size),
        tokenizer=tokenizer,
        template=template,
        model_name=args.served_model_name or Path(last or base).resolve().name,
        max_model_len=max_model_len,
        defaults=defaults,
        stop_ids=stop_ids,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
    )
    return args, state


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args, state = prepare(list(sys.argv[1:] if argv is None else argv))
    except (ServeError, ArgumentError, ModelError, TemplateError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    logger.info(
        "serving %r on http://%s:%d (chat page at /, API at /v1)", state.model_name, args.host, args.port
    )
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info")
