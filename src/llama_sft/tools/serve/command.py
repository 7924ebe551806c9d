"""The ``llama-sft serve`` command: its flags, the checks on them, loading the model, running uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import fields

from ...checks import ModelError
from ...data.templates import TemplateError
from ...data.tokenizer import TokenizerError
from ...loading import ModelSpec, load
from ...options import ArgumentError, add_config, add_lora_model, add_model_flags, parse_command
from ..chat import GenerationSettings
from .app import create_app
from .engine import Engine
from .protocol import ServerState

# The package's name, as engine.py uses: one logger name for all of the server's log lines.
logger = logging.getLogger(__package__)

API_KEY_ENV = "LLAMA_SFT_API_KEY"


class ServeError(ValueError):
    """A bad ``llama-sft serve`` flag."""


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
    add_config(parser)
    add("--model", default=None, help="Merged or fully fine-tuned Hugging Face model folder.")
    add("--base_model", default=None, help="Base model folder, with --lora_model.")
    add_lora_model(parser, "LoRA folder(s) merged into --base_model.")
    add_model_flags(parser)
    add("--served_model_name", default=None, help="Model id in the API. Default: the folder's name.")
    add("--host", default="127.0.0.1", help="Address to bind (default loopback only).")
    add("--port", type=int, default=8000, help="Port (default 8000).")
    add("--api_key", default=os.environ.get(API_KEY_ENV), help=f"Required bearer key (or ${API_KEY_ENV}).")
    add("--allow_no_auth", action="store_true", help="Bind a non-loopback --host without --api_key.")
    add("--max_batch_size", type=int, default=8, help="Requests decoded together (default 8).")
    add("--max_model_len", type=int, default=None, help="Prompt plus answer tokens. Default: the model's.")
    add("--max_request_bytes", type=int, default=1_000_000, help="Largest request body accepted.")
    for option in fields(GenerationSettings):
        if option.name == "do_sample":
            continue  # temperature 0 is greedy decoding
        name = "max_tokens" if option.name == "max_new_tokens" else option.name
        add(f"--{name}", type=type(option.default), default=option.default, dest=option.name,
            help=f"Default for requests that do not set it. {option.metadata['help']}")  # fmt: skip
    return parser


def prepare(argv: list[str]) -> tuple[argparse.Namespace, ServerState]:
    """Parse the flags, load the model and start the engine (the server is not started)."""
    args = parse_command(build_parser(), argv)
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
    base_flag = "--model" if args.model else "--base_model"
    loaded = load(ModelSpec.from_flags(args, args.model, base_flag))
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
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
        model_name=args.served_model_name or loaded.name,
        max_model_len=max_model_len,
        defaults=defaults,
        stop_ids=template.stop_ids(tokenizer),
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
    )
    return args, state


def main(argv: list[str]) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args, state = prepare(argv)
    except (ServeError, ArgumentError, ModelError, TemplateError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    logger.info(
        "serving %r on http://%s:%d (chat page at /, API at /v1)", state.model_name, args.host, args.port
    )
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info")
