# relata developer tasks. `make test` is what CI runs (.ci/run).
# uv keeps its downloads in its normal user cache (~/.cache/uv); the Kafka jars go to
# ~/.cache/relata (RELATA_EMBEDDED_KAFKA_CACHE_DIR); nothing is downloaded into the repo.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relata-setup.stamp

.DEFAULT_GOAL := help
.PHONY: help setup kafka-jars demo test lint format pytest

help:
	@echo "make setup   create $(VENV), install relata[dev], resolve the Kafka jars (idempotent)"
	@echo "make demo    run the whole pipeline on embedded Kafka and Qdrant"
	@echo "make test    lint + type-check + every test (what CI runs)"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make format  ruff format + ruff check --fix"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv

# Reinstall only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@

# Cheap when the jar cache exists; resolves it atomically with Maven otherwise.
kafka-jars: $(STAMP)
	@$(BIN)/relata kafka --resolve-only >/dev/null

setup: $(STAMP) kafka-jars

demo: setup
	$(BIN)/relata demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when it collected nothing: that is a failure here, with a clear message.
pytest: setup
	@rc=0; $(BIN)/pytest tests/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests under tests/" >&2; fi; \
	exit $$rc

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	@$(MAKE) --no-print-directory pytest
