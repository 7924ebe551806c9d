#!/usr/bin/env python
"""C-Eval benchmark: the original evaluator, lm-evaluation-harness and `llama-sft eval` on one model
and one set of files, side by side.

The workload: a C-Eval-layout folder generated here (``dev/``, ``val/``, ``test/`` with
``{subject}_{split}.csv`` and ``subject_mapping.json``), questions and options cut from the real
Chinese text of the shared ``alpaca_zh_demo.json`` (so prompts have realistic token counts), answers
drawn with a fixed seed; and a randomly initialised LLaMA in float32 with the real Chinese-LLaMA-2
tokenizer saved beside it. Its predictions are arbitrary but deterministic, so agreement between
the contenders is still a strict check. Each contender runs in a child process of its own, once per
shot count, in alternating order:

- ``original``: ``bench/eval_original.py``, the Chinese-LLaMA-Alpaca-2 evaluator rebuilt: one
  ``generate`` call per question, letter scores as that script reads them;
- ``lm-eval``: lm-evaluation-harness through ``lm_eval.simple_evaluate`` with ``HFLM`` over local task
  YAMLs (``bench/eval_lm_harness/ceval_local.yaml``) with the same prompt text; it picks the letter
  with the highest log-likelihood as a continuation, a different rule from the original's, so
  its choices may differ without either being wrong;
- ``llama-sft``: ``llama-sft eval --task ceval``.

Reported per contender and shot count: ``run_s``, from loading the weights to the last prediction
(the contender's own clock: the original's and lm-eval's around their calls, llama-sft's
``seconds`` in results.json), and ``wall_s``, the whole child process (imports included);
questions/s and prompt tokens/s over each (the prompt tokens as the original tokenizes them, the
same numerator for all); and how many predictions agree with the original's, with every
difference listed and its causes found: a prompt that differs in text or in tokens, or the pick of
the contender's own rule computed on the original's forward pass (lm-eval: the raw logit of the
letter after the colon; llama-sft: the raw logits of both pieces summed, where the original reads
them after generate's repetition penalty).

    python bench/eval_bench.py          # 5 subjects x 40 val questions, a 216M-parameter LLaMA, 0 and 5 shots
    python bench/eval_bench.py --quick  # a tiny model and 8 questions: checks every path end to end

Writes bench/results/DATE_MACHINE_eval.json (eval-quick with --quick), or --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eval_original  # noqa: E402
import train_bench as tb  # noqa: E402  (sets sys.path for llama_sft and the offline environment)

CONTENDERS = ("original", "lm-eval", "llama-sft")
# Real C-Eval subjects, one or two of each group, as subject_mapping.json names them.
SUBJECTS = {
    "computer_network": ["Computer Network", "计算机网络", "STEM"],
    "college_economics": ["College Economics", "大学经济学", "Social Science"],
    "high_school_history": ["High School History", "高中历史", "Humanities"],
    "law": ["Law", "法学", "Humanities"],
    "physician": ["Physician", "医师资格", "Other"],
}
QUESTION_ENDINGS = ["", "。下列说法正确的是____", "，这句话中的关键内容是（　　）", "。以下哪一项符合题意？"]
LM_EVAL_TEMPLATE = HERE / "eval_lm_harness" / "ceval_local.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny model, 2 subjects of 4 questions.")
    p.add_argument("--data", default=str(tb.SHARED / "data" / "alpaca_zh_demo.json"), help="Chinese text.")
    p.add_argument(
        "--tokenizer", default=str(tb.SHARED / "tokenizers" / "chinese-llama-2"), help="Tokenizer folder."
    )
    p.add_argument("--subjects", type=int, default=5, help="Subjects (of SUBJECTS, in order).")
    p.add_argument("--val", type=int, default=40, help="Val questions per subject.")
    p.add_argument("--hidden", type=int, default=1024, help="Hidden size of the random LLaMA.")
    p.add_argument("--intermediate", type=int, default=2816, help="MLP intermediate size.")
    p.add_argument("--layers", type=int, default=8, help="Decoder layers.")
    p.add_argument("--heads", type=int, default=16, help="Attention heads.")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5], help="Shot counts to measure.")
    p.add_argument("--batch_size", type=int, default=8, help="Batch size of lm-eval and llama-sft.")
    p.add_argument("--runs", default=",".join(CONTENDERS), help="Comma list of contenders.")
    p.add_argument("--work", help="Folder for the data, model and outputs (default: a temporary one).")
    p.add_argument("--out", help="Results JSON (default: bench/results/DATE_MACHINE_eval[-quick].json).")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the questions and the weights.")
    p.add_argument("--note", help="A remark stored in the results (e.g. that the machine was busy).")
    p.add_argument("--lm_eval_worker", nargs=5, metavar=("MODEL", "TASKS", "N_SHOT", "BATCH", "OUT"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.val = 2, 4
        args.hidden, args.intermediate, args.layers, args.heads = 64, 172, 2, 4
    return args


# ---------------------------------------------------------------- the benchmark files


def chinese_pieces(path: Path) -> tuple[list[str], list[str]]:
    """Sentences (question text) and short phrases (option text) from the Alpaca records' Chinese."""
    records = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    text = "。".join(r.get("instruction", "") + "。" + r.get("output", "") for r in records)
    if not text:  # no shared data: a fixed stand-in, so that --quick and the tests still run
        text = "。".join(f"第{i}个问题的内容是关于细胞理论和日心说的比较，请判断" for i in range(50))
        text += "。" + "、".join(f"选项内容{'甲乙丙丁戊己庚辛'[i % 8]}{i}" for i in range(80))

    def is_chinese(s: str, share: float) -> bool:
        return sum("\u4e00" <= c <= "\u9fff" for c in s) >= share * len(s)

    sentences = [s.strip() for s in re.split(r"[。！？\n]", text)]
    sentences = sorted({s for s in sentences if 10 <= len(s) <= 60 and is_chinese(s, 0.7)})
    phrases = [s.strip() for s in re.split(r"[，、；。！？：,\n]", text)]
    phrases = sorted({s for s in phrases if 2 <= len(s) <= 16 and is_chinese(s, 0.8)})
    return sentences, phrases


