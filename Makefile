# Everything installs into a local .venv on first use: torch first (the CPU build that
# `pip install torch==2.13.0` finds locally), then the package with its extras.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` (auto: one per core; 0: none, the suite in one process)
TEST_WORKERS ?= auto

.PHONY: install demo test lint format typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[serve,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hkd4vlm quickstart --out runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# ruff (lint and format, configured in pyproject.toml); .ci/run runs it before the tests
lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

# mypy (configured in pyproject.toml) over the whole package, which it reports clean; .ci/run runs it after lint
typecheck: $(STAMP)
	$(BIN)/mypy src/hkd4vlm

bench: $(STAMP)
	$(BIN)/hkd4vlm bench --out bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
