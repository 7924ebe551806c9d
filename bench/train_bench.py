#!/usr/bin/env python
"""Side-by-side training benchmark: the original Chinese-Alpaca pipeline, TRL and llama-sft.

Every contender trains the same randomly initialised LLaMA on the same records, a global batch of
8 records in every optimizer step (the Trainer's seeded random sampler gives all of them the same
records in the same steps), for the same number of steps, with the same LoRA. Each runs in a
child process of its own, so its peak RSS is its own. Reported per run: trained tokens/s (prompt
+ response tokens, padding excluded, over the Trainer's training loop), padding share of the
positions computed, peak RSS at the end of training, eval loss on the held-out records (the same
per-token mean, computed the same way for every contender, in float32) and model-FLOPs
utilisation: the training FLOPs per token from the config (lm_head on every token, as the
original computes it) times tokens/s, divided by a GEMM rate measured here for the dtype used.

    python bench/train_bench.py            # the default workload (~15 minutes on 2 cores)
    python bench/train_bench.py --quick    # a small model and few steps (< 3 minutes)

Writes bench/results/DATE_MACHINE_MODE.json (or --out) and a PNG bar chart beside it: the UTC
date, the machine as ``machine_slug()`` names it (e.g. xeon-amx, epyc-avx2, h200) and the mode
(quick or full), so that runs on different machines and days sit side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The real data and tokenizers; LLAMA_SFT_SHARED points elsewhere (a copy carried to a GPU machine).
SHARED = Path(os.environ.get("LLAMA_SFT_SHARED", ROOT.parent / "shared")).resolve()
RUNS = ("original-bs1-ga8", "original-bs8", "trl", "llama-sft", "llama-sft-fp32")
# TRL settings tried with --trl-sweep; "trl" runs the best of them on this machine (see docs/performance.md).
TRL_SETTINGS = {
    "trl-bs1-ga8": {"batch": 1, "accum": 8},
    "trl-bs8": {"batch": 8, "accum": 1},
    "trl-bs8-padding-free": {"batch": 8, "accum": 1, "padding_free": True},
    "trl-bs8-chunked-nll": {"batch": 8, "accum": 1, "loss_type": "chunked_nll"},
    "trl-bs1-ga8-bf16": {"batch": 1, "accum": 8, "bf16": True},
}
TRL_BEST = "trl-bs8-padding-free"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 42


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small model, few steps: finishes in < 3 minutes.")
    p.add_argument("--data", default=str(SHARED / "data" / "alpaca_zh_demo.json"), help="Alpaca JSON file.")
    p.add_argument(
        "--tokenizer", default=str(SHARED / "tokenizers" / "chinese-llama-2"), help="Tokenizer folder."
    )
    p.add_argument("--train-records", type=int, default=960, help="Records 0..N-1 train.")
    p.add_argument("--eval-records", type=int, default=40, help="The next N records are the eval set.")
    p.add_argument("--hidden", type=int, default=512, help="Hidden size of the in-process LLaMA.")
    p.add_argument("--intermediate", type=int, default=1376, help="MLP intermediate size.")
    p.add_argument("--layers", type=int, default=8, help="Decoder layers.")
    p.add_argument("--heads", type=int, default=8, help="Attention heads (as many key/value heads).")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps of --global-batch records.")
    p.add_argument(
        "--global-batch", type=int, default=8, help="Records in every optimizer step, for every run."
    )
    p.add_argument("--max-seq-length", type=int, default=512, help="Tokens kept of each record.")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the llama-sft run (default: bfloat16 on a GPU; on a CPU what llama-sft "
                   "itself chooses there, bfloat16 only where bfloat16 products are fast)")  # fmt: skip
    p.add_argument("--runs", default=",".join(RUNS), help="Comma list of runs to do, in order.")
    p.add_argument("--trl-sweep", action="store_true", help="Also run every TRL setting in TRL_SETTINGS.")
    p.add_argument("--repeat", type=int, default=1,
                   help="Do the list of runs this many times, round-robin, and report for each run the "
                   "repeat with the median tokens/s (a shared machine's speed drifts by 15-30%% in minutes)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="Results JSON, a PNG chart beside it (default: bench/results/DATE_MACHINE_MODE.json)")  # fmt: skip
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads = 256, 688, 4, 4
        args.steps, args.train_records, args.eval_records = 6, 960, 16
    return args


# ---------------------------------------------------------------------------------------------
# The workload: data, tokenizer and base model, written once to a scratch folder.


def prepare_workload(args: argparse.Namespace, scratch: Path) -> dict:
    from llama_sft.data.records import load_records
    from llama_sft.data.tokenizer import TextTokenizer
    from llama_sft.tools.demo import make_model, write_alpaca

    if Path(args.data).is_file() and Path(args.tokenizer).is_dir():
        records, tokenizer_dir, source = load_records(args.data), Path(args.tokenizer), "shared"
    else:
        records, tokenizer_dir, source = (
            generated_records(scratch / "demo"),
            scratch / "demo" / "tokenizer",
            "demo",
        )
    train = records[: args.train_records]
    held = records[args.train_records : args.train_records + args.eval_records]
    write_alpaca(train, scratch / "train.json")
    write_alpaca(held, scratch / "eval.json")
    vocab = len(TextTokenizer.load(tokenizer_dir))
    make_model(
        scratch / "base",
        vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        seed=0,
    )
    return {
        "source": source,
        "scratch": str(scratch),
        "train_json": str(scratch / "train.json"),
        "eval_json": str(scratch / "eval.json"),
        "tokenizer": str(tokenizer_dir),
        "model": str(scratch / "base"),
        "vocab": vocab,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "max_seq_length": args.max_seq_length,
        "train_records": len(train),
        "eval_records": len(held),
    }


def generated_records(folder: Path, count: int = 1000) -> list:
    """Without the shared data: the demo's tokenizer and vocabulary, in records as long as real
    Alpaca ones (instructions of 5-40 words, responses of 10-300)."""
    import random

    from llama_sft.data.records import Record
    from llama_sft.tools.demo import WORDS, build_demo

    train, held = build_demo(folder)
    rng, words = random.Random(0), [w for pair in WORDS.items() for w in pair]
    records = []
    for i in range(count):
        seed = (train + held)[i % len(train + held)]
        instruction = seed.instruction + " " + " ".join(rng.choices(words, k=rng.randint(5, 40)))
        records.append(Record(instruction, "", " ".join(rng.choices(words, k=rng.randint(10, 300)))))
    return records


def lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=PROJECTIONS,
        modules_to_save=["embed_tokens", "lm_head"],
        inference_mode=False,
    )


def trainer_settings(w: dict, batch: int, accum: int, output_dir: str) -> dict:
    """TrainingArguments shared by every contender: the documented schedule, nothing saved."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "max_steps": w["steps"],
        "learning_rate": 1e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "seed": SEED,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not on_gpu(),
        "disable_tqdm": True,
    }


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Measuring: a callback that times the training loop, counts the tokens of every collated batch
# and reads the peak RSS when training ends.


