# Two set-up commands for a fresh machine with Python 3.11 and pip: `make serve`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

MODEL_DIR := service/model/default_artifact
MODEL_DATA := model_export/data/german_credit.csv
# The model team's Ed25519 signing key; never in the repository.
MODEL_KEY ?= $(HOME)/.privscore/model-team.key

.PHONY: serve test lint protos install dev clean model model-sign model-verify bench soak fuzz

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
	$(BIN)/privscore keys init
	$(BIN)/privscore certs init
	$(BIN)/privscore serve

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# Retrain the bundled model (unsigned until `make model-sign`), then verify it.
model: dev
	$(BIN)/privscore-model train --data $(MODEL_DATA) --label creditability --bad bad \
		--schema model_export/data/german_credit.schema.json --seed 42 --out $(MODEL_DIR) \
		--citation "Hofmann, H. (1994). Statlog (German Credit Data). UCI Machine Learning Repository. https://doi.org/10.24432/C5NC77 (CC BY 4.0)."

model-sign: dev
	$(BIN)/privscore-model sign $(MODEL_DIR) --key $(MODEL_KEY)

model-verify: dev
	$(BIN)/privscore-model verify $(MODEL_DIR) --data $(MODEL_DATA)

# Privscore against its ceilings (echo server, onnxruntime alone, audit fsync off), then the
# scale-out part (PostgreSQL against the file log, two workers against one) when PostgreSQL
# is reachable; about 5 minutes.
bench: dev
	$(BIN)/python -m bench.run

# Five minutes of Score at 8 callers, sampling the server's RSS (bench/soak.json).
soak: dev
	$(BIN)/python -m bench.run --soak 300 --out bench/soak.json

# A longer run of the request fuzzer than the 20 s one in `make test`.
fuzz: dev
	$(BIN)/python -m tests.fuzz.fuzz_requests -max_total_time=600

protos: dev
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
