"""`llama-sft eval`: multiple-choice predictions equal a plain one-question-at-a-time forward pass,
perplexity equals the mean loss computed directly, the output files, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_quiet, shared_path
from eval_helpers import translation_rows, write_benchmark, write_ceval
from transformers import AutoModelForCausalLM

from llama_sft.data.templates import load_template
from llama_sft.tools.evaluate import main
from llama_sft.tools.evaluate.choice import Question, Subject, letter_ids, prompt_text

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def plain_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def run(argv: list[str], capsys) -> str:
    main([str(a) for a in argv])
    return capsys.readouterr().out


def model_flags(model_dir: Path, tokenizer_dir: Path) -> list:
    return ["--model", model_dir, "--tokenizer_path", tokenizer_dir]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# Prompts, byte for byte


def test_prompts_are_the_originals_byte_for_byte():
    shot = Question("0", "1+1=", ("1", "2", "3", "4"), "B")
    question = Question("7", "2+2=", ("3", "4", "5", "6"), "B")
    ceval = Subject("math", "数学", (), [question], [shot])
    assert prompt_text("ceval", ceval, question) == (
        "以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "1+1=\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "2+2=\nA. 3\nB. 4\nC. 5\nD. 6\n答案："
    )
    # C-Eval zero-shot: the question alone, as Chinese-LLaMA-Alpaca asks it.
    assert prompt_text("ceval", Subject("math", "数学", (), [question]), question) == (
        "2+2=\nA. 3\nB. 4\nC. 5\nD. 6\n答案："
    )
    cmmlu = Subject("agronomy", "农学", (), [question], [shot])
    assert prompt_text("cmmlu", cmmlu, question) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：1+1=\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：B\n\n"
        "题目：2+2=\nA. 3\nB. 4\nC. 5\nD. 6\n答案是："
    )
    mmlu = Subject("abstract_algebra", "abstract algebra", (), [question])
    assert prompt_text("mmlu", mmlu, question) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "2+2=\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    mmlu.shots = [shot]
    assert "4\nAnswer: B\n\n2+2=" in prompt_text("mmlu", mmlu, question)


def test_letter_ids_are_the_letter_alone_and_after_a_colon():
    from llama_sft.data.tokenizer import TextTokenizer

    llama = TextTokenizer.load(shared_path("tokenizers/llama"))
    pairs = letter_ids(llama, "ceval")
    assert [[llama.sp.id_to_piece(i) for i in pair] for pair in pairs] == [
        ["▁A", "A"],
        ["▁B", "B"],
        ["▁C", "C"],
        ["▁D", "D"],
    ]
    assert pairs[0] == (319, 29909) and letter_ids(llama, "mmlu") == pairs


# ---------------------------------------------------------------------------------------------
# Predictions equal an unbatched forward pass


def expected_text(task: str, name: str, shots: list, row) -> str:
    """The prompt, built here from the layouts' documentation rather than by the code under test."""

    def block(r, answer):
        options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, r[1:5], strict=True))
        if task == "ceval":
            return f"{r[0]}{options}\n答案：" + (f"{r[5]}\n\n" if answer else "")
        if task == "cmmlu":
            return f"题目：{r[0]}{options}\n答案是：" + (f"{r[5]}\n\n" if answer else "")
        return f"{r[0]}{options}\nAnswer:" + (f" {r[5]}\n\n" if answer else "")

    heads = {
        "ceval": f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n",
        "cmmlu": f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n",
        "mmlu": f"The following are multiple choice questions (with answers) about {name}.\n\n",
    }
    head = heads[task] if shots or task != "ceval" else ""
    return head + "".join(block(s, True) for s in shots) + block(row, False)


@torch.no_grad()
def one_at_a_time(model, tokenizer, task, name, shots, rows, template=None, penalty=1.1) -> list[str]:
    """The original evaluator's rule: generate's repetition penalty on the next-token logits, then the
    two ids of each letter summed."""
    from transformers import RepetitionPenaltyLogitsProcessor

    penalize = RepetitionPenaltyLogitsProcessor(penalty)
    sp = tokenizer.sp
    colon = ":" if task == "mmlu" else "："
    alone = [sp.encode(letter)[0] for letter in LETTERS]
    after = [sp.encode(colon + letter)[-1] for letter in LETTERS]
    found = []
    for row in rows:
        text = expected_text(task, name, shots, row)
        text = template.render(text) if template is not None else text
        ids = torch.tensor([[tokenizer.bos_id, *sp.encode(text)]])
        logits = penalize(ids, model(input_ids=ids).logits[:, -1])[0]
        found.append(LETTERS[int((logits[alone] + logits[after]).argmax())])
    return found


