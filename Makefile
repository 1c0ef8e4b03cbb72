# Everything a fresh machine needs: `make run` serves, `make test` tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-unit test-conformance bench bench-quick bench-tools definitions clean

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## Start the server on the embedded SQLite database under ./.fhir-data (http://127.0.0.1:8080/fhir/default).
run: install
	$(BIN)/fhir-server migrate
	$(BIN)/fhir-server serve

## Run every test: SQLite always, PostgreSQL when reachable (FHIR_TEST_POSTGRES_URL or 127.0.0.1:5432).
test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests

test-conformance: install
	$(BIN)/python -m pytest conformance_tests

## Benchmarks against a PostgreSQL-backed server started as in production (see benchmarks/README.md).
bench: install bench-tools
	FHIR_BENCH_POSTGRES_URL=$$(tools/ensure_postgres.sh) $(BIN)/python -m benchmarks.run --profile

bench-quick: install bench-tools
	FHIR_BENCH_POSTGRES_URL=$$(tools/ensure_postgres.sh) $(BIN)/python -m benchmarks.run --quick

## wrk (Debian package) drives the load; py-spy (PyPI, pinned in requirements.lock) profiles with --profile.
bench-tools: install
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet -c requirements.lock py-spy
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (Debian package)"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }; }

## Rebuild the package data from the official definitions in ../shared (developers only).
definitions:
	$(PYTHON) tools/compile_definitions.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
