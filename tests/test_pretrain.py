"""Pre-training data: documents -> EOS-joined token stream -> blocks; the report, the cache, bad input,
and how rows added to the embeddings start."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_sft.data.pretrain import build_blocks, check_block_size, find_text_files
from llama_sft.data.records import DataError

BAD = Path(__file__).parent / "bad_inputs" / "pretrain"

TXT = "今天天气很好，我们去公园散步吧。\n\nHello world.\n   \n机器学习是人工智能的一个分支。\n"
JSONL = '{"text": "Summarize the text: 你好，世界。"}\n\n{"text": "a\\u001b[31m red\\u000cpage"}\n'


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(TXT, encoding="utf-8")
    (folder / "b.jsonl").write_text(JSONL, encoding="utf-8")
    (folder / "notes.md").write_text("not read", encoding="utf-8")
    return folder


def expected_stream(tokenizer) -> list[int]:
    documents = [
        "今天天气很好，我们去公园散步吧。",
        "Hello world.",
        "机器学习是人工智能的一个分支。",
        "Summarize the text: 你好，世界。",
        "a[31m red\npage",  # the escape character removed, the form feed made a line break
    ]
    return [t for doc in documents for t in tokenizer.encode(doc) + [tokenizer.eos_id]]


def test_documents_are_joined_with_eos_and_cut_into_blocks(tokenizer, tmp_path):
    files = find_text_files(write_corpus(tmp_path / "data"))
    assert [p.name for p in files] == ["a.txt", "b.jsonl"]
    stream = expected_stream(tokenizer)
    block_size = 7
    dataset, stats, cached = build_blocks(files, tokenizer, block_size, tmp_path / "cache")
    assert not cached
    whole = len(stream) // block_size
    assert len(stream) % block_size != 0  # the literal text leaves a partial block to drop
    assert len(dataset) == whole == stats.blocks
    for i in range(whole):
        item = dataset[i]
        assert item["input_ids"] == stream[i * block_size : (i + 1) * block_size]
        assert item["labels"] == item["input_ids"]  # every position is labelled
    with pytest.raises(IndexError):
        dataset[whole]
    assert (stats.files, stats.documents, stats.tokens) == (2, 5, len(stream))
    assert stats.dropped_tokens == len(stream) - whole * block_size
    assert stats.report("train") == (
        f"train: 2 files, 5 documents, {len(stream)} tokens with one EOS per document -> {whole} blocks "
        f"of --block_size 7; the last {stats.dropped_tokens} tokens (a partial block) were dropped"
    )
    assert dataset.lengths() == [7] * whole and dataset.num_tokens() == whole * 7


def test_an_exact_fit_drops_nothing(tokenizer, tmp_path):
    files = find_text_files(write_corpus(tmp_path / "data"))
    total = len(expected_stream(tokenizer))
    dataset, stats, _ = build_blocks(files, tokenizer, total, None)
    assert len(dataset) == 1 and stats.dropped_tokens == 0
    assert stats.report("x").endswith("no partial block was left over")
    assert dataset[0]["input_ids"] == expected_stream(tokenizer)


def test_the_cache_is_keyed_by_contents_and_memory_mapped(tokenizer, tmp_path):
    data = write_corpus(tmp_path / "data")
    cache = tmp_path / "cache"
    first, stats, cached = build_blocks(find_text_files(data), tokenizer, 5, cache)
    assert not cached
    again, stats_again, cached = build_blocks(find_text_files(data), tokenizer, 5, cache)
    assert cached and stats_again == stats
    assert isinstance(again.tokens, np.memmap) and again.tokens.dtype == np.uint16
    assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    # The entry, its report and its lock; no temporary file left.
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".tokens"]

    # Another block size or changed text is another cache entry.
    _, _, cached = build_blocks(find_text_files(data), tokenizer, 6, cache)
    assert not cached
    (data / "a.txt").write_text(TXT + "One more line.\n", encoding="utf-8")
    _, changed, cached = build_blocks(find_text_files(data), tokenizer, 5, cache)
    assert not cached and changed.documents == 6

    # A damaged entry is tokenized again, not trusted.
    for path in cache.glob("*.tokens"):
        path.write_bytes(b"\x00")
    rebuilt, _, cached = build_blocks(find_text_files(data), tokenizer, 5, cache)
    assert not cached and len(rebuilt) == changed.blocks


def test_processes_sharing_a_cache_tokenize_once(tokenizer, tmp_path, monkeypatch):
    from llama_sft.data import pretrain

    files = find_text_files(write_corpus(tmp_path / "data"))
    calls, real = [], pretrain._write_tokens

    def slow_write(*args):
        calls.append(1)
        time.sleep(0.5)  # holds the lock long enough for the other worker to arrive
        real(*args)

    monkeypatch.setattr(pretrain, "_write_tokens", slow_write)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_blocks(files, tokenizer, 5, tmp_path / "cache"), range(2)))
    assert len(calls) == 1
    assert sorted(cached for _, _, cached in results) == [False, True]
    assert results[0][0][0] == results[1][0][0]


def test_a_single_file_can_be_the_dataset(tokenizer, tmp_path):
    data = write_corpus(tmp_path / "data")
    assert find_text_files(data / "b.jsonl") == [data / "b.jsonl"]


def test_a_byte_order_mark_is_not_text(tokenizer, tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello world.\n")
    dataset, stats, _ = build_blocks([tmp_path / "bom.txt"], tokenizer, 2, None)
    assert stats.tokens == len(tokenizer.encode("Hello world.")) + 1


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        (
            "empty.txt",
            ["empty.txt: the file holds no text (empty or whitespace only)", "remove it or fill it"],
        ),
        ("whitespace_only.txt", ["whitespace_only.txt: the file holds no text"]),
        ("not_utf8.txt", ["not_utf8.txt: not valid UTF-8 at byte 28 (line 2)", "re-save the file as UTF-8"]),
        ("no_text_field.jsonl", ['no_text_field.jsonl, line 2: no "text" string', "add the field"]),
        ("invalid_json.jsonl", ["invalid_json.jsonl, line 2: invalid JSON", "fix or remove that line"]),
    ],
)
def test_bad_files_are_one_line_errors(tokenizer, tmp_path, name, fragments):
    data = write_corpus(tmp_path / "data")
    shutil.copyfile(BAD / name, data / name)
    with pytest.raises(DataError) as error:
        build_blocks(find_text_files(data), tokenizer, 4, tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    # Nothing but the lock is left in the cache: no entry, no temporary token file.
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_every_bad_file_is_tested():
    source = Path(__file__).read_text(encoding="utf-8")
    assert all(f'"{p.name}"' in source for p in BAD.iterdir())


def test_bad_folders_and_block_sizes(tokenizer, tmp_path):
    (tmp_path / "only_json").mkdir()
    (tmp_path / "only_json" / "a.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"only_json: no \*\.txt or \*\.jsonl files in --dataset_dir"):
        find_text_files(tmp_path / "only_json")
    with pytest.raises(DataError, match=r"missing: --dataset_dir does not exist"):
        find_text_files(tmp_path / "missing")
    with pytest.raises(DataError, match=r"--block_size 1 is too small"):
        check_block_size(1, 2048)
    with pytest.raises(DataError, match=r"--block_size 4096 is larger than the model's context \(2048"):
        check_block_size(4096, 2048)
    check_block_size(2048, 2048)
    files = find_text_files(write_corpus(tmp_path / "data"))
    with pytest.raises(DataError, match=r"fewer than one block of --block_size 100000; add text or lower"):
        build_blocks(files, tokenizer, 100_000, tmp_path / "cache")
    with pytest.raises(DataError, match=r"--block_size 1 is too small"):
        build_blocks(files, tokenizer, 1, tmp_path / "cache")


def test_a_large_vocabulary_is_stored_in_four_bytes(tokenizer, tmp_path, monkeypatch):
    files = find_text_files(write_corpus(tmp_path / "data"))
    small, _, _ = build_blocks(files, tokenizer, 4, None)
    assert small.tokens.dtype == np.uint16
    monkeypatch.setattr(tokenizer, "base_size", 70_000)
    big, _, _ = build_blocks(files, tokenizer, 4, None)
    assert big.tokens.dtype == np.int32 and big[0] == small[0]


def test_new_embedding_rows_start_at_the_mean_of_the_old(tmp_path):
    from llama_sft.tools.demo import make_model
    from llama_sft.training.args import ModelArguments
    from llama_sft.training.model import load_base_model

    make_model(tmp_path / "model", 300, hidden=16, layers=1, heads=2, intermediate=32)
    args = ModelArguments(model_name_or_path=str(tmp_path / "model"))
    model = load_base_model(args, 340, torch.float32)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == 340
        mean = weight[:300].mean(dim=0)
        spread = weight[:300].std(dim=0).mean()
        # transformers' mean_resizing draws each new row from a normal at the old rows' mean with a
        # covariance 1e-9 times theirs: the new rows sit at the mean, far closer than any old row.
        assert torch.allclose(weight[300:], mean.expand(40, -1), atol=float(spread.detach()) * 1e-2)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"] == 300


def test_long_tokenizing_logs_progress(tokenizer, tmp_path, monkeypatch, caplog):
    from llama_sft.data import pretrain

    monkeypatch.setattr(pretrain, "_PROGRESS_SECONDS", 0.0)
    files = find_text_files(write_corpus(tmp_path / "data"))
    with caplog.at_level("INFO", logger="llama_sft.data.pretrain"):
        build_blocks(files, tokenizer, 5, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing:")]
    assert lines[0].startswith("tokenizing: done with a.txt (file 1 of 2)")
    assert lines[-1].startswith("tokenizing: done with b.jsonl (file 2 of 2)")
    assert ", 5 documents, " in lines[-1]
