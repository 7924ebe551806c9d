"""Bad input through the real command line: one clear line, exit code 2, output_dir untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import train_argv, write_json

from llama_sft.cli import main


@pytest.fixture
def run_train(capsys):
    """`llama-sft train ARGV` in-process: (exit code, stderr)."""

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        try:
            main(["train", *argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err

    return run


def test_real_process_exit_code_and_message(model_dir, tokenizer_dir, data_dir, tmp_path):
    (data_dir / "train" / "part1.json").write_text('[{"instruction": "a", "output": ')
    argv = train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "llama_sft.cli", "train", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "part1.json: invalid JSON at line 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("bad_file", "content", "expected"),
    [
        ("train/part1.json", '[{"instruction": "a", "output": ', "part1.json: invalid JSON at line 1"),
        (
            "train/part1.json",
            '{"instruction": "a", "output": "b"}',
            "part1.json: the file holds one JSON object",
        ),
        (
            "train/part1.json",
            '[{"instruction": "a", "output": "b"}, "x"]',
            "part1.json, record 1: expected an object",
        ),
        (
            "train/part1.json",
            '[{"instruction": "a", "output": 3}]',
            "part1.json, record 0: 'output' must be a string",
        ),
        ("eval.json", '[{"input": "a", "output": "b"}]', "eval.json, record 0: missing 'instruction'"),
    ],
)
def test_bad_data_exits_before_loading_anything(
    run_train, model_dir, tokenizer_dir, data_dir, tmp_path, bad_file, content, expected
):
    (data_dir / bad_file).write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    start = time.time()
    code, err = run_train(train_argv(model_dir, tokenizer_dir, data_dir, out))
    assert code == 2
    assert expected in err
    assert time.time() - start < 60
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_empty_dataset_dir_and_missing_validation_file(
    run_train, model_dir, tokenizer_dir, data_dir, tmp_path
):
    for path in (data_dir / "train").iterdir():
        path.unlink()
    code, err = run_train(train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out"))
    assert code == 2 and "no *.json or *.jsonl files in --dataset_dir" in err
    write_json(data_dir / "train" / "a.json", [{"instruction": "a", "output": "b"}])
    argv = train_argv(
        model_dir, tokenizer_dir, data_dir, tmp_path / "out", validation_file=tmp_path / "nope.json"
    )
    code, err = run_train(argv)
    assert code == 2 and "nope.json: file not found" in err
    assert not (tmp_path / "out").exists()


def test_do_eval_without_validation_data(run_train, model_dir, tokenizer_dir, data_dir, tmp_path):
    write_json(data_dir / "train" / "part1.json", [{"instruction": "a", "output": "b"}])
    (data_dir / "train" / "part2.jsonl").unlink()
    argv = train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out", validation_file=None)
    argv += ["--validation_split_percentage", "0"]
    code, err = run_train(argv)
    assert code == 2 and "there is no validation data" in err


def test_max_seq_length_smaller_than_template(run_train, model_dir, tokenizer_dir, data_dir, tmp_path):
    code, err = run_train(train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out", max_seq_length=8))
    assert code == 2 and "--max_seq_length 8 is too small" in err


def test_unknown_flag_is_one_line(run_train, model_dir, tokenizer_dir, data_dir, tmp_path):
    code, err = run_train(
        [*train_argv(model_dir, tokenizer_dir, data_dir, tmp_path / "out"), "--lora_rnak", "8"]
    )
    assert code == 2
    assert "unrecognized arguments: --lora_rnak 8" in err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) < 5


def test_validation_split_is_deterministic(data_dir):
    from llama_sft.data.records import load_dataset_dir
    from llama_sft.training.run import split_records

    records = load_dataset_dir(data_dir / "train")
    first = split_records(records, 0.25)
    assert split_records(records, 25) == first
    assert len(first[1]) == 4 and len(first[0]) == 12
    assert json.dumps([r.output for r in first[1]]) == json.dumps(
        [r.output for r in split_records(records, 0.25)[1]]
    )
