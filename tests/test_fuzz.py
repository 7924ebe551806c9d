"""Property-based fuzzing of every reader of user input, through the real entry points.

The contract, the same for every surface: an input works, or raises the project's input-error type
with a one-line message; the CLI turns that into ``error: ...`` on stderr, exit code 2, and
``output_dir`` untouched. Any other exception is a defect.

A surface is three things: a Hypothesis strategy that draws the input as bytes (``SURFACES``'s
``draw``), the file suffix it is saved with, and a ``check(path)`` that feeds the saved file to the
real reader and asserts the contract. Adding a surface (conversations, pre-training text, the
server's request bodies) is adding one entry to ``SURFACES``.

``make test`` runs the ``ci`` profile: derandomized (a fixed seed), a bounded number of examples per
surface. ``make fuzz`` runs the ``fuzz`` profile (``LLAMA_SFT_FUZZ=1``): random seeds, many examples,
no deadline; a failing example, once shrunk, is saved as ``tests/bad_inputs/found/SURFACE-HASH.EXT``
and its path printed. ``test_replay`` runs every saved file through its surface's check again, and
every hand-made file of ``tests/bad_inputs/`` through the records check.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SMALL_RECORDS, train_argv, write_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context

from llama_sft.checks import ModelError, adapter_vocab_rows, check_adapter_dir, check_model_dir
from llama_sft.cli import main
from llama_sft.data.encode import encode_records
from llama_sft.data.records import DataError, load_records
from llama_sft.data.templates import TemplateError, load_template, prompt_ids
from llama_sft.data.tokenizer import TextTokenizer, TokenizerError
from llama_sft.tools.chat import ChatError, read_instructions
from llama_sft.training.args import ArgumentError
from llama_sft.training.run import parse_for_this_machine

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
    """parse_for_this_machine as ``llama-sft train`` calls it: an argparse error must be one line, exit 2."""
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            expect(lambda: parse_for_this_machine(argv), (ArgumentError,))
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


# The input: a JSON escape of half an emoji, as crawled data holds it.
LONE_SURROGATE = (b'[{"instruction": "a\\ud800b", "output": "x\\udc80"}]', ".json")
NUL_RECORD = (b'[{"instruction": "a\\u0000b", "output": "x"}]', ".json")


@dataclass(frozen=True)
class Surface:
    draw: st.SearchStrategy  # -> (bytes, suffix)
    check: Callable[[Path, TextTokenizer], None]
    examples: int  # per `make test` run
    known: tuple = ()  # inputs always tried first: (bytes, suffix)


SURFACES = {
    "records": Surface(alpaca_files(), check_records, 400, (LONE_SURROGATE, NUL_RECORD)),
    "template": Surface(
        template_files(), check_template, 200, ((b'{"prompt": "\\ud800 {instruction}"}', ".json"),)
    ),
    "flags": Surface(flag_lists(), check_flags, 150),
    "config": Surface(yaml_configs(), check_config, 100),
    "model_dir": Surface(model_folders(), check_model_folder, 200),
    "adapter_dir": Surface(adapter_folders(), check_adapter_folder, 200),
    "tokenizer_dir": Surface(tokenizer_folders(), check_tokenizer_folder, 100),
    "chat_data": Surface(chat_files(), check_chat_file, 200, (LONE_SURROGATE, NUL_RECORD)),
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
