#!/usr/bin/env python
"""What each part of llama-sft's training step buys: one change turned off at a time.

Times the forward and backward of the same micro-batch of 8 records (the first 8 of the
benchmark's training data, the default workload of train_bench.py) under llama-sft's default
CPU path, then with one of its changes undone, the variants interleaved and repeated so that
every one sees the same machine, and reports the median time and tokens/s of each:

    all                 the default path: packed row, record-by-record attention (one CPU
                        kernel call per layer; on a GPU one masked sdpa call), BitsDropout,
                        labelled-only lm_head fused with the loss and both gradients in the
                        forward, bfloat16 residual stream,
                        our autocast, fused norms and MLPs, lm_head's weight cast into a kept
                        buffer, the head's logits and the vocabulary gradients in kept memory
                        (CPU), the model's own lm_head call on no positions outside autocast,
                        LoRA updates summed inside the products
    -packing            right-padded batch of 8 with a padding mask (what the original does)
    -packed-attention   sdpa with transformers' block-diagonal (n, n) mask
    -row-at-once        on a GPU, one sdpa call per record, not one masked call for the row
    -bits-dropout       torch.nn.Dropout for LoRA
    -cpu-kernels        PyTorch's ops where the fused CPU kernels run (dropout bits from NumPy,
                        select and scale; a log-softmax per 16 rows of logits; one sdpa call per
                        record)
    -labelled-lm_head   logits at every position (labels -100 where the prompt is)
    -fused-head         the model's lm_head makes the logits; the loss alone is fused
    -fused-ce           torch's cross_entropy on the model's logits (float32 upcast, as usual)
    -base-dtype-residual  the float32 embedding's output left in float32, and the residual stream
    -own-autocast       accelerate's float32 copy of the logits and PEFT's float32 LoRA inputs
    -fused-modules      transformers' own RMSNorm and MLP modules (PyTorch's ops)
    -fused-lora         PEFT's LoRA Linear forward (the scaled update added as two new tensors)
    -kept-gradients     new tensors for the embedding's and lm_head's gradients and the head's
                        logits every step
    -empty-head-outside-autocast  the model's lm_head on no positions under autocast, which casts
                        its weight

The step runs in llama-sft's dtype on this machine: bfloat16 autocast over bfloat16 frozen
weights, or float32 throughout on a CPU without bfloat16 matrix units (--dtype chooses), where
-base-dtype-residual, -own-autocast and -empty-head-outside-autocast change nothing.
The optimizer step is the same for every variant and is left out. On a GPU (when one is seen) the
step runs there and each time ends with a synchronisation; the CPU-only variants are then the same
as "all". Options it does not know go to train_bench.py's workload (--hidden 2048 --layers 16 ...).
--profile N prints the N ops that took the most time in one step of "all" (torch.profiler) and
writes the table beside --out.

    python bench/step_ablation.py [--quick] [--reps 8] [--variants all,-fused-head] [--profile 25]
                                  [--out bench/results/ablation.json] [train_bench.py options]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import train_bench

VARIANTS = (
    "all",
    "-packing",
    "-packed-attention",
    "-row-at-once",
    "-bits-dropout",
    "-cpu-kernels",
    "-labelled-lm_head",
    "-fused-head",
    "-fused-ce",
    "-base-dtype-residual",
    "-own-autocast",
    "-fused-modules",
    "-fused-lora",
    "-kept-gradients",
    "-empty-head-outside-autocast",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="The quick model of train_bench.py.")
    p.add_argument("--reps", type=int, default=8, help="Timed repetitions of every variant.")
    p.add_argument("--records", type=int, default=8, help="Records in the micro-batch.")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma list of variants to time.")
    p.add_argument("--profile", type=int, default=0, help="Print this many top ops of one profiled step.")
    p.add_argument("--out", default=str(train_bench.HERE / "results" / "ablation.json"), help="Results JSON.")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from llama_sft.speedups import attention, cpu_kernels
    from llama_sft.data.collate import Collator
    from llama_sft.data.encode import IGNORE_INDEX, encode_records
    from llama_sft.data.packing import PackingCollator
    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.speedups.dropout import BitsDropout, set_lora_dropout
    from llama_sft.speedups.fused_modules import (
        LLAMA_MLPS,
        LLAMA_RMS_NORMS,
        FusedLoraLinear,
        use_fused_modules,
    )
    from llama_sft.speedups.kept_memory import EmbeddingWithKeptGradient, HeadMemory, keep_embedding_gradients
    from llama_sft.training.args import LoraArguments
    from llama_sft.training.model import attach_lora, keep_residual_in_base_dtype
    from llama_sft.training.trainer import (
        ComputeDtypeCopy,
        HeadSkippingEmptyInput,
        LabelledCrossEntropy,
        head_projection,
        labelled_loss_sum,
    )

    args, workload_args = parse_args(argv)
    bench_args = train_bench.parse_args((["--quick"] if args.quick else []) + workload_args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="llama-sft-ablation-") as tmp:
        w = train_bench.prepare_workload(bench_args, Path(tmp))
        tokenizer = TextTokenizer.load(w["tokenizer"])
        records = load_records(w["train_json"])[: args.records]
        data, _ = encode_records(records, load_template("alpaca"), tokenizer, w["max_seq_length"])
        examples = [data[i] for i in range(len(data))]
        torch.manual_seed(0)
        # llama-sft's dtype on this machine: frozen bfloat16 weights under bfloat16 autocast, or
        # float32 throughout on a CPU without bfloat16 matrix units.
        dtype = getattr(torch, train_bench.llama_sft_dtype(bench_args))
        autocast = dtype == torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(w["model"], dtype=dtype, attn_implementation="sdpa")
    lora = LoraArguments(
        trainable=",".join(train_bench.PROJECTIONS),
        lora_rank=8,
        lora_alpha=32,
        lora_dropout=0.05,
        modules_to_save="embed_tokens,lm_head",
    )
    model = attach_lora(base, lora).to(device).train()
    kinds = LLAMA_RMS_NORMS | LLAMA_MLPS
    originals = {name: m for name, m in model.named_modules() if type(m).__name__ in kinds}
    head, head_copy, head_memory = head_projection(model), ComputeDtypeCopy(), HeadMemory()
    embedding = model.get_input_embeddings().modules_to_save["default"]
    use_fused_modules(model)  # as train.py does; off the CPU only the LoRA layers change
    if device.type == "cpu":  # as SftTrainer does
        keep_embedding_gradients(model, head_memory.logits)
    fused = {name: model.get_submodule(name) for name in originals}
    fused_lora = [m for m in model.modules() if type(m) is FusedLoraLinear]

    def set_modules(chosen: dict) -> None:
        for name, module in chosen.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)

    config = model.get_base_model().config
    packed, padded = PackingCollator()(examples), Collator(tokenizer.pad_id)(examples)
    packed, padded = ({k: v.to(device) for k, v in batch.items()} for batch in (packed, padded))
    tokens = sum(len(e["input_ids"]) for e in examples)

    row_at_once_max_len = attention.GPU_ROW_AT_ONCE_MAX_LEN
    residual_hook = None  # at most one on the model: each step removes the previous step's

    def use_kernels(on: bool) -> None:
        os.environ["LLAMA_SFT_CPU_KERNELS"] = "1" if on else "0"
        cpu_kernels.kernels.cache_clear()

    def step(variant: str) -> None:
        nonlocal residual_hook
        set_modules(originals if variant == "-fused-modules" else fused)
        for layer in fused_lora:
            layer.__class__ = LoraLinear if variant == "-fused-lora" else FusedLoraLinear
        config._attn_implementation = "sdpa" if variant == "-packed-attention" else attention.PACKED_SDPA
        attention.GPU_ROW_AT_ONCE_MAX_LEN = 0 if variant == "-row-at-once" else row_at_once_max_len
        set_lora_dropout(model, torch.nn.Dropout if variant == "-bits-dropout" else BitsDropout)
        if residual_hook is not None:
            residual_hook.remove()
        residual_hook = None if variant == "-base-dtype-residual" else keep_residual_in_base_dtype(model)
        kept = device.type == "cpu" and variant != "-kept-gradients"
        embedding.__class__ = EmbeddingWithKeptGradient if kept else torch.nn.Embedding
        empty_head = torch.nn.Linear if variant == "-empty-head-outside-autocast" else HeadSkippingEmptyInput
        head.__class__ = empty_head
        inputs = dict(padded if variant == "-packing" else packed)
        own = variant != "-own-autocast"
        own_loss = variant in ("-labelled-lm_head", "-fused-ce", "-own-autocast")
        with (
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
            disable_input_dtype_casting(model, active=own and autocast),
        ):
            if not own_loss:
                weight = None if variant == "-fused-head" else head.weight
                low = head_copy(weight, torch.bfloat16) if weight is not None and autocast else None
                loss, count, _ = labelled_loss_sum(model, inputs, weight, low, head_memory if kept else None)
                (loss / count).backward()
                model.zero_grad(set_to_none=True)
                return
            targets = inputs.pop("labels")[:, 1:]
            if variant == "-labelled-lm_head":
                keep = torch.arange(targets.shape[1], device=device)
            else:
                keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        if not own:
            logits = logits.float()
        flat, picked = logits.flatten(0, 1), targets[:, keep].flatten()
        if variant == "-fused-ce":
            loss = torch.nn.functional.cross_entropy(flat.float(), picked, reduction="sum")
        else:
            loss = LabelledCrossEntropy.apply(flat, picked)
        (loss / max(1, int((picked != IGNORE_INDEX).sum()))).backward()
        model.zero_grad(set_to_none=True)

    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    times = {v: [] for v in variants}
    for variant in variants:
        use_kernels(variant != "-cpu-kernels")
        step(variant)  # warm-up: oneDNN primitives, allocator
    for _ in range(args.reps):
        for variant in variants:
            use_kernels(variant != "-cpu-kernels")  # (re)loading the library is not part of a step
            start = time.perf_counter()
            step(variant)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[variant].append(time.perf_counter() - start)
    median = {v: statistics.median(t) for v, t in times.items()}
    rows = [
        {
            "variant": v,
            "median_ms": round(median[v] * 1000, 1),
            "min_ms": round(min(times[v]) * 1000, 1),
            "tokens_per_s": round(tokens / median[v], 1),
            "slowdown": round(median[v] / median["all"], 3),
        }
        for v in variants
    ]
    print(
        f"{args.records} records, {tokens} tokens, forward + backward on {device.type} in {dtype}, "
        f"median of {args.reps}:"
    )
    print(f"{'variant':20s} {'median ms':>10s} {'min ms':>8s} {'tokens/s':>9s} {'x all':>6s}")
    for r in rows:
        print(
            f"{r['variant']:20s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['tokens_per_s']:9.1f} "
            f"{r['slowdown']:6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "records": args.records,
        "tokens": tokens,
        "reps": args.reps,
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "workload_args": workload_args,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.profile:
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