def make_ceval(folder: Path, subjects: list[str], n_val: int, seed: int, source: Path) -> None:
    """C-Eval's layout: dev (5 a subject, with explanations), val (answers), test (no answers)."""
    rng = random.Random(seed)
    sentences, phrases = chinese_pieces(source)
    columns = ["id", "question", "A", "B", "C", "D", "answer"]
    for split in ("dev", "val", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        for split, count in (("dev", 5), ("val", n_val), ("test", n_val)):
            rows = []
            for i in range(count):
                question = "，".join(rng.sample(sentences, rng.choice([1, 1, 2, 3])))
                options = rng.sample(phrases, 4)
                row = {"id": i, "question": question + rng.choice(QUESTION_ENDINGS)}
                row.update(zip("ABCD", options, strict=True))
                if split != "test":  # C-Eval's test answers are withheld: no answer column
                    row["answer"] = rng.choice("ABCD")
                if split == "dev":
                    row["explanation"] = f"1. {rng.choice(sentences)}。2. 所以答案是{row['answer']}。"
                rows.append(row)
            names = columns[:-1] if split == "test" else columns + (["explanation"] if split == "dev" else [])
            with open(folder / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=names)
                writer.writeheader()
                writer.writerows(rows)
    mapping = {subject: SUBJECTS[subject] for subject in subjects}
    (folder / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=2))


