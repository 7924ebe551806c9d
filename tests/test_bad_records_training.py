"""--on_bad_records through a whole run: `llama-sft train` and `pretrain` skip what is bad, count it in
data_stats.json and train on the rest; under stop, or past --max_bad_fraction, the run ends with one line."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import SMALL_RECORDS, corpus, shared_path, train_argv, write_json

from llama_sft.cli import main as cli_main
from llama_sft.data.records import REASONS

TRUNCATED = b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp'
# One optimizer step, no evaluation or checkpoint: what is checked is which data the run took.
SHORT = {
    "validation_file": None,
    "do_eval": False,
    "evaluation_strategy": "no",
    "save_strategy": "no",
    "max_steps": 1,
    "logging_steps": 1,
}


def run_cli(command: str, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code (0 when the run returns) and stderr of one in-process run."""
    capsys.readouterr()
    try:
        cli_main([command, *argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def bad_stats(out) -> dict:
    return json.loads((out / "data_stats.json").read_text())["bad_records"]["train"]


def test_real_sharegpt_sample_trains_on_what_is_kept(model_dir, tokenizer_dir, tmp_path, capsys, caplog):
    sample = shared_path("data/sharegpt_en_sample.json")
    out = tmp_path / "out"
    flags = dict(SHORT, dataset_dir=sample, prompt_template="llama2-chat", max_seq_length=96)
    argv = train_argv(model_dir, tokenizer_dir, tmp_path, out, **flags)

    code, err = run_cli("train", argv, capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(
        err, f"error: {sample}, record 0, turn 0: the conversation opens with an assistant turn"
    )

    code, err = run_cli("train", [*argv, "--on_bad_records", "skip", "--max_bad_fraction", "0.3"], capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "361 of 1000 records are bad (36.1%", "raise --max_bad_fraction")

    with caplog.at_level(logging.INFO, logger="llama_sft"):
        code, err = run_cli("train", [*argv, "--on_bad_records", "skip"], capsys)
    assert code == 0, err[-3000:]
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    stats = bad_stats(out)
    assert sum(stats["by_reason"].values()) + stats["kept"] == 1000
    assert stats["by_reason"] == {"opens with assistant turn": 357, "empty text": 2, "turns out of order": 2}
    assert set(stats["by_reason"]) <= set(REASONS) and stats["files"] == [str(sample)]
    logged = [record.getMessage() for record in caplog.records]
    assert "--on_bad_records skip: skipped 361 bad records of 1000 (36.1%), kept 639:" in logged


def pretrain_argv(model_dir, tokenizer_dir, data, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
        "--dataset_dir", str(data), "--data_cache_dir", str(out.parent / "cache"), "--block_size", "32",
        "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "2", "--output_dir", str(out),
        "--lora_rank", "4", "--lora_alpha", "8", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


def test_pretraining_skips_an_undecodable_text_file(model_dir, tokenizer_dir, tmp_path, capsys):
    data, out = tmp_path / "text", tmp_path / "out"
    data.mkdir()
    texts = corpus()
    (data / "a.txt").write_text("\n".join(texts[:40]) + "\n", encoding="utf-8")
    (data / "b.txt").write_bytes(("今天天气很好。\n" * 5).encode() + b"caf\xe9 au lait\n")
    (data / "c.txt").write_text("\n".join(texts[40:80]) + "\n", encoding="utf-8")
    argv = pretrain_argv(model_dir, tokenizer_dir, data, out)

    code, err = run_cli("pretrain", argv, capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, f"{data / 'b.txt'}: not valid UTF-8")

    code, err = run_cli("pretrain", [*argv, "--on_bad_records", "skip"], capsys)
    assert code == 0, err[-3000:]
    assert (out / "pt_lora_model" / "adapter_model.safetensors").is_file()
    stats = bad_stats(out)
    assert stats["by_reason"] == {"unreadable file": 1} and stats["files"] == [str(data / "b.txt")]
    assert json.loads((out / "data_stats.json").read_text())["train"]["files"] == 2


def test_instruction_tuning_skips_a_truncated_json_file(model_dir, tokenizer_dir, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_json(data / "a.json", SMALL_RECORDS[:8])
    (data / "b.json").write_bytes(TRUNCATED)
    (data / "c.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in SMALL_RECORDS[8:]) + "\n"
    )
    argv = train_argv(model_dir, tokenizer_dir, tmp_path, out, **SHORT, dataset_dir=data)

    code, err = run_cli("train", argv, capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, f"error: {data / 'b.json'}: invalid JSON at line 1")

    # One bad file of 17 counted items is more than 5%: the run stops, naming the limit.
    code, err = run_cli("train", [*argv, "--on_bad_records", "skip", "--max_bad_fraction", "0.05"], capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(
        err, "1 of 17 records are bad (5.9%: 1 unreadable file)", "raise --max_bad_fraction"
    )

    code, err = run_cli("train", [*argv, "--on_bad_records", "skip"], capsys)
    assert code == 0, err[-3000:]
    assert (out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    stats = bad_stats(out)
    assert (stats["by_reason"], stats["kept"], stats["files"]) == (
        {"unreadable file": 1},
        16,
        [str(data / "b.json")],
    )


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_everything_bad_is_one_line_under_skip(model_dir, tokenizer_dir, tmp_path, capsys, command):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    if command == "train":
        (data / "a.json").write_bytes(TRUNCATED)
        argv = train_argv(model_dir, tokenizer_dir, tmp_path, out, **SHORT, dataset_dir=data)
    else:
        (data / "a.txt").write_bytes(b"\xff\xfe\n")
        argv = pretrain_argv(model_dir, tokenizer_dir, data, out)
    code, err = run_cli(command, [*argv, "--on_bad_records", "skip", "--max_bad_fraction", "1"], capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "all 1 records are bad (1 unreadable file), so none is left")
