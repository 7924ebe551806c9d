"""`llama-sft eval --task generate`: prompts as training renders them, batched greedy answers that
equal unbatched ones, and scores equal to the metric libraries' own."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from conftest import assert_quiet, write_json

from llama_sft.data.encode import IGNORE_INDEX, encode_record
from llama_sft.data.records import DataError, load_records
from llama_sft.data.templates import Template, load_template, prompt_ids
from llama_sft.loading import ModelSpec, load
from llama_sft.options import ArgumentError
from llama_sft.tools.chat import GenerationSettings, generate_ids
from llama_sft.tools.evaluate import metrics
from llama_sft.tools.evaluate.generation import fit_prompts, greedy_answers, read_examples, run_generation
from llama_sft.tools.evaluate.metrics import Scorer, average, segment

PAIRS = [
    ("今天天气很好，我们去公园散步吧。", "今天天气很好，我们去散步吧。"),
    ("机器学习是人工智能的一个分支。", "深度学习是机器学习的一个分支。"),
    ("The cat sat on the mat.", "A cat was sitting on the mat."),
    ("红色", "红色"),
]


class JiebaWords:
    def tokenize(self, text):
        return [word for word in jieba_cut(text) if word.strip()]


def jieba_cut(text):
    import jieba

    return list(jieba.cut(text))


@pytest.fixture(scope="module")
def scorer():
    return Scorer()


def test_segment_cuts_chinese_into_words_and_drops_spaces(scorer):
    assert segment("今天天气很好，我们去公园散步吧。Hello world") == [
        "今天天气",
        "很",
        "好",
        "，",
        "我们",
        "去",
        "公园",
        "散步",
        "吧",
        "。",
        "Hello",
        "world",
    ]


def test_scores_equal_the_libraries_own(scorer):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=JiebaWords())
    rows = []
    for reference, prediction in PAIRS:
        bleu = sentence_bleu(
            [list(reference.strip())],
            list(prediction.strip()),
            smoothing_function=SmoothingFunction().method3,
        )
        expected = rouge.score(reference, prediction)
        got = scorer.score(reference, prediction)
        assert got["bleu-4"] == pytest.approx(100 * bleu)
        assert got["rouge-1"] == pytest.approx(100 * expected["rouge1"].fmeasure)
        assert got["rouge-2"] == pytest.approx(100 * expected["rouge2"].fmeasure)
        assert got["rouge-l"] == pytest.approx(100 * expected["rougeL"].fmeasure)
        assert got["exact_match"] == (100.0 if reference == prediction else 0.0)
        rows.append(got)
    # Pairs that differ score between the extremes, in Chinese as in English.
    assert all(0 < row["bleu-4"] < 100 and 0 < row["rouge-1"] < 100 for row in rows[:3])
    means = average(rows)
    assert means["exact_match"] == 25.0
    assert means["rouge-1"] == pytest.approx(sum(row["rouge-1"] for row in rows) / 4, abs=1e-4)


def test_scores_by_hand(scorer):
    same = scorer.score("我们今天去公园散步。", " 我们今天去公园散步。\n")
    assert same == {
        "exact_match": 100.0,
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }
    assert scorer.score("红色的苹果", "blue sky") == dict.fromkeys(metrics.METRICS, 0.0)
    # Six words against two, both found: precision 1, recall 1/3, F1 0.5; one bigram of five: F1 1/3.
    half = scorer.score("the cat sat on the mat", "the cat")
    assert half["rouge-1"] == pytest.approx(50.0)
    assert half["rouge-2"] == pytest.approx(100 * 2 * (1 / 5) / (1 + 1 / 5))


def test_jieba_says_nothing_on_stderr(capfd):
    import jieba

    # As a fresh process finds it: jieba's logger at DEBUG, its dictionary not loaded.
    jieba.setLogLevel(logging.DEBUG)
    jieba.dt.initialized = False
    Scorer().score("我们去公园", "我们去公园")
    assert capfd.readouterr().err == ""


def test_missing_library_names_the_extra(monkeypatch):
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(
        metrics.importlib.util, "find_spec", lambda name: None if name == "rouge_score" else real(name)
    )
    with pytest.raises(ArgumentError, match=r"rouge-score is not installed: pip install 'llama-sft\[eval\]'"):
        Scorer()


def test_long_prompts_keep_bos_and_their_end():
    assert fit_prompts([[1, 5, 6, 7, 8], [1, 5], [1, 9, 9]], bos_id=1, room=3) == (
        [[1, 7, 8], [1, 5], [1, 9, 9]],
        1,
    )


CONVERSATION = {
    "system": "Be brief.",
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Name a colour"},
        {"from": "gpt", "value": "红色"},
    ],
}


def test_conversation_prompt_is_the_training_prompt(tmp_path, tokenizer):
    template = load_template("llama2-chat")
    path = write_json(tmp_path / "chat.json", [CONVERSATION])
    (example,) = read_examples(path, template, tokenizer)
    assert example.number == 0
    assert example.reference == "红色"
    assert example.prompt == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello</s><s>[INST] Name a colour [/INST]"
    )
    assert example.prompt_ids == prompt_ids(
        template, tokenizer, "Name a colour", [("Hi", "Hello")], "Be brief."
    )
    # What training puts before the last answer, which it trains on alone with train_on_turns "last".
    ids, labels, _ = encode_record(load_records(path)[0], template, tokenizer, 10_000, "last")
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert example.prompt_ids == ids[:first_trained]
    assert ids[first_trained:-1] == tokenizer.encode("红色")


def test_bad_records_name_file_and_record(tmp_path, tokenizer):
    alpaca = load_template("alpaca")
    missing = write_json(
        tmp_path / "missing.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    )
    with pytest.raises(DataError, match=rf"^{missing}, record 1: missing 'output'"):
        read_examples(missing, alpaca, tokenizer)
    empty = write_json(
        tmp_path / "empty.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]
    )
    with pytest.raises(DataError, match=rf"^{empty}, record 1: the answer .* is empty"):
        read_examples(empty, alpaca, tokenizer)
    single_turn = Template(name="plain", prompt="Q: {instruction}\nA:")
    chat = write_json(tmp_path / "chat.json", [CONVERSATION])
    with pytest.raises(DataError, match=rf"^{chat}, record 0: .* 'plain' has no multi-turn format"):
        read_examples(chat, single_turn, tokenizer)


RECORDS = [
    {"instruction": "Translate to Chinese: red", "output": "红色"},
    {"instruction": "What is 狗 in English?", "input": "", "output": "dog"},
    {
        "instruction": "Summarize the text",
        "input": "机器学习是人工智能的一个分支。" * 3,
        "output": "机器学习",
    },
    {"instruction": "Give the Chinese word for ten.", "output": "十", "history": [["Hi", "Hello"]]},
    {"instruction": "Hello", "output": "你好"},
    {"instruction": "今天天气很好，我们去公园散步吧。", "output": "好的"},
]
SETTINGS = GenerationSettings(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def loaded(model_dir, tokenizer_dir):
    loaded = load(ModelSpec(model_dir, tokenizer_path=tokenizer_dir, prompt_template="alpaca", device="cpu"))
    # Settings a released model's generation_config may hold; greedy evaluation must ignore them.
    config = loaded.model.generation_config
    config.do_sample, config.temperature, config.top_k, config.repetition_penalty = True, 0.7, 5, 1.5
    return loaded


def test_batched_answers_equal_unbatched(tmp_path, loaded):
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    path = write_json(tmp_path / "eval.json", RECORDS)
    results, rows = run_generation(loaded, path, batch_size=4, max_new_tokens=8, progress=False)
    examples = read_examples(path, template, tokenizer)
    alone = [
        generate_ids(model, tokenizer, e.prompt_ids, SETTINGS, stop_ids=[tokenizer.eos_id]) for e in examples
    ]
    assert [row["prediction"] for row in rows] == [tokenizer.decode(ids).strip() for ids in alone]
    assert [row["id"] for row in rows] == list(range(6))
    assert [row["reference"] for row in rows] == [record["output"] for record in RECORDS]
    assert rows[3]["prompt"].startswith("<s>Below is an instruction")
    assert rows[3]["prompt"].endswith(
        "Hello</s><s>### Instruction:\nGive the Chinese word for ten.\n\n### Response: "
    )
    assert [row["hit_max_new_tokens"] for row in rows] == [len(ids) == 8 for ids in alone]
    scorer = Scorer()
    for row in rows:
        assert {k: row[k] for k in metrics.METRICS} == scorer.score(row["reference"], row["prediction"])
    assert results["records"] == 6
    assert results["rouge-l"] == average(rows)["rouge-l"]
    assert results["template"] == "alpaca"
    json.dumps([results, rows], ensure_ascii=False)  # what the command writes

    # A second stop id that some answers reach and others do not: rows that stop early are filled
    # while the rest of their batch goes on, and each answer is still its unbatched one, which a
    # stop id only ends sooner.
    prompts = [e.prompt_ids for e in examples]
    stop = next(
        token for ids in alone for token in ids[2:] if 0 < sum(token in other for other in alone) < len(alone)
    )
    stops = [tokenizer.eos_id, stop]
    batched = greedy_answers(model, prompts, stops, batch_size=4, max_new_tokens=8)
    expected = [ids[: ids.index(stop)] if stop in ids else ids for ids in alone]
    assert [ids for ids, _ in batched] == expected
    assert [cut for _, cut in batched] == [len(ids) == 8 and stop not in ids for ids in alone]
    assert any(cut for _, cut in batched) and not all(cut for _, cut in batched)


def test_command_writes_scores_or_stops_at_a_bad_record(tmp_path, model_dir, tokenizer_dir, capfd):
    from llama_sft.tools.evaluate import main

    flags = ["--task", "generate", "--base_model", str(model_dir), "--tokenizer_path", str(tokenizer_dir)]
    flags += ["--prompt_template", "alpaca", "--device", "cpu", "--max_new_tokens", "4", "--batch_size", "2"]
    good = write_json(tmp_path / "good.json", RECORDS[:3])
    main([*flags, "--validation_file", str(good), "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["task"] == "generate" and results["records"] == 3
    assert set(metrics.METRICS) <= set(results)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["reference"] for line in lines] == ["红色", "dog", "机器学习"]
    output = capfd.readouterr()
    assert_quiet(SimpleNamespace(stdout=output.out, stderr=output.err), "eval --task generate")
    assert "Building prefix dict" not in output.err

    bad = write_json(tmp_path / "bad.json", [RECORDS[0], {"instruction": "no answer"}])
    with pytest.raises(SystemExit) as stop:
        main([*flags, "--validation_file", str(bad), "--output_dir", str(tmp_path / "bad_out")])
    assert stop.value.code == 2
    assert capfd.readouterr().err.splitlines() == [
        f"error: {bad}, record 1: missing 'output'; every record needs 'instruction' and 'output' strings"
    ]
    assert not (tmp_path / "bad_out").exists()
