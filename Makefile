# Every target installs what it needs first, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export WANDB_MODE ?= offline
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Options for the demo, e.g. DEMO_ARGS="--out runs/demo2 --steps 50" (`python -m cluster.demo --help`).
DEMO_ARGS ?=

.PHONY: setup demo test test-quick bench system-deps clean

setup: $(STAMP)

# torch is installed first and pinned to the CPU wheel: any requirement that admits a newer torch
# would otherwise pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[dev]'  # setuptools' editable-install notice
	rm -f $(VENV)/.installed-* && touch $@

# Headless Chromium renders the dashboard in the report tests (Debian package).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

demo: $(STAMP)
	$(BIN)/python -m cluster.demo $(DEMO_ARGS)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q --timeout=900 tests

# The quick subset (< 2 minutes): no Ray clusters, no multi-process DeepSpeed, no training runs.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=300 -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/pipeline_throughput.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/plan_accuracy.py
	$(BIN)/python bench/dedup_scale.py
	$(BIN)/python bench/pipeline_end_to_end.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
