#!/usr/bin/env python
"""The C-Eval evaluation of Chinese-LLaMA-Alpaca-2 (``scripts/ceval/eval.py`` and
``llama_evaluator.py``), rebuilt as the baseline of ``bench/eval_bench.py``.

What it keeps of the original, since each of these decides a prediction:

- the tokenizer: the original loads the slow ``LlamaTokenizer`` with ``legacy=True``, which is
  SentencePiece's own segmentation with BOS first for text without special tokens. Transformers 5
  no longer has that class (its ``LlamaTokenizer`` is a ``tokenizers`` BPE converted from the same
  file, which cuts some Chinese text into other pieces), so ``SentencePieceTokenizer`` below
  calls SentencePiece directly;
- the prompts: zero-shot is the question, its four options and ``答案：`` with no header; K-shot puts
  ``以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。`` (``subject`` is the file's English
  name) and the first K dev questions with their answers before it; ``--with_prompt`` wraps the
  question in the Llama-2 chat template with the original's system prompt (and the few-shot prefix
  in its own variant of it);
- constrained decoding: one ``model.generate`` call per question, one new token, the original's
  sampling settings (temperature 0.2, top-k off, top-p 1.0, repetition penalty 1.1) with
  ``output_scores``, so the scores read are the processed ones (penalised and divided by the
  temperature); the predicted letter is the argmax over A-D of the score of the letter encoded
  alone (``▁A``) plus its score encoded after a full-width colon (``A``).

What differs: float32 on the CPU (the original loads float16 on a GPU with ``device_map='auto'``),
subjects in sorted order (the original takes ``os.listdir``'s), and predictions are written as
JSON lines instead of ``submission.json``.

    python bench/eval_original.py --model_path MODEL --data_dir CEVAL --n_shot 5 --output preds.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHOICES = ["A", "B", "C", "D"]
SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"
CHAT_TEMPLATE = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"


def format_example(row, include_answer: bool) -> str:
    """A question and its options; with its answer and a blank line when it is a shot."""
    text = row["question"]
    for choice in CHOICES:
        text += f"\n{choice}. {row[choice]}"
    return text + ("\n答案：" + row["answer"] + "\n\n" if include_answer else "\n答案：")


def few_shot_prefix(subject: str, dev_rows: list, with_prompt: bool) -> str:
    header = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    if not with_prompt:
        return header + "".join(format_example(row, include_answer=True) for row in dev_rows)
    prefix = CHAT_TEMPLATE.format(instruction=header, system_prompt=SYSTEM_PROMPT)
    prefix += f"好的，我会结合{subject}相关知识回答"
    for row in dev_rows:
        question = format_example(row, include_answer=False).removesuffix("\n答案：")
        prefix += "[INST] " + question + "\n答案：[/INST]" + row["answer"] + "\n"
    return prefix


def question_prompt(row, prefix: str, with_prompt: bool) -> str:
    instruction = format_example(row, include_answer=False)
    if with_prompt:
        instruction = CHAT_TEMPLATE.format(instruction=instruction, system_prompt=SYSTEM_PROMPT)
    return prefix + instruction


def read_split(data_dir: Path, split: str, subject: str):
    import pandas as pd

    return pd.read_csv(data_dir / split / f"{subject}_{split}.csv")


def subjects_of(data_dir: Path, split: str) -> list[str]:
    return sorted(p.name.removesuffix(f"_{split}.csv") for p in (data_dir / split).glob(f"*_{split}.csv"))


def prompts(data_dir: Path, n_shot: int, with_prompt: bool, split: str = "val") -> list[dict]:
    """Every question's prompt as the original builds it, subject by subject."""
    out = []
    for subject in subjects_of(data_dir, split):
        questions = read_split(data_dir, split, subject)
        prefix = ""
        if n_shot > 0:
            dev = read_split(data_dir, "dev", subject)
            prefix = few_shot_prefix(subject, [dev.iloc[i] for i in range(n_shot)], with_prompt)
        for _, row in questions.iterrows():
            out.append(
                {
                    "subject": subject,
                    "id": int(row["id"]),
                    "answer": row["answer"],
                    "prompt": question_prompt(row, prefix, with_prompt),
                }
            )
    return out


