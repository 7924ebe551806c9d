"""GPU smoke check of the documented command: the demo's data, tokenizer and model, trained under
torchrun with --fp16 --torch_dtype float16 --gradient_checkpointing (what run_sft.sh passes), then the
held-out exact match through PEFT and through `llama-sft chat` batch mode. Prints one JSON line and,
if OUT is set, writes it to $OUT/DATE_MACHINE_smoke.json (named as bench/results/README.md says).

    python bench/gpu_smoke.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llama_sft.data.templates import load_template
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import build_demo, demo_train_argv, exact_match

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=300, help="Training steps of the demo run.")
parser.add_argument(
    "--root", default="/tmp/llama-sft-gpu-smoke", help="Scratch folder for the demo data and run."
)
args = parser.parse_args()

root = Path(args.root)
_, held = build_demo(root)
argv = demo_train_argv(root, args.steps) + ["--gradient_checkpointing", "--disable_tqdm", "True"]
script = Path(__file__).resolve().parents[1] / "scripts" / "training" / "run_clm_sft_with_peft.py"
start = time.time()
run = subprocess.run(
    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script), *argv]
)
seconds = time.time() - start
result = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "exit_code": run.returncode,
}
if run.returncode == 0:
    tokenizer = TextTokenizer.load(root / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(root / "base_model"))
    tuned = PeftModel.from_pretrained(base, str(root / "output" / "sft_lora_model")).to(device).eval()
    after, answers = exact_match(tuned, tokenizer, load_template("alpaca"), held)
    state = json.loads((root / "output" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    result.update(steps=args.steps, train_seconds=round(seconds, 1), exact_match_after=after,
                  first_loss=losses[0], last_loss=losses[-1], sample=answers[:3])  # fmt: skip
    # The same adapter through `llama-sft chat` batch mode (on the GPU when there is one).
    questions = root / "held_out.json"
    questions.write_text(json.dumps([{"instruction": r.instruction} for r in held], ensure_ascii=False))
    chat = [sys.executable, "-m", "llama_sft.cli", "chat", "--base_model", str(root / "base_model"),
            "--lora_model", str(root / "output" / "sft_lora_model"), "--data_file", str(questions),
            "--predictions_file", str(root / "predictions.json"), "--do_sample", "false", "--max_new_tokens", "16"]  # fmt: skip
    chat_run = subprocess.run(chat)
    if chat_run.returncode == 0:
        outputs = [p["output"] for p in json.loads((root / "predictions.json").read_text(encoding="utf-8"))]
        result["chat_exact_match"] = sum(o == r.output for o, r in zip(outputs, held, strict=True)) / len(
            held
        )
    result["chat_exit_code"] = chat_run.returncode
print(json.dumps(result, ensure_ascii=False))
if os.environ.get("OUT"):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_bench

    name = f"{time.strftime('%Y-%m-%d', time.gmtime())}_{train_bench.machine_slug()}_smoke.json"
    Path(os.environ["OUT"], name).write_text(json.dumps(result, ensure_ascii=False, indent=1))
sys.exit(run.returncode)
