"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) read from their official folder layouts, put in
the original evaluation prompts and answered by the letter with the highest next-token score.

Contract: ``read_benchmark(task, data_dir, split, n_shot, subjects) -> list[Subject]`` reads and
checks every file it needs (the split's questions, the dev questions used as shots) and raises
``EvalError`` naming the file and row at the first problem; nothing else is read later.
``subject_prompts(subject, task, tokenizer, template)`` gives each question's prompt ids
(``template`` None: ``[BOS] + encode(text)``; a template: ``templates.prompt_ids``, the ids training
puts before a response). ``letter_ids(tokenizer, task)`` gives, per letter, the two ids whose
next-token logits are summed: the letter encoded alone (``▁A`` for a SentencePiece vocabulary) and
the last id of the letter encoded after a colon (``A``), the full-width ``：`` for the Chinese
benchmarks and ``:`` for MMLU. ``predict(model, prompts, letters, batch_size)`` returns one letter a
prompt, the same as one unpadded forward pass per prompt would give; the longest token prefix the
prompts share (BOS, the header and the few-shot examples) is run once and its cache reused.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...data.templates import Template, prompt_ids
from ...data.tokenizer import TextTokenizer

LETTERS = ("A", "B", "C", "D")
TASKS = ("ceval", "cmmlu", "mmlu")
# The splits each benchmark ships, the default first (C-Eval's test answers are withheld).
SPLITS = {"ceval": ("val", "test", "dev"), "cmmlu": ("test", "dev"), "mmlu": ("test", "val", "dev")}
MAPPING_FILE = "subject_mapping.json"
MAX_SHOTS = 5


class EvalError(ValueError):
    """Bad evaluation input: the message names the file (and row) and the fix, on one line."""


# CMMLU's subjects: the Chinese name its prompt uses and the category its results are grouped by.
# Subjects about China count in "China specific" as well (CMMLU_CHINA).
_CMMLU = {
    "STEM": "anatomy 解剖学, astronomy 天文学, college_actuarial_science 大学精算学, "
    "college_engineering_hydrology 大学工程水文学, college_mathematics 大学数学, "
    "college_medical_statistics 大学医学统计, computer_science 计算机科学, conceptual_physics 概念物理学, "
    "electrical_engineering 电气工程, elementary_mathematics 初等数学, genetics 遗传学, "
    "high_school_biology 高中生物, high_school_chemistry 高中化学, high_school_mathematics 高中数学, "
    "high_school_physics 高中物理学, machine_learning 机器学习, virology 病毒学",
    "Humanities": "arts 艺术学, business_ethics 商业伦理, chinese_history 中国历史, chinese_literature 中国文学, "
    "college_law 大学法律, global_facts 全球事实, international_law 国际法学, jurisprudence 法理学, "
    "logical 逻辑学, marxist_theory 马克思主义理论, philosophy 哲学, professional_law 专业法学, "
    "world_history 世界历史, world_religions 世界宗教",
    "Social Science": "ancient_chinese 古汉语, chinese_civil_service_exam 中国公务员考试, "
    "chinese_food_culture 中国饮食文化, chinese_foreign_policy 中国外交政策, "
    "chinese_teacher_qualification 中国教师资格, college_education 大学教育学, economics 经济学, "
    "education 教育学, elementary_chinese 小学语文, ethnology 民族学, high_school_geography 高中地理, "
    "high_school_politics 高中政治, journalism 新闻学, management 管理学, marketing 市场营销, "
    "modern_chinese 现代汉语, professional_accounting 专业会计, professional_psychology 专业心理学, "
    "public_relations 公共关系, security_study 安全研究, sociology 社会学",
    "Other": "agronomy 农学, chinese_driving_rule 中国驾驶规则, clinical_knowledge 临床知识, "
    "college_medicine 大学医学, computer_security 计算机安全, construction_project_management 建设工程管理, "
    "elementary_commonsense 小学常识, elementary_information_and_technology 小学信息技术, "
    "food_science 食品科学, human_sexuality 人类性行为, legal_and_moral_basis 法律与道德基础, "
    "nutrition 营养学, professional_medicine 专业医学, sports_science 体育学, "
    "traditional_chinese_medicine 中医中药",
}
CMMLU_SUBJECTS = {
    key: (name, category)
    for category, entries in _CMMLU.items()
    for key, name in (entry.split() for entry in entries.split(", "))
}
CMMLU_CHINA = set(
    "ancient_chinese chinese_civil_service_exam chinese_driving_rule chinese_food_culture "
    "chinese_foreign_policy chinese_history chinese_literature chinese_teacher_qualification "
    "construction_project_management elementary_chinese elementary_commonsense ethnology "
    "high_school_politics modern_chinese traditional_chinese_medicine".split()
)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # None: a test question whose answer is withheld


@dataclass
class Subject:
    key: str  # the file's subject name, as in predictions and results
    name: str  # the name the prompt uses
    categories: tuple[str, ...]
    questions: list[Question]
    shots: list[Question] = field(default_factory=list)
    title: str = ""  # the name results show: C-Eval's Chinese name, else ``name``


def subject_file(task: str, data_dir: Path, split: str, key: str) -> Path:
    name = f"{key}.csv" if task == "cmmlu" else f"{key}_{split}.csv"
    return data_dir / split / name


def file_pattern(task: str, split: str) -> str:
    return "{subject}.csv" if task == "cmmlu" else f"{{subject}}_{split}.csv"


def list_subjects(task: str, data_dir: Path, split: str) -> list[str]:
    folder = data_dir / split
    pattern = f"{split}/{file_pattern(task, split)}"
    if not folder.is_dir():
        raise EvalError(
            f"{folder}: no {split}/ folder in --data_dir; {task} questions lie in --data_dir/{pattern} "
            "(unpack the benchmark as docs/evaluation.md shows)"
        )
    suffix = ".csv" if task == "cmmlu" else f"_{split}.csv"
    keys = sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))
    if not keys:
        raise EvalError(f"{folder}: no {pattern} files; unpack the benchmark as docs/evaluation.md shows")
    return keys


