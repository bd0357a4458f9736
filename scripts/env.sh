# Shared settings for the scripts; sourced, not run.
SYNAPSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SYNAPSE_HOME="${SYNAPSE_HOME:-$SYNAPSE_ROOT/.synapse}"
export SYNAPSE_PG_ROOT="$SYNAPSE_HOME/pg"
export PG_CONFIG="$SYNAPSE_PG_ROOT/usr/lib/postgresql/15/bin/pg_config"
export PG_BIN="$SYNAPSE_PG_ROOT/usr/lib/postgresql/15/bin"
export PGRX_HOME="$SYNAPSE_HOME/pgrx"
# Rust ERRORs inside Postgres would otherwise log a full backtrace each.
export RUST_BACKTRACE=0
mkdir -p "$SYNAPSE_HOME"
