#!/usr/bin/env python
"""What each speed-up buys: one training step with each turned off in turn, through the switch.

Times the forward and backward of the same micro-batch of 8 records (the first 8 of the
benchmark's training data, the default workload of train_bench.py) under ``llama-sft train``'s
own set-up for this machine (``--speedups auto``), then with ``--speedups off`` and with each
speed-up left out in turn (``--skip_speedups NAME``), the variants interleaved and repeated so
that every one sees the same machine, and reports the median time and tokens/s of each:

    all              every speed-up that fits this machine
    off              stock transformers and PEFT modules, attention and loss (packed row kept)
    -packing         a right-padded batch of 8 with a padding mask (what the original does)
    -NAME            all but the speed-up NAME (the names of ``llama_sft.speedups.NAMES``;
                     -labelled_logits also leaves out fused_head, which needs it)

Every variant is built by the same entry point as training (``speedups.apply``) and stepped by
the same ``SftTrainer.compute_loss``; the optimizer step is the same for every variant and is left
out. The step runs in llama-sft's dtype on this machine (--dtype chooses). On a GPU the step runs
there and each time ends with a synchronisation. Options it does not know go to train_bench.py's
workload (--hidden 2048 --layers 16 ...). --profile N prints the N ops that took the most time in
one step of "all" (torch.profiler) and writes the table beside --out.

    python bench/step_ablation.py [--quick] [--reps 8] [--variants all,off,-fused_head] [--profile 25]
                                  [--out FILE.json] [train_bench.py options]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import train_bench

import llama_sft.speedups as speedups

# As `llama-sft train` does, before anything allocates a tensor.
speedups.prepare_process(set())

# cpu_environment is set when the process starts, so it cannot be left out of one variant.
VARIANTS = ("all", "off", "-packing", *(f"-{name}" for name in speedups.NAMES if name != "cpu_environment"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="The quick model of train_bench.py.")
    p.add_argument("--reps", type=int, default=8, help="Timed repetitions of every variant.")
    p.add_argument("--records", type=int, default=8, help="Records in the micro-batch.")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma list of variants to time.")
    p.add_argument("--profile", type=int, default=0, help="Print this many top ops of one profiled step.")
    p.add_argument(
        "--out", default=None, help="Results JSON (default: bench/results/DATE_MACHINE_ablation.json)."
    )
    return p.parse_known_args(argv)


def variant_flags(variant: str) -> list[str]:
    if variant == "off":
        return ["--speedups", "off"]
    if variant == "-packing":
        return ["--packing", "False"]
    if variant == "-labelled_logits":
        return ["--skip_speedups", "labelled_logits,fused_head"]
    if variant.startswith("-"):
        return ["--skip_speedups", variant[1:]]
    return []


def build_variant(variant: str, w: dict, dtype: str, scratch: Path):
    """(trainer, speed-ups applied) for one variant, set up as ``llama-sft train`` sets up a run."""
    import torch

    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.training.args import parse_train_args
    from llama_sft.training.model import attach_lora, load_base_model
    from llama_sft.training.precision import Machine
    from llama_sft.training.trainer import SftTrainer

    argv = [
        "--model_name_or_path", w["model"], "--tokenizer_name_or_path", w["tokenizer"],
        "--output_dir", str(scratch / variant), "--report_to", "none", "--lora_rank", "8",
        "--lora_alpha", "32", "--lora_dropout", "0.05", "--trainable", ",".join(train_bench.PROJECTIONS),
        "--modules_to_save", "embed_tokens,lm_head", "--torch_dtype", dtype,
        *(["--bf16"] if dtype == "bfloat16" else []), *variant_flags(variant),
    ]  # fmt: skip
    args = parse_train_args(argv, Machine.detect())
    size = len(TextTokenizer.load(w["tokenizer"]))
    torch.manual_seed(0)

    def build_model():
        return attach_lora(load_base_model(args.model, size, getattr(torch, dtype)), args.lora)

    fast = speedups.apply(args, build_model)
    trainer = SftTrainer(model=fast.model, args=args.training, loss=fast.loss, autocast=fast.autocast)
    # As the Trainer prepares it for training: accelerate's autocast where llama-sft's is not used.
    model = trainer.accelerator.prepare_model(trainer.model).train()
    return trainer, model, fast


def main(argv: list[str] | None = None) -> None:
    import torch

    from llama_sft.data.collate import Collator
    from llama_sft.data.encode import IGNORE_INDEX, encode_records
    from llama_sft.data.packing import PackingCollator
    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.speedups import cpu_kernels

    args, workload_args = parse_args(argv)
    bench_args = train_bench.parse_args((["--quick"] if args.quick else []) + workload_args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = train_bench.llama_sft_dtype(bench_args)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="llama-sft-ablation-") as tmp:
        w = train_bench.prepare_workload(bench_args, Path(tmp))
        tokenizer = TextTokenizer.load(w["tokenizer"])
        records = load_records(w["train_json"])[: args.records]
        data, _ = encode_records(records, load_template("alpaca"), tokenizer, w["max_seq_length"])
        examples = [data[i] for i in range(len(data))]
        built = {v: build_variant(v, w, dtype, Path(tmp)) for v in variants}
    packed, padded = PackingCollator()(examples), Collator(tokenizer.pad_id)(examples)
    packed, padded = ({k: v.to(device) for k, v in batch.items()} for batch in (packed, padded))
    tokens = sum(len(e["input_ids"]) for e in examples)
    count = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    # The kernels are switched per process; each variant steps with its own choice.
    kernels_on = {v: fast.report["cpu_kernels"].startswith("applied") for v, (_, _, fast) in built.items()}

    def step(variant: str) -> None:
        trainer, model, _ = built[variant]
        cpu_kernels.set_enabled(kernels_on[variant])
        batch = dict(padded if variant == "-packing" else packed)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch, num_items_in_batch=count)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {v: [] for v in variants}
    for variant in variants:
        step(variant)  # warm-up: oneDNN primitives, allocator
    for _ in range(args.reps):
        for variant in variants:
            start = time.perf_counter()
            step(variant)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[variant].append(time.perf_counter() - start)
    median = {v: statistics.median(t) for v, t in times.items()}
    base = median.get("all") or min(median.values())
    rows = [
        {
            "variant": v,
            "median_ms": round(median[v] * 1000, 1),
            "min_ms": round(min(times[v]) * 1000, 1),
            "tokens_per_s": round(tokens / median[v], 1),
            "slowdown": round(median[v] / base, 3),
        }
        for v in variants
    ]
    print(
        f"{args.records} records, {tokens} tokens, forward + backward on {device.type} in {dtype}, median of {args.reps}:"
    )
    print(f"{'variant':24s} {'median ms':>10s} {'min ms':>8s} {'tokens/s':>9s} {'x all':>6s}")
    for r in rows:
        print(
            f"{r['variant']:24s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['tokens_per_s']:9.1f} "
            f"{r['slowdown']:6.2f}"
        )
    out = Path(args.out) if args.out else train_bench.default_out(bench_args, "ablation")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "records": args.records,
        "tokens": tokens,
        "reps": args.reps,
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else train_bench.machine_slug(),
        "dtype": dtype,
        "workload_args": workload_args,
        "speedups": {v: fast.report for v, (_, _, fast) in built.items()},
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.profile and "all" in built:
        table = profile_step(lambda: step("all"), device, args.profile)
        print(table)
        out.with_suffix(".profile.txt").write_text(table + "\n")


def profile_step(step, device, rows: int) -> str:
    """The ``rows`` ops with the most self time in one call of ``step``, and the step's wall time
    against its device time (on a GPU, a wall time well above the kernels' is launch overhead)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = f"one step of 'all' under the profiler: {wall * 1000:.1f} ms wall"
    if device.type == "cuda":
        kernels = sum(e.self_device_time_total for e in events) / 1000
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
        head += f", {kernels:.1f} ms of device time, {launches} kernel launches"
    return head + "\n" + events.table(sort_by=sort, row_limit=rows)


if __name__ == "__main__":
    sys.exit(main())
