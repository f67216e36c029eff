# Two commands on a fresh machine: `make up` and `make test`.
VENV ?= $(CURDIR)/.venv
SB := $(VENV)/bin/switchboard
export SWITCHBOARD_VENV := $(VENV)

.PHONY: bootstrap bootstrap-tests up down status test lint unit integration chaos bench clean compose-test

bootstrap:
	@scripts/bootstrap.sh

# Tests also need Debian's chromium (browser tests through Playwright).
bootstrap-tests:
	@scripts/bootstrap.sh --tests

up: bootstrap
	$(SB) up $(ARGS)

down: bootstrap
	$(SB) down

status: bootstrap
	$(SB) status

lint: bootstrap
	$(VENV)/bin/ruff check app tests migrations bench
	$(VENV)/bin/mypy

# The whole suite, then the docker compose smoke test (which says so and passes
# only when no Docker engine can be had on this machine).
test: bootstrap-tests lint
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)
	@scripts/compose-test.sh

unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit

integration: bootstrap
	$(VENV)/bin/pytest -q tests/integration

bench: bootstrap
	$(VENV)/bin/python -m bench.up_time

clean:
	rm -rf .switchboard build *.egg-info

# docker compose: build compose/compose.yaml against a real Docker engine and smoke-test it.
compose-test: bootstrap
	@scripts/compose-test.sh
