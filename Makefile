# Synapse: `make demo` to see it run, `make test` to check everything.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build install up down demo test test-unit test-pg test-e2e bench bench-smoke lint

setup:
	@scripts/setup.sh

build: setup
	@$(ENV) cargo build --workspace --exclude synapse_pg
	@$(ENV) cargo build -p synapse_pg

# Installs the extension into the private Postgres under .synapse/: the
# current version's script (generated) and the released ones kept in sql/
# (older install scripts and the upgrade path from each).
install: setup
	@$(ENV) cargo pgrx install -p synapse_pg --pg-config "$$PG_CONFIG" >/dev/null
	@$(ENV) cp sql/synapse--*.sql "$$("$$PG_CONFIG" --sharedir)/extension/"
	@echo "installed the synapse extension"

up: install
	@scripts/stack.sh up

down:
	@scripts/stack.sh down

demo: up
	@scripts/demo.sh

lint: setup
	@scripts/check-released.sh
	@$(ENV) cargo fmt --all -- --check
	@$(ENV) cargo clippy --workspace --all-targets -- -D warnings

test-unit: setup
	@$(ENV) cargo test -p synapse_worker

# #[pg_test]s: a throwaway cluster started by cargo-pgrx (as postgres when root).
test-pg: setup
	@$(ENV) mkdir -p "$$SYNAPSE_HOME/pgrx-test" && \
	  if [ "$$(id -u)" -eq 0 ]; then chown postgres "$$SYNAPSE_HOME/pgrx-test"; \
	    RUNAS="--runas postgres --pgdata $$SYNAPSE_HOME/pgrx-test/data"; fi; \
	  cargo pgrx test pg15 -p synapse_pg $$RUNAS

# End-to-end: each test starts its own cluster and Redis on free ports.
test-e2e: install
	@$(ENV) cargo build -p synapse_worker --bin synapse-worker --examples
	@$(ENV) cargo test -p synapse_e2e -- --test-threads 2

# Benchmarks on an isolated stack with release builds; prints a table and
# writes target/bench/results.json. Not part of `make test` (see bench-smoke).
# BENCH_ARGS passes flags, e.g. make bench BENCH_ARGS="--only latency,dag";
# --only peer runs Synapse's drain beside Graphile Worker's (which the bench
# installs with npm into target/bench/graphile).
BENCH_ARGS ?=
bench: setup
	@$(ENV) cargo pgrx install --release -p synapse_pg --pg-config "$$PG_CONFIG" >/dev/null
	@$(ENV) cp sql/synapse--*.sql "$$("$$PG_CONFIG" --sharedir)/extension/"
	@$(ENV) cargo build --release -p synapse_worker --bin synapse-worker
	@$(ENV) cargo build --release -p synapse_e2e --bin synapse-bench
	@mkdir -p target/bench
	@$(ENV) SYNAPSE_WORKER_BIN=$(CURDIR)/target/release/synapse-worker target/release/synapse-bench --json target/bench/results.json $(BENCH_ARGS)

# The benchmark with tiny sizes, so it cannot rot.
bench-smoke: install
	@$(ENV) cargo build -p synapse_worker --bin synapse-worker
	@$(ENV) cargo run -q -p synapse_e2e --bin synapse-bench -- --quick --runs 1

test: lint test-unit test-pg test-e2e bench-smoke
	@echo "all tests passed"