def make_meter():
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.batches = []  # (tokens, positions) of every collated batch, in order
            self.seconds = self.peak_rss_mb = 0.0

        def count(self, batch: dict) -> None:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            self.batches.append((int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))

        def on_train_begin(self, args, state, control, **kwargs):
            # The data loader collates one batch ahead; only the first steps x GA batches are trained.
            self.trained_batches = args.max_steps * args.gradient_accumulation_steps
            self.start = time.perf_counter()

        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # accelerate wraps the DataLoader; its batches come from the wrapped one.
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            collate = loader.collate_fn
            if getattr(collate, "counted", False):
                return

            def counting_collate(examples):
                batch = collate(examples)
                self.count(batch)
                return batch

            counting_collate.counted = True
            loader.collate_fn = counting_collate

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start
            self.peak_rss_mb = peak_rss_mb()
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu() else None

        def result(self) -> dict:
            trained = self.batches[: self.trained_batches]
            tokens, positions = sum(t for t, _ in trained), sum(p for _, p in trained)
            return {
                "tokens": tokens,
                "positions": positions,
                "train_seconds": round(self.seconds, 2),
                "tokens_per_s": round(tokens / self.seconds, 1),
                "padding_share": round(1 - tokens / max(1, positions), 4),
                "peak_rss_mb": round(self.peak_rss_mb),
                "peak_gpu_mb": round(self.peak_gpu_mb) if self.peak_gpu_mb else None,
            }

    return Meter()


