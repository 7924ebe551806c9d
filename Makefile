# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := src tests scripts $(wildcard bench)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed JIT-builds a CPU op once; keep the build beside the project so later runs reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: venv demo test lint format bench bench-quick clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/llama-sft demo --output_dir demo_output

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: lint
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/train_bench.py

bench-quick: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/train_bench.py --quick

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