def read_questions(path: Path, task: str, answers_optional: bool) -> list[Question]:
    """One subject's CSV in its benchmark's layout; ``answers_optional``: empty answers are allowed."""
    if not path.is_file():
        raise EvalError(f"{path}: file not found; each subject needs one file per split it is read from")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(enumerate(csv.reader(handle), start=1))
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not valid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise EvalError(f"{path}: cannot read the CSV ({exc}); restore it from the download") from None
    rows = [(number, row) for number, row in rows if any(cell.strip() for cell in row)]
    if task == "mmlu":
        # MMLU's files have no header: question, the four options, the answer.
        width, columns = 6, {"id": None, "question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
    else:
        if not rows:
            raise EvalError(f"{path}: the file is empty; restore it from the download")
        _, header = rows.pop(0)
        columns = header_columns(path, task, header, answers_optional)
        width = len(header)
    if not rows:
        raise EvalError(f"{path}: holds no questions; restore it from the download or leave the subject out")
    questions = []
    for index, (line, row) in enumerate(rows):
        where = f"{path}, row {index + 1} (line {line})"
        if len(row) != width:
            raise EvalError(f"{where}: {len(row)} fields where {width} are expected; fix the row's quoting")
        answer_at = columns["answer"]
        answer = row[answer_at].strip() if answer_at is not None else ""
        if answer not in LETTERS and not (answers_optional and answer == ""):
            allowed = "A, B, C, D or empty" if answers_optional else "A, B, C or D"
            raise EvalError(f"{where}: the answer is {answer[:20]!r}; it must be {allowed}")
        identifier = row[columns["id"]].strip() if columns["id"] is not None else str(index)
        questions.append(
            Question(
                identifier,
                row[columns["question"]],
                tuple(row[columns[letter]] for letter in LETTERS),
                answer or None,
            )
        )
    return questions


def header_columns(path: Path, task: str, header: list[str], answers_optional: bool) -> dict[str, int | None]:
    names = [cell.strip() for cell in header]
    if task == "cmmlu":
        # CMMLU's header starts with an unnamed index column, then Question,A,B,C,D,Answer.
        wanted = {"question": "Question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "Answer"}
        columns = {"id": 0}
        expected = ",Question,A,B,C,D,Answer"
    else:
        wanted = {"id": "id", "question": "question", **{x: x for x in LETTERS}, "answer": "answer"}
        columns = {}
        expected = "id,question,A,B,C,D,answer[,explanation]"
    for key, name in wanted.items():
        if name in names:
            columns[key] = names.index(name)
        elif key == "answer" and answers_optional:
            columns[key] = None
        else:
            raise EvalError(
                f"{path}: the header has no {name!r} column (it has {','.join(names)[:80]!r}); "
                f"{task} files start with the header {expected}"
            )
    return columns


def read_mapping(data_dir: Path) -> dict[str, list]:
    """``subject_mapping.json`` (subject -> [English name, Chinese name, category]), or {} when absent."""
    path = data_dir / MAPPING_FILE
    if not path.is_file():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EvalError(
            f"{path}: not valid JSON ({exc}); restore it from the benchmark's repository"
        ) from None
    if not isinstance(mapping, dict):
        raise EvalError(f"{path}: expected an object of subject -> [English name, Chinese name, category]")
    for key, value in mapping.items():
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise EvalError(
                f"{path}: subject {key!r} maps to {str(value)[:60]!r}; each subject maps to "
                "[English name, Chinese name, category]"
            )
    return mapping


def describe(task: str, key: str, mapping: dict[str, list]) -> tuple[str, str, tuple[str, ...]]:
    """The subject's name in the prompt, its name in the results, and its categories. C-Eval's
    prompt names the subject by its file name, as Chinese-LLaMA-Alpaca's script does."""
    if key in mapping:
        english, chinese, category = mapping[key]
        name = {"ceval": key, "cmmlu": chinese, "mmlu": english}[task]
        return name, (english if task == "mmlu" else chinese), (category,)
    if task == "cmmlu" and key in CMMLU_SUBJECTS:
        name, category = CMMLU_SUBJECTS[key]
        return name, name, (category, "China specific") if key in CMMLU_CHINA else (category,)
    name = key.replace("_", " ") if task == "mmlu" else key
    return name, name, ()


def read_benchmark(
    task: str, data_dir: str | Path, split: str, n_shot: int, subjects: list[str] | None = None
) -> list[Subject]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"{data_dir}: --data_dir is not a folder; point it at the unpacked {task} benchmark")
    if split not in SPLITS[task]:
        raise EvalError(f"--split {split}: {task} has the splits {', '.join(SPLITS[task])}")
    if not 0 <= n_shot <= MAX_SHOTS:
        raise EvalError(f"--n_shot {n_shot}: give 0 to {MAX_SHOTS} examples from the dev split")
    if n_shot and split == "dev":
        raise EvalError(
            "--split dev takes --n_shot 0: the examples come from dev, so they would answer themselves"
        )
    found = list_subjects(task, data_dir, split)
    keys = found
    if subjects:
        unknown = [key for key in subjects if key not in found]
        if unknown:
            shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
            raise EvalError(
                f"{data_dir / split}: no subject {unknown[0]!r} (no file "
                f"{subject_file(task, data_dir, split, unknown[0]).name}); --subjects takes names of these "
                f"files: {shown}"
            )
        keys = list(dict.fromkeys(subjects))
    mapping = read_mapping(data_dir)
    result = []
    for key in keys:
        questions = read_questions(
            subject_file(task, data_dir, split, key), task, answers_optional=split == "test"
        )
        shots = []
        if n_shot:
            dev = subject_file(task, data_dir, "dev", key)
            shots = read_questions(dev, task, answers_optional=False)
            if len(shots) < n_shot:
                raise EvalError(
                    f"{dev}: holds {len(shots)} questions, fewer than --n_shot {n_shot}; lower --n_shot "
                    f"to {len(shots)} or less"
                )
            shots = shots[:n_shot]
        name, title, categories = describe(task, key, mapping)
        result.append(Subject(key, name, categories, questions, shots, title))
    return result


# ---------------------------------------------------------------------------------------------
# Prompts


def header(task: str, name: str) -> str:
    if task == "ceval":
        return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if task == "cmmlu":
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"


def format_question(task: str, question: Question, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, question.options, strict=True))
    if task == "ceval":
        text, answer = f"{question.question}{options}\n答案：", f"{question.answer}\n\n"
    elif task == "cmmlu":
        text, answer = f"题目：{question.question}{options}\n答案是：", f"{question.answer}\n\n"
    else:
        text, answer = f"{question.question}{options}\nAnswer:", f" {question.answer}\n\n"
    return text + answer if with_answer else text


