#!/usr/bin/env python
"""Continued pre-training benchmark: the original Chinese-LLaMA-Alpaca run_clm_pt_with_peft.py
pipeline, rebuilt, against `llama-sft pretrain`.

The workload is train_bench's: its randomly initialised LLaMA and the shared Chinese records, here as
plain text, one document a record (instruction, input and output joined by spaces, line breaks
inside them turned into spaces). Records 0..N-1 are the training text, the next ones the held-out
text. Every contender trains the LoRA of the original run_pt.sh (r 64, alpha 128, dropout 0.05 on
q, k, v, o, gate, down and up; embed_tokens and lm_head trained in full) with its schedule (batch 1
x gradient accumulation 8, lr 2e-4, cosine, 5% warm-up, weight decay 0.01, seed 42) for the same
number of optimizer steps, each in a child process of its own (so its peak RSS is its own):

- ``original``: the Hugging Face tokenizer (BOS before every document), ``datasets`` map with the
  original ``group_texts`` (concatenate a map batch of 1,000 lines, cut into --block-size blocks,
  labels a copy of the input ids), ``default_data_collator``, the HF Trainer with PEFT's LoRA,
  float32 on a CPU (bfloat16 on a GPU);
- ``llama-sft``: ``llama_sft.training.run.train(argv, task="pt")`` on the same folder (documents
  followed by EOS, concatenated, cut into blocks), every speed-up that fits, in the dtype llama-sft
  chooses on this machine;
- ``llama-sft-no-fused-head``: the same with ``--skip_speedups fused_head``: what fusing the output
  projection with the loss saves when every position is labelled;
- ``llama-sft-bs8``, ``llama-sft-bs8-no-fused-head``: the same two at batch 8 x GA 1 (the same 8
  blocks a step, one pass of 4,096 tokens), where the logits of a pass are 8 times larger;
- not run by default: ``original-bs8``, ``llama-sft-speedups-off`` (``--speedups off``: stock
  transformers and PEFT modules, attention and loss) and ``llama-sft-bs8-speedups-off``.

Reported per run: trained tokens/s (block tokens over the Trainer's training loop), peak RSS over
training and the peak of each part of a step (before training, the forwards and backwards, the
optimizer step), and the loss on the same held-out blocks (the held-out documents followed by EOS
and cut into blocks, one block a forward, float32) before and after training. Positions whose
target is BOS or EOS are left out of that loss, since the two pipelines separate documents with
different tokens.

    python bench/pretrain_bench.py            # block 512, 6 steps of 8 blocks (~2 minutes a run on 2 idle cores)
    python bench/pretrain_bench.py --quick    # train_bench's quick model, block 128, 4 steps

Writes bench/results/DATE_MACHINE_pretrain.json (pretrain-quick with --quick), or --out.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_bench as tb  # noqa: E402  (sets sys.path for llama_sft and the offline environment)

RUNS = ("original", "llama-sft", "llama-sft-no-fused-head", "llama-sft-bs8", "llama-sft-bs8-no-fused-head")
OPTIONAL_RUNS = ("original-bs8", "llama-sft-speedups-off", "llama-sft-bs8-speedups-off")
LLAMA_SFT_FLAGS = {
    "llama-sft": [],
    "llama-sft-no-fused-head": ["--skip_speedups", "fused_head"],
    "llama-sft-speedups-off": ["--speedups", "off"],
}
PROJECTIONS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
LORA = {"r": 64, "alpha": 128, "dropout": 0.05, "modules_to_save": ["embed_tokens", "lm_head"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small model, block 128, 4 steps.")
    p.add_argument(
        "--data", default=str(tb.SHARED / "data" / "alpaca_zh_demo.json"), help="Alpaca JSON file."
    )
    p.add_argument(
        "--tokenizer", default=str(tb.SHARED / "tokenizers" / "chinese-llama-2"), help="Tokenizer folder."
    )
    p.add_argument("--train-records", type=int, default=960, help="Records 0..N-1 are the training text.")
    p.add_argument("--eval-records", type=int, default=40, help="The next N records are the held-out text.")
    p.add_argument("--hidden", type=int, default=512, help="Hidden size of the in-process LLaMA.")
    p.add_argument("--intermediate", type=int, default=1376, help="MLP intermediate size.")
    p.add_argument("--layers", type=int, default=8, help="Decoder layers.")
    p.add_argument("--heads", type=int, default=8, help="Attention heads (as many key/value heads).")
    p.add_argument("--block-size", type=int, default=512, help="Tokens in a block.")
    p.add_argument("--steps", type=int, default=6, help="Optimizer steps of 8 blocks (batch 1 x GA 8).")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the llama-sft runs (default: what llama-sft chooses on this machine)")  # fmt: skip
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"Comma list of runs, in order, from {', '.join(RUNS + OPTIONAL_RUNS)}")  # fmt: skip
    p.add_argument(
        "--repeat", type=int, default=1, help="Runs of the list, round-robin; the median is reported."
    )
    p.add_argument(
        "--out", default=None, help="Results JSON (default: bench/results/DATE_MACHINE_MODE.json)."
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads = 256, 688, 4, 4
        args.block_size, args.steps = 128, 4
    return args


# ---------------------------------------------------------------------------------------------
# The workload: a plain-text folder, the held-out blocks and the base model, in a scratch folder.


def document(record) -> str:
    """One record as one line of plain text."""
    parts = (record.instruction, record.input, record.output)
    return " ".join(" ".join(p.split("\n")).strip() for p in parts if p.strip()).replace("\r", " ")


def prepare_workload(args: argparse.Namespace, scratch: Path) -> dict:
    import numpy as np

    from llama_sft.data.pretrain import build_blocks
    from llama_sft.data.records import load_records
    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.tools.demo import make_model

    if Path(args.data).is_file() and Path(args.tokenizer).is_dir():
        records, tokenizer_dir, source = load_records(args.data), Path(args.tokenizer), "shared"
    else:
        records = tb.generated_records(scratch / "demo")
        tokenizer_dir, source = scratch / "demo" / "tokenizer", "demo"
    docs = [document(r) for r in records]
    train, held = (
        docs[: args.train_records],
        docs[args.train_records : args.train_records + args.eval_records],
    )
    for folder, lines in (("pt", train), ("held", held)):
        (scratch / folder).mkdir()
        (scratch / folder / f"{folder}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    blocks, stats, _ = build_blocks([scratch / "held" / "held.txt"], tokenizer, args.block_size, None)
    np.save(scratch / "eval_blocks.npy", np.asarray([blocks[i]["input_ids"] for i in range(len(blocks))]))
    _, train_stats, _ = build_blocks([scratch / "pt" / "pt.txt"], tokenizer, args.block_size, None)
    make_model(
        scratch / "base",
        len(tokenizer),
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        seed=0,
    )
    return {
        "source": source,
        "scratch": str(scratch),
        "text_dir": str(scratch / "pt"),
        "eval_blocks": str(scratch / "eval_blocks.npy"),
        "tokenizer": str(tokenizer_dir),
        "model": str(scratch / "base"),
        "vocab": len(tokenizer),
        "separators": [tokenizer.bos_id, tokenizer.eos_id],
        "steps": args.steps,
        "global_batch": 8,
        "block_size": args.block_size,
        "train_records": len(train),
        "train_tokens": train_stats.tokens,
        "train_blocks": train_stats.blocks,
        "eval_records": len(held),
        "eval_blocks_count": stats.blocks,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "intermediate": args.intermediate,
    }


def held_out_loss(model, w: dict) -> float:
    """Mean token cross-entropy on the held-out blocks, BOS and EOS targets left out; float32."""
    import numpy as np
    import torch

    blocks = np.load(w["eval_blocks"])
    model = model.float().eval()
    device = next(model.parameters()).device
    separators = torch.tensor(w["separators"], device=device)
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor(block[None].astype("int64"), device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            targets = ids[0, 1:].masked_fill(torch.isin(ids[0, 1:], separators), -100)
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def phase_peaks():
    """A callback that splits peak RSS by part of the optimizer step: it reads the high-water mark
    (VmHWM) and resets it (``/proc/self/clear_refs``) at each boundary. Phases: before training
    (loading, data), the 8 forwards and backwards of a step (with the gradient clipping), the
    optimizer step, and what follows it until the next step begins."""
    from transformers import TrainerCallback

    class PhasePeaks(TrainerCallback):
        def __init__(self):
            self.peaks, self.phase = {}, "before training"

        def switch(self, phase: str) -> None:
            self.peaks[self.phase] = round(max(self.peaks.get(self.phase, 0), tb.peak_rss_mb()))
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                return  # no reset here: the peaks stay cumulative
            self.phase = phase

        def on_step_begin(self, args, state, control, **kwargs):
            self.switch("forward and backward")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.switch("optimizer step")

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.switch("after the step")

        def on_train_end(self, args, state, control, **kwargs):
            self.switch("end")

        def result(self, meter_result: dict) -> dict:
            """The meter's result with the peak over all phases (the meter's own reading comes after
            a reset) and the peak of each phase."""
            return {**meter_result, "peak_rss_mb": max(self.peaks.values()), "phase_peak_rss_mb": self.peaks}

    return PhasePeaks()


def settings(w: dict, output_dir: str, batch: int) -> dict:
    """TrainingArguments of run_pt.sh (its warmup_ratio 0.05 is warmup_steps 0.05 in transformers 5),
    8 blocks a step: batch 1 x GA 8 as documented, or batch 8 x GA 1."""
    return {
        **tb.trainer_settings(w, batch, 8 // batch, output_dir),
        "learning_rate": 2e-4,
        "warmup_steps": 0.05,
        "weight_decay": 0.01,
    }


# ---------------------------------------------------------------------------------------------
# Contender 1: the original run_clm_pt_with_peft.py, rebuilt.


def original_blocks(w: dict):
    """load_dataset("text"), the HF tokenizer (BOS per document), group_texts per map batch."""
    from itertools import chain

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(w["tokenizer"])
    block_size = w["block_size"]

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}  # noqa: SIM118 (as the original)
        total_length = len(concatenated[list(examples.keys())[0]])
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    cache = os.path.join(w["scratch"], "hf-datasets")
    files = sorted(str(p) for p in Path(w["text_dir"]).glob("*.txt"))
    raw = load_dataset("text", data_files=files, cache_dir=cache, keep_in_memory=False)
    tokenized = raw.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns="text")
    grouped = tokenized.map(group_texts, batched=True)
    grouped.set_format("torch")
    return grouped["train"]


def run_original(w: dict, batch: int) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed

    set_seed(tb.SEED)  # first, as the original's main() does: the LoRA's A matrices are drawn from it
    dtype = "bfloat16" if tb.on_gpu() else "float32"
    train_set = original_blocks(w)
    model = LlamaForCausalLM.from_pretrained(w["model"], dtype=getattr(torch, dtype))
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=PROJECTIONS,
        inference_mode=False,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        modules_to_save=LORA["modules_to_save"],
    )
    model = get_peft_model(model, config)
    meter, phases = tb.make_meter(), phase_peaks()
    args = settings(w, os.path.join(w["scratch"], "out-original"), batch)
    args["bf16"] = tb.on_gpu()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=train_set,
        data_collator=default_data_collator,
        callbacks=[meter, phases],
    )
    trainer.train()
    result = phases.result(meter.result())
    return {**result, "eval_loss": held_out_loss(trainer.model, w), "dtype": dtype, "blocks": len(train_set),
            "settings": args}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Contender 2: llama-sft pretrain, in this process through its own entry point.


def run_llama_sft(w: dict, dtype: str, extra: list[str], batch: int) -> dict:
    # First, as `llama-sft pretrain` does: PyTorch's allocation options before anything allocates a tensor.
    from llama_sft.speedups import prepare_process  # isort: skip

    prepare_process(set())
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama_sft.training.run import train

    out = os.path.join(w["scratch"], "out-llama-sft")
    args = settings(w, out, batch)
    argv = [
        "--model_name_or_path", w["model"],
        "--tokenizer_name_or_path", w["tokenizer"],
        "--dataset_dir", w["text_dir"],
        "--data_cache_dir", os.path.join(w["scratch"], "cache"),
        "--block_size", str(w["block_size"]),
        "--do_train",
        "--lora_rank", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
        "--lora_dropout", str(LORA["dropout"]),
        "--trainable", ",".join(PROJECTIONS),
        "--modules_to_save", ",".join(LORA["modules_to_save"]),
        "--torch_dtype", dtype,
        "--overwrite_output_dir",
        "--bf16", str(dtype == "bfloat16"),
        "--log_level", "warning",
        *extra,
    ]  # fmt: skip
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    meter, phases = tb.make_meter(), phase_peaks()
    lora_dir = train(argv, callbacks=[meter, phases], task="pt")
    result = phases.result(meter.result())
    base = LlamaForCausalLM.from_pretrained(w["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(lora_dir)).to("cuda" if tb.on_gpu() else "cpu")
    used = tb.trained_dtype(Path(lora_dir), dtype)
    return {
        **result,
        "eval_loss": held_out_loss(model, w),
        "dtype": used,
        "settings": {**args, "extra": extra},
    }


def run_contender(name: str, w: dict, dtype: str) -> dict:
    """``original`` or ``llama-sft[-no-fused-head|-speedups-off]``; ``-bs8`` after the first word: batch 8 x GA 1."""
    batch = 8 if "-bs8" in name else 1
    base = name.replace("-bs8", "")
    if base == "original":
        return run_original(w, batch)
    if base in LLAMA_SFT_FLAGS:
        return run_llama_sft(w, dtype, LLAMA_SFT_FLAGS[base], batch)
    raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS + OPTIONAL_RUNS)}")


# ---------------------------------------------------------------------------------------------
# The run: prepare, each contender in a child process, table, JSON.


def run_child(name: str, workload_file: Path, dtype: str) -> dict:
    result_file = workload_file.with_name(f"result-{name}.json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--workload", str(workload_file), "--dtype", dtype]
    print(f"  {name}: training ...", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        print(proc.stdout[-4000:])
        return {"name": name, "error": f"exit status {proc.returncode}"}
    result = json.loads(result_file.read_text())
    print(
        f"  {name}: {result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_mb']} MiB, "
        f"held-out loss {result['eval_loss']:.4f}, {time.time() - started:.0f} s wall",
        flush=True,
    )
    return {"name": name, **result}


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        w = json.loads(Path(args.workload).read_text())
        result = run_contender(args.child, w, args.dtype)
        result["gemm_gflops"] = tb.gemm_rate(result["dtype"])
        Path(args.workload).with_name(f"result-{args.child}.json").write_text(json.dumps(result))
        return
    names = [n for n in args.runs.split(",") if n]
    machine, loads = tb.describe_machine(), {"start": load_average()}
    dtype = tb.llama_sft_dtype(args)
    if not args.dtype and not tb.on_gpu():
        machine["llama_sft_dtype_reason"] = tb.cpu_bf16_choice()[1]
    print(
        f"machine: {machine['cpu']} ({machine['name']}), load average {loads['start']}; llama-sft in {dtype}"
    )
    with tempfile.TemporaryDirectory(prefix="llama-sft-pt-bench-") as tmp:
        scratch = Path(tmp)
        w = prepare_workload(args, scratch)
        workload_file = scratch / "workload.json"
        workload_file.write_text(json.dumps(w))
        print(
            f"workload: {w['source']} text, {w['train_records']} documents, {w['train_tokens']:,} tokens "
            f"({w['train_blocks']} blocks of {w['block_size']}), vocab {w['vocab']}, hidden {args.hidden} x "
            f"{args.layers} layers; {w['steps']} steps x 8 blocks; {w['eval_blocks_count']} held-out blocks",
            flush=True,
        )
        from transformers import LlamaForCausalLM

        w["eval_loss_before"] = held_out_loss(LlamaForCausalLM.from_pretrained(w["model"]), w)
        print(f"held-out loss before training: {w['eval_loss_before']:.4f}", flush=True)
        rate = tb.gemm_rate("float32")
        runs = [run_child(name, workload_file, dtype) for _ in range(args.repeat) for name in names]
        results = [tb.median_run([r for r in runs if r["name"] == name]) for name in names]
        # Every token of a block attends to itself and all before it: a mean context of (n + 1) / 2.
        flops = tb.flops_per_token(w["model"], (w["block_size"] + 1) / 2, r=LORA["r"])["total"]
    loads["end"] = load_average()
    w["flops_per_token"] = flops
    for r in results:
        if "error" not in r:
            r["mfu"] = round(r["tokens_per_s"] * flops / (max(rate, r["gemm_gflops"]) * 1e9), 4)
    print_table(results, w)
    out = Path(args.out) if args.out else tb.default_out(args, "pretrain-quick" if args.quick else "pretrain")
    out.parent.mkdir(parents=True, exist_ok=True)
    places = {w["scratch"]: "$SCRATCH", str(tb.SHARED): "$SHARED", str(tb.ROOT): ".", str(Path.home()): "~"}
    w = {k: v for k, v in w.items() if k not in ("scratch", "text_dir", "eval_blocks", "model")}
    machine["gemm_gflops"] = {"float32": round(rate, 1)}
    machine["load_average"] = loads
    report = [{**r, "workload": w, "machine": machine, "quick": args.quick} for r in results]
    out.write_text(json.dumps(tb.without_local_paths(report, places), indent=2) + "\n")
    print(f"\nwrote {out}")


def print_table(results: list[dict], w: dict) -> None:
    head = (
        f"{'run':<26}{'tokens/s':>10}{'peak RSS':>11}{'loss before':>13}{'loss after':>12}{'MFU':>7}  dtype"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<26}  failed: {r['error']}")
            continue
        print(
            f"{r['name']:<26}{r['tokens_per_s']:>10.0f}{r['peak_rss_mb']:>7.0f} MiB{w['eval_loss_before']:>13.4f}"
            f"{r['eval_loss']:>12.4f}{r['mfu']:>7.1%}  {r['dtype']}"
        )
    ok = {r["name"]: r for r in results if "error" not in r}
    for name, r in ok.items():
        if "original" in ok and name != "original":
            base = ok["original"]
            print(
                f"{name} vs original: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                f"peak RSS {r['peak_rss_mb'] - base['peak_rss_mb']:+.0f} MiB"
            )


if __name__ == "__main__":
    main()
