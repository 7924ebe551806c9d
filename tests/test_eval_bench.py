"""The evaluation benchmark's two baselines on a two-question C-Eval folder: the original evaluator's
prompts and letter rule, and the lm-evaluation-harness task that is given the same prompts."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import eval_original  # noqa: E402

VAL = [
    {
        "id": "0",
        "question": "细胞是生命的基本单位吗",
        "A": "是的",
        "B": "不是",
        "C": "不一定",
        "D": "无法判断",
        "answer": "A",
    },
    {
        "id": "1",
        "question": "太阳系的中心是",
        "A": "地球",
        "B": "月亮",
        "C": "太阳",
        "D": "火星",
        "answer": "C",
    },
]
DEV = [
    {
        "id": "0",
        "question": "天空是什么颜色",
        "A": "红色",
        "B": "蓝色",
        "C": "绿色",
        "D": "黑色",
        "answer": "B",
        "explanation": "1. 天空是蓝色的。",
    },  # fmt: skip
]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def bench_case(tmp_path_factory, tokenizer_dir, model_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_bench")
    data, model = root / "ceval", root / "model"
    write_rows(data / "val" / "physics_val.csv", VAL)
    write_rows(data / "dev" / "physics_dev.csv", DEV)
    shutil.copytree(model_dir, model)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, model / item.name)
    return data, model


def test_original_prompts_are_written_as_the_original_writes_them(bench_case):
    data, _ = bench_case
    zero = eval_original.prompts(data, n_shot=0, with_prompt=False)
    assert [p["prompt"] for p in zero] == [
        "细胞是生命的基本单位吗\nA. 是的\nB. 不是\nC. 不一定\nD. 无法判断\n答案：",
        "太阳系的中心是\nA. 地球\nB. 月亮\nC. 太阳\nD. 火星\n答案：",
    ]
    one = eval_original.prompts(data, n_shot=1, with_prompt=False)
    assert one[1]["prompt"] == (
        "以下是中国关于physics考试的单项选择题，请选出其中的正确答案。\n\n"
        "天空是什么颜色\nA. 红色\nB. 蓝色\nC. 绿色\nD. 黑色\n答案：B\n\n"
        "太阳系的中心是\nA. 地球\nB. 月亮\nC. 太阳\nD. 火星\n答案："
    )
    chat = eval_original.prompts(data, n_shot=1, with_prompt=True)[0]["prompt"]
    assert chat.startswith(
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
    )
    assert "[/INST]好的，我会结合physics相关知识回答[INST] 天空是什么颜色" in chat
    assert "D. 黑色\n答案：[/INST]B\n[INST] <<SYS>>" in chat


def test_original_letter_is_the_penalised_two_piece_sum(bench_case):
    """generate's scores are the logits after the repetition penalty (1.1 on pieces in the prompt)
    and temperature (0.2); the letter is the argmax of the two pieces' scores summed."""
    from transformers import AutoModelForCausalLM

    data, model = bench_case
    evaluator = eval_original.OriginalEvaluator(str(model))
    reference = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    prompt = eval_original.prompts(data, n_shot=1, with_prompt=False)[0]["prompt"]
    ids = evaluator.tokenizer.encode(prompt)
    assert ids[0] == evaluator.tokenizer.bos_token_id and ids[1:] == evaluator.tokenizer.sp.encode(prompt)
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, -1]
    penalised = logits.clone()
    seen = torch.tensor(sorted(set(ids)))
    penalised[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.1, logits[seen] * 1.1)
    penalised /= 0.2
    alone, after = evaluator.alone_ids, evaluator.after_colon_ids
    assert alone != after  # "▁A" and "A" are two pieces
    picked = evaluator.predict(prompt)
    expected = penalised[alone] + penalised[after]
    assert picked["letter_scores"] == pytest.approx(expected.tolist(), rel=1e-4)
    assert not torch.allclose(expected, (logits[alone] + logits[after]) / 0.2)  # the penalty counted
    assert picked["prediction"] == "ABCD"[int((penalised[alone] + penalised[after]).argmax())]
    assert picked["raw_sum"] == "ABCD"[int((logits[alone] + logits[after]).argmax())]
    assert picked["after_colon"] == "ABCD"[int(logits[after].argmax())]
    assert picked["prompt_tokens"] == len(ids)


def test_lm_eval_task_is_given_the_original_prompt(bench_case, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import eval_bench

    data, model = bench_case
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    names = eval_bench.write_lm_eval_tasks(tmp_path / "tasks", data, n_shot=1)
    assert names == ["ceval_local_physics"]
    out = tmp_path / "lm_eval.json"
    eval_bench.lm_eval_worker(str(model), str(tmp_path / "tasks"), 1, 2, str(out))
    rows = json.loads(out.read_text())["predictions"]
    expected = eval_original.prompts(data, n_shot=1, with_prompt=False)
    assert [(r["id"], r["answer"], r["context"]) for r in rows] == [
        (0, "A", expected[0]["prompt"]),
        (1, "C", expected[1]["prompt"]),
    ]
    # Its rule: the log-likelihood of the one piece "A".."D" after the context, as lm-eval's own
    # tokenizer (AutoTokenizer) cuts the context; the pick is the largest.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    reference = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    letters = [tokenizer.encode("：" + c)[-1] for c in "ABCD"]
    for row in rows:
        with torch.no_grad():
            logits = reference(torch.tensor([tokenizer(row["context"])["input_ids"]])).logits[0, -1]
        expected_ll = torch.log_softmax(logits, -1)[letters].tolist()
        assert row["loglikelihoods"] == pytest.approx(expected_ll, abs=1e-4)
        assert row["prediction"] == "ABCD"[row["loglikelihoods"].index(max(row["loglikelihoods"]))]
