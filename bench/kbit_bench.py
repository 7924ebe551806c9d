#!/usr/bin/env python
"""Memory and speed of LoRA training over 16-, 8- and 4-bit base weights, side by side.

Builds one random LLaMA (by default ~1.1B parameters: hidden 2048, 22 layers, MLP 5632, 32 heads
with 4 key/value heads, 32,000-row vocabulary), then trains a LoRA on it with ``llama-sft train``
for each ``--load_in_kbits`` in its own child process, so each peak RSS is its own. Reported per
run: the base weights' bytes in memory, peak RSS (loading included: a k-bit run reads the 16-bit
checkpoint, whose file pages count while it is quantised), RSS and anonymous (non-file) RSS at the
end of training, and trained tokens/s. LoRA is on all seven projections and nothing is trained in full, so the base
weights are what differs. On a GPU, peak GPU memory too.

    python bench/kbit_bench.py [--bits 16,8,4] [--steps 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import train_bench

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="16,8,4", help="Comma list of --load_in_kbits values to run.")
    p.add_argument("--steps", type=int, default=10, help="Optimizer steps of each run.")
    p.add_argument("--batch", type=int, default=2, help="Records per step.")
    p.add_argument("--max-seq-length", type=int, default=128, help="Tokens kept of each record.")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument(
        "--out", default=None, help="Results JSON (default: bench/results/DATE_MACHINE_kbit.json)."
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace, scratch: Path) -> dict:
    """The random model, a tokenizer and records, in ``scratch``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_sft.tools.demo import make_tokenizer, write_alpaca

    shared = train_bench.SHARED
    data = shared / "data" / "alpaca_zh_demo.json"
    tokenizer = shared / "tokenizers" / "llama"
    if data.is_file() and (tokenizer / "tokenizer.model").is_file():
        data_file, tokenizer_dir = data, tokenizer
    else:  # no shared/: the demo's generated records and a tokenizer trained on them
        from llama_sft.tools.demo import demo_records

        train, _ = demo_records()
        data_file = scratch / "train.json"
        write_alpaca(train, data_file)
        tokenizer_dir = scratch / "tokenizer"
        make_tokenizer(tokenizer_dir, [r.instruction + " " + r.output for r in train])
    from llama_sft.data.tokenizer import TextTokenizer

    vocab = len(TextTokenizer.load(tokenizer_dir))  # with its pad token: no resizing in the runs
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    print(f"building a random LLaMA: hidden {args.hidden} x {args.layers} layers ...", flush=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(scratch / "model")
    del model
    print(f"  {params / 1e9:.2f}B parameters saved in bfloat16", flush=True)
    return {
        "model": str(scratch / "model"),
        "tokenizer": str(tokenizer_dir),
        "data": str(data_file),
        "params": params,
    }


def proc_status_mb(field: str) -> float:
    """A memory figure of /proc/self/status in MiB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bf16_is_fast() -> bool:
    """Whether the runs compute in bfloat16 (a GPU, or a CPU with native bfloat16), as llama-sft
    would choose; in float32 elsewhere, where PEFT's preparation keeps frozen weights in float32."""
    import torch

    from llama_sft.training.precision import cpu_bf16_is_fast

    return torch.cuda.is_available() or cpu_bf16_is_fast()[0]


def child(bits: int, w: dict, args: argparse.Namespace, scratch: Path) -> dict:
    """One training run in this process; returns its measurements."""
    import torch
    from transformers import TrainerCallback

    from llama_sft.training.run import train

    seen = {}

    class Measure(TrainerCallback):
        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            base = model.get_base_model()
            seen["weights_mb"] = (
                sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()]) / 2**20
            )
            seen["rss_after_load_mb"] = train_bench.peak_rss_mb()
            seen["start"] = time.perf_counter()

        def on_train_end(self, args_, state, control, **kwargs):
            seen["seconds"] = time.perf_counter() - seen["start"]
            seen["rss_end_mb"] = proc_status_mb("VmRSS")
            seen["anon_end_mb"] = proc_status_mb("RssAnon")
            seen["tokens"] = int(state.num_input_tokens_seen)

    out = scratch / f"run-{bits}"
    argv = [
        "--model_name_or_path", w["model"], "--tokenizer_name_or_path", w["tokenizer"],
        "--dataset_dir", w["data"], "--output_dir", str(out), "--overwrite_output_dir", "--do_train",
        "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
        "--max_seq_length", str(args.max_seq_length), "--learning_rate", "1e-4", "--lora_rank", "8",
        "--lora_alpha", "32", "--trainable", ",".join(train_bench.PROJECTIONS), "--modules_to_save", "null",
        "--torch_dtype", "bfloat16", "--load_in_kbits", str(bits), "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", "1", "--include_num_input_tokens_seen", "True",
        "--data_cache_dir", str(scratch / "cache"), "--disable_tqdm", "True",
        *(["--bf16"] if bf16_is_fast() else []),
    ]  # fmt: skip
    train(argv, callbacks=[Measure()])
    result = {
        "bits": bits,
        "weights_mb": round(seen["weights_mb"], 1),
        "peak_rss_after_load_mb": round(seen["rss_after_load_mb"], 1),
        "peak_rss_mb": round(train_bench.peak_rss_mb(), 1),
        "rss_end_mb": round(seen["rss_end_mb"], 1),
        "anon_end_mb": round(seen["anon_end_mb"], 1),
        "tokens_per_s": round(seen["tokens"] / seen["seconds"], 1),
        "steps": args.steps,
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        w = json.loads(Path(args.child).read_text())
        bits = int(w.pop("bits"))
        result = child(bits, w, args, Path(args.child).parent)
        Path(args.child).with_name(f"result-{bits}.json").write_text(json.dumps(result))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="llama-sft-kbit-") as tmp:
        scratch = Path(tmp)
        w = build(args, scratch)
        for bits in [int(b) for b in args.bits.split(",")]:
            spec = scratch / f"spec-{bits}.json"
            spec.write_text(json.dumps({**w, "bits": bits}))
            print(f"training over {bits}-bit base weights ...", flush=True)
            started = time.time()
            cmd = [sys.executable, __file__, "--child", str(spec), *(argv or sys.argv[1:])]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            result_file = scratch / f"result-{bits}.json"
            if proc.returncode != 0 or not result_file.is_file():
                print(proc.stdout[-3000:])
                results.append({"bits": bits, "error": f"exit status {proc.returncode}"})
                continue
            results.append(json.loads(result_file.read_text()))
            print(f"  {results[-1]} ({time.time() - started:.0f} s wall)", flush=True)
    ok = {r["bits"]: r for r in results if "error" not in r}
    print(
        f"\n{'base':>6s} {'weights':>10s} {'RSS peak':>10s} {'RSS end':>9s} {'anon end':>9s} {'tokens/s':>9s}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['bits']:>4d}-bit  {r['error']}")
            continue
        print(
            f"{r['bits']:>4d}-bit {r['weights_mb']:>7.0f} MB {r['peak_rss_mb']:>7.0f} MB "
            f"{r['rss_end_mb']:>6.0f} MB {r['anon_end_mb']:>6.0f} MB {r['tokens_per_s']:>9.1f}"
        )
    if 16 in ok and 4 in ok:
        share = ok[4]["weights_mb"] / ok[16]["weights_mb"]
        print(f"4-bit base weights: {share:.2f} of the 16-bit ones' memory")
    out = Path(args.out) if args.out else train_bench.default_out(argparse.Namespace(quick=False), "kbit")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = train_bench.machine_slug()
    report = {"machine": machine, "params": w["params"], "bf16": bf16_is_fast(), "runs": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