CASES = {
    # task, split, n_shot, with_prompt, the name the prompt gives the subject
    "ceval-zero-shot": ("ceval", "val", 0, False, "translation"),
    "ceval-5-shot-with-prompt": ("ceval", "val", 5, True, "translation"),
    "cmmlu-3-shot": ("cmmlu", "test", 3, False, "农学"),
    "mmlu-2-shot": ("mmlu", "test", 2, False, "agronomy"),
}
# The raw logits (no repetition penalty) in one case, the original's penalty in the others.
PENALTY = {"mmlu-2-shot": 1.0}


@pytest.mark.parametrize("case", CASES)
def test_predictions_equal_one_question_at_a_time(
    case, model_dir, tokenizer_dir, tokenizer, plain_model, tmp_path, capsys
):
    task, split, n_shot, with_prompt, name = CASES[case]
    rows, dev = translation_rows(11, seed=3), translation_rows(5, seed=4, start=20)
    subject = "agronomy" if task != "ceval" else "translation"
    data = write_benchmark(task, tmp_path / task, {subject: {split: rows, "dev": dev}})
    if task == "ceval":
        (data / "subject_mapping.json").write_text(
            json.dumps({"translation": ["Translation", "翻译", "Humanities"]}), encoding="utf-8"
        )
    out = tmp_path / "out"
    argv = [*model_flags(model_dir, tokenizer_dir), "--task", task, "--data_dir", data, "--output_dir", out]
    penalty = PENALTY.get(case, 1.1)
    argv += ["--split", split, "--n_shot", n_shot, "--batch_size", 4, "--repetition_penalty", penalty]
    if with_prompt:
        argv += ["--with_prompt", "--prompt_template", "alpaca"]
    run(argv, capsys)

    template = load_template("alpaca") if with_prompt else None
    expected = one_at_a_time(plain_model, tokenizer, task, name, dev[:n_shot], rows, template, penalty)
    predictions = read_rows(out / "predictions.jsonl")
    assert [p["prediction"] for p in predictions] == expected
    assert [p["answer"] for p in predictions] == [r[5] for r in rows]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    correct = sum(p == r[5] for p, r in zip(expected, rows, strict=True))
    assert results["subjects"][subject]["correct"] == correct
    assert results["average"]["accuracy"] == pytest.approx(correct / len(rows))


# ---------------------------------------------------------------------------------------------
# Output files


def test_ceval_files_table_and_overwrite(model_dir, tokenizer_dir, tmp_path, capfd):
    capsys = capfd  # file descriptors too: library warnings are checked below
    rows_a, rows_b = translation_rows(6, seed=1), translation_rows(4, seed=2, start=30)
    mapping = {"alpha": ["Alpha", "甲", "STEM"], "beta": ["Beta", "乙", "Other"]}
    data = write_ceval(
        tmp_path / "ceval",
        {"alpha": {"val": rows_a, "test": rows_a[:3]}, "beta": {"val": rows_b, "test": rows_b[:2]}},
        mapping,
    )
    out = tmp_path / "out"
    base = [*model_flags(model_dir, tokenizer_dir), "--task", "ceval", "--data_dir", data, "--n_shot", 0]
    capsys.readouterr()
    table = run([*base, "--output_dir", out], capsys)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    subjects = results["subjects"]
    assert list(subjects) == ["alpha", "beta"]
    assert subjects["alpha"]["questions"] == 6 and subjects["alpha"]["categories"] == ["STEM"]
    total = subjects["alpha"]["correct"] + subjects["beta"]["correct"]
    assert results["average"] == {"questions": 10, "scored": 10, "correct": total, "accuracy": total / 10}
    assert results["categories"]["Other"]["accuracy"] == subjects["beta"]["accuracy"]
    assert results["task"] == "ceval" and results["split"] == "val" and results["n_shot"] == 0
    assert results["command"].startswith("llama-sft eval --model ")
    assert {"date", "machine", "model"} <= set(results)
    assert f"{100 * total / 10:.2f}" in table.splitlines()[-2]
    predictions = read_rows(out / "predictions.jsonl")
    assert [(p["subject"], p["id"]) for p in predictions][:2] == [("alpha", "0"), ("alpha", "1")]
    submission = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    assert submission["beta"] == {p["id"]: p["prediction"] for p in predictions if p["subject"] == "beta"}

    # A second run into the same folder is refused; --overwrite_output_dir replaces the results.
    with pytest.raises(SystemExit) as stopped:
        run([*base, "--output_dir", out, "--split", "test"], capsys)
    assert stopped.value.code == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    run([*base, "--output_dir", out, "--split", "test", "--overwrite_output_dir"], capsys)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # The test split withholds its answers: predictions and a submission, no accuracy.
    assert results["split"] == "test" and results["average"]["accuracy"] is None
    assert results["subjects"]["alpha"] == {
        "name": "甲", "categories": ["STEM"], "questions": 3, "scored": 0, "correct": None, "accuracy": None,
    }  # fmt: skip
    assert {p["answer"] for p in read_rows(out / "predictions.jsonl")} == {None}
    assert set(json.loads((out / "submission.json").read_text())["alpha"]) == {"0", "1", "2"}
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "results.json", "submission.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ceval", "out"]  # no staging folder left
    captured = capfd.readouterr()
    assert_quiet(SimpleNamespace(stdout=table + captured.out, stderr=captured.err), "llama-sft eval")