def make_model(folder: Path, args: argparse.Namespace) -> dict:
    """A random LLaMA in float32 with the Chinese-LLaMA-2 tokenizer (a small trained one without it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(args.tokenizer)
    if (tokenizer_dir / "tokenizer.model").exists():
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, folder / name)
        vocab = eval_original.SentencePieceTokenizer(folder).sp.get_piece_size()
    else:
        from llama_sft.tools.demo import make_tokenizer

        sentences, phrases = chinese_pieces(Path(args.data))
        vocab = len(make_tokenizer(folder, sentences + phrases + list("ABCD答案：."), vocab_size=1000))
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "heads": args.heads,
        "dtype": "float32",
        "tokenizer": "chinese-llama-2" if (tokenizer_dir / "tokenizer.model").exists() else "generated",
    }


# ---------------------------------------------------------------- lm-evaluation-harness


def write_lm_eval_tasks(folder: Path, data_dir: Path, n_shot: int) -> list[str]:
    """One task per subject over the local CSV files; the few-shot header only with shots, as the
    original writes it (no header at zero-shot)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in eval_original.subjects_of(data_dir, "val"):
        name = f"ceval_local_{subject}"
        config = {
            "include": str(LM_EVAL_TEMPLATE),
            "task": name,
            "dataset_kwargs": {
                # dev's explanation column is left out: the splits of one dataset share their columns.
                "usecols": ["id", "question", "A", "B", "C", "D", "answer"],
                "data_files": {
                    "validation": str(data_dir / "val" / f"{subject}_val.csv"),
                    "dev": str(data_dir / "dev" / f"{subject}_dev.csv"),
                },
            },
        }
        if n_shot > 0:
            config["description"] = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
        # JSON is YAML, and keeps the Chinese header and its line breaks exact.
        (folder / f"{name}.yaml").write_text(json.dumps(config, ensure_ascii=False, indent=2))
        names.append(name)
    return names


def lm_eval_worker(model_dir: str, tasks_dir: str, n_shot: int, batch_size: int, out: str) -> None:
    """Runs in a child process: lm-eval's HF model, then simple_evaluate over the local tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=batch_size, device="cpu")
    loaded = time.perf_counter()
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    names = sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, num_fewshot=n_shot, log_samples=True, bootstrap_iters=0
    )
    done = time.perf_counter()
    rows = []
    for name in names:
        subject = name.removeprefix("ceval_local_")
        for sample in sorted(results["samples"][name], key=lambda s: s["doc_id"]):
            loglikelihoods = [float(r[0]) for r in sample["filtered_resps"]]
            doc = sample["doc"]
            rows.append(
                {
                    "subject": subject,
                    "id": int(doc["id"]),
                    "answer": doc["answer"],
                    "prediction": "ABCD"[loglikelihoods.index(max(loglikelihoods))],
                    "context": sample["arguments"][0][0],
                    "loglikelihoods": loglikelihoods,
                }
            )
    Path(out).write_text(
        json.dumps(
            {"predictions": rows, "load_s": round(loaded - start, 3), "eval_s": round(done - loaded, 3)},
            ensure_ascii=False,
        )
    )


# ---------------------------------------------------------------- the contenders


def run_child(command: list[str], log: Path) -> tuple[float, str | None]:
    """Wall seconds of one child process, and its error (the log's tail) if it failed."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        return wall, f"exit status {code}: " + log.read_text(errors="replace")[-2000:]
    return wall, None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_original(work: Path, model: Path, data: Path, n_shot: int, args) -> dict:
    out = work / f"original-{n_shot}shot"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "eval_original.py"), "--model_path", str(model)]
    command += ["--data_dir", str(data), "--n_shot", str(n_shot)]
    command += ["--output", str(out / "predictions.jsonl"), "--timing", str(out / "timing.json")]
    wall, error = run_child(command, out / "log.txt")
    if error:
        return {"wall_s": wall, "error": error}
    timing = json.loads((out / "timing.json").read_text())
    return {"wall_s": wall, **timing, "predictions": read_jsonl(out / "predictions.jsonl")}


