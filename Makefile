# The two commands of the README, and the steps they need. Everything lands in .venv and .local.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test lint bench install kafka-jars clean

demo: install kafka-jars ## the whole pipeline locally on the sample payloads, then stop
	$(BIN)/audience-relay up --demo

up: install kafka-jars ## the whole pipeline locally; keeps serving until Ctrl-C
	$(BIN)/audience-relay up

test: install kafka-jars ## the whole test suite against a real broker
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

kafka-jars: install
	$(BIN)/audience-relay kafka fetch

clean:
	-$(BIN)/audience-relay kafka stop
	rm -rf $(VENV) .local