class SentencePieceTokenizer:
    """The slow ``LlamaTokenizer(legacy=True)``'s behaviour on text without special tokens: the
    SentencePiece model's pieces, BOS first unless ``add_special_tokens=False``."""

    def __init__(self, folder: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        pad = self.sp.piece_to_id("<pad>")
        self.pad_token_id = pad if pad != self.sp.unk_id() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + self.sp.encode(text)

    def __call__(self, text: str, return_tensors: str = "pt") -> dict:
        import torch

        ids = torch.tensor([self.encode(text)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class OriginalEvaluator:
    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.tokenizer = SentencePieceTokenizer(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()
        self.generation_config = GenerationConfig(
            temperature=0.2,
            top_k=0,
            top_p=1.0,
            do_sample=True,
            num_beams=1,
            repetition_penalty=1.1,
            max_new_tokens=1,
            output_scores=True,
            return_dict_in_generate=True,
            # Not the original's: the raw logits as well, read only to explain where other rules differ.
            output_logits=True,
        )
        # Each letter is scored twice: as the text "A" alone (with its word-start piece) and as it
        # follows "答案：" (without one), the original's two readings of what an answer starts with.
        encode = self.tokenizer.encode
        self.alone_ids = [encode(c, add_special_tokens=False)[0] for c in CHOICES]
        self.after_colon_ids = [encode("：" + c)[-1] for c in CHOICES]

    def predict(self, prompt: str) -> dict:
        """The letter the original picks for one prompt, the prompt's length in tokens, and the
        letters two other rules would pick from the same forward pass: the two pieces' raw logits
        summed (no repetition penalty), and the raw logit of the piece after the colon alone."""
        import torch

        inputs = self.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                generation_config=self.generation_config,
            )
        scores = output.scores[0][0].float()
        summed = scores[self.alone_ids] + scores[self.after_colon_ids]
        if not torch.isfinite(summed).all():
            raise ValueError(f"non-finite letter scores {summed.tolist()}")
        logits = output.logits[0][0].float()
        raw = logits[self.alone_ids] + logits[self.after_colon_ids]
        return {
            "prediction": CHOICES[int(summed.argmax())],
            "raw_sum": CHOICES[int(raw.argmax())],
            "after_colon": CHOICES[int(logits[self.after_colon_ids].argmax())],
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "letter_scores": summed.tolist(),
        }


def evaluate(model_path: str, data_dir: Path, n_shot: int, with_prompt: bool) -> dict:
    import torch

    torch.manual_seed(42)
    start = time.perf_counter()
    evaluator = OriginalEvaluator(model_path)
    loaded = time.perf_counter()
    rows, prompt_tokens = [], 0
    for item in prompts(data_dir, n_shot, with_prompt):
        picked = evaluator.predict(item["prompt"])
        prompt_tokens += picked.pop("prompt_tokens")
        picked.pop("letter_scores")
        rows.append({"subject": item["subject"], "id": item["id"], "answer": item["answer"], **picked})
    done = time.perf_counter()
    return {
        "predictions": rows,
        "load_s": round(loaded - start, 3),
        "eval_s": round(done - loaded, 3),
        "prompt_tokens": prompt_tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="Model folder (tokenizer saved with it).")
    parser.add_argument("--data_dir", required=True, help="C-Eval folder: dev/ and val/ CSV files.")
    parser.add_argument("--n_shot", type=int, default=5, help="Dev questions before each question (0: none).")
    parser.add_argument("--with_prompt", action="store_true", help="Wrap prompts in the chat template.")
    parser.add_argument("--output", required=True, help="Predictions, one JSON line per question.")
    parser.add_argument("--timing", help="JSON file for load and evaluation seconds.")
    args = parser.parse_args(argv)
    result = evaluate(args.model_path, Path(args.data_dir), args.n_shot, args.with_prompt)
    with open(args.output, "w", encoding="utf-8") as f:
        for row in result.pop("predictions"):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.timing:
        Path(args.timing).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
