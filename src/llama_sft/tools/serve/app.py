"""The FastAPI app of ``llama-sft serve``: the ``/v1`` routes, their API key, and the chat page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Job
from .page import PAGE
from .protocol import Reply, RequestError, ServerState, chat_prompt, completion_prompt, parse_sampling, usage


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.engine.close()

    app = FastAPI(title="llama-sft serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        refusal = key_refusal(request, state)
        if refusal is not None:
            return refusal
        return await call_next(request)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, state)
        return await generate(request, state, body, chat_prompt(body, state), {"messages"}, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, state)
        return await generate(request, state, body, completion_prompt(body, state), {"prompt"}, chat=False)

    return app


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def request_error(_request, exc: RequestError):
    return error_response(exc)


async def http_error(_request, exc: HTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return error_response(RequestError(str(exc.detail), status=exc.status_code, code=code))


def key_refusal(request: Request, state: ServerState) -> JSONResponse | None:
    """The 401 answer to a ``/v1`` request without the server's API key; None when it may go on."""
    if state.api_key is not None and request.url.path.startswith("/v1"):
        given = request.headers.get("authorization", "")
        expected = f"Bearer {state.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return error_response(
                RequestError(
                    "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api_key",
                    status=401,
                    code="invalid_api_key",
                )
            )
    return None


async def read_json(request: Request, state: ServerState) -> dict:
    """The request's body: a JSON object of at most --max_request_bytes naming this server's model."""
    limit = state.max_request_bytes
    too_large = RequestError(f"the request body is over {limit} bytes", status=413, code="request_too_large")
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


async def generate(
    request: Request, state: ServerState, body: dict, prompt: list[int], params: set[str], chat: bool
):
    """Queue the request in the engine, then answer it whole or as a stream of server-sent events."""
    sampling = parse_sampling(body, state, params, len(prompt))
    job = Job(prompt, sampling, state.tokenizer, state.engine.device, state.stop_ids)
    state.engine.submit(job)
    reply = Reply(state.model_name, chat)
    if body.get("stream"):
        include_usage = (body.get("stream_options") or {}).get("include_usage", False)
        events = stream_events(job, reply, len(prompt), include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await whole_answer(request, job, reply, len(prompt))


async def stream_events(job: Job, reply: Reply, prompt_len: int, include_usage: bool):
    try:
        if reply.chat:
            yield reply.chunk([reply.choice(None, None, first=True)])
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
                yield reply.chunk([reply.choice(value, None)])
            elif kind == "done":
                yield reply.chunk([reply.choice(None, value)])
                break
            else:
                error_body = RequestError(value, status=500, kind="server_error").body()
                yield f"data: {json.dumps(error_body)}\n\n"
                break
        if include_usage:
            yield reply.chunk([], usage(prompt_len, len(job.generated)))
        yield "data: [DONE]\n\n"
    finally:
        # A client gone mid-stream lands here too: its row leaves the batch before the next step.
        job.cancel()


async def whole_answer(request: Request, job: Job, reply: Reply, prompt_len: int):
    """Gather the answer's text, checking between events whether the client is still there."""
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
    return reply.body("".join(pieces), value, usage(prompt_len, len(job.generated)))
