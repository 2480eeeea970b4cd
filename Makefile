# Fresh machine: `make up` brings the stack up, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: up test lint compile explain clean

# The virtualenv is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	@echo "make up: the model runtimes and the gateway are not built yet; this compiles config.yaml only."
	$(VENV)/bin/sluice compile config.yaml -o model_repository

compile: $(STAMP)
	$(VENV)/bin/sluice compile config.yaml -o model_repository

explain: $(STAMP)
	$(VENV)/bin/sluice explain config.yaml

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