def prompt_text(task: str, subject: Subject, question: Question) -> str:
    """The whole text before the answer. C-Eval's zero-shot prompt is the question alone, as in
    Chinese-LLaMA-Alpaca; CMMLU and MMLU always start with their header."""
    shots = "".join(format_question(task, shot, with_answer=True) for shot in subject.shots)
    lead = header(task, subject.name) if (subject.shots or task != "ceval") else ""
    return lead + shots + format_question(task, question, with_answer=False)


def subject_prompts(
    subject: Subject, task: str, tokenizer: TextTokenizer, template: Template | None
) -> list[list[int]]:
    texts = [prompt_text(task, subject, question) for question in subject.questions]
    if template is None:
        return [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(texts)]
    return [prompt_ids(template, tokenizer, text) for text in texts]


def letter_ids(tokenizer: TextTokenizer, task: str) -> list[tuple[int, int]]:
    colon = ":" if task == "mmlu" else "："
    return [(tokenizer.encode(letter)[0], tokenizer.encode(colon + letter)[-1]) for letter in LETTERS]


# ---------------------------------------------------------------------------------------------
# Scoring


def shared_prefix(prompts: list[list[int]]) -> int:
    """The length of the token prefix every prompt starts with, leaving each at least one token."""
    length = min(len(ids) for ids in prompts) - 1
    first = prompts[0]
    for ids in prompts[1:]:
        same = 0
        while same < length and ids[same] == first[same]:
            same += 1
        length = same
    return max(length, 0)


