# One gate for people and CI. `make setup` once, then `make check`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup test check lint typecheck protos protos-check demo bench bench-inference bench-batching bench-downloads bench-rollout bench-alerts bench-cli bench-store bench-ingest bench-sync bench-sink bench-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A Sparkplug B edge node and host from a third-party library for the tests
# (tests/peers/): pysparkplug needs paho-mqtt 1, the project paho-mqtt 2.
PEER_VENV := .venv-sparkplug
$(PEER_VENV)/bin/python:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q pysparkplug==0.6.1 paho-mqtt==1.6.1 protobuf==7.36.2

setup: $(BIN)/python $(PEER_VENV)/bin/python
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -c constraints.txt -e '.[all]'

test: setup
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

protos:
	$(BIN)/python scripts/gen_protos.py

protos-check:
	$(BIN)/python scripts/gen_protos.py --check

check: setup lint typecheck protos-check
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/autoglm demo

bench: setup
	$(BIN)/python tests/benchmarks/bench_heartbeats.py

bench-store: setup
	$(BIN)/python tests/benchmarks/bench_store_records.py

bench-ingest: setup
	$(BIN)/python tests/benchmarks/bench_ingest.py

# PostgreSQL too where one runs on this machine (BENCH_PG_DSN: an admin DSN; empty: SQLite only)
BENCH_PG_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres
bench-sync: setup
	$(BIN)/python tests/benchmarks/bench_sync.py $(if $(BENCH_PG_DSN),--postgres $(BENCH_PG_DSN),)

bench-sink: setup
	$(BIN)/python tests/benchmarks/bench_sink.py

bench-memory: setup
	$(BIN)/python tests/benchmarks/bench_agent_memory.py

bench-cli: setup
	$(BIN)/python tests/benchmarks/bench_cli_startup.py

bench-inference: setup
	$(BIN)/python tests/benchmarks/bench_inference.py

bench-batching: setup
	$(BIN)/python tests/benchmarks/bench_batching.py

bench-downloads: setup
	$(BIN)/python tests/benchmarks/bench_downloads.py

bench-rollout: setup
	$(BIN)/python tests/benchmarks/bench_rollout.py

bench-alerts: setup
	$(BIN)/python tests/benchmarks/bench_alerts.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