# ---------------------------------------------------------------------------------------------
# Perplexity


@torch.no_grad()
def test_perplexity_equals_the_mean_loss_computed_directly(
    model_dir, tokenizer_dir, tokenizer, plain_model, tmp_path, capsys
):
    text = tmp_path / "text"
    text.mkdir()
    lines = [
        "Hello world. 你好，世界。",
        "今天天气很好，我们去公园散步吧。",
        "Translate to Chinese: red 红色",
    ]
    (text / "a.txt").write_text("\n".join(lines * 3) + "\n\n", encoding="utf-8")
    (text / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines[::-1] * 2) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    flags = [*model_flags(model_dir, tokenizer_dir), "--task", "perplexity", "--data_dir", text]
    run([*flags, "--output_dir", out, "--block_size", 16, "--batch_size", 3], capsys)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))

    losses_all, sp = [], tokenizer.sp
    for name, docs in (("a.txt", lines * 3), ("b.jsonl", lines[::-1] * 2)):
        stream = [t for doc in docs for t in (*sp.encode(doc), tokenizer.eos_id)]
        blocks = [stream[i : i + 16] for i in range(0, len(stream) - 15, 16)]
        losses = [
            plain_model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks
        ]
        entry = results["files"][str(text / name)]
        assert entry["blocks"] == len(blocks) and entry["tokens"] == 15 * len(blocks)
        assert entry["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
        losses_all += losses
    assert results["overall"]["perplexity"] == pytest.approx(
        math.exp(sum(losses_all) / len(losses_all)), rel=1e-5
    )
    assert results["block_size"] == 16
    assert not (out / "predictions.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# A LoRA trained on the questions scores above its base


def test_a_lora_trained_on_the_questions_scores_above_its_base(
    model_dir, tokenizer_dir, tokenizer, tmp_path, capsys
):
    from peft import LoraConfig, get_peft_model

    rows = translation_rows(16, seed=5)
    data = write_ceval(tmp_path / "ceval", {"translation": {"val": rows}})
    # Fine-tune the base on these questions (prompt -> the answer letter, as training would see them).
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    sp = tokenizer.sp
    examples = [[tokenizer.bos_id, *sp.encode(expected_text("ceval", "", [], r) + r[5])] for r in rows]
    # One right-padded batch, each row trained on its last token only: the answer letter.
    width = max(map(len, examples))
    ids = torch.tensor([e + [tokenizer.eos_id] * (width - len(e)) for e in examples])
    labels = torch.full_like(ids, -100)
    for row, example in enumerate(examples):
        labels[row, len(example) - 1] = example[-1]
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in examples])[:, None]).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train fastest on one thread, even more so on a busy machine
    try:
        for _ in range(60):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    lora = tmp_path / "lora"
    model.save_pretrained(str(lora))

    accuracy = {}
    for name, extra in (("base", []), ("lora", ["--lora_model", lora])):
        out = tmp_path / name
        argv = ["--base_model", model_dir, "--tokenizer_path", tokenizer_dir, *extra, "--task", "ceval"]
        run([*argv, "--data_dir", data, "--n_shot", 0, "--output_dir", out], capsys)
        accuracy[name] = json.loads((out / "results.json").read_text())["average"]["accuracy"]
    assert accuracy["lora"] >= 0.9 > accuracy["base"] + 0.3, accuracy


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the file and row, --output_dir untouched