def eval_loss(model, w: dict) -> float:
    """Mean token cross-entropy over the eval records' responses: one record a forward, float32."""
    import torch

    from llama_sft.data.encode import encode_records
    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(w["tokenizer"])
    data, _ = encode_records(
        load_records(w["eval_json"]), load_template("alpaca"), tokenizer, w["max_seq_length"]
    )
    model = model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ids = torch.tensor([data[i]["input_ids"]], device=model.device)
            labels = torch.tensor(data[i]["labels"][1:], device=model.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
            )
            count += int((labels != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------
# Contender 1: the original Chinese-Alpaca run_clm_sft_with_peft.py, rebuilt. Its data handling:
# BOS + prompt and response + EOS tokenized apart (SentencePiece, as its LlamaTokenizer did),
# concatenated and cut to max_seq_length, labels -100 on the prompt; a collator that right-pads
# every batch to its longest example; HF Trainer (random sampler, no packing), float32.


def original_dataset(w: dict):
    import torch

    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer

    tokenizer, template = TextTokenizer.load(w["tokenizer"]), load_template("alpaca")
    examples = []
    for record in load_records(w["train_json"]):
        source = [tokenizer.bos_id] + tokenizer.encode(template.render(record.full_instruction))
        target = tokenizer.encode(record.output) + [tokenizer.eos_id]
        input_ids = torch.LongTensor(source + target)[: w["max_seq_length"]]
        labels = torch.LongTensor([-100] * len(source) + target)[: w["max_seq_length"]]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, tokenizer.pad_id


def original_collator(pad_id: int):
    import torch

    def collate(instances):
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [i["input_ids"] for i in instances], batch_first=True, padding_value=pad_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [i["labels"] for i in instances], batch_first=True, padding_value=-100
        )
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id)}

    return collate


