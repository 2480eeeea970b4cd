# Fresh machine: `make up` brings the stack up, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: up test lint compile explain models verify bench overload llm-bench clean

# The virtualenv is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/sluice models
	$(VENV)/bin/sluice up config.yaml -o model_repository

models: $(STAMP)
	$(VENV)/bin/sluice models

compile: $(STAMP)
	$(VENV)/bin/sluice compile config.yaml -o model_repository

explain: $(STAMP)
	$(VENV)/bin/sluice explain config.yaml

# Probe every knob of every service on a stack brought up for it (about a minute), then stop it.
verify: models
	$(VENV)/bin/sluice verify config.yaml --up

# Run alone: on 2 cores anything else running skews the figures.
bench: models
	$(PY) -m benchmarks.embeddings

# Each encoder service at 0.5x-3x its capacity, open loop, with and without Redis; 5 minutes at nominal load.
overload: models
	$(PY) -m benchmarks.overload --nominal-seconds 300

# The LLM service's continuous and static schedulers, streamed completions at 1-16 streams and open loop at 2x.
llm-bench: models
	$(PY) -m benchmarks.llm

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
