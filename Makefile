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

.PHONY: venv demo test lint format bench bench-quick bench-eval bench-export clean browser fuzz llama-cpp

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

# The chat page's browser test drives Debian's chromium; installed only when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }

# llama.cpp's Python binding for the GGUF export tests. PyPI has only its source: it is compiled once
# (minutes) into a wheel under .venv/wheels and installed from there when missing.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(VENV)/wheels
llama-cpp: venv
	@$(BIN)/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)')" 2>/dev/null || { \
	  ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
	    $(BIN)/python -m pip wheel -q --no-deps --no-binary llama-cpp-python -w $(WHEELS) \
	      llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  $(BIN)/python -m pip install -q --only-binary llama-cpp-python --find-links $(WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); }

test: lint browser llama-cpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q --durations=15 tests

# A long random search of every input surface (tests/test_fuzz.py), round after round with new seeds,
# for FUZZ_MINUTES; a failing input is saved in tests/bad_inputs/found/ and the search stops.
FUZZ_MINUTES ?= 20
fuzz: venv
	end=$$(( $$(date +%s) + $(FUZZ_MINUTES) * 60 )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		round=$$((round + 1)); echo "fuzz round $$round"; \
		LLAMA_SFT_FUZZ=1 $(BIN)/python -m pytest -q -x -s -p no:cacheprovider tests/test_fuzz.py tests/test_serve_fuzz.py || exit 1; \
	done

bench: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/train_bench.py

bench-quick: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/train_bench.py --quick

# llama-sft export of a ~1B-parameter LLaMA (random weights, 12 GB of scratch disk) for every --outtype:
# time, peak RSS, file size, llama.cpp decode speed (EXPORT_BENCH_ARGS=--quick: a smoke test).
EXPORT_BENCH_ARGS ?=
bench-export: venv llama-cpp
	$(BIN)/python bench/export_bench.py $(EXPORT_BENCH_ARGS)

# C-Eval scoring: the original evaluator, lm-evaluation-harness and `llama-sft eval` side by side
# (EVAL_BENCH_ARGS=--quick: a tiny model, to check every path end to end).
EVAL_BENCH_ARGS ?=
bench-eval: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/eval_bench.py $(EVAL_BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
