#!/usr/bin/env bash
# One GPU, one prepared run (< 8 minutes): a ~1B-parameter LLaMA with random weights, bfloat16,
# max_seq_length 1024, the original pipeline (HF Trainer + PEFT, right-padded, batch 1 x GA 8 and
# batch 8, each again with cuDNN's attention switched off as llama-sft does) against
# llama-sft's default path, 20 optimizer steps of 8 records each. Prints tokens/s and peak GPU
# memory and writes $OUT/DATE_GPU_gpu.json (+ .png, .log), named as bench/results/README.md says
# (e.g. 2026-11-28_h200_gpu.json). With --ablation it then times llama-sft's step with each of its
# changes undone on the same model (step_ablation.py, $OUT/DATE_GPU_gpu-ablation.json) and
# profiles one step (DATE_GPU_gpu-ablation.profile.txt): ~2 minutes more. The .log files hold
# the machine's paths: keep them out of bench/results.
#
#   bash bench/gpu_bench.sh [--ablation]                     # ~1B model on the GPU
#   bash bench/gpu_bench.sh --model-size tiny [--ablation]   # a tiny model: checks the script anywhere
#
# Data: the benchmark's default workload from ../shared, else its generated demo data. ../shared
# does not travel to a lent GPU machine: copy its data/alpaca_zh_demo.json and
# tokenizers/chinese-llama-2 into the git-ignored .shared/ of the checkout, carry that, and run
# with LLAMA_SFT_SHARED=.shared (train_bench.py reads it).
#
# Installs nothing: needs torch (with CUDA), transformers and peft, and the repository's src/.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=1b ABLATION=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model-size) SIZE=${2:?--model-size 1b or tiny}; shift 2 ;;
    --ablation) ABLATION=1; shift ;;
    *) echo "unknown option $1 (--model-size 1b|tiny, --ablation)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

$PY - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "sentencepiece", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_bench: missing Python packages {missing}; this script installs nothing")
import torch
print("torch", torch.__version__, "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)")
PYEOF

case "$SIZE" in
  # 16 layers x (4 x 2048^2 + 3 x 2048 x 5504) + 2 x 55296 x 2048 rows: ~1.04B parameters.
  1b) MODEL=(--hidden 2048 --intermediate 5504 --layers 16 --heads 16) STEPS=(--steps 20) MODE=gpu ;;
  tiny) MODEL=(--hidden 64 --intermediate 172 --layers 2 --heads 4) STEPS=(--steps 2 --eval-records 4) MODE=gpu-tiny ;;
  *) echo "--model-size: 1b or tiny" >&2; exit 2 ;;
esac
# DATE_MACHINE, as train_bench.py names its own results (the GPU's model, or the CPU's on a check run).
NAME=$($PY -c 'import sys, time; sys.path.insert(0, "bench"); import train_bench
print(time.strftime("%Y-%m-%d", time.gmtime()) + "_" + train_bench.machine_slug())')

# A failed benchmark does not stop the ablation: a GPU lease is too short to rerun either.
failed=0
$PY bench/train_bench.py "${MODEL[@]}" "${STEPS[@]}" --max-seq-length 1024 \
    --runs original-bs1-ga8,original-bs1-ga8-no-cudnn,original-bs8,original-bs8-no-cudnn,llama-sft \
    --out "$OUT/${NAME}_$MODE.json" 2>&1 | tee "$OUT/${NAME}_$MODE.log" || failed=1
[ "$ABLATION" = 1 ] || exit $failed

# The CPU-only variants (-bits-dropout, -cpu-kernels) are the same as "all" on a GPU.
$PY bench/step_ablation.py "${MODEL[@]}" --max-seq-length 1024 --reps 6 --profile 30 \
    --variants all,-packing,-packed-attention,-row-at-once,-labelled-lm_head,-fused-head,-fused-ce,-base-dtype-residual,-own-autocast,-fused-lora \
    --out "$OUT/${NAME}_$MODE-ablation.json" 2>&1 | tee "$OUT/${NAME}_$MODE-ablation.log" || failed=1
exit $failed