@torch.no_grad()
def predict(
    model,
    prompts: list[list[int]],
    letters: list[tuple[int, int]],
    batch_size: int,
    pad_id: int,
    advance: Callable[[int], None] | None = None,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """The letter whose two ids have the largest summed logit after each prompt.

    ``repetition_penalty`` rescales, as ``generate`` does, the logit of each id that occurs in the
    prompt (divided when positive, multiplied when negative) before the two are summed: the
    original evaluator read its scores from ``generate`` with a penalty of 1.1, and a letter id
    that occurs in one prompt may be absent from another, so it can change a pick.

    The shared prefix is run once; each batch of the rest is left-padded after it, the padding
    masked out and the positions counted past it, so every row sees what it would see alone."""
    device = next(model.parameters()).device
    start = shared_prefix(prompts)
    cache = None
    if start:
        prefix = torch.tensor([prompts[0][:start]], device=device)
        cache = model(input_ids=prefix, use_cache=True).cache
    alone = torch.tensor([pair[0] for pair in letters], device=device)
    after = torch.tensor([pair[1] for pair in letters], device=device)
    # Longest first, so a batch's rows are of similar length and a too-large batch fails at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    found: list[str] = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        tails = [prompts[i][start:] for i in rows]
        width = max(len(tail) for tail in tails)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), start + width), dtype=torch.long)
        mask[:, :start] = 1
        for row, tail in enumerate(tails):
            ids[row, width - len(tail) :] = torch.tensor(tail)
            mask[row, start + width - len(tail) :] = 1
        positions = (start + mask[:, start:].cumsum(-1) - 1).clamp(min=start)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
        logits = (
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                cache=past,
                use_cache=cache is not None,
                logits_to_keep=1,
            )
            .logits[:, -1, :]
            .float()
        )
        if repetition_penalty != 1.0:
            logits = penalize(logits, [prompts[i] for i in rows], letters, repetition_penalty)
        scores = logits[:, alone] + logits[:, after]
        for row, best in zip(rows, scores.argmax(-1).tolist(), strict=True):
            found[row] = LETTERS[best]
        if advance is not None:
            advance(len(rows))
    return found


def penalize(logits: torch.Tensor, prompts: list[list[int]], letters, penalty: float) -> torch.Tensor:
    """``logits`` with each letter id that occurs in its row's prompt rescaled by ``penalty``."""
    logits = logits.clone()
    ids = sorted({i for pair in letters for i in pair})
    for row, prompt in enumerate(prompts):
        seen = set(prompt)
        present = [i for i in ids if i in seen]
        if present:
            values = logits[row, present]
            logits[row, present] = torch.where(values < 0, values * penalty, values / penalty)
    return logits
