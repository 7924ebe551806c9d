"""Property-based fuzzing of every reader of user input, through the real entry points.

The contract, the same for every surface: an input works, or raises the project's input-error type
with a one-line message; the CLI turns that into ``error: ...`` on stderr, exit code 2, and
``output_dir`` untouched. Any other exception is a defect.

A surface is three things: a Hypothesis strategy that draws the input as bytes (``SURFACES``'s
``draw``), the file suffix it is saved with, and a ``check(path)`` that feeds the saved file to the
real reader and asserts the contract. Adding a surface is adding one entry to ``SURFACES`` (the
server's request bodies, which need a live server, are fuzzed in ``test_serve_fuzz.py``).

``make test`` runs the ``ci`` profile: derandomized (a fixed seed), a bounded number of examples per
surface. ``make fuzz`` runs the ``fuzz`` profile (``LLAMA_SFT_FUZZ=1``): random seeds, many examples,
no deadline; a failing example, once shrunk, is saved as ``tests/bad_inputs/found/SURFACE-HASH.EXT``
and its path printed. ``test_replay`` runs every saved file through its surface's check again,
every hand-made file of ``tests/bad_inputs/`` through the records check and those of
``tests/bad_inputs/pretrain/`` through the pre-training check.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_RECORDS, train_argv, write_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context

from llama_sft.checks import ModelError, adapter_vocab_rows, check_adapter_dir, check_model_dir
from llama_sft.cli import main
from llama_sft.data.encode import encode_records
from llama_sft.data.pretrain import build_blocks, check_block_size, find_text_files
from llama_sft.data.records import DataError, load_records
from llama_sft.data.templates import TemplateError, load_template, prompt_ids
from llama_sft.data.tokenizer import TextTokenizer, TokenizerError
from llama_sft.tools.chat import ChatError, read_instructions
from llama_sft.training.args import ArgumentError, parse_train_args
from llama_sft.training.precision import Machine

CORPUS = Path(__file__).parent / "bad_inputs"
FOUND = CORPUS / "found"
FUZZING = os.environ.get("LLAMA_SFT_FUZZ") == "1"

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=200, suppress_health_check=_QUIET
)
settings.register_profile(
    "fuzz",
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("LLAMA_SFT_FUZZ_EXAMPLES", "3000")),
    suppress_health_check=_QUIET,
)
PROFILE = settings.get_profile("fuzz" if FUZZING else "ci")


# ---------------------------------------------------------------------------------------------
# Text: what scraped data holds. Hypothesis' own characters() leave out surrogates; they are added.

QUIRKS = [
    "\ud800",
    "\udfff",
    "\ud83d",
    "\udc80",
    "\x00",
    "\x1b[31m",
    "\x0c",
    "\x7f",
    "\x85",
    "\ufeff",
    "\u2028",
    "\ufffd",
    "{instruction}",
    "{system_prompt}",
    "\\",
    '"',
    "\r\n",
    "你好",
    "😀",
]
chars = st.characters(exclude_categories=()) | st.sampled_from(QUIRKS)
texts = st.lists(chars, max_size=30).map("".join)
# Now and then a long string (up to ~20k characters), built by repeating a short one.
long_texts = st.builds(lambda t, n: t * n, texts.filter(bool), st.integers(100, 1000))
any_text = st.one_of(texts, texts, texts, long_texts)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("instruction", "input", "output")


@st.composite
def records(draw) -> dict:
    """Mostly well-formed records with one thing wrong now and then."""
    keys = draw(st.lists(st.sampled_from(FIELDS), unique=True, min_size=1) | st.just(list(FIELDS)))
    record = {
        key: draw(any_text | (json_values if draw(st.integers(0, 5)) == 0 else any_text)) for key in keys
    }
    if draw(st.integers(0, 8)) == 0:
        record[draw(texts)] = draw(json_values)
    return record


def mangle(draw, text: str) -> bytes:
    """Byte-level damage a file picks up: a BOM, another encoding, truncation, a repeated key."""
    how = draw(st.sampled_from(["none"] * 6 + ["bom", "utf16", "latin1", "truncate", "dup_key", "bytes"]))
    if how == "dup_key" and '"output":' in text:
        text = text.replace('"output":', '"output": "x", "output":', 1)
    raw = text.encode("utf-8", "surrogatepass")
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "utf16":
        return text.encode("utf-16", "surrogatepass")
    if how == "latin1":
        return text.encode("latin-1", "replace")
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "bytes":
        return draw(st.binary(max_size=64)) + raw[: draw(st.integers(0, len(raw)))]
    return raw


@st.composite
def alpaca_files(draw) -> tuple[bytes, str]:
    items = draw(st.lists(records() | json_values, max_size=5))
    ascii_only = draw(st.booleans())  # True: "\ud800" escapes, as crawled data has them
    if draw(st.booleans()):
        top = items if draw(st.integers(0, 9)) else draw(json_values)
        return mangle(draw, json.dumps(top, ensure_ascii=ascii_only)), ".json"
    lines = [json.dumps(item, ensure_ascii=ascii_only) for item in items]
    if lines and draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "   ", "{", "[]", "null"])))
    return mangle(draw, "\n".join(lines)), ".jsonl"


@st.composite
def template_files(draw) -> tuple[bytes, str]:
    data = {"prompt": draw(any_text.map(lambda t: t + "{instruction}") | json_values)}
    for key in (
        "name",
        "system_prompt",
        "followup_prompt",
        "description",
        "prompt_no_system",
        "after_answer",
    ):
        if draw(st.booleans()):
            data[key] = draw(any_text | json_values)
    if draw(st.booleans()):
        data["end_of_turn"] = draw(st.sampled_from(["</s>", "<|im_end|>", "", None]) | any_text | json_values)
    if draw(st.booleans()):
        data["bos"] = draw(st.sampled_from(["every_turn", "first", "none"]) | json_values)
    if draw(st.booleans()):
        data["trim"] = draw(st.booleans() | json_values)
    top = data if draw(st.integers(0, 9)) else draw(json_values)
    return mangle(draw, json.dumps(top, ensure_ascii=draw(st.booleans()))), ".json"


ROLE_NAMES = ["system", "human", "user", "gpt", "assistant", "tool", "function_call", ""]


@st.composite
def turns(draw, role_key: str, text_key: str) -> list:
    """Mostly alternating user/assistant turns, now and then a role or a text out of place."""
    count = draw(st.integers(0, 6))
    start = draw(st.sampled_from([0, 0, 0, 1]))
    names = [("human" if role_key == "from" else "user", "gpt" if role_key == "from" else "assistant")[(start + i) % 2]
             for i in range(count)]  # fmt: skip
    if names and draw(st.integers(0, 4)) == 0:
        names[draw(st.integers(0, len(names) - 1))] = draw(st.sampled_from(ROLE_NAMES))
    out = []
    for name in names:
        turn = {
            role_key: name,
            text_key: draw(any_text | (json_values if draw(st.integers(0, 6)) == 0 else any_text)),
        }
        if draw(st.integers(0, 10)) == 0:
            del turn[draw(st.sampled_from([role_key, text_key]))]
        out.append(turn if draw(st.integers(0, 15)) else draw(json_values))
    return out


@st.composite
def conversation_records(draw) -> object:
    kind = draw(st.sampled_from(["sharegpt", "messages", "history"]))
    if kind == "sharegpt":
        record = {"conversations": draw(turns("from", "value"))}
        if draw(st.booleans()):
            record["system"] = draw(any_text | json_values)
    elif kind == "messages":
        record = {"messages": draw(turns("role", "content"))}
    else:
        record = draw(records())
        pairs = st.lists(st.lists(any_text, min_size=2, max_size=2) | json_values, max_size=3)
        record["history"] = draw(pairs | json_values)
        if draw(st.booleans()):
            record["system"] = draw(any_text | json_values)
    return record


@st.composite
def conversation_files(draw) -> tuple[bytes, str]:
    """Files of conversation records, now and then mixing formats or holding stray values."""
    items = draw(
        st.lists(conversation_records() | conversation_records() | records() | json_values, max_size=4)
    )
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        return mangle(draw, json.dumps(items, ensure_ascii=ascii_only)), ".json"
    return mangle(draw, "\n".join(json.dumps(item, ensure_ascii=ascii_only) for item in items)), ".jsonl"


# Flags by the kind of value they take; values drawn across kinds test wrong types too.
NUMBER_FLAGS = [
    "max_seq_length",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "warmup_ratio",
    "validation_split_percentage",
    "preprocessing_num_workers",
    "max_tokens_per_pass",
    "eval_steps",
    "save_steps",
    "logging_steps",
    "seed",
    "save_total_limit",
]
CHOICE_FLAGS = [
    "torch_dtype",
    "nan_policy",
    "speedups",
    "eval_strategy",
    "lr_scheduler_type",
    "packing",
    "fp16",
]
TEXT_FLAGS = [
    "trainable",
    "modules_to_save",
    "skip_speedups",
    "system_prompt",
    "prompt_template",
    "deepspeed",
]
numbers = st.sampled_from(
    ["0", "-1", "1e400", "nan", "-inf", "2e-4", "0.5", "1.5", "99999999999999999999"]
) | (st.integers(-(2**40), 2**40).map(str))
words = st.sampled_from(
    ["true", "false", "auto", "off", "", "null", "q_proj,v_proj", ",", "[1]", "{}"]
) | texts.map(
    lambda t: t.replace("\x00", "")  # a command line cannot hold NUL
)


@st.composite
def flag_lists(draw) -> tuple[bytes, str]:
    argv = []
    for flag in draw(st.lists(st.sampled_from(NUMBER_FLAGS + CHOICE_FLAGS + TEXT_FLAGS), max_size=4)):
        value = draw(numbers | words if flag in NUMBER_FLAGS else words | numbers)
        argv += draw(st.sampled_from([[f"--{flag}", value], [f"--{flag}={value}"], [f"--{flag}"]]))
    return json.dumps(argv).encode(), ".argv.json"


@st.composite
def yaml_configs(draw) -> tuple[bytes, str]:
    import yaml

    data = {
        draw(st.sampled_from(NUMBER_FLAGS + CHOICE_FLAGS + TEXT_FLAGS) | texts): draw(json_values | numbers)
        for _ in range(draw(st.integers(0, 4)))
    }
    text = yaml.safe_dump(data, allow_unicode=draw(st.booleans())) if draw(st.integers(0, 5)) else draw(texts)
    return mangle(draw, text), ".yaml"


def folder_of(files: dict[str, bytes]) -> bytes:
    """A folder saved as one JSON file: file name -> base64 content."""
    return json.dumps({name: base64.b64encode(data).decode() for name, data in files.items()}).encode()


def json_bytes(draw, good: dict) -> bytes:
    """A config file: the good one with keys dropped, replaced or retyped, or damaged bytes."""
    data = dict(good)
    for key in draw(st.lists(st.sampled_from(sorted(good)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del data[key]
        else:
            data[key] = draw(json_values)
    return mangle(draw, json.dumps(data if draw(st.integers(0, 9)) else draw(json_values)))


@st.composite
def model_folders(draw) -> tuple[bytes, str]:
    good = {"model_type": "llama", "vocab_size": 500, "hidden_size": 32, "num_hidden_layers": 2}
    files = {}
    if draw(st.integers(0, 9)):
        files["config.json"] = json_bytes(draw, good)
    layout = draw(st.sampled_from(["single", "index", "none", "bin"]))
    if layout == "single":
        files["model.safetensors"] = draw(st.binary(max_size=64))
    elif layout == "bin":
        files["pytorch_model.bin"] = draw(st.binary(max_size=64))
    elif layout == "index":
        shards = {
            "weight_map": {"a.weight": "model-00001.safetensors", "b.weight": "model-00002.safetensors"}
        }
        files["model.safetensors.index.json"] = json_bytes(draw, shards)
        for name in draw(st.lists(st.sampled_from(["model-00001.safetensors", "model-00002.safetensors"]))):
            files[name] = b""
    return folder_of(files), ".model_dir.json"


@st.composite
def adapter_folders(draw) -> tuple[bytes, str]:
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    files = {}
    if draw(st.integers(0, 9)):
        files["adapter_config.json"] = json_bytes(draw, good)
    if draw(st.integers(0, 4)):
        name = draw(st.sampled_from(["adapter_model.safetensors", "adapter_model.bin"]))
        files[name] = draw(st.sampled_from([GOOD_ADAPTER, b""]) | st.binary(max_size=64))
        if draw(st.booleans()):
            files[name] = files[name][: draw(st.integers(0, len(files[name])))]
    return folder_of(files), ".adapter_dir.json"


def _safetensors_adapter() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"base_model.model.lm_head.weight": torch.zeros(3, 2), "x.lora_A.weight": torch.zeros(2, 2)})


GOOD_ADAPTER = _safetensors_adapter()


@st.composite
def tokenizer_folders(draw) -> tuple[bytes, str]:
    files = {}
    for name, good in (
        (
            "tokenizer_config.json",
            {"pad_token": "<pad>", "added_tokens_decoder": {"500": {"content": "<x>"}}},
        ),
        ("special_tokens_map.json", {"pad_token": {"content": "<unk>"}}),
    ):
        if draw(st.booleans()):
            files[name] = json_bytes(draw, good)
    return folder_of(files), ".tokenizer_dir.json"


@st.composite
def chat_files(draw) -> tuple[bytes, str]:
    raw, suffix = draw(alpaca_files())
    if draw(st.integers(0, 3)) == 0:
        return mangle(draw, "\n".join(draw(st.lists(any_text, max_size=5)))), ".txt"
    return raw, suffix


# Pre-training text: lines of a .txt file, or JSON lines of a .jsonl file, as crawls and dumps hold them.
NOT_JSON = ["{", "[", '{"text": "a"', "nan", "'text'", '{"text": "a"}{', "[" * 3000, '{"text": "a"} x']
HUGE_NUMBER = "9" * 5000  # more digits than Python turns into an int
# Text around a word: what survives cleaning is never empty.
worded = st.tuples(any_text, st.sampled_from(["hello", "你好", "世界 world", "3.14"]), any_text).map("".join)


@st.composite
def jsonl_lines(draw, damaged: bool) -> str:
    ascii_only = draw(st.booleans())
    kinds = ["text"] * 6 + ["blank", "not_json", "not_object", "no_text", "other", "huge"]
    kind = draw(st.sampled_from(kinds if damaged else ["text", "text", "text", "blank"]))
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t", "\r", "\x0c"]))
    if kind == "not_json":
        return draw(st.sampled_from(NOT_JSON) | texts)
    if kind == "not_object":
        return json.dumps(draw(json_values), ensure_ascii=ascii_only)
    if kind == "no_text":
        return json.dumps({draw(st.sampled_from(["content", "Text", "", "text "])): draw(any_text)})
    if kind == "other":
        return json.dumps({"text": draw(json_values)}, ensure_ascii=ascii_only)
    if kind == "huge":
        return draw(
            st.sampled_from(
                [f'{{"text": "a", "n": {HUGE_NUMBER}}}', f'{{"text": {HUGE_NUMBER}}}', '{"text": 1e999}']
            )
        )
    item = {"text": draw(any_text if damaged else worded | any_text)}
    if draw(st.integers(0, 4)) == 0:
        item[draw(texts)] = draw(json_values)
    return json.dumps(item, ensure_ascii=ascii_only)


@st.composite
def pretrain_files(draw) -> tuple[bytes, str]:
    """A .txt or .jsonl pre-training file, and the --block_size it is blocked with (in the suffix).
    Two files in three are damaged somewhere (a bad line, bytes, encoding); the rest are text that
    is only odd (controls, surrogate escapes, BOMs, line endings, blank lines, long lines)."""
    block_size = (
        draw(st.integers(2, 24)) if draw(st.integers(0, 9)) else draw(st.sampled_from([-1, 0, 1, 512]))
    )
    suffix = draw(st.sampled_from([".txt", ".jsonl"]))
    damaged = draw(st.integers(0, 2)) == 0
    blank = st.sampled_from(["", "  ", "\t", "\x0c", "\u3000"])
    if suffix == ".txt":
        lines = draw(st.lists(any_text | blank if damaged else worded | any_text, min_size=1, max_size=8))
    else:
        lines = draw(st.lists(jsonl_lines(damaged), min_size=1, max_size=8))
    if lines and draw(st.integers(0, 6)) == 0:
        # A very long line: a dump with no line breaks.
        lines[draw(st.integers(0, len(lines) - 1))] = draw(texts.filter(bool)) * draw(
            st.integers(2000, 20000)
        )
    newline = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    if damaged and draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(["", " ", "\n\n", " \r\n\t\n", "\ufeff", "\u3000\n"]))
    if not damaged or draw(st.integers(0, 3)):
        # A lone surrogate cannot be written in UTF-8: in a .txt file it is invalid bytes, kept now and then.
        text = re.sub("[\ud800-\udfff]", "", text)
    if not damaged:
        return (draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + text.encode()), f".b{block_size}{suffix}"
    raw = mangle(draw, text)
    if raw and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]))
            + raw[at:]
        )
    return raw, f".b{block_size}{suffix}"


# llama-sft export: a tiny good base model and LoRA (built once, see export_world), each file
# edited: keys dropped, set to odd values of the right type or to any JSON value, or the file replaced
# by damaged bytes or removed; then the flags. Saved as one JSON object (see check_export).
ODD = {
    "config.json": {
        "hidden_size": [31, 33, 0, -32, 32.0, "32", 64, True],
        "num_attention_heads": [3, 5, 0, -4, 4.0, "4", 8, 64],
        "num_key_value_heads": [None, 0, 1, 3, 4, 8, -2, 2.5, "2"],
        "head_dim": [None, 0, 7, 16, 8.0, "8"],
        "num_hidden_layers": [0, 2, -1, "1", 1.5],
        "intermediate_size": [63, 0, 128, "64"],
        "max_position_embeddings": [0, -1, 2**40, 1e9, "256", None, 2**70],
        "rms_norm_eps": [0, -1e-6, "1e-6", None, float("nan"), 1e30],
        "rope_theta": [0, -1, "1e4", None, float("inf"), 5e5],
        "rope_scaling": [None, "linear", [], [["type", "linear"]], {}, {"type": "linear"},
                         {"type": "linear", "factor": "2"}, {"type": "linear", "factor": True},
                         {"type": "linear", "factor": 0}, {"type": "linear", "factor": -2.0},
                         {"type": "linear", "factor": float("nan")}, {"type": ["linear"], "factor": 2},
                         {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": "64"},
                         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -1},
                         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                         {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "dynamic", "factor": 2.0},
                         {"rope_type": None}, {"factor": 2.0}],
        "rope_parameters": [None, "default", [], {}, {"rope_theta": "x"}, {"rope_theta": 5e5, "rope_type": "default"},
                            {"rope_type": "linear", "factor": 2.0, "rope_theta": -1},
                            {"rope_type": "yarn", "factor": 1e309}, {"rope_type": {"a": 1}}],
        "architectures": ["LlamaForCausalLM", ["LlamaForCausalLM", "X"], [], None, [["LlamaForCausalLM"]],
                          {"LlamaForCausalLM": 1}, 5, ["MistralForCausalLM"]],
        "model_type": ["mistral", None, 5, "LLAMA", ["llama"]],
        "vocab_size": [499, 501, 0, "500", 10**6],
        "attention_bias": [True, "false", 1, None],
        "mlp_bias": [True, 0],
        "tie_word_embeddings": [True, "no"],
        "torch_dtype": ["float16", "int8", 5],
    },
    "tokenizer_config.json": {
        **{
            key: ["<s>", "</s>", "<unk>", "<pad>", "<x>", "", None, 5, {"content": "<pad>"}, {"content": 5},
                  "▁the", "\ud800", "<0x41>", "{{ bos_token }}"]
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        },
        "add_bos_token": [True, False, "true", None, 1],
        "add_eos_token": [True, "x"],
        "added_tokens_decoder": [{}, {"500": {"content": "<x>"}}, {"501": {"content": "<x>"}},
                                 {"500": {"content": "<pad>"}}, {"500": "<x>"}, {"499": {"content": "<y>"}},
                                 {"600": {"content": "<x>"}}, {"-1": {"content": "<x>"}},
                                 {"500": {"content": "<x>"}, "501": {"content": "<x>"}},
                                 {"500": {"content": "<|im_end|>"}}, {"500": {"content": ""}},
                                 {"500": {"content": "\ud800"}}, [], "x"],
        "chat_template": ["{{ x", 5],
        "model_max_length": [0, -1, 1e30],
    },
    "special_tokens_map.json": {
        key: ["<s>", "</s>", "<unk>", "<pad>", "<x>", "", None, {"content": "<pad>"}, {"content": []}, "\x00"]
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
    },
    "adapter_config.json": {
        "r": [0, -1, 2.5, "2", None, 4, 10**30, True],
        "lora_alpha": [0, "8", None, float("nan"), float("inf"), -8, True, 1e308, 1e39, 1e30, 1e6],
        "use_rslora": [True, "yes", 1],
        "use_dora": [True, "false"],
        "fan_in_fan_out": [True, 1],
        "peft_type": ["LORA", "lora", "PREFIX_TUNING", None, 5],
        "alpha_pattern": [{}, {"q_proj": 16}, {"q_proj": "16"}, {"(": 2}, {"(?i)q_proj": 16}, {"q_proj": None}, [], "x", None],
        "rank_pattern": [{}, {"k_proj": 4}, {"k_proj": 0}, {"[": 2}, {"k_proj": "2"}, [], 5, None],
        "lora_bias": [True, "no"],
        "trainable_token_indices": [[1, 2], {"embed_tokens": [1]}],
        "target_modules": [[], "q_proj", None, ["x"]],
        "modules_to_save": [["embed_tokens", "lm_head"], "lm_head", 5],
    },
}  # fmt: skip
OUTTYPES = ["f16", "q8_0", "bf16", "f32"]


@st.composite
def file_edits(draw, name: str) -> dict:
    """How one JSON file of the good folder is changed: keys (mostly), bytes, or removed."""
    how = draw(st.sampled_from(["keys"] * 6 + ["raw", "remove"]))
    if how == "remove":
        return {"remove": True}
    if how == "raw":
        text = draw(
            st.sampled_from(["", "{", "[]", "null", '{"a": ' + HUGE_NUMBER + "}", "\ufeff{}"]) | texts
        )
        return {"raw": base64.b64encode(mangle(draw, text)).decode()}
    odd = ODD[name]
    edits = {"set": {}, "drop": []}
    for key in draw(st.lists(st.sampled_from(sorted(odd)), min_size=1, max_size=3, unique=True)):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            edits["drop"].append(key)
        elif choice == 1:
            edits["set"][key] = draw(json_values)
        elif choice == 2:
            edits["set"][key] = "__HUGE__"  # a number of more than 4300 digits, written in place
        else:
            edits["set"][key] = draw(st.sampled_from(odd[key]))
    return edits


EXPORT_PARTS = ["config.json", "adapter_config.json", "tokenizer_config.json", "special_tokens_map.json",
                "template", "outtype", "output", "prompt_template"]  # fmt: skip


@st.composite
def export_inputs(draw) -> tuple[bytes, str]:
    """What ``llama-sft export`` is given: the good folders with up to three parts changed (none in
    about one example of six), where the tokenizer and template lie, and the flags."""
    lora = draw(st.sampled_from([True, True, True, False]))
    changed = draw(st.lists(st.sampled_from(EXPORT_PARTS), max_size=3, unique=True))
    spec = {
        "lora": lora,
        # The tokenizer lies in the base, the LoRA or both; a damaged file is in one of them.
        "tokenizer_in": draw(st.sampled_from(["base", "both"] + (["lora"] if lora else []))),
        "damage_in": draw(st.sampled_from(["base", "lora"] if lora else ["base"])),
        "outtype": draw(st.sampled_from(OUTTYPES)),
        "output": "m.gguf",
    }
    for name in ("config.json", "adapter_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        spec[name] = draw(file_edits(name)) if name in changed else {}
    if "outtype" in changed:
        odd = st.sampled_from(["F16", "q4_0", "", "f16 ", "auto", "-f16", "f16\n"])
        spec["outtype"] = draw(odd | texts.map(lambda t: t.replace("\x00", "")))
    if "output" in changed:
        spec["output"] = draw(
            st.sampled_from(["m.GGUF", "m", "missing/m.gguf", ".gguf", "m.gguf.gguf", "m .gguf"])
        )
    # template.json: the good one with the LoRA, none, or a damaged one in the base or the LoRA.
    spec["template"] = {"where": "lora" if lora else "none"}
    if "template" in changed:
        spec["template"]["where"] = draw(
            st.sampled_from(["lora", "none", "base"] if lora else ["none", "base"])
        )
        if spec["template"]["where"] != "none":
            spec["template"]["raw"] = base64.b64encode(draw(template_files())[0]).decode()
    if "prompt_template" in changed:
        names = ["alpaca", "llama2-chat", "chatml", "llama3", "nope", "{root}/base/template.json", ""]
        spec["prompt_template"] = draw(st.sampled_from(names) | texts.map(lambda t: t.replace("\x00", "")))
    return json.dumps(spec).encode(), ".export.json"


# ---------------------------------------------------------------------------------------------
# The checks: one per surface, given the saved file. They run the real readers.


def one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"


def expect(call: Callable[[], object], errors: tuple[type[BaseException], ...]) -> object | None:
    """The contract: the call works (its result is returned) or raises one of ``errors`` in one line."""
    try:
        return call()
    except errors as exc:
        one_line(exc)
        return None


def check_records(path: Path, tokenizer: TextTokenizer) -> None:
    loaded = expect(lambda: load_records(path), (DataError,))
    if loaded:
        # What passed validation must encode: the lone-surrogate crash happened here.
        encode_records(loaded, load_template("alpaca"), tokenizer, 64)


def check_conversations(path: Path, tokenizer: TextTokenizer) -> None:
    loaded = expect(lambda: load_records(path), (DataError,))
    if loaded:
        # Whatever passed validation encodes with every built-in template the tokenizer can serve,
        # at a length that cuts some conversations short.
        for name in ("alpaca", "llama2-chat"):
            for train_on in ("all", "last"):
                encode_records(loaded, load_template(name), tokenizer, 48, train_on_turns=train_on)


def check_template(path: Path, tokenizer: TextTokenizer) -> None:
    template = expect(lambda: load_template(path), (TemplateError,))
    if template is not None:
        tokenizer.encode(template.render("指令"))
        if template.followup_prompt is not None:
            tokenizer.encode(template.render_followup("指令"))
            # A whole conversation renders, or the template's end-of-turn token is refused in one line.
            expect(lambda: prompt_ids(template, tokenizer, "指令", [("问", "答")], "系统"), (TemplateError,))


def run_parser(argv: list[str]) -> None:
    """The parse as ``llama-sft train`` makes it: an argparse error must be one line, exit 2."""
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            expect(lambda: parse_train_args(argv, Machine.detect()), (ArgumentError,))
    except SystemExit as exit_:
        # The whole message on the last line (a library may have logged something before it).
        last = err.getvalue().strip().splitlines()[-1]
        assert exit_.code == 2 and last.startswith("error: ") and last.endswith("every flag)"), err.getvalue()


def check_flags(path: Path, tokenizer: TextTokenizer) -> None:
    argv = json.loads(path.read_text())
    run_parser(["--model_name_or_path", "m", "--output_dir", str(path.parent / "out"), *argv])


def check_config(path: Path, tokenizer: TextTokenizer) -> None:
    run_parser(["--config", str(path), "--model_name_or_path", "m", "--output_dir", "o"])


def unpack(path: Path) -> Path:
    folder = path.with_suffix("").with_suffix("")
    folder = folder.parent / (folder.name + "_unpacked")
    folder.mkdir(exist_ok=True)
    for name, data in json.loads(path.read_text()).items():
        (folder / name).write_bytes(base64.b64decode(data))
    return folder


def check_model_folder(path: Path, tokenizer: TextTokenizer) -> None:
    expect(lambda: check_model_dir(unpack(path)), (ModelError,))


def check_adapter_folder(path: Path, tokenizer: TextTokenizer) -> None:
    folder = unpack(path)
    if expect(lambda: check_adapter_dir(folder), (ModelError,)) is not None:
        expect(lambda: adapter_vocab_rows(folder), (ModelError,))


def check_tokenizer_folder(path: Path, tokenizer: TextTokenizer) -> None:
    folder = unpack(path)
    (folder / "tokenizer.model").write_bytes((tokenizer.directory / "tokenizer.model").read_bytes())
    loaded = expect(lambda: TextTokenizer.load(folder), (TokenizerError,))
    if loaded is not None:
        assert loaded.pad_id != loaded.eos_id
        loaded.encode("你好 world")


def check_chat_file(path: Path, tokenizer: TextTokenizer) -> None:
    items = expect(lambda: read_instructions(path), (ChatError,))
    for item in items or []:
        tokenizer.encode(load_template("alpaca").render(f"{item['instruction']}\n{item['input']}"))


def check_pretrain(path: Path, tokenizer: TextTokenizer) -> None:
    """find_text_files and build_blocks on the file: whole blocks that agree with the report, or a
    DataError; the cache holds no temporary file either way, and a second build maps the cached blocks."""
    given = re.search(r"\.b(-?\d+)\.\w+$", path.name)
    block_size = int(given[1]) if given else 4  # the hand-made files of bad_inputs/pretrain name none
    expect(lambda: check_block_size(block_size, 16), (DataError,))
    files = expect(lambda: find_text_files(path), (DataError,))
    assert files == [path]
    cache = path.parent / "cache"
    results = []
    for cache_dir in (None, cache, cache):
        built = expect(
            lambda d=cache_dir: build_blocks(files, tokenizer, block_size, d, num_workers=1), (DataError,)
        )
        if cache.is_dir():
            assert not [p.name for p in cache.iterdir() if ".tmp" in p.name], list(cache.iterdir())
        if built is None:
            assert not results, "a file built once must build again"
            assert not cache.is_dir() or not list(cache.glob("*.tokens")), "an error left blocks behind"
            continue
        dataset, stats, cached = built
        assert cached == (cache_dir is not None and len(results) == 2)
        assert (stats.files, stats.block_size) == (1, block_size)
        assert stats.blocks == stats.tokens // block_size == len(dataset) >= 1
        assert stats.dropped_tokens == stats.tokens - stats.blocks * block_size
        assert stats.tokens >= stats.documents >= 1
        tokens = np.asarray(dataset.tokens)
        assert len(tokens) == stats.blocks * block_size == dataset.num_tokens()
        assert int(tokens.max()) < len(tokenizer) and int(tokens.min()) >= 0
        # One EOS a document: those of the dropped tail are missing.
        eos = int((tokens == tokenizer.eos_id).sum())
        assert stats.documents - stats.dropped_tokens <= eos <= stats.documents
        last = dataset[len(dataset) - 1]
        assert len(last["input_ids"]) == block_size and last["labels"] == last["input_ids"]
        with pytest.raises(IndexError):
            dataset[len(dataset)]
        for share in (0.1, 10, 99):
            # The held-out split: the whole's blocks, none twice, training keeps at least one.
            kept, held = dataset.split(share)
            picked = np.concatenate([kept.blocks, held.blocks]) if held is not None else np.arange(len(kept))
            assert len(kept) >= 1 and sorted(picked.tolist()) == list(range(len(dataset)))
            assert kept[len(kept) - 1]["input_ids"] == dataset[int(picked[len(kept) - 1])]["input_ids"]
        results.append((stats, tokens.tobytes()))
    assert all(result == results[0] for result in results)


_WORLD: dict[Path, Path] = {}


def export_world(tokenizer: TextTokenizer) -> Path:
    """A good base (1 layer, 4 heads over 2 key/value heads) with the tokenizer, and a LoRA of q/k/v
    with template.json, as train saves it; built once a session."""
    if tokenizer.directory not in _WORLD:
        import torch
        from lora_helpers import write_base
        from safetensors.torch import save_file

        root = tokenizer.directory.parent / "export_world"
        write_base(root / "base", vocab=len(tokenizer), hidden=32, layers=1, heads=4, kv_heads=2)
        tokenizer.save(root / "base")
        generator = torch.Generator().manual_seed(0)
        lora = {}
        for name, rows in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
            key = f"base_model.model.model.layers.0.self_attn.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=generator) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(rows, 2, generator=generator) * 0.1
        (root / "lora").mkdir()
        save_file(lora, str(root / "lora" / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                  "target_modules": ["q_proj", "k_proj", "v_proj"], "fan_in_fan_out": False, "bias": "none",
                  "use_rslora": False, "use_dora": False, "alpha_pattern": {}, "rank_pattern": {},
                  "modules_to_save": None, "lora_bias": False, "trainable_token_indices": None}  # fmt: skip
        (root / "lora" / "adapter_config.json").write_text(json.dumps(config))
        load_template("alpaca").save(root / "lora")
        _WORLD[tokenizer.directory] = root
    return _WORLD[tokenizer.directory]


def apply_edits(path: Path, edits: dict) -> None:
    if edits.get("remove"):
        path.unlink(missing_ok=True)
    elif "raw" in edits:
        path.write_bytes(base64.b64decode(edits["raw"]))
    elif edits:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        for key in edits["drop"]:
            data.pop(key, None)
        data.update(edits["set"])
        path.write_text(json.dumps(data).replace('"__HUGE__"', HUGE_NUMBER), encoding="utf-8")


def gguf_problems(path: Path) -> list[str]:
    """What llama.cpp's loader would refuse in a GGUF of the LLaMA graph: sizes that disagree with the
    tensors, ids outside the vocabulary, values out of range; and weights that are not finite."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), t) for t in reader.tensors}
    if meta.get("general.architecture") != "llama":
        return [f"architecture {meta.get('general.architecture')!r}"]
    problems = []

    def key(name, default=None):
        return meta.get(f"llama.{name}", default)

    layers, embd, ff = key("block_count"), key("embedding_length"), key("feed_forward_length")
    heads, kv_heads = key("attention.head_count"), key("attention.head_count_kv")
    if not all(isinstance(v, int) and v > 0 for v in (layers, embd, ff, heads, kv_heads)):
        return [f"sizes {layers, embd, ff, heads, kv_heads}"]
    head_k = key("attention.key_length", embd // heads)
    head_v = key("attention.value_length", embd // heads)
    if heads % kv_heads:
        problems.append(f"{heads} heads over {kv_heads} key/value heads")
    if key("rope.dimension_count", head_k) != head_k:
        problems.append(f"rope dimensions {key('rope.dimension_count')} != head size {head_k}")
    if not (isinstance(key("context_length"), int) and key("context_length") > 0):
        problems.append(f"context length {key('context_length')!r}")
    for name in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"):
        value = key(name, 1.0)
        if not (np.isfinite(value) and value > 0):
            problems.append(f"{name} {value!r}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = key("vocab_size", len(tokens))
    if not (
        len(tokens)
        == vocab
        == len(meta.get("tokenizer.ggml.scores") or [])
        == len(meta.get("tokenizer.ggml.token_type") or [])
    ):
        problems.append(f"{len(tokens)} tokens, vocab_size {vocab}")
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            problems.append(f"{name} id {token_id} of {len(tokens)} tokens")
    expected = {
        "token_embd.weight": (vocab, embd),
        "output_norm.weight": (embd,),
        "output.weight": (vocab, embd),
    }
    for i in range(layers):
        expected |= {
            f"blk.{i}.attn_norm.weight": (embd,),
            f"blk.{i}.attn_q.weight": (heads * head_k, embd),
            f"blk.{i}.attn_k.weight": (kv_heads * head_k, embd),
            f"blk.{i}.attn_v.weight": (kv_heads * head_v, embd),
            f"blk.{i}.attn_output.weight": (embd, heads * head_v),
            f"blk.{i}.ffn_norm.weight": (embd,),
            f"blk.{i}.ffn_gate.weight": (ff, embd),
            f"blk.{i}.ffn_up.weight": (ff, embd),
            f"blk.{i}.ffn_down.weight": (embd, ff),
        }
    if "output.weight" not in tensors:
        del expected["output.weight"]  # tied to the embedding
    if set(tensors) != set(expected):
        problems.append(f"tensors {sorted(set(tensors) ^ set(expected))[:4]} missing or extra")
    for name, (shape, tensor) in tensors.items():
        if name in expected and shape != expected[name]:
            problems.append(f"{name} has shape {shape}, expected {expected[name]}")
        floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        if tensor.tensor_type in floats and not np.isfinite(tensor.data).all():
            problems.append(f"{name} is not finite")
    return problems


def check_export(path: Path, tokenizer: TextTokenizer) -> None:
    """``llama-sft export`` on the edited folders: a GGUF that llama.cpp's loader takes (and its
    Modelfile), or exit 2 with one ``error:`` line and nothing written in the output folder."""
    spec = json.loads(path.read_text())
    world, root = export_world(tokenizer), path.parent / "export"
    base, lora, out = root / "base", root / "lora", root / "out"
    shutil.copytree(world / "base", base)
    shutil.copytree(world / "lora", lora)
    out.mkdir()
    if spec["tokenizer_in"] != "base":
        tokenizer.save(lora)
    if spec["tokenizer_in"] == "lora":
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            (base / name).unlink()
    apply_edits(base / "config.json", spec["config.json"])
    apply_edits(lora / "adapter_config.json", spec["adapter_config.json"])
    damaged = base if spec["damage_in"] == "base" else lora
    if (damaged / "tokenizer.model").is_file():
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            apply_edits(damaged / name, spec[name])
    template = spec["template"]
    if template["where"] != "lora":
        (lora / "template.json").unlink()
    if "raw" in template:
        (root / template["where"] / "template.json").write_bytes(base64.b64decode(template["raw"]))
    argv = ["export", "--base_model", str(base), "--output_file", str(out / spec["output"])]
    argv.append(f"--outtype={spec['outtype']}")
    if spec["lora"]:
        argv += ["--lora_model", str(lora)]
    if "prompt_template" in spec:
        argv.append(f"--prompt_template={spec['prompt_template'].replace('{root}', str(root))}")
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        main(argv)
        raise SystemExit(0)
    assert "Traceback" not in err.getvalue()
    if exit_.value.code != 0:
        assert exit_.value.code == 2, err.getvalue()[-2000:]
        lines = err.getvalue().strip().splitlines()
        assert lines[-1].startswith("error: ") and lines[-1].strip() != "error:", lines
        assert sorted(out.rglob("*")) == [], "a failed export left files behind"
        return
    written = out / spec["output"]
    assert sorted(p.name for p in out.iterdir()) == sorted([written.name, f"{written.stem}.Modelfile"])
    problems = gguf_problems(written)
    assert not problems, problems
    assert (
        (out / f"{written.stem}.Modelfile").read_text(encoding="utf-8").startswith(f"FROM ./{written.name}\n")
    )


# The input: a JSON escape of half an emoji, as crawled data holds it.
LONE_SURROGATE = (b'[{"instruction": "a\\ud800b", "output": "x\\udc80"}]', ".json")
NUL_RECORD = (b'[{"instruction": "a\\u0000b", "output": "x"}]', ".json")
# An integer of more than 4300 digits: valid JSON that Python's json refuses with a plain ValueError.
HUGE_RECORD = (b'[{"instruction": "a", "output": "x", "n": ' + HUGE_NUMBER.encode() + b"}]", ".json")


def export_case(**spec) -> tuple[bytes, str]:
    """An export input: the good folders with ``spec``'s changes."""
    good = {"lora": True, "tokenizer_in": "base", "damage_in": "base", "outtype": "f16", "output": "m.gguf",
            "template": {"where": "lora"}, "config.json": {}, "adapter_config.json": {},
            "tokenizer_config.json": {}, "special_tokens_map.json": {}}  # fmt: skip
    return json.dumps(good | spec).encode(), ".export.json"


# What the export surface found on its first runs (see docs/reliability.md).
EXPORT_FOUND = (
    export_case(**{"config.json": {"set": {}, "drop": ["num_hidden_layers"]}}),
    export_case(**{"config.json": {"set": {"num_attention_heads": []}, "drop": []}}),
    export_case(**{"config.json": {"set": {"architectures": [["LlamaForCausalLM"]]}, "drop": []}}),
    export_case(**{"config.json": {"set": {"num_hidden_layers": 2}, "drop": []}}),
    export_case(
        **{"config.json": {"set": {"rope_scaling": "linear", "max_position_embeddings": 2**40}, "drop": []}}
    ),
    export_case(**{"adapter_config.json": {"set": {"r": "2"}, "drop": []}}),
    export_case(**{"adapter_config.json": {"set": {"alpha_pattern": {"(": 2}}, "drop": []}}),
    export_case(**{"special_tokens_map.json": {"set": {"bos_token": "__HUGE__"}, "drop": []}}),
)


@dataclass(frozen=True)
class Surface:
    draw: st.SearchStrategy  # -> (bytes, suffix)
    check: Callable[[Path, TextTokenizer], None]
    examples: int  # per `make test` run
    known: tuple = ()  # inputs always tried first: (bytes, suffix)


SURFACES = {
    "records": Surface(alpaca_files(), check_records, 400, (LONE_SURROGATE, NUL_RECORD, HUGE_RECORD)),
    "template": Surface(
        template_files(), check_template, 200, ((b'{"prompt": "\\ud800 {instruction}"}', ".json"),)
    ),
    "flags": Surface(flag_lists(), check_flags, 150),
    "config": Surface(yaml_configs(), check_config, 100),
    "model_dir": Surface(model_folders(), check_model_folder, 200),
    "adapter_dir": Surface(adapter_folders(), check_adapter_folder, 200),
    "tokenizer_dir": Surface(tokenizer_folders(), check_tokenizer_folder, 100),
    "chat_data": Surface(chat_files(), check_chat_file, 200, (LONE_SURROGATE, NUL_RECORD, HUGE_RECORD)),
    "conversations": Surface(
        conversation_files(),
        check_conversations,
        300,
        (
            (
                b'[{"conversations": [{"from": "human", "value": "a\\ud800"}, {"from": "gpt", "value": "b"}]}]',
                ".json",
            ),
        ),
    ),
    "export": Surface(export_inputs(), check_export, 100, EXPORT_FOUND),
    "pretrain_text": Surface(
        pretrain_files(),
        check_pretrain,
        150,
        (
            (b"a\xed\xa0\x80b\n", ".b2.txt"),
            (b'{"text": "a\\ud800b"}\n{"text": "c", "n": ' + HUGE_NUMBER.encode() + b"}\n", ".b2.jsonl"),
        ),
    ),
}


def save_found(surface: str, raw: bytes, suffix: str) -> Path:
    FOUND.mkdir(exist_ok=True)
    path = FOUND / f"{surface}-{hashlib.sha256(raw).hexdigest()[:12]}{suffix}"
    path.write_bytes(raw)
    print(f"\nsaved the failing input as {path}", file=sys.__stderr__)
    return path


def run_surface(name: str, raw: bytes, suffix: str, tmp: Path, tokenizer: TextTokenizer) -> None:
    case = tmp / f"case{suffix}"
    case.write_bytes(raw)
    try:
        SURFACES[name].check(case, tokenizer)
    except BaseException:
        if FUZZING and current_build_context().is_final:
            save_found(name, raw, suffix)
        raise


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_surface(name, tokenizer, tmp_path_factory):
    surface = SURFACES[name]
    examples = PROFILE.max_examples if FUZZING else surface.examples

    runs = []

    def holds(drawn):
        raw, suffix = drawn
        runs.append(suffix)
        run_surface(name, raw, suffix, tmp_path_factory.mktemp(name, numbered=True), tokenizer)

    for known in surface.known:
        holds = example(known)(holds)
    settings(PROFILE, max_examples=examples)(given(surface.draw)(holds))()
    print(f"fuzzed {name}: {len(runs)} examples", file=sys.__stderr__)
    assert len(runs) >= min(examples, 50)


def replay_cases() -> list[tuple[str, Path]]:
    found = [(p.name.split("-")[0], p) for p in sorted(FOUND.glob("*-*"))] if FOUND.is_dir() else []
    made = [("records", p) for p in sorted(CORPUS.glob("*.json*"))]
    made += [("pretrain_text", p) for p in sorted((CORPUS / "pretrain").glob("*"))]
    return found + made


@pytest.mark.parametrize(("surface", "path"), replay_cases(), ids=[p.name for _, p in replay_cases()])
def test_replay(surface, path, tokenizer, tmp_path):
    """Every saved or hand-made bad input still meets the contract."""
    case = tmp_path / path.name
    case.write_bytes(path.read_bytes())
    SURFACES[surface].check(case, tokenizer)


# ---------------------------------------------------------------------------------------------
# The CLI itself, for a sample: one line, exit 2, output_dir untouched.


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory, model_dir, tokenizer_dir):
    root = tmp_path_factory.mktemp("cli")
    write_json(root / "data" / "eval.json", SMALL_RECORDS[:4])
    (root / "out").mkdir()
    (root / "out" / "kept.txt").write_text("a file from an earlier run")
    return root, model_dir, tokenizer_dir


@settings(PROFILE, max_examples=PROFILE.max_examples // 20 if FUZZING else 12)
@given(alpaca_files())
@example(LONE_SURROGATE)
@example(NUL_RECORD)
def test_cli_train_sample(cli_world, drawn):
    root, model_dir, tokenizer_dir = cli_world
    raw, suffix = drawn
    train_dir = root / "data" / "train"
    train_dir.mkdir(exist_ok=True)
    for old in train_dir.iterdir():
        old.unlink()
    (train_dir / f"part{suffix}").write_bytes(raw)
    before = snapshot(root / "out")
    argv = train_argv(model_dir, tokenizer_dir, root / "data", root / "out", overwrite_output_dir=True)
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        main(["train", *argv, "--dry_run"])
        raise SystemExit(0)  # --dry_run returns after its report
    if exit_.value.code != 0:
        assert exit_.value.code == 2, err.getvalue()[-2000:]
        last = err.getvalue().strip().splitlines()[-1]
        assert last.startswith("error: ") and f"part{suffix}" in last, last
    assert "Traceback" not in err.getvalue()
    assert snapshot(root / "out") == before


def test_cli_cleans_and_counts(cli_world, caplog):
    """The issue's record trains (here: --dry_run encodes it) with one warning counting the records."""
    root, model_dir, tokenizer_dir = cli_world
    train_dir = root / "data" / "train"
    train_dir.mkdir(exist_ok=True)
    for old in train_dir.iterdir():
        old.unlink()
    records = [
        {"instruction": "a\ud800b", "output": "x"},
        {"instruction": "ok", "output": "y\x1b[0m"},
    ] + SMALL_RECORDS
    (train_dir / "crawl.json").write_text(json.dumps(records), encoding="utf-8")
    argv = train_argv(model_dir, tokenizer_dir, root / "data", root / "out", overwrite_output_dir=True)
    with redirect_stdout(io.StringIO()):
        main(["train", *argv, "--dry_run"])
    warnings = [
        r.getMessage() for r in caplog.records if "lone surrogates or control characters" in r.getMessage()
    ]
    assert warnings == [
        f"{train_dir / 'crawl.json'}: removed lone surrogates or control characters from 2 record(s) "
        "(record 0, record 1); see the Data section of the README"
    ]
