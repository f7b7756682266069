# Two set-up commands for a fresh machine with Python 3.11 and pip: `make serve`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint protos install dev clean

# Stamps re-run an install only when its inputs change.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/privscore serve

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

protos: dev
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
