# Quarry — every target creates the virtualenv it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: a real extraction on the embedded default (SQLite store, SQLite broker, one worker)
demo: $(STAMP)
	$(BIN)/quarry demo

## lint: ruff (lint + format check), mypy --strict, and the import-linter layer contracts
lint: $(STAMP)
	$(BIN)/ruff check worker scheduler tests bench
	$(BIN)/ruff format --check worker scheduler tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## test: lint, then every test tier in TEST_WORKERS processes (an idle one takes tests queued for a busy one,
## so the long acceptance tests do not end the run on one process); pytest's "no tests ran" (exit 5) fails the target
TEST_WORKERS ?= 3
test: lint
	@$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

## unit: the fast tier only
unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/store -q

## bench: throughput and latency against raw baselines measured in the same run (BENCH_ARGS=ingest: log ingestion and the log call alone; BENCH_ARGS=api: the API part alone;
## BENCH_ARGS=scale: log ingestion with 64 writers and 500 runs on PostgreSQL, 2,000 stream clients, pages at
## 20 million entries in daily partitions (python -m bench.partitions --keep keeps the loaded store for a next try);
## BENCH_ARGS=console: the web console in headless Chromium alone, BENCH_CONSOLE_ARGS=--quick for a short try)
bench: $(STAMP)
ifeq ($(BENCH_ARGS),console)
	$(BIN)/python -m bench.console $(BENCH_CONSOLE_ARGS)
else
	$(BIN)/python -m bench $(BENCH_ARGS)
ifeq ($(BENCH_ARGS)$(BENCH_SKIP_CONSOLE),)
	$(BIN)/python -m bench.console $(BENCH_CONSOLE_ARGS)
endif
endif

## chaos: 20 runs x 50 slices across three workers under random signals, PostgreSQL restarts,
## broker outages and partitions, on Redis then on RabbitMQ (CHAOS_ARGS: --runs, --minutes, --seed)
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.run --broker redis $(CHAOS_ARGS)
	$(BIN)/python -m tests.chaos.run --broker amqp $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .quarry .mypy_cache .pytest_cache .ruff_cache