def run_lm_eval(work: Path, model: Path, data: Path, n_shot: int, args) -> dict:
    out = work / f"lm-eval-{n_shot}shot"
    tasks = out / "tasks"
    write_lm_eval_tasks(tasks, data, n_shot)
    command = [sys.executable, __file__, "--lm_eval_worker", str(model), str(tasks), str(n_shot)]
    command += [str(args.batch_size), str(out / "result.json")]
    wall, error = run_child(command, out / "log.txt")
    if error:
        return {"wall_s": wall, "error": error}
    return {"wall_s": wall, **json.loads((out / "result.json").read_text())}


def run_llama_sft(work: Path, model: Path, data: Path, n_shot: int, args) -> dict:
    out = work / f"llama-sft-{n_shot}shot"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "llama_sft.cli", "eval", "--task", "ceval", "--model", str(model)]
    command += [
        "--data_dir",
        str(data),
        "--split",
        "val",
        "--n_shot",
        str(n_shot),
        "--torch_dtype",
        "float32",
    ]
    command += ["--batch_size", str(args.batch_size), "--output_dir", str(out)]
    wall, error = run_child(command, work / f"llama-sft-{n_shot}shot.log")
    if error:
        return {"wall_s": wall, "error": error}
    summary = json.loads((out / "results.json").read_text())
    # results.json's seconds run from loading the weights to the last prediction.
    return {"wall_s": wall, "run_s": summary["seconds"], "predictions": read_jsonl(out / "predictions.jsonl")}


RUNNERS = {"original": run_original, "lm-eval": run_lm_eval, "llama-sft": run_llama_sft}


# ---------------------------------------------------------------- comparison

LM_EVAL_RULE = (
    "lm-eval picks the letter X whose continuation 'X' after '答案：' has the highest log-likelihood, "
    "that is the highest raw logit of the one piece 'X'; the original sums the scores of two pieces "
    "per letter ('▁X' and 'X') as generate returns them, after its repetition penalty (1.1 on every "
    "piece already in the prompt, so on 'X' but mostly not on '▁X') and temperature. Where these rank "
    "the letters differently the choices differ; neither is a fault."
)
REASONS = {
    "prompt text": "the prompt given to the model differs from the original's",
    "prompt ids": "the same prompt text, cut into other tokens",
    "repetition penalty": "the pick of the original's rule on raw logits: the original reads the scores "
    "after generate's repetition penalty of 1.1, which divides a positive logit and multiplies a negative "
    "one of every piece already in the prompt ('A'-'D' after a line break always are), and llama-sft "
    "sums the raw logits",
    "lm-eval's rule": "the pick of the highest raw logit of the piece after the colon alone, computed "
    "on the original's own forward pass",
}
# Which letter of the original's forward pass each contender's rule would give (eval_original.predict).
RULES = {"llama-sft": ("raw_sum", "repetition penalty"), "lm-eval": ("after_colon", "lm-eval's rule")}


def reference_prompts(model: Path, data: Path, n_shot: int) -> list[dict]:
    """Every question's prompt text and ids as the original builds and tokenizes them."""
    prompts = eval_original.prompts(data, n_shot, with_prompt=False)
    tokenizer = eval_original.SentencePieceTokenizer(model)
    for item in prompts:
        item["ids"] = tokenizer.encode(item["prompt"])
    return prompts


def lm_eval_prompts(model: Path, rows: list[dict]) -> dict:
    """lm-eval's context per question and its ids as lm-eval's tokenizer (AutoTokenizer) gives them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return {(r["subject"], int(r["id"])): (r["context"], tokenizer(r["context"])["input_ids"]) for r in rows}


def llama_sft_prompts(model: Path, data: Path, n_shot: int) -> dict | None:
    """llama-sft's prompt text and ids per question, from its own reader; None where unavailable."""
    try:
        from llama_sft.data.tokenizer import TextTokenizer
        from llama_sft.tools.evaluate.choice import prompt_text, read_benchmark, subject_prompts
    except ImportError:
        return None
    tokenizer = TextTokenizer.load(model)
    found = {}
    for subject in read_benchmark("ceval", data, "val", n_shot):
        ids = subject_prompts(subject, "ceval", tokenizer, None)
        for question, question_ids in zip(subject.questions, ids, strict=True):
            found[(subject.key, int(question.id))] = (prompt_text("ceval", subject, question), question_ids)
    return found


