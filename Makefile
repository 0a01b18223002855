# The two commands of the README, and the steps they need. Everything lands in .venv and .local.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test lint audit lock promtool bench install kafka-jars clean

demo: install kafka-jars ## the whole pipeline locally on the sample payloads, then stop
	$(BIN)/audience-relay up --demo

up: install kafka-jars ## the whole pipeline locally; keeps serving until Ctrl-C
	$(BIN)/audience-relay up

# The whole suite, slow tests included (the 10,000-case fuzz corpus), hypothesis seeded so a CI run
# is reproducible; a plain `pytest` skips the slow tests and draws new examples.
test: install kafka-jars ## the whole test suite against a real broker
	$(BIN)/pytest --run-slow --hypothesis-seed=20261123

audit: install ## known vulnerabilities in the locked dependencies (pip-audit)
	$(BIN)/python scripts/audit.py requirements.lock

lock: install ## requirements.lock: the exact versions installed for audience-relay[dev]
	$(BIN)/python scripts/lock.py > requirements.lock

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

promtool: ## promtool (Debian's prometheus package) for the alert-rule tests; CI runs this, locally optional
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

kafka-jars: install
	$(BIN)/audience-relay kafka fetch

clean:
	-$(BIN)/audience-relay kafka stop
	rm -rf $(VENV) .local
