# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
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
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: venv
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

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
