#!/usr/bin/env python
"""Pre-training data stage on a large corpus: time and memory of ``build_blocks``.

Generates a folder of plain-text files (one document a line) from the shared Chinese records' text:
their clauses (cut at Chinese and Latin punctuation and line breaks) recombined at random into new
sentences of 1-3 clauses, 2-30 sentences a document, each document headed by its number, so that
no two documents repeat and the text keeps the records' vocabulary and mix of Chinese, Latin and
code. Then tokenizes it with ``llama_sft.data.pretrain.build_blocks`` in a child process (so its
peak RSS is its own), printing progress as it goes, and maps the cached result in a second child.

    python bench/corpus_bench.py                    # 2 GB in 8 files, 2 workers, block 512
    python bench/corpus_bench.py --size-gb 0.2 2    # several sizes, one after the other
    python bench/corpus_bench.py --size-gb 0.05     # a quick check

The corpus and the cache go to a temporary folder (under --tmp, default the system's) and are
deleted afterwards unless --keep. Writes bench/results/DATE_MACHINE_corpus.json, or --out.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_bench as tb  # noqa: E402  (sets sys.path for llama_sft and the offline environment)
from pretrain_bench import load_average  # noqa: E402

CLAUSE_END = re.compile(r"(?<=[，。！？；：,.!?;:\n])")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, nargs="+", default=[2.0], help="Corpus sizes in GB (10^9 bytes).")
    p.add_argument("--files", type=int, default=8, help="Files a corpus is written in.")
    p.add_argument("--workers", type=int, default=2, help="num_workers (--preprocessing_num_workers).")
    p.add_argument("--block-size", type=int, default=512, help="--block_size.")
    p.add_argument(
        "--data", default=str(tb.SHARED / "data" / "alpaca_zh_demo.json"), help="Alpaca JSON file."
    )
    p.add_argument(
        "--tokenizer", default=str(tb.SHARED / "tokenizers" / "chinese-llama-2"), help="Tokenizer folder."
    )
    p.add_argument(
        "--tmp", default=None, help="Where the corpus and cache folder is made (default: the system's)."
    )
    p.add_argument("--keep", action="store_true", help="Keep the generated corpus and cache.")
    p.add_argument(
        "--out", default=None, help="Results JSON (default: bench/results/DATE_MACHINE_corpus.json)."
    )
    p.add_argument("--child", choices=["tokenize", "cached"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The corpus.


def clauses(data: str) -> list[str]:
    from llama_sft.data.records import load_records

    pool = set()
    for record in load_records(data):
        for field in (record.instruction, record.input, record.output):
            for piece in CLAUSE_END.split(field):
                piece = " ".join(piece.split())
                if len(piece) >= 2:
                    pool.add(piece)
    return sorted(pool)


def document(rng: random.Random, pool: list[str], number: int) -> str:
    sentences = []
    for _ in range(rng.randint(2, 30)):
        sentence = "".join(rng.choices(pool, k=rng.randint(1, 3)))
        sentences.append(sentence if sentence[-1] in "。！？.!?" else sentence + "。")
    return f"第{number}篇 " + "".join(sentences)


def generate(folder: Path, size: int, files: int, pool: list[str]) -> dict:
    """Writes ``files`` files of together about ``size`` bytes; prints progress."""
    folder.mkdir(parents=True)
    rng, number, written, started = random.Random(0), 0, 0, time.perf_counter()
    per_file, next_report = size // files, size // 10
    for index in range(files):
        path, in_file = folder / f"part-{index:02d}.txt", 0
        with path.open("wb") as out:
            while in_file < per_file:
                lines = []
                for _ in range(100):
                    number += 1
                    lines.append(document(rng, pool, number))
                chunk = ("\n".join(lines) + "\n").encode("utf-8")
                out.write(chunk)
                in_file += len(chunk)
                written += len(chunk)
                if written >= next_report:
                    next_report += size // 10
                    print(
                        f"  generated {written / 1e9:.2f} of {size / 1e9:.2f} GB "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
    return {"bytes": written, "files": files, "documents": number}


# ---------------------------------------------------------------------------------------------
# The measurement, in a child process.


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watch(cache: Path, started: float, stop: threading.Event, itemsize: int) -> None:
    """Every 10 s: the tokens written so far (the temporary token file's size), speed and RSS."""
    while not stop.wait(10):
        parts = list(cache.glob("*.tokens.tmp"))
        tokens = sum(p.stat().st_size for p in parts if p.exists()) // itemsize
        seconds = time.perf_counter() - started
        print(
            f"  {seconds:5.0f} s: {tokens / 1e6:7.1f} M tokens written, {tokens / seconds / 1e6:.2f} M tokens/s, "
            f"RSS {rss_mb():.0f} MiB (peak {tb.peak_rss_mb():.0f})",
            flush=True,
        )


def child(args: argparse.Namespace) -> None:
    from llama_sft.data.pretrain import _dtype, build_blocks, find_text_files
    from llama_sft.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(args.tokenizer)
    files = find_text_files(args.corpus)
    before = rss_mb()
    cache = Path(args.cache)
    stop, started = threading.Event(), time.perf_counter()
    itemsize = 2 if _dtype(tokenizer).__name__ == "uint16" else 4
    watcher = threading.Thread(target=watch, args=(cache, started, stop, itemsize), daemon=True)
    watcher.start()
    _, stats, from_cache = build_blocks(files, tokenizer, args.block_size, cache, args.workers)
    seconds = time.perf_counter() - started
    stop.set()
    result = {
        "phase": args.child,
        "from_cache": from_cache,
        "seconds": round(seconds, 2),
        "documents": stats.documents,
        "tokens": stats.tokens,
        "blocks": stats.blocks,
        "dropped_tokens": stats.dropped_tokens,
        "tokens_per_s": round(stats.tokens / seconds) if not from_cache else None,
        "rss_before_mb": round(before),
        "peak_rss_mb": round(tb.peak_rss_mb()),
        "cache_bytes": sum(p.stat().st_size for p in cache.glob("pretrain-*.tokens")),
        "report": stats.report("train"),
    }
    Path(args.result).write_text(json.dumps(result))


def measure(phase: str, corpus: Path, cache: Path, args: argparse.Namespace) -> dict:
    result = cache.parent / f"result-{phase}.json"
    cmd = [sys.executable, __file__, "--child", phase, "--corpus", str(corpus), "--cache", str(cache),
           "--result", str(result), "--workers", str(args.workers), "--block-size", str(args.block_size),
           "--tokenizer", args.tokenizer]  # fmt: skip
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"the {phase} child failed (exit status {proc.returncode})")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    machine = tb.describe_machine()
    load_start = load_average()
    print(f"machine: {machine['cpu']} ({machine['name']}), load average {load_start}", flush=True)
    pool = clauses(args.data)
    print(f"{len(pool):,} distinct clauses from {args.data}", flush=True)
    rows = []
    for size_gb in args.size_gb:
        tmp = Path(tempfile.mkdtemp(prefix="llama-sft-corpus-", dir=args.tmp))
        try:
            print(f"\n{size_gb:g} GB corpus in {tmp}:", flush=True)
            corpus = generate(tmp / "text", int(size_gb * 1e9), args.files, pool)
            print(
                f"  {corpus['documents']:,} documents, {corpus['bytes'] / 1e9:.2f} GB in {corpus['files']} files"
            )
            print(f"tokenizing with {args.workers} workers, block {args.block_size}:", flush=True)
            load = load_average()
            first = measure("tokenize", tmp / "text", tmp / "cache", args)
            print(
                f"  {first['report']}\n  {first['seconds']} s, {first['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                f"peak RSS {first['peak_rss_mb']} MiB ({first['rss_before_mb']} MiB before reading), "
                f"cache {first['cache_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
            again = measure("cached", tmp / "text", tmp / "cache", args)
            print(f"  cached: {again['seconds']} s, peak RSS {again['peak_rss_mb']} MiB", flush=True)
            load = {"before": load, "after": load_average()}
            rows.append({"size_gb": size_gb, "corpus": corpus, "load_average": load, "tokenize": first,
                         "cached": again})  # fmt: skip
        finally:
            if args.keep:
                print(f"  kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    machine["load_average"] = {"start": load_start, "end": load_average()}
    settings = {"workers": args.workers, "block_size": args.block_size, "files": args.files}
    out = Path(args.out) if args.out else tb.default_out(args, "corpus")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "settings": settings, "tokenizer": Path(args.tokenizer).name, "runs": rows}
    places = {str(tb.SHARED): "$SHARED", str(tb.ROOT): "."}
    out.write_text(json.dumps(tb.without_local_paths(report, places), indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
