"""Reading Alpaca files, and the exact complaint for each kind of bad data."""

from __future__ import annotations

import json

import pytest

from llama_sft.data.records import DataError, Record, find_data_files, load_dataset_dir, load_records


def test_json_and_jsonl_in_stable_order(data_dir):
    files = find_data_files(data_dir / "train")
    assert [f.name for f in files] == ["part1.json", "part2.jsonl"]
    records = load_dataset_dir(data_dir / "train")
    assert len(records) == 16
    assert records[1] == Record("What is 狗 in English?", "", "dog")
    assert records[2].full_instruction == "Translate to English\n猫"


def test_bom_null_input_and_jsonl_saved_as_json(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "input": None, "output": "b"}]).encode()
    )
    assert load_records(bom) == [Record("a", "", "b")]
    lines = tmp_path / "lines.json"
    lines.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert load_records(lines) == [Record("a", "", "b"), Record("c", "", "d")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[{"instruction": "a", "output": "b"}', "invalid JSON at line 1"),
        (b'{"instruction": "a", "output": "b"}', "holds one JSON object"),
        (b'"just text"', "expected a JSON list of records, found str"),
        (b'[{"instruction": "a", "output": "b"}, 7]', "record 1: expected an object"),
        (b'[{"instruction": "a", "output": ["b"]}]', "record 0: 'output' must be a string, found list"),
        (b'[{"instruction": "a"}]', "record 0: missing 'output'"),
        (b'[{"output": "b"}]', "record 0: missing 'instruction'"),
        (b'[{"instruction": "a", "output": "b", "output": "c"}]', "record 0: key 'output' appears twice"),
        (b'[{"instruction": "", "input": "", "output": "b"}]', "both empty"),
        (b"[]", "holds no records"),
        (b'[{"instruction": "\xff", "output": "b"}]', "not valid UTF-8 at byte 18 (line 1)"),
    ],
)
def test_bad_data_names_file_record_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_records(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_bad_jsonl_line_and_missing_paths(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_records(path)
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="does not exist"):
        find_data_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*.json or \*.jsonl files"):
        find_data_files(tmp_path / "empty")
