# The one way in: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run lint format test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Without UPSTREAM_URL, run against the built-in demo upstream so a rewrite shows at once.
run: install
	$(BIN)/openai-model-rerouter $(if $(UPSTREAM_URL),,--demo)

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests

format: install
	$(BIN)/ruff check --fix service tests
	$(BIN)/ruff format service tests

test: lint
	$(BIN)/pytest
