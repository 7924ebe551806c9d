#!/usr/bin/env bash
# Run here, before a lent GPU's one call: puts what bench/gpu_bench.sh needs and the GPU machine
# lacks into git-ignored folders of the checkout, to be carried there.
#   .shared/  the default workload's data and 55,296-piece tokenizer, from ../shared (1.5 MB)
#   .whl/     transformers and peft at the versions this project pins (the GPU image has older
#             ones; torch, accelerate, tokenizers, safetensors and sentencepiece are there)
# Then, with the device tool (one call, ~7 minutes; see docs/performance.md, "On a GPU"):
#   carry [".shared", ".whl"], command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
#   LLAMA_SFT_SHARED=.shared PYTHON=python3 bash bench/gpu_bench.sh --ablation
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${LLAMA_SFT_SHARED_SOURCE:-../shared}
[ -f "$SHARED/data/alpaca_zh_demo.json" ] || { echo "no $SHARED/data/alpaca_zh_demo.json" >&2; exit 1; }
mkdir -p .shared/data .shared/tokenizers
cp "$SHARED/data/alpaca_zh_demo.json" .shared/data/
cp -r "$SHARED/tokenizers/chinese-llama-2" .shared/tokenizers/
PY=${PYTHON:-.venv/bin/python}
versions=$($PY -c "import transformers, peft; print(f'transformers=={transformers.__version__} peft=={peft.__version__}')")
rm -rf .whl
# Both are pure-Python wheels, so no platform or Python version needs naming.
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl $versions
du -sh .shared .whl
