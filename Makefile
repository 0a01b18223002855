# The two commands of the README, and the steps they need. Everything lands in .venv and .local.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: demo up test unit lint lockcheck audit lock promtool bench install kafka-jars clean

demo: install kafka-jars ## the whole pipeline locally on the sample payloads, then stop
	$(BIN)/audience-relay up --demo

up: install kafka-jars ## the whole pipeline locally; keeps serving until Ctrl-C
	$(BIN)/audience-relay up

# The whole suite, slow tests included (the 10,000-case fuzz corpus), hypothesis seeded so a CI run
# is reproducible; a plain `pytest` skips the slow tests and draws new examples.
test: install kafka-jars ## the whole test suite against a real broker
	$(BIN)/pytest --run-slow --hypothesis-seed=20261123

# The same run without the tests that need a broker (marked kafka automatically, see tests/conftest.py):
# no Java, no Kafka jars, seconds.
unit: install ## the tests that need no broker
	$(BIN)/pytest -m "not kafka" --run-slow --hypothesis-seed=20261123

audit: install ## known vulnerabilities in the locked dependencies (pip-audit)
	$(BIN)/python scripts/audit.py $(LOCK)

# Resolves pyproject.toml without the lock (pip keeps every installed version that still fits, so only
# what the change needs moves; `$(BIN)/pip install -U NAME` first to move NAME on purpose), then locks
# what is installed. Needs no `install`: that refuses a lock which disagrees with pyproject.toml.
lock: | $(BIN)/python ## requirements.lock: the exact versions installed for audience-relay[dev]
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python scripts/lock.py > $(LOCK).new
	mv $(LOCK).new $(LOCK)

lockcheck: install ## pyproject.toml against requirements.lock, and the venv against the lock
	$(BIN)/python scripts/lock.py --check --check-installed

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

install: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip

# Exactly the locked versions (pip constraints: the lock pins, pyproject.toml chooses what is installed;
# the project itself is editable). The pyproject-vs-lock check runs before pip so a stale lock is one
# clear list, not a resolver error; the venv check after it finds a package the lock does not pin
# (constraints alone would install it at whatever is newest).
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) pip packaging
	$(BIN)/python scripts/lock.py --check
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	$(BIN)/python scripts/lock.py --check-installed
	touch $(STAMP)

promtool: ## promtool (Debian's prometheus package) for the alert-rule tests; CI runs this, locally optional
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

kafka-jars: install
	$(BIN)/audience-relay kafka fetch

clean:
	-$(BIN)/audience-relay kafka stop
	rm -rf $(VENV) .local