def bad_benchmark(root: Path, problem: str) -> tuple[Path, list, str]:
    """A C-Eval or MMLU folder with one problem; returns (folder, extra flags, expected in the error)."""
    rows, dev = translation_rows(4, seed=6), translation_rows(2, seed=7, start=10)
    folder = write_benchmark("ceval", root / "ceval", {"s": {"val": rows, "dev": dev}, "t": {"val": rows}})
    val = folder / "val" / "s_val.csv"
    if problem == "missing split":
        mmlu = write_benchmark("mmlu", root / "mmlu", {"s": {"test": rows}})
        return mmlu, ["--task", "mmlu", "--split", "val", "--n_shot", 0], f"{mmlu / 'val'}: no val/ folder"
    if problem == "missing dev file":
        return folder, ["--subjects", "t", "--n_shot", 1], f"{folder / 'dev' / 't_dev.csv'}: file not found"
    if problem == "missing column":
        val.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
        return folder, ["--n_shot", 0], f"{val}: the header has no 'answer' column"
    if problem == "answer outside A-D":
        text = val.read_text(encoding="utf-8").splitlines()
        text[3] = text[3][:-1] + "E"
        val.write_text("\n".join(text) + "\n", encoding="utf-8")
        return folder, ["--n_shot", 0], f"{val}, row 3 (line 4): the answer is 'E'"
    if problem == "empty file":
        val.write_text("", encoding="utf-8")
        return folder, ["--n_shot", 0], f"{val}: the file is empty"
    if problem == "header only":
        val.write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
        return folder, ["--n_shot", 0], f"{val}: holds no questions"
    if problem == "n_shot above dev":
        dev_file = folder / "dev" / "s_dev.csv"
        return (
            folder,
            ["--subjects", "s", "--n_shot", 3],
            f"{dev_file}: holds 2 questions, fewer than --n_shot 3",
        )
    if problem == "unknown subject":
        return folder, ["--subjects", "s,nope", "--n_shot", 0], "no subject 'nope' (no file nope_val.csv)"
    if problem == "no text":
        text = root / "text"
        text.mkdir()
        (text / "notes.md").write_text("not read\n")
        return text, ["--task", "perplexity"], f"{text}: no *.txt or *.jsonl files in --data_dir"
    if problem == "blank text file":
        text = root / "text"
        text.mkdir()
        (text / "a.txt").write_text("\n  \n")
        return text, ["--task", "perplexity", "--block_size", 8], f"{text / 'a.txt'}: the file holds no text"
    if problem == "text shorter than a block":
        text = root / "text"
        text.mkdir()
        (text / "a.txt").write_text("Hello world.\n")
        return text, ["--task", "perplexity", "--block_size", 64], f"{text / 'a.txt'}: the text holds"
    raise AssertionError(problem)


PROBLEMS = [
    "missing split",
    "missing dev file",
    "missing column",
    "answer outside A-D",
    "empty file",
    "header only",
    "n_shot above dev",
    "unknown subject",
    "no text",
    "blank text file",
    "text shorter than a block",
]


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_input_stops_with_one_line_and_leaves_the_output_dir(
    problem, existing, model_dir, tokenizer_dir, tmp_path, capsys
):
    data, extra, expected = bad_benchmark(tmp_path / "input", problem)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("kept")
    argv = [
        *model_flags(model_dir, tokenizer_dir),
        "--task",
        "ceval",
        "--data_dir",
        data,
        "--output_dir",
        out,
    ]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run([*argv, *extra], capsys)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["input", "out"] if existing else ["input"])
    if existing:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_flags_come_from_a_config_file(model_dir, tokenizer_dir, tmp_path, capsys):
    data = write_benchmark("mmlu", tmp_path / "mmlu", {"s": {"test": translation_rows(3, seed=8)}})
    config = tmp_path / "eval.yaml"
    config.write_text(f"task: mmlu\nn_shot: 0\ndata_dir: {data}\nwith_prompt: false\nbatch_size: 2\n")
    out = tmp_path / "out"
    run(["--config", config, *model_flags(model_dir, tokenizer_dir), "--output_dir", out], capsys)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "mmlu" and results["n_shot"] == 0 and results["average"]["questions"] == 3


def test_repetition_penalty_rescales_letters_in_the_prompt_as_generate_does():
    from transformers import RepetitionPenaltyLogitsProcessor

    from llama_sft.tools.evaluate.choice import penalize

    letters = [(1, 2), (3, 4), (5, 6), (7, 8)]
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.9, 1.9, -1.0, -1.0, -3.0, 0.5, 9.0]])
    prompt = [9, 1, 2, 7]  # A's two ids and D's first occur in the prompt
    got = penalize(logits, [prompt], letters, 1.1)
    expected = RepetitionPenaltyLogitsProcessor(1.1)(torch.tensor([prompt]), logits.clone())
    expected[0, 9] = logits[0, 9]  # not a letter id: left alone
    assert torch.allclose(got, expected)
    summed = lambda x: [float(x[0, a] + x[0, b]) for a, b in letters]  # noqa: E731
    assert max(range(4), key=lambda i: summed(logits)[i]) == 0  # raw: A (4.0 against B's 3.8)
    assert max(range(4), key=lambda i: summed(got)[i]) == 1  # penalised: A 3.64, B 3.8
