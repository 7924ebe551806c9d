"""Throughput and latency of ``llama-sft serve`` through the real ``openai`` client, on loopback.

Starts ``llama-sft serve`` as a subprocess on a free port (or uses ``--url``), then sends the same
``--requests`` streamed chat requests at each concurrency in ``--concurrency`` and reports generated
tokens/s, time to first token and p50/p95 latency. ``--load_test N`` then sends N requests at
concurrency 16, every tenth one bad, and checks that every good one is answered, every bad one gets
a 4xx and none a 5xx, with the server's RSS sampled after each request. Results go to ``--output``.

    python bench/serve_bench.py --base_model demo_output/base_model \
        --lora_model demo_output/output/sft_lora_model --load_test 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import psutil

QUESTIONS = [
    "What is 黑色 in English?",
    "Translate to Chinese: red",
    "把这个英文词翻译成中文：three",
    "Give the English word for 红色.",
    "Translate to English: 五",
    "What is water in Chinese?",
    "把这个英文词翻译成中文：yellow",
    "Give the Chinese word for ten.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_sft.cli", "serve", "--port", str(port), "--max_batch_size", "16"]
    if args.model:
        command += ["--model", args.model]
    else:
        command += ["--base_model", args.base_model, "--lora_model", args.lora_model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


def one_request(client: openai.OpenAI, model: str, question: str, max_tokens: int, seed: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        # Every answer max_tokens long, so that the levels decode the same number of tokens.
        extra_body={"min_tokens": max_tokens},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"ttft": first if first is not None else latency, "latency": latency, "tokens": tokens}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def run_level(client, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    jobs = [(QUESTIONS[i % len(QUESTIONS)], i) for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: one_request(client, model, job[0], max_tokens, job[1]), jobs))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "generated_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(r["ttft"] for r in results), 1),
        "latency_p50_ms": round(1000 * percentile([r["latency"] for r in results], 0.5), 1),
        "latency_p95_ms": round(1000 * percentile([r["latency"] for r in results], 0.95), 1),
    }


BAD_BODIES = [
    b'{"model": "MODEL", "messages": [}',
    b'{"model": "MODEL", "messages": []}',
    b'{"model": "MODEL", "messages": [{"role": "robot", "content": "hi"}]}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}',
    b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "MODEL", "messages": [{"role": "assistant", "content": "hi"}]}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": 5}]}',
]


def load_test(url: str, model: str, total: int, pid: int | None) -> dict:
    process = psutil.Process(pid) if pid else None
    rss: list[float] = []
    statuses: dict[str, int] = {}

    def send(number: int) -> tuple[bool, int]:
        bad = number % 10 == 9
        if bad:
            body = BAD_BODIES[number // 10 % len(BAD_BODIES)].replace(b"MODEL", model.encode())
        else:
            question = QUESTIONS[number % len(QUESTIONS)]
            body = json.dumps(
                {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16}
            ).encode()
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300)
        if process is not None:
            rss.append(process.memory_info().rss / 2**20)
        return bad, response.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(total)))
    for bad, status in results:
        key = f"{'bad' if bad else 'good'} {status}"
        statuses[key] = statuses.get(key, 0) + 1
    good_ok = all(status == 200 for bad, status in results if not bad)
    bad_4xx = all(400 <= status < 500 for bad, status in results if bad)
    warm = rss[len(rss) // 4 :] if rss else []
    return {
        "requests": total,
        "concurrency": 16,
        "wall_s": round(time.perf_counter() - start, 1),
        "statuses": statuses,
        "every_good_answered": good_ok,
        "every_bad_4xx": bad_4xx,
        "no_5xx": all(status < 500 for _, status in results),
        "rss_mib_after_warmup": {
            "first": round(warm[0], 1),
            "max": round(max(warm), 1),
            "last": round(warm[-1], 1),
        }
        if warm
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Merged model folder.")
    parser.add_argument("--base_model", default="demo_output/base_model", help="Base model folder.")
    parser.add_argument("--lora_model", default="demo_output/output/sft_lora_model", help="LoRA folder.")
    parser.add_argument("--url", help="Use a running server instead of starting one.")
    parser.add_argument("--api_key", default="none", help="The running server's key (with --url).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="Concurrency levels.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    parser.add_argument("--max_tokens", type=int, default=32, help="max_tokens of each request.")
    parser.add_argument("--load_test", type=int, default=0, help="Requests in the load test (0: none).")
    parser.add_argument("--output", default=None, help="JSON results file.")
    args = parser.parse_args()
    server, url = (None, args.url) if args.url else start_server(args)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        run_level(client, model, max(args.concurrency), max(args.concurrency), args.max_tokens)  # warm-up
        levels = [run_level(client, model, c, args.requests, args.max_tokens) for c in args.concurrency]
        for level in levels:
            print(json.dumps(level))
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "levels": levels,
            "speedup": round(levels[-1]["tokens_per_s"] / levels[0]["tokens_per_s"], 2),
        }
        print(f"throughput at concurrency {levels[-1]['concurrency']}: {result['speedup']}x concurrency 1")
        if args.load_test:
            result["load_test"] = load_test(url, model, args.load_test, server.pid if server else None)
            print(json.dumps(result["load_test"]))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