def differences(name: str, reference: list[dict], other: list[dict], prompts: list[dict], given) -> dict:
    """Questions where ``other`` picks another letter than the original, each with every cause found:
    a prompt that differs in text or ids, or the pick of ``name``'s rule on the original's forward pass.

    ``given``: (subject, id) -> (text, ids) given to the other contender, or None where unknown."""
    picks = {(row["subject"], int(row["id"])): row["prediction"] for row in other}
    by_key = {(p["subject"], p["id"]): p for p in prompts}
    rule_key, rule_name = RULES[name]
    listed, counts = [], {}
    same_text = same_ids = 0
    for row in reference:
        key = (row["subject"], int(row["id"]))
        text, ids = given.get(key, (None, None)) if given else (None, None)
        same_text += text == by_key[key]["prompt"]
        same_ids += ids == by_key[key]["ids"]
        pick = picks.get(key)
        if pick == row["prediction"]:
            continue
        causes = []
        if given and text != by_key[key]["prompt"]:
            causes.append("prompt text")
        elif given and ids != by_key[key]["ids"]:
            causes.append("prompt ids")
        if pick == row[rule_key]:
            causes.append(rule_name)
        why = " + ".join(causes) or "unexplained"
        counts[why] = counts.get(why, 0) + 1
        listed.append(
            {"subject": key[0], "id": key[1], "original": row["prediction"], "other": pick, "why": why}
        )
    result = {"agree": len(reference) - len(listed), "of": len(reference), "differences_by_cause": counts}
    if given is not None:
        result.update({"same_prompt_text": same_text, "same_prompt_ids": same_ids})
    result["differences"] = listed
    return result


def compare(runs: dict, prompts: list[dict], model: Path, ours: dict | None) -> dict:
    out = {}
    reference = runs.get("original", {}).get("predictions")
    if reference is None:
        return out
    out["original_vs_other_rules"] = {
        "raw_sum_differs": sum(r["raw_sum"] != r["prediction"] for r in reference),
        "after_colon_differs": sum(r["after_colon"] != r["prediction"] for r in reference),
    }
    if "predictions" in runs.get("lm-eval", {}):
        rows = runs["lm-eval"]["predictions"]
        out["lm-eval_vs_original"] = {
            **differences("lm-eval", reference, rows, prompts, lm_eval_prompts(model, rows)),
            "rule": LM_EVAL_RULE,
        }
    if "predictions" in runs.get("llama-sft", {}):
        rows = runs["llama-sft"]["predictions"]
        out["llama-sft_vs_original"] = differences("llama-sft", reference, rows, prompts, ours)
    out["causes"] = REASONS
    return out


def accuracy(rows: list[dict]) -> float:
    return round(sum(row["prediction"] == row["answer"] for row in rows) / max(1, len(rows)), 4)


def summarise(name: str, run: dict, questions: int, prompt_tokens: int) -> dict:
    """Speeds over the run (weights loaded to last prediction) and over the whole child process."""
    row = {"name": name, "wall_s": round(run["wall_s"], 2)}
    if "error" in run:
        return {**row, "error": run["error"]}
    seconds = run["run_s"] if "run_s" in run else run["load_s"] + run["eval_s"]
    row.update(
        {
            "run_s": round(seconds, 2),
            "load_s": run.get("load_s"),
            "eval_s": run.get("eval_s"),
            "questions": len(run["predictions"]),
            "questions_per_s": round(questions / seconds, 3),
            "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
            "questions_per_s_wall": round(questions / run["wall_s"], 3),
            "prompt_tokens_per_s_wall": round(prompt_tokens / run["wall_s"], 1),
            "accuracy": accuracy(run["predictions"]),
        }
    )
    return row


