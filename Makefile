# One command to set up and run the main job, one to set up and run the tests.
# Each creates the virtual environment (.venv) when it is missing.
#   make demo    # memaudit run examples/prompts.parquet with the bundled lab model
#   make test    # the test suite (CPU, no network), one pytest-xdist worker per core (at most 8), a file per worker
#   make wheel   # dist/memaudit-VERSION-py3-none-any.whl, built from a clean build/ (pip wheel alone also packs
#                # whatever an earlier build left in build/lib: a module since removed or renamed)
# GPU users: create .venv with your CUDA build of torch first (TORCH_SPEC= skips the CPU pin).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,ray
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean wheel

$(BIN)/memaudit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || { test -z "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; }
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/memaudit

demo: setup
	rm -rf memaudit-runs/demo  # a fresh run each time (a rerun on a changed input is refused, by design)
	$(BIN)/memaudit run examples/prompts.parquet --out memaudit-runs/demo
	$(BIN)/memaudit report memaudit-runs/demo

test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8 --dist loadfile

wheel:
	rm -rf build
	$(PYTHON) -m pip wheel --no-deps . -w dist

bench: setup
	$(BIN)/python benchmarks/scoring_vs_reference.py --quick

clean:
	rm -rf memaudit-runs .pytest_cache build
