#!/usr/bin/env python
"""Preference training side by side: TRL's DPOTrainer and ``llama-sft dpo``.

Both continue the same SFT LoRA on the same randomly initialised LLaMA (the real chinese-llama-2
tokenizer's vocabulary) with the same pairs: the records of ../shared/data/alpaca_zh_demo.json, each
answer chosen and the next record's answer rejected, prompts in the alpaca template. Both run the
sigmoid (DPO) loss with the same beta, batch, accumulation, learning rate and steps, in float32 (TRL's
default of bfloat16 is turned off so the arithmetic is the same), each in a child process of its
own so its peak RSS is its own. The reference is each one's own: TRL scores it in every step under
a "ref" copy of the adapter, llama-sft once before training (its time is counted here).

Reported per contender: tokens/s (prompt + answer tokens of both sequences of every pair trained,
padding excluded, over the training loop plus llama-sft's reference pass), peak RSS (VmHWM at the
end), the first and last logged loss.

    python bench/dpo_bench.py            # hidden 512, 4 layers, 64 pairs, max length 512
    python bench/dpo_bench.py --quick    # hidden 128, 2 layers, 16 pairs, max length 256

Writes bench/results/DATE_MACHINE_dpo[-quick].json (or --out).
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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from train_bench import describe_machine  # noqa: E402  (the CPU's model and features, as every bench records)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = Path(os.environ.get("LLAMA_SFT_SHARED", ROOT.parent / "shared")).resolve()
CONTENDERS = ("trl", "llama-sft")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="A small model and few pairs: a smoke run.")
    p.add_argument("--out", default=None, help="Where to write the JSON results.")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    return p.parse_args()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(quick: bool, scratch: Path) -> dict:
    """The model folder, the SFT LoRA, the pairs (as llama-sft reads them and as text for TRL)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.tools.demo import make_model

    tokenizer_dir = SHARED / "tokenizers" / "chinese-llama-2"
    tokenizer = TextTokenizer.load(tokenizer_dir)
    hidden, layers, count, max_len = (128, 2, 16, 256) if quick else (512, 4, 64, 512)
    make_model(scratch / "base", len(tokenizer), hidden=hidden, layers=layers, heads=max(2, hidden // 64))
    model = AutoModelForCausalLM.from_pretrained(scratch / "base")
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lora = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # an SFT LoRA that has learnt something, not PEFT's zero start
    lora.save_pretrained(scratch / "sft_lora_model")
    tokenizer.save(scratch / "sft_lora_model")
    template = load_template("alpaca")
    template.save(scratch / "sft_lora_model")

    records = json.loads((SHARED / "data" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[: count + 1]
    pairs = [
        {
            "instruction": r["instruction"],
            "input": r.get("input", ""),
            "chosen": r["output"],
            "rejected": n["output"],
        }
        for r, n in zip(records, records[1:], strict=False)
    ]
    (scratch / "pairs").mkdir()
    (scratch / "pairs" / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    text_pairs = [
        {
            "prompt": template.render(p["instruction"] + ("\n" + p["input"] if p["input"] else "")),
            "chosen": p["chosen"],
            "rejected": p["rejected"],
        }
        for p in pairs
    ]
    (scratch / "text_pairs.json").write_text(json.dumps(text_pairs, ensure_ascii=False), encoding="utf-8")
    return {
        "scratch": str(scratch),
        "tokenizer": str(tokenizer_dir),
        "hidden": hidden,
        "layers": layers,
        "pairs": len(pairs),
        "max_length": max_len,
        "batch": 4,
        "accum": 2,
        "steps": len(pairs) // 8,  # one epoch: every pair once
        "beta": 0.1,
        "lr": 1e-4,
    }


def run_trl(w: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    scratch = Path(w["scratch"])
    model = AutoModelForCausalLM.from_pretrained(scratch / "base")
    model = PeftModel.from_pretrained(model, scratch / "sft_lora_model", is_trainable=True)
    dataset = Dataset.from_list(json.loads((scratch / "text_pairs.json").read_text(encoding="utf-8")))
    config = DPOConfig(
        output_dir=str(scratch / "out-trl"),
        per_device_train_batch_size=w["batch"],
        gradient_accumulation_steps=w["accum"],
        max_steps=w["steps"],
        learning_rate=w["lr"],
        beta=w["beta"],
        max_length=w["max_length"],
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    timer = LoopTimer()
    trainer = DPOTrainer(
        model,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(w["tokenizer"]),
        callbacks=[timer],
    )
    tokens = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
        for r in trainer.train_dataset
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": timer.seconds, "losses": [losses[0], losses[-1]]}


def run_llama_sft(w: dict) -> dict:
    from llama_sft.training import run

    scratch = Path(w["scratch"])
    reference_seconds = []
    attach = run.attach_reference

    def timed_attach(*args, **kwargs):
        start = time.perf_counter()
        attach(*args, **kwargs)
        reference_seconds.append(time.perf_counter() - start)

    run.attach_reference = timed_attach
    timer = LoopTimer()
    out = scratch / "out-llama-sft"
    argv = [
        "--model_name_or_path", str(scratch / "base"), "--tokenizer_name_or_path", w["tokenizer"],
        "--peft_path", str(scratch / "sft_lora_model"), "--dataset_dir", str(scratch / "pairs"),
        "--output_dir", str(out), "--do_train", "--per_device_train_batch_size", str(w["batch"]),
        "--gradient_accumulation_steps", str(w["accum"]), "--max_steps", str(w["steps"]),
        "--learning_rate", str(w["lr"]), "--pref_beta", str(w["beta"]), "--max_seq_length", str(w["max_length"]),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--disable_tqdm", "True", "--data_cache_dir", str(scratch / "cache"),
    ]  # fmt: skip
    run.train(argv, callbacks=[timer], task="dpo")
    from llama_sft.data.preference import load_pair_dir
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer

    pairs, _ = load_pair_dir(
        scratch / "pairs", TextTokenizer.load(w["tokenizer"]), load_template("alpaca"), w["max_length"]
    )
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "tokens": tokens,
        "seconds": timer.seconds + sum(reference_seconds),
        "reference_seconds": sum(reference_seconds),
        "losses": [losses[0], losses[-1]],
    }


def LoopTimer():  # noqa: N802 - a callback class made after transformers is imported
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    return Timer()


def child(name: str, workload: Path) -> None:
    w = json.loads(workload.read_text())
    if name == "llama-sft":
        from llama_sft.training.command_line import prepare_process

        prepare_process([])  # as `llama-sft dpo` sets up its process, before PyTorch starts
    result = run_trl(w) if name == "trl" else run_llama_sft(w)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, Path(args.workload))
        return
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as folder:
        scratch = Path(folder)
        workload = prepare(args.quick, scratch)
        (scratch / "workload.json").write_text(json.dumps(workload))
        results = {}
        for name in CONTENDERS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, "--workload", str(scratch / "workload.json")],
                capture_output=True,
                text=True,
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(line[len("RESULT ") :])
            print(
                f"{name:10s} {results[name]['tokens_per_s']:9.1f} tokens/s  peak RSS {results[name]['peak_rss_mb']:7.0f} MB"
            )
    speed = results["llama-sft"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    memory = results["llama-sft"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
    print(f"llama-sft / TRL: {speed:.2f}x tokens/s, {memory:.2f}x peak RSS")
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": describe_machine(),
        "workload": {k: v for k, v in workload.items() if k != "scratch"},
        "results": results,
        "speed_ratio": speed,
        "memory_ratio": memory,
    }
    name = f"{report['date']}_{report['machine']['name']}_dpo{'-quick' if args.quick else ''}.json"
    out = Path(args.out or HERE / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
