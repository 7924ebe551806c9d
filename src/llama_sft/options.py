"""Command-line options every ``llama-sft`` command shares. Imports neither PyTorch nor transformers.

Contract:
- ``expand_config(argv)`` replaces ``--config FILE.yaml`` by the file's settings in place, so flags
  given after it win; every command accepts ``--config`` (``add_config``).
- ``--lora_model`` takes one or more folders, space- or comma-separated, in every command
  (``add_lora_model`` and ``lora_folders``).
- ``parse_command(parser, argv)`` is the one parse of a tool's flags: the YAML merged first, then
  argparse; a bad value exits 2 with one line.
- ``ArgumentError`` is a bad flag value: a one-line message naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


class ArgumentError(ValueError):
    """A bad flag value. The message names the flag and says what to do, on one line: flag values
    quoted in it have their line breaks and other control characters escaped."""

    def __init__(self, message: str):
        super().__init__(escaped(message))


def escaped(text: str) -> str:
    """User text quoted in an error, with line breaks and other control characters escaped: one line."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


def yaml_to_argv(path: str | Path) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        # YAML's messages span lines (the problem, then where); the error is one line.
        raise ArgumentError(
            f"{path}: cannot read the --config YAML file: {' '.join(str(exc).split())}"
        ) from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: a --config file is a mapping of argument names to values")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: list[str]) -> list[str]:
    """Replace ``--config FILE`` by the file's settings, so later flags override them."""
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--config":
            if not eq:
                if i + 1 >= len(argv):
                    raise ArgumentError("--config needs a YAML file")
                value, i = argv[i + 1], i + 1
            out += yaml_to_argv(value)
        else:
            out.append(argv[i])
        i += 1
    return out


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a command line (the last one wins), else None."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == flag:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return found


def lora_folders(values: list[str] | str | None) -> list[str]:
    """``--lora_model`` as a list of folders: ``A B``, ``A,B`` and ``A, B`` all give ``[A, B]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="YAML file of these flags (name: value); flags given after it win."
    )


def add_lora_model(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    parser.add_argument(
        "--lora_model",
        nargs="+",
        default=None,
        required=required,
        help=f"{help} One or more folders, space- or comma-separated, applied in the order given.",
    )


def add_model_flags(parser: argparse.ArgumentParser, kbits: bool = False) -> None:
    """The loader's flags besides the model folders (``loading.ModelSpec``), as chat and serve take them."""
    add = parser.add_argument
    add(
        "--tokenizer_path", default=None, help="Tokenizer folder. Default: the last LoRA's, then the model's."
    )
    add(
        "--prompt_template",
        default=None,
        help="Template name or JSON file. Default: template.json of the last LoRA, then the model's.",
    )
    add("--system_prompt", default=None, help="Replace the template's default system prompt.")
    add("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    add(
        "--torch_dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype. auto: float16 on a GPU, float32 on a CPU.",
    )
    if kbits:
        add(
            "--load_in_kbits",
            type=int,
            default=16,
            choices=[4, 8, 16],
            help="Load the base in 4 or 8 bits (bitsandbytes), the LoRA beside it unmerged; 16: as saved.",
        )


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The one parse of a tool's flags, ``--config`` expanded first. A bad --config exits 2 with one line."""
    try:
        expanded = expand_config(list(argv))
    except ArgumentError as exc:
        parser.exit(2, f"error: {exc}\n")
    args = parser.parse_args(expanded)
    if hasattr(args, "lora_model"):
        args.lora_model = lora_folders(args.lora_model)
    return args
