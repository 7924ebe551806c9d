"""Tokenizing conversations: time and peak memory of reading and encoding N generated ShareGPT
conversations (six turns each: three user/assistant exchanges, mixed Chinese and English) with a
SentencePiece tokenizer, as ``llama-sft train`` does before training (``load_records`` then
``encode_records`` with ``--preprocessing_num_workers``).

    python bench/conversation_bench.py --tokenizer ../shared/tokenizers/chinese-llama-2 \
        --conversations 20000 --workers 2 [--output bench/results/NAME.json]

Peak RSS is the process's VmHWM, read from /proc at the end (the process does nothing else); the
RSS after imports is reported beside it, so the data's own share is the difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from llama_sft.data.encode import encode_records
from llama_sft.data.records import load_records
from llama_sft.data.templates import load_template
from llama_sft.data.tokenizer import TextTokenizer

WORDS = "the model answers 问题 with 答案 and explains 为什么 each step of training takes time 数据".split()


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def conversation(rng: random.Random) -> dict:
    turns = []
    for _ in range(3):
        turns.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))})
        turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))})
    return {"conversations": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--template", default="llama2-chat")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rss_start = proc_status_mb("VmRSS")
    tokenizer = TextTokenizer.load(args.tokenizer)
    template = load_template(args.template)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "talks.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for _ in range(args.conversations):
                out.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
        size_mb = path.stat().st_size / 2**20
        start = time.perf_counter()
        records = load_records(path)
        read_s = time.perf_counter() - start
        dataset, stats = encode_records(
            records, template, tokenizer, args.max_seq_length, num_workers=args.workers
        )
        total_s = time.perf_counter() - start
    result = {
        "machine": platform.processor() or platform.machine(),
        "tokenizer": f"{args.tokenizer} ({len(tokenizer)} pieces)",
        "template": args.template,
        "conversations": args.conversations,
        "file_mb": round(size_mb, 1),
        "workers": args.workers,
        "max_seq_length": args.max_seq_length,
        "read_s": round(read_s, 2),
        "read_and_encode_s": round(total_s, 2),
        "conversations_per_s": round(args.conversations / total_s),
        "tokens": dataset.num_tokens(),
        "stats": stats.to_dict(),
        "rss_after_imports_mb": round(rss_start),
        "rss_peak_mb": round(proc_status_mb("VmHWM")),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
