# holdwall-stream developer commands. Every target creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench verify-kafka lint format ddl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Local broker (Tansu on 127.0.0.1:9092 unless KAFKA_BROKERS is set) + worker on SQLite, web on :3000.
run: $(STAMP)
	$(BIN)/holdwall-stream run

## The whole test suite against a real broker, PostgreSQL and SQLite.
## Two pytest processes, each with its own broker: most of the suite waits on worker
## processes and group joins (12:52 serial, 7:05 like this on a slow 2-CPU machine). A
## test file stays in one process, so its module fixtures (running workers) start once.
## Not more than two: every e2e test runs workers with database pools of their own.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

## Unit tests only (no broker, no database).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

## Throughput and latency benchmarks (not part of `make test`).
bench: $(STAMP)
	$(BIN)/python -m benchmarks

## The checklist's verify:kafka against the configured brokers.
verify-kafka: $(STAMP)
	$(BIN)/holdwall-stream verify

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate tables/*.sql from the SQLAlchemy models.
ddl: $(STAMP)
	$(BIN)/holdwall-stream db ddl --write

clean:
	rm -rf $(VENV) holdwall-data holdwall.db* .pytest_cache .ruff_cache