def run_original(w: dict, batch: int, accum: int) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    # On a CPU the original runs in float32 (its float16 is unusable there); on a GPU, as
    # documented, in half precision: bfloat16 weights and autocast.
    dtype = "bfloat16" if on_gpu() else "float32"
    examples, pad_id = original_dataset(w)
    model = LlamaForCausalLM.from_pretrained(w["model"], dtype=getattr(torch, dtype))
    model = get_peft_model(model, lora_config())
    meter = make_meter()
    settings = trainer_settings(w, batch, accum, os.path.join(w["scratch"], "out-original"))
    settings["bf16"] = on_gpu()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=examples,
        data_collator=original_collator(pad_id),
        callbacks=[meter],
    )
    trainer.train()
    return {
        **meter.result(),
        "eval_loss": eval_loss(trainer.model, w),
        "dtype": dtype,
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------
# Contender 2: TRL's SFTTrainer on prompt-completion data (prompt = the rendered template,
# completion = the response; TRL adds EOS), loss on the completion only, the same LoRA.


def run_trl(w: dict, batch: int, accum: int, padding_free=False, loss_type="nll", bf16=False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template

    template = load_template("alpaca")
    rows = [
        {"prompt": template.render(r.full_instruction), "completion": r.output}
        for r in load_records(w["train_json"])
    ]
    tokenizer = AutoTokenizer.from_pretrained(w["tokenizer"])
    model = LlamaForCausalLM.from_pretrained(w["model"], dtype=torch.float32)
    settings = {
        **trainer_settings(w, batch, accum, os.path.join(w["scratch"], "out-trl")),
        # TRL refuses padding_free with max_length unless it packs (which would change the records
        # of a step); without max_length it does not truncate, so only records over the limit differ.
        "max_length": None if padding_free else w["max_seq_length"],
        "completion_only_loss": True,
        "padding_free": padding_free,
        "loss_type": loss_type,
        "bf16": bf16,
        "dataset_num_proc": 1,
    }
    meter = make_meter()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[meter],
    )
    trainer.train()
    dtype = "bfloat16" if bf16 else "float32"
    return {**meter.result(), "eval_loss": eval_loss(trainer.model, w), "dtype": dtype, "settings": settings}


# ---------------------------------------------------------------------------------------------
# Contender 3: llama-sft, through its own entry point (`llama-sft train`), default path: packed
# rows, loss on labelled positions only, in the dtype llama-sft chooses on this machine.


def run_llama_sft(
    w: dict, dtype: str, max_tokens_per_pass: int | None = None, return_freed_memory: bool = True
) -> dict:
    # First, as `llama-sft train` does: PyTorch's allocation options before anything allocates a tensor.
    from llama_sft.speedups import prepare_process  # isort: skip

    prepare_process(set())
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama_sft.training.run import train

    out = os.path.join(w["scratch"], f"out-llama-sft-{dtype}")
    settings = trainer_settings(w, w["global_batch"], 1, out)
    argv = [
        "--model_name_or_path", w["model"],
        "--tokenizer_name_or_path", w["tokenizer"],
        "--dataset_dir", w["train_json"],
        "--data_cache_dir", os.path.join(w["scratch"], "cache"),
        "--max_seq_length", str(w["max_seq_length"]),
        "--do_train",
        "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0.05",
        "--trainable", ",".join(PROJECTIONS),
        "--modules_to_save", "embed_tokens,lm_head",
        "--torch_dtype", dtype,
        "--overwrite_output_dir",
        "--bf16", str(dtype == "bfloat16"),
        "--log_level", "warning",
    ]  # fmt: skip
    if not return_freed_memory:
        argv += ["--return_freed_memory", "False"]
        settings["return_freed_memory"] = False
    if max_tokens_per_pass:
        argv += ["--max_tokens_per_pass", str(max_tokens_per_pass)]
        settings["max_tokens_per_pass"] = max_tokens_per_pass
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    meter = make_meter()
    lora_dir = train(argv, callbacks=[meter])
    result = meter.result()
    base = LlamaForCausalLM.from_pretrained(w["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(lora_dir)).to("cuda" if on_gpu() else "cpu")
    used = trained_dtype(Path(lora_dir), dtype)
    return {**result, "eval_loss": eval_loss(model, w), "dtype": used, "settings": settings}


def trained_dtype(lora_dir: Path, asked: str) -> str:
    """The dtype llama-sft's products ran in, from the arguments it saved with the LoRA: it may
    decline the bfloat16 it was asked for, and MFU must divide by the rate of the dtype it used."""
    try:
        run_args = json.loads((lora_dir / "training_args.json").read_text())
        training = run_args["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return asked
    return run_args.get("compute_dtype") or ("bfloat16" if training.get("bf16") else "float32")


def run_contender(name: str, w: dict, args: argparse.Namespace) -> dict:
    if name.endswith("-no-cudnn"):  # e.g. original-bs8-no-cudnn: that run with cuDNN's attention off
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
        name = name.removesuffix("-no-cudnn")
    if name == "original-bs1-ga8":
        return run_original(w, batch=1, accum=8)
    if name == "original-bs8":
        return run_original(w, batch=8, accum=1)
    if name == "trl":
        return run_trl(w, **TRL_SETTINGS[TRL_BEST])
    if name in TRL_SETTINGS:
        return run_trl(w, **TRL_SETTINGS[name])
    ours = llama_sft_dtype(args)
    if name == "llama-sft":
        return run_llama_sft(w, ours)
    if name == "llama-sft-fp32":
        return run_llama_sft(w, "float32")
    if name == "llama-sft-keep-freed":  # --return_freed_memory False
        return run_llama_sft(w, ours, return_freed_memory=False)
    if name.startswith("llama-sft-budget"):  # e.g. llama-sft-budget512: --max_tokens_per_pass 512
        return run_llama_sft(w, ours, int(name.removeprefix("llama-sft-budget")))
    choices = ", ".join(RUNS + tuple(TRL_SETTINGS) + ("llama-sft-keep-freed", "llama-sft-budgetN"))
    raise SystemExit(
        f"unknown run {name!r}; choose from {choices} (original-*-no-cudnn: cuDNN attention off)"
    )


# ---------------------------------------------------------------------------------------------
# The machine: its name in results files, llama-sft's dtype there, FLOPs and the GEMM rate.

# Words of a CPU's model name that say its family; the first one found names the machine.
CPU_FAMILIES = ("xeon", "epyc", "core", "ryzen", "threadripper", "opteron", "pentium", "celeron",
                "atom", "athlon", "graviton", "neoverse")  # fmt: skip
# The strongest matrix feature first: flags of /proc/cpuinfo and the name each gives in a slug.
MATRIX_FEATURES = {"amx_bf16": "amx", "avx512_bf16": "avx512bf16", "avx512f": "avx512", "avx2": "avx2"}
# Flags worth recording beside a result: what decides the speed of its products.
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve", "bf16")  # fmt: skip
BF16_MATRIX_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_info() -> tuple[str, set[str]]:
    """The model name and flags of the first processor in /proc/cpuinfo (elsewhere: what the
    platform module says, and no flags)."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.processor() or platform.machine(), flags


def slug(text: str) -> str:
    """Lower case, trademarks dropped, runs of anything but letters and digits as one dash."""
    text = re.sub(r"\((r|tm|c)\)", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_slug() -> str:
    """A short name for this machine in results files: the GPU's model on a GPU (``h200``), else
    the CPU's family word and its strongest matrix feature (``xeon-amx``, ``epyc-avx512bf16``,
    ``epyc-avx2``). Speed depends on those features more than on the exact model."""
    if on_gpu():
        import torch

        words = slug(torch.cuda.get_device_name(0)).split("-")
        return "-".join(w for w in words if w not in ("nvidia", "amd", "geforce", "tesla")) or "gpu"
    name, flags = cpu_info()
    words = slug(name).split("-")
    family = next((w for w in words if w in CPU_FAMILIES), None)
    if family is None:  # an unknown model: its name without vendor and marketing words
        skip = {"intel", "amd", "cpu", "processor", "core", "with", "radeon", "graphics"}
        family = "-".join(w for w in words if w not in skip and not w.endswith("ghz"))[:24].strip("-")
    feature = next((short for flag, short in MATRIX_FEATURES.items() if flag in flags), "")
    return "-".join(part for part in (family or "cpu", feature) if part)


def describe_machine() -> dict:
    """What a results file records of the machine it ran on."""
    import torch

    name, flags = cpu_info()
    return {
        "name": machine_slug(),
        "cpu": name,
        "cpu_flags": [f for f in RECORDED_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if on_gpu() else None,
    }


def default_out(args: argparse.Namespace, mode: str | None = None) -> Path:
    """bench/results/DATE_MACHINE_MODE.json: today's UTC date, ``machine_slug()``, quick or full."""
    date = time.strftime("%Y-%m-%d", time.gmtime())
    return HERE / "results" / f"{date}_{machine_slug()}_{mode or ('quick' if args.quick else 'full')}.json"


def cpu_bf16_choice() -> tuple[bool, str]:
    """Whether llama-sft trains under bfloat16 autocast on this CPU, and why: the trainer's own
    decision, so the benchmark runs what `llama-sft train` would. oneDNN's own claim of bfloat16
    support is not enough: it is also true where bfloat16 is emulated (on an Ice Lake class Xeon,
    2.4x slower than float32)."""
    try:
        from llama_sft.training.precision import cpu_bf16_is_fast
    except ImportError:  # an older llama-sft: the flags alone
        found = sorted(cpu_info()[1] & BF16_MATRIX_FLAGS)
        if found:
            return True, f"native bfloat16 matrix instructions ({', '.join(found)})"
        return False, "no native bfloat16 matrix instructions (avx512_bf16, amx_bf16) in /proc/cpuinfo"
    return cpu_bf16_is_fast()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. /proc's VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over from the parent through fork and exec, so a child would report the
    benchmark's own peak (building the model) whenever that is the larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_sft_dtype(args: argparse.Namespace) -> str:
    """llama-sft's dtype: --dtype, else bfloat16 on a GPU, else what llama-sft chooses on this CPU."""
    if args.dtype:
        return args.dtype
    if on_gpu():
        return "bfloat16"
    return "bfloat16" if cpu_bf16_choice()[0] else "float32"


def gemm_rate(dtype_name: str, size: int = 2048, seconds: float = 2.0) -> float:
    """Best of three timings of a square matrix product, in GFLOP/s.

    A dtype the CPU has no fast path for (bfloat16 without AVX512-BF16 or AMX: one 2048^3 product
    took 63 s on an AVX2 EPYC) is measured on a smaller product, so the measurement stays within a
    few seconds."""
    import torch

    dtype, device = getattr(torch, dtype_name), "cuda" if on_gpu() else "cpu"
    size = 8192 if device == "cuda" else size
    while True:
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start < seconds / 3 or size <= 256:
            break
        size //= 4
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(model_dir: str, mean_context: float, r: int = 8) -> dict:
    """Training FLOPs per token from the config: the frozen base forward and input-gradient passes
    (2 + 2 FLOPs per weight), LoRA (6 per LoRA weight), causal attention, and the trained lm_head
    (forward, input gradient and weight gradient: 6 per weight)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    kv_dim = h // heads * kv
    per_layer = [(h, h), (h, kv_dim), (h, kv_dim), (h, h), (h, i), (h, i), (i, h)]
    layer_weights = sum(a * b for a, b in per_layer)
    lora_weights = sum(r * (a + b) for a, b in per_layer)
    body = n * (4 * layer_weights + 6 * lora_weights + 3 * 4 * h * mean_context)
    head = 6 * h * config["vocab_size"]
    return {"body": body, "lm_head": head, "total": body + head}


# ---------------------------------------------------------------------------------------------
# The run: prepare, each contender in a child process, table, JSON, chart.


def run_child(name: str, workload_file: Path, args: argparse.Namespace) -> dict:
    result_file = workload_file.with_name(f"result-{name}.json")
    # The dtype is chosen once, here: a child choosing again could time a probe under load.
    cmd = [sys.executable, __file__, "--child", name, "--workload", str(workload_file)]
    cmd += ["--dtype", llama_sft_dtype(args)]
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        print(proc.stdout[-4000:])
        return {"name": name, "error": f"exit status {proc.returncode}"}
    result = json.loads(result_file.read_text())
    print(f"  {name}: {result['tokens_per_s']} tokens/s, {time.time() - started:.0f} s wall", flush=True)
    return {"name": name, **result}


def label_stats(w: dict) -> dict:
    from llama_sft.data.encode import encode_records
    from llama_sft.data.records import load_records
    from llama_sft.data.templates import load_template
    from llama_sft.data.tokenizer import TextTokenizer

    data, _ = encode_records(
        load_records(w["train_json"]),
        load_template("alpaca"),
        TextTokenizer.load(w["tokenizer"]),
        w["max_seq_length"],
    )
    lengths = data.lengths()
    labelled = int((data.labels != -100).sum())
    return {
        "labelled_share": labelled / data.num_tokens(),
        "mean_context": sum(n * (n + 1) / 2 for n in lengths) / sum(lengths),
    }


def best_gemm_rates(rates: dict, runs: list[dict]) -> dict:
    """For each dtype, the best GEMM rate measured in the benchmark: at the start (``rates``) and
    right after every run of that dtype (each run's ``gemm_gflops``, all repeats)."""
    best = dict(rates)
    for run in runs:
        if "gemm_gflops" in run:
            best[run["dtype"]] = max(best.get(run["dtype"], 0.0), run["gemm_gflops"])
    return best


def add_flops(results: list[dict], w: dict, rates: dict, runs: list[dict]) -> None:
    """MFU of each run against ``best_gemm_rates`` for the dtype that run trained in. One
    measurement is not enough: on a shared 2-core Xeon, three in a row gave 854, 1,692 and 934
    GFLOP/s in bfloat16, and an MFU divided by one of them moved by as much. ``mfu_at_run_rate``
    keeps the figure against the rate measured right after the run."""
    stats = label_stats(w)
    flops = flops_per_token(w["model"], stats["mean_context"])
    w["flops_per_token"] = flops["total"]
    best = best_gemm_rates(rates, runs)
    for run in results:
        if "error" in run:
            continue
        after_run, rate = run["gemm_gflops"], best[run["dtype"]]
        # llama-sft computes the lm_head only where the next label is kept: fewer FLOPs executed.
        head_share = stats["labelled_share"] if run["name"].startswith("llama-sft") else 1.0
        executed = flops["body"] + flops["lm_head"] * head_share
        run["gemm_gflops"] = round(rate, 1)
        run["gemm_gflops_at_start"] = round(rates.get(run["dtype"], after_run), 1)
        run["gemm_gflops_after_run"] = round(after_run, 1)
        run["mfu"] = round(run["tokens_per_s"] * flops["total"] / (rate * 1e9), 4)
        run["mfu_executed"] = round(run["tokens_per_s"] * executed / (rate * 1e9), 4)
        run["mfu_at_run_rate"] = round(run["tokens_per_s"] * flops["total"] / (after_run * 1e9), 4)


def median_run(repeats: list[dict]) -> dict:
    """The repeat with the median tokens/s (the lower one of an even count), with every repeat's
    tokens/s, peak RSS and eval loss listed under ``repeats``."""
    ok = sorted((r for r in repeats if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return repeats[0]
    chosen = dict(ok[(len(ok) - 1) // 2])
    if len(repeats) > 1:
        keys = ("tokens_per_s", "peak_rss_mb", "eval_loss")
        chosen["repeats"] = [{k: r[k] for k in keys} if "error" not in r else r for r in repeats]
    return chosen


def without_local_paths(value, places: dict[str, str]):
    """``value`` with every string that starts in one of ``places`` (folder: name) starting with
    that name instead: a results file is shared, the folders of the machine it ran on are not."""
    if isinstance(value, dict):
        return {k: without_local_paths(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v, places) for v in value]
    if isinstance(value, str):
        for folder in sorted(places, key=len, reverse=True):  # the innermost folder first
            if len(folder) > 1 and (value == folder or value.startswith(folder + "/")):
                return places[folder] + value[len(folder) :]
    return value


def print_ratios(results: list[dict]) -> None:
    ok = {r["name"]: r for r in results if "error" not in r}
    ours = ok.get("llama-sft")
    for r in results:
        if "repeats" in r:
            print(
                f"{r['name']}: tokens/s of each repeat "
                + ", ".join(str(x.get("tokens_per_s")) for x in r["repeats"])
            )
    if ours is None:
        return
    for name, r in ok.items():
        if not name.startswith("llama-sft"):
            print(
                f"llama-sft vs {name}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                f"peak RSS {ours['peak_rss_mb'] - r['peak_rss_mb']:+.0f} MiB"
            )


def print_table(results: list[dict]) -> None:
    gpu = any(r.get("peak_gpu_mb") for r in results)
    head = f"{'run':<22}{'tokens/s':>10}{'padding':>9}{'peak RSS':>10}{'peak GPU' if gpu else '':>10}"
    head += f"{'eval loss':>11}{'MFU':>7}  dtype"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<22}  failed: {r['error']}")
            continue
        gpu_mem = f"{r['peak_gpu_mb'] / 1024:>8.2f}GB" if gpu else f"{'':>10}"
        print(
            f"{r['name']:<22}{r['tokens_per_s']:>10.0f}{r['padding_share']:>9.1%}{r['peak_rss_mb'] / 1024:>8.2f}GB"
            f"{gpu_mem}{r['eval_loss']:>11.4f}{r['mfu']:>7.1%}  {r['dtype']}"
        )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    names = [r["name"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, scale in (
        (axes[0], "tokens_per_s", "trained tokens/s (higher is better)", 1),
        (axes[1], "peak_rss_mb", "peak RSS, GB (lower is better)", 1 / 1024),
    ):
        values = [r[key] * scale for r in ok]
        bars = ax.bar(
            names, values, color=["#999" if n.startswith(("original", "trl")) else "#2a7" for n in names]
        )
        ax.bar_label(bars, fmt="%.0f" if scale == 1 else "%.2f")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        w = json.loads(Path(args.workload).read_text())
        result = run_contender(args.child, w, args)
        # Measured in the child right after training, under the same load as the run it divides.
        result["gemm_gflops"] = gemm_rate(result["dtype"])
        Path(args.workload).with_name(f"result-{args.child}.json").write_text(json.dumps(result))
        return
    names = [n for n in args.runs.split(",") if n]
    machine = describe_machine()
    ours = llama_sft_dtype(args)
    if not args.dtype and not on_gpu():
        machine["llama_sft_dtype_reason"] = cpu_bf16_choice()[1]
        print(f"llama-sft trains in {ours} on this CPU: {machine['llama_sft_dtype_reason']}")
    if "llama-sft" in names and "llama-sft-fp32" in names and ours == "float32":
        names.remove("llama-sft-fp32")  # the same run twice
        print("llama-sft-fp32 left out: llama-sft itself runs in float32")
    if args.trl_sweep:
        names += list(TRL_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="llama-sft-bench-") as tmp:
        scratch = Path(tmp)
        w = prepare_workload(args, scratch)
        workload_file = scratch / "workload.json"
        workload_file.write_text(json.dumps(w))
        print(
            f"workload: {w['source']} data, {w['train_records']} training records, vocab {w['vocab']}, "
            f"hidden {args.hidden} x {args.layers} layers, {w['steps']} steps x {w['global_batch']} records"
        )
        # bfloat16 only where llama-sft trains in it: where bfloat16 is emulated, a bfloat16
        # product of 2048^3 takes a minute.
        dtypes = sorted({"float32", ours})
        rates = {d: gemm_rate(d) for d in dtypes}
        print("GEMM rate: " + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items()), flush=True)
        runs = [run_child(name, workload_file, args) for _ in range(args.repeat) for name in names]
        results = [median_run([r for r in runs if r["name"] == name]) for name in names]
        add_flops(results, w, rates, runs)
    print_table(results)
    print_ratios(results)
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    places = {w["scratch"]: "$SCRATCH", str(SHARED): "$SHARED", str(ROOT): ".", str(Path.home()): "~"}
    w = {k: v for k, v in w.items() if k not in ("scratch", "train_json", "eval_json", "model")}
    machine["gemm_gflops"] = {d: round(r, 1) for d, r in rates.items()}
    report = [{**r, "workload": w, "machine": machine, "quick": args.quick} for r in results]
    out.write_text(json.dumps(without_local_paths(report, places), indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
