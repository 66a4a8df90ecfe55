# voco — developer entry points. `make run` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
CORES ?= 2
# the slowest tests are listed after every run (CI keeps an eye on its time limit)
PYTEST_ARGS ?= --durations=30

.PHONY: venv run test lint bench clean-outputs

# Idempotent: re-installs only when pyproject.toml changed (stamp keyed on its hash).
venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

# The main job: the whole DAG on the embedded default (synthetic phantom CT) on CPU.
# OVERRIDES=my.yaml (space-separated files) adds your own override files on top of the laptop default.
run: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile config/profiles/local all --cores $(CORES) \
		$(if $(OVERRIDES),--configfile config/config.yaml $(OVERRIDES))

test: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakemake --lint -s workflow/Snakefile

bench: venv
	$(BIN)/python benchmarks/bench_loading.py

clean-outputs:
	rm -rf data runs results logs .snakemake