def ratios(rows: dict) -> dict:
    """llama-sft's speed over each other contender's: over the run and over the whole process."""
    ours = rows.get("llama-sft", {})
    out = {}
    for other in ("original", "lm-eval"):
        theirs = rows.get(other, {})
        if not ours or not theirs or "error" in ours or "error" in theirs:
            continue
        out[f"llama-sft/{other}"] = round(theirs["run_s"] / ours["run_s"], 2)
        out[f"llama-sft/{other}_wall"] = round(theirs["wall_s"] / ours["wall_s"], 2)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.lm_eval_worker:
        model, tasks, n_shot, batch, out = args.lm_eval_worker
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return lm_eval_worker(model, tasks, int(n_shot), int(batch), out)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    import torch
    from transformers.utils import logging as transformers_logging

    import llama_sft  # noqa: F401  (its import silences library notices a user cannot act on)

    transformers_logging.disable_progress_bar()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="eval-bench-"))
    # lm-eval's datasets cache stays in the work folder, so that runs never share a stale one.
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    data, model = work / "ceval", work / "model"
    subjects = list(SUBJECTS)[: args.subjects]
    shutil.rmtree(data, ignore_errors=True)
    make_ceval(data, subjects, args.val, args.seed, Path(args.data))
    model_info = make_model(model, args)
    names = [n for n in args.runs.split(",") if n]
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": tb.describe_machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": "quick" if args.quick else "full",
        "note": args.note,
        "command": shlex.join(
            ["python", "bench/eval_bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": model_info,
        "workload": {"subjects": subjects, "val_per_subject": args.val, "batch_size": args.batch_size},
        "shots": [],
    }
    for index, n_shot in enumerate(args.shots):
        prompts = reference_prompts(model, data, n_shot)
        prompt_tokens = sum(len(p["ids"]) for p in prompts)
        # Alternate the order, so that no contender always runs first (cold caches) or last.
        order = names if index % 2 == 0 else names[::-1]
        runs = {}
        for name in order:
            print(f"{n_shot}-shot: {name} ...", flush=True)
            runs[name] = RUNNERS[name](work, model, data, n_shot, args)
            print(
                f"  {runs[name]['wall_s']:.1f} s" + ("  FAILED" if "error" in runs[name] else ""), flush=True
            )
        rows = {name: summarise(name, runs[name], len(prompts), prompt_tokens) for name in order}
        ours = llama_sft_prompts(model, data, n_shot) if "llama-sft" in names else None
        entry = {
            "n_shot": n_shot,
            "order": order,
            "questions": len(prompts),
            "prompt_tokens": prompt_tokens,
            "mean_prompt_tokens": round(prompt_tokens / len(prompts), 1),
            "runs": [rows[name] for name in order],
            "speedup": ratios(rows),
            "agreement": compare(runs, prompts, model, ours),
        }
        report["shots"].append(entry)
        agree = {k: f"{v['agree']}/{v['of']}" for k, v in entry["agreement"].items() if "agree" in v}
        print(json.dumps({"n_shot": n_shot, "speedup": entry["speedup"], "agreement": agree}), flush=True)
    out = Path(args.out) if args.out else tb.ROOT / "bench" / "results" / default_name(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, ensure_ascii=False, indent=1)
    for place, name in ((str(work), "$SCRATCH"), (str(tb.SHARED), "$SHARED"), (str(tb.ROOT), ".")):
        text = text.replace(place, name)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def default_name(args: argparse.Namespace) -> str:
    mode = "eval-quick" if args.quick else "eval"
    return f"{time.strftime('%Y-%m-%d', time.gmtime())}_{tb.machine_slug()}_{mode}.json"


if __name__ == "__main__":
    sys.exit(main())
