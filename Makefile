# Two commands on a fresh machine: `make up` and `make test`.
VENV ?= $(CURDIR)/.venv
SB := $(VENV)/bin/switchboard
export SWITCHBOARD_VENV := $(VENV)

.PHONY: bootstrap bootstrap-tests up down status test lint unit integration chaos browser bench clean compose-test multihost-test

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

# Import contracts (pyproject.toml's [tool.importlinter]: the tiers, and the worker's
# parts), then import cycles between any two modules of app/.
lint: bootstrap
	$(VENV)/bin/ruff check app tests migrations bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/python scripts/check_import_cycles.py

# The whole suite, then the docker compose smoke test (which says so and passes
# only when no Docker engine can be had on this machine).
test: bootstrap-tests lint
	$(VENV)/bin/pytest -q -ra --ignore=tests/multihost $(PYTEST_ARGS)
	$(VENV)/bin/pytest -q -rA tests/multihost
	@scripts/compose-test.sh

# The tier across network namespaces (hosts, a keepalived pair with a virtual IP) and
# its whole-host faults and partitions (tests/multihost; needs root, as `make test`).
multihost-test: bootstrap-tests
	$(VENV)/bin/pytest -q -rA tests/multihost

unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit

integration: bootstrap
	$(VENV)/bin/pytest -q tests/integration

chaos: bootstrap
	$(VENV)/bin/pytest -q -s tests/chaos

browser: bootstrap-tests
	$(VENV)/bin/pytest -q tests/browser

bench: bootstrap
	$(VENV)/bin/python -m bench.up_time
	$(VENV)/bin/python -m bench.throughput --mode max
	$(VENV)/bin/python -m bench.throughput --mode max --tls
	$(VENV)/bin/python -m bench.throughput --mode rate --rate 5000
	$(VENV)/bin/python -m bench.throughput --mode rate --rate 2000
	$(VENV)/bin/python -m bench.throughput --mode rate --rate 3000 --wal
	$(VENV)/bin/python -m bench.batch_cost
	$(VENV)/bin/python -m bench.throughput --mode rate --rate 2000 --ack-every 1
	$(VENV)/bin/python -m bench.throughput --mode rate --rate 2000 --ack-every 10 --read-every 1
	$(VENV)/bin/python -m bench.session_memory
	$(VENV)/bin/python -m bench.failover --scenario kill-worker --sessions 10000
	$(VENV)/bin/python -m bench.failover --scenario kill-primary --sessions 2000 --after 25
	$(VENV)/bin/python -m bench.failover --scenario switchover --sessions 2000
	$(VENV)/bin/python -m bench.report_speed
	$(VENV)/bin/python -m bench.token_storm --sessions 20000 --procs 4
	$(VENV)/bin/python -m bench.connections --sessions 100000

clean:
	rm -rf .switchboard build *.egg-info

# docker compose: build compose/compose.yaml against a real Docker engine and smoke-test it.
compose-test: bootstrap
	@scripts/compose-test.sh
