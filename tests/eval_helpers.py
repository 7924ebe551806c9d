"""Generated benchmark folders in each official layout (C-Eval, CMMLU, MMLU), for `llama-sft eval`.

A subject is ``{split: [row, ...]}`` where a row is ``(question, A, B, C, D, answer)``. The files
are written as the downloads lay them out:

- C-Eval: ``dev/{s}_dev.csv`` (header id,question,A,B,C,D,answer,explanation),
  ``val/{s}_val.csv`` (id,question,A,B,C,D,answer), ``test/{s}_test.csv`` (id,question,A,B,C,D: the
  answers are withheld), and ``subject_mapping.json`` when a mapping is given;
- CMMLU: ``dev/{s}.csv`` and ``test/{s}.csv`` with the header ``,Question,A,B,C,D,Answer``, the
  first column an unnamed row index;
- MMLU: ``dev/{s}_dev.csv``, ``val/{s}_val.csv``, ``test/{s}_test.csv`` with no header.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from llama_sft.tools.demo import WORDS

Row = tuple[str, str, str, str, str, str]
LETTERS = "ABCD"


def translation_rows(count: int, seed: int = 0, start: int = 0) -> list[Row]:
    """Questions asking for the translation of one of the demo's words, with four options; the
    demo's LoRA was trained on these words (both directions)."""
    rng = random.Random(seed)
    pairs = list(WORDS.items())
    rows = []
    for number in range(start, start + count):
        english, chinese = pairs[number % len(pairs)]
        to_chinese = number // len(pairs) % 2 == 0
        word, right = (english, chinese) if to_chinese else (chinese, english)
        pool = [zh if to_chinese else en for en, zh in pairs if en != english]
        options = [right, *rng.sample(pool, 3)]
        rng.shuffle(options)
        answer = LETTERS[options.index(right)]
        question = f"Translate to Chinese: {word}" if to_chinese else f"Translate to English: {word}"
        rows.append((question, *options, answer))
    return rows


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def write_ceval(root: Path, subjects: dict[str, dict[str, list[Row]]], mapping: dict | None = None) -> Path:
    for subject, splits in subjects.items():
        for split, rows in splits.items():
            path = root / split / f"{subject}_{split}.csv"
            if split == "test":
                _write(path, ["id", "question", *LETTERS], [[str(i), *r[:5]] for i, r in enumerate(rows)])
            elif split == "dev":
                header = ["id", "question", *LETTERS, "answer", "explanation"]
                _write(path, header, [[str(i), *r, ""] for i, r in enumerate(rows)])
            else:
                _write(
                    path, ["id", "question", *LETTERS, "answer"], [[str(i), *r] for i, r in enumerate(rows)]
                )
    if mapping is not None:
        (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    return root


def write_cmmlu(root: Path, subjects: dict[str, dict[str, list[Row]]]) -> Path:
    for subject, splits in subjects.items():
        for split, rows in splits.items():
            header = ["", "Question", *LETTERS, "Answer"]
            _write(root / split / f"{subject}.csv", header, [[str(i), *r] for i, r in enumerate(rows)])
    return root


def write_mmlu(root: Path, subjects: dict[str, dict[str, list[Row]]]) -> Path:
    for subject, splits in subjects.items():
        for split, rows in splits.items():
            _write(root / split / f"{subject}_{split}.csv", None, [list(r) for r in rows])
    return root


WRITERS = {"ceval": write_ceval, "cmmlu": write_cmmlu, "mmlu": write_mmlu}


def write_benchmark(task: str, root: Path, subjects: dict[str, dict[str, list[Row]]]) -> Path:
    return WRITERS[task](root, subjects)
