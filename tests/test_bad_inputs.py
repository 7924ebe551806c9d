"""The bad-input corpus: every case fails fast with one line naming the file/record/flag and the fix,
exit code 2, no traceback, and the output_dir exactly as it was (with or without --overwrite_output_dir)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import train_argv
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llama_sft.cli import main
from llama_sft.tools.demo import make_model
from llama_sft.training.run import train

CORPUS = Path(__file__).parent / "bad_inputs"


@dataclass
class World:
    """Everything a case may break, freshly copied for each case."""

    root: Path
    model: Path
    tokenizer: Path
    data: Path
    out: Path
    flags: dict


USED_FILES = set()


def put_in_dataset(name: str):
    USED_FILES.add(name)

    def setup(w: World):
        for path in (w.data / "train").iterdir():
            path.unlink()
        shutil.copyfile(CORPUS / name, w.data / "train" / name)

    return setup


def put_in_validation(name: str):
    USED_FILES.add(name)

    def setup(w: World):
        shutil.copyfile(CORPUS / name, w.root / name)
        w.flags["validation_file"] = w.root / name

    return setup


def flags(**values):
    def setup(w: World):
        w.flags.update(values)

    return setup


def huge_record(w: World):
    for path in (w.data / "train").iterdir():
        path.unlink()
    record = {"instruction": "Summarize: " + "很长的文本。" * 580_000, "input": "", "output": "短"}
    (w.data / "train" / "huge.json").write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    assert (w.data / "train" / "huge.json").stat().st_size > 10_000_000


def tokenizer_without_model_file(w: World):
    (w.tokenizer / "tokenizer.model").unlink()


def tokenizer_not_sentencepiece(w: World):
    (w.tokenizer / "tokenizer.model").write_bytes(b"<html>404 Not Found</html>")


def tokenizer_smaller_than_model(w: World):
    shutil.rmtree(w.model)
    make_model(w.model, 32000, hidden=16, layers=1, heads=2, intermediate=32)


def model_without_weights(w: World):
    (w.model / "model.safetensors").unlink()


def model_without_config(w: World):
    (w.model / "config.json").unlink()


def adapter_from_other_base(w: World):
    w.flags["peft_path"] = w.root / "adapter_other_base"


def adapter_not_lora(w: World):
    folder = w.root / "prefix"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8})
    )
    w.flags["peft_path"] = folder


def adapter_without_config(w: World):
    (w.root / "empty_adapter").mkdir()
    w.flags["peft_path"] = w.root / "empty_adapter"


def deepspeed_not_json(w: World):
    (w.root / "ds.json").write_text("stage: 2\n")
    w.flags["deepspeed"] = w.root / "ds.json"


def kbit_with_zero3(w: World):
    (w.root / "ds3.json").write_text('{"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}')
    w.flags.update(load_in_kbits=4, deepspeed=w.root / "ds3.json")


def output_dir_is_a_file(w: World):
    w.out = w.root / "out_file"
    w.out.write_text("I am a file")
    w.flags["output_dir"] = w.out


def unwritable_output_dir(w: World):
    w.out = Path("/proc/llama-sft-output")
    w.flags["output_dir"] = w.out


def config_not_a_mapping(w: World):
    (w.root / "run.yaml").write_text("- lora_rank\n- 8\n")
    w.flags["config"] = w.root / "run.yaml"


def empty_dataset_dir(w: World):
    for path in (w.data / "train").iterdir():
        path.unlink()


# (name, setup, fragments the one-line message must contain)
CASES = [
    (
        "conversation file mixing formats",
        put_in_dataset("conversation_mixed_formats.jsonl"),
        [
            "conversation_mixed_formats.jsonl, record 1: the record is OpenAI messages but record 0 is ShareGPT"
        ],
    ),
    (
        "conversation with an unknown role",
        put_in_dataset("conversation_unknown_role.json"),
        ["conversation_unknown_role.json, record 1, turn 1: unknown 'from' 'function_call'"],
    ),
    (
        "conversation opening with the assistant",
        put_in_dataset("conversation_assistant_first.json"),
        [
            "conversation_assistant_first.json, record 0, turn 0: the conversation opens with an assistant turn"
        ],
    ),
    (
        "conversation with two user turns running",
        put_in_validation("conversation_two_user_turns.jsonl"),
        ["conversation_two_user_turns.jsonl, record 1, turn 1: two user turns running"],
    ),
    (
        "conversation with a late system turn",
        put_in_dataset("conversation_late_system.json"),
        ["conversation_late_system.json, record 0, turn 2: a system turn after the first turn"],
    ),
    (
        "conversation with an empty answer",
        put_in_dataset("conversation_empty_content.json"),
        ["conversation_empty_content.json, record 0, turn 1: 'value' is empty"],
    ),
    (
        "conversation content not a string",
        put_in_dataset("conversation_content_not_string.json"),
        ["conversation_content_not_string.json, record 0, turn 0: 'content' must be a string, found a list"],
    ),
    (
        "conversation without an assistant turn",
        put_in_dataset("conversation_no_assistant.json"),
        ["conversation_no_assistant.json, record 1: the conversation has no assistant turn"],
    ),
    (
        "history not pairs",
        put_in_dataset("history_not_pairs.json"),
        ["history_not_pairs.json, record 0, history turn 1: expected a [user, assistant] pair"],
    ),
    ("truncated JSON", put_in_dataset("truncated.json"), ["truncated.json: invalid JSON at line 2"]),
    ("object instead of list", put_in_dataset("object_not_list.json"), ["object_not_list.json", "JSON list"]),
    (
        "list for output",
        put_in_dataset("output_is_list.json"),
        ["record 1: 'output' must be a string, found list"],
    ),
    (
        "empty strings everywhere",
        put_in_dataset("empty_strings.json"),
        ["empty_strings.json, record 0", "both empty"],
    ),
    ("invalid UTF-8", put_in_dataset("invalid_utf8.json"), ["invalid_utf8.json: not valid UTF-8", "re-save"]),
    (
        "duplicate keys",
        put_in_dataset("duplicate_keys.json"),
        ["duplicate_keys.json, record", "'output' appears twice"],
    ),
    ("record not an object", put_in_dataset("record_not_object.json"), ["record_not_object.json, record 2"]),
    (
        "missing output",
        put_in_dataset("missing_output.json"),
        ["missing_output.json, record 0: missing 'output'"],
    ),
    ("null output", put_in_dataset("null_output.json"), ["null_output.json, record 0: 'output' is null"]),
    (
        "number instruction",
        put_in_dataset("number_instruction.json"),
        ["'instruction' must be a string, found int"],
    ),
    ("empty list", put_in_dataset("empty_list.json"), ["empty_list.json: the file holds no records"]),
    ("empty file", put_in_dataset("empty_file.json"), ["empty_file.json: invalid JSON at line 1"]),
    ("CSV saved as .json", put_in_dataset("csv_saved_as.json"), ["csv_saved_as.json: invalid JSON"]),
    ("bad JSON Lines line", put_in_dataset("bad_line.jsonl"), ["bad_line.jsonl, line 3: invalid JSON"]),
    (
        "prompts fill the length (found by make fuzz)",
        put_in_dataset("prompt_fills_max_seq_length.jsonl"),
        ["prompt_fills_max_seq_length.jsonl: every training record's prompt fills --max_seq_length 128"],
    ),
    ("bad validation file", put_in_validation("output_is_list.json"), ["output_is_list.json, record 1"]),
    (
        "10 MB single record",
        huge_record,
        ["huge.json: every training record's prompt fills", "raise --max_seq"],
    ),
    ("empty dataset dir", empty_dataset_dir, ["no *.json or *.jsonl files in --dataset_dir"]),
    (
        "missing dataset dir",
        flags(dataset_dir="/nonexistent/data"),
        ["/nonexistent/data: --dataset_dir does not exist"],
    ),
    (
        "missing validation file",
        flags(validation_file="/nonexistent/dev.json"),
        ["/nonexistent/dev.json: file not found"],
    ),
    ("tokenizer without model file", tokenizer_without_model_file, ["no tokenizer.model or tokenizer.json"]),
    (
        "tokenizer not SentencePiece",
        tokenizer_not_sentencepiece,
        ["tokenizer.model: not a SentencePiece model"],
    ),
    (
        "missing tokenizer folder",
        flags(tokenizer_name_or_path="/nonexistent/tok"),
        ["/nonexistent/tok: tokenizer folder"],
    ),
    (
        "tokenizer smaller than model",
        tokenizer_smaller_than_model,
        ["32000 embedding rows", "tokenizer that came with"],
    ),
    ("model without weights", model_without_weights, ["no weights", "Hugging Face format"]),
    ("model without config", model_without_config, ["no config.json"]),
    (
        "missing model folder",
        flags(model_name_or_path="/nonexistent/model"),
        ["--model_name_or_path is not a folder"],
    ),
    ("adapter from another base", adapter_from_other_base, ["does not fit this base model", "another base"]),
    ("adapter that is not a LoRA", adapter_not_lora, ["'PREFIX_TUNING' adapter, not a LoRA"]),
    ("adapter without config", adapter_without_config, ["--peft_path has no adapter_config.json"]),
    ("max_seq_length below the template", flags(max_seq_length=16), ["--max_seq_length 16 is too small"]),
    ("lora_rank 0", flags(lora_rank=0), ["--lora_rank 0", "positive"]),
    ("lora_dropout 1.5", flags(lora_dropout=1.5), ["--lora_dropout 1.5"]),
    (
        "unknown trainable module",
        flags(trainable="q_proj,qkv_proj"),
        ["--trainable names qkv_proj", "choose from"],
    ),
    (
        "modules_to_save missing",
        flags(modules_to_save="embed_tokens,output"),
        ["--modules_to_save names output"],
    ),
    ("deepspeed config not JSON", deepspeed_not_json, ["ds.json: --deepspeed config is not valid JSON"]),
    (
        "missing deepspeed config",
        flags(deepspeed="/nonexistent/ds.json"),
        ["--deepspeed config file not found"],
    ),
    ("output_dir is a file", output_dir_is_a_file, ["out_file: --output_dir is a file"]),
    (
        "unwritable output_dir",
        unwritable_output_dir,
        ["/proc/llama-sft-output: --output_dir is not writable"],
    ),
    ("unknown flag", flags(lora_rnak=8), ["unrecognized", "--lora_rnak"]),
    ("bad torch_dtype", flags(torch_dtype="fp8"), ["--torch_dtype", "invalid choice"]),
    ("unknown template", flags(prompt_template="vicuna"), ["unknown prompt template 'vicuna'", "alpaca"]),
    (
        "eval without validation data",
        flags(validation_file=None, validation_split_percentage=0),
        ["no validation data"],
    ),
    ("config not a mapping", config_not_a_mapping, ["run.yaml: a --config file is a mapping"]),
    (
        "missing resume checkpoint",
        flags(resume_from_checkpoint="/nonexistent/ckpt"),
        ["--resume_from_checkpoint"],
    ),
    ("3-bit base weights", flags(load_in_kbits=3), ["--load_in_kbits 3: supported are 4", "8 (LLM.int8)"]),
    (
        "k-bit with full fine-tuning",
        flags(load_in_kbits=8, full_finetuning=True),
        ["--load_in_kbits 8 with --full_finetuning", "--load_in_kbits 16 for full fine-tuning"],
    ),
    (
        "k-bit with ZeRO-3",
        kbit_with_zero3,
        ["--load_in_kbits 4 with DeepSpeed ZeRO-3", "ds_zero2_no_offload"],
    ),
    (
        "full fine-tuning continuing a LoRA",
        flags(full_finetuning=True, peft_path="/nonexistent/lora"),
        ["--full_finetuning with --peft_path", "merge it first"],
    ),
]


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir, tokenizer_dir):
    """A real finished run: the output_dir every case must leave exactly as it is."""
    from conftest import SMALL_RECORDS, write_json

    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    write_json(data / "train" / "a.json", SMALL_RECORDS)
    write_json(data / "eval.json", SMALL_RECORDS[:4])
    argv = train_argv(model_dir, tokenizer_dir, data, root / "out", max_steps=2, save_steps=2)
    train(argv)
    # A LoRA of the same layout made for a wider model: its shapes cannot fit the test model.
    make_model(root / "other_base", 400, hidden=48, layers=1, heads=2, intermediate=64)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    base = AutoModelForCausalLM.from_pretrained(str(root / "other_base"))
    get_peft_model(base, config).save_pretrained(str(root / "adapter_other_base"))
    return root


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
@pytest.mark.parametrize(("name", "setup", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    finished_run, model_dir, tokenizer_dir, tmp_path, capsys, overwrite, name, setup, fragments
):
    w = World(tmp_path, tmp_path / "model", tmp_path / "tokenizer", tmp_path / "data", tmp_path / "out", {})
    shutil.copytree(model_dir, w.model)
    shutil.copytree(tokenizer_dir, w.tokenizer)
    shutil.copytree(finished_run / "data", w.data)
    shutil.copytree(finished_run / "out", w.out)
    shutil.copytree(finished_run / "adapter_other_base", tmp_path / "adapter_other_base")
    setup(w)
    before = snapshot(w.out)

    argv = train_argv(w.model, w.tokenizer, w.data, w.out, overwrite_output_dir=overwrite, max_steps=4)
    for flag, value in w.flags.items():
        argv += [f"--{flag}", str(value)] if value is not None else []
        if value is None:
            at = argv.index(f"--{flag}")
            del argv[at : at + 2]
    start = time.time()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last
    assert "Traceback" not in err
    assert time.time() - start < 30
    assert snapshot(w.out) == before


def test_corpus_size():
    assert len(CASES) >= 25
    assert {p.name for p in CORPUS.glob("*.json*")} == USED_FILES


def test_debug_shows_the_traceback(tokenizer_dir, model_dir, tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    shutil.copyfile(CORPUS / "truncated.json", tmp_path / "data" / "train" / "truncated.json")
    argv = train_argv(model_dir, tokenizer_dir, tmp_path / "data", tmp_path / "out", validation_file=None)
    with pytest.raises(Exception, match="invalid JSON"):
        main(["train", *argv, "--debug"])


def test_full_disk_is_refused_before_training(tmp_path):
    from llama_sft.training.args import ArgumentError
    from llama_sft.training.run import check_writable

    check_writable(tmp_path / "out", 1)
    with pytest.raises(ArgumentError, match=r"GiB free, but checkpoints of this run need about"):
        check_writable(tmp_path / "out", 2**62)
