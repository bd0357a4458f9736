#!/usr/bin/env bash
# Installs what building and running Synapse needs, idempotently:
# Debian packages, cargo-pgrx at the pinned version, and a private copy of
# Postgres 15 that pgrx installs the extension into (so nothing under /usr is
# written and a running system cluster is never touched).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang
          build-essential pkg-config libssl-dev redis-server redis-tools sudo graphviz
          chromium)
CARGO_PGRX_VERSION=0.18.1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Node.js and npm, for the benchmark's peer (Graphile Worker, which the bench
# installs itself with npm). Any node on PATH will do; Debian's otherwise.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: installing nodejs npm"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

# playwright-core, which drives Chromium in the console's browser test, at the
# version package-lock.json pins.
if [ ! -d pgrx-tests/browser/node_modules/playwright-core ]; then
    echo "setup: installing the browser test's playwright-core"
    npm ci --prefix pgrx-tests/browser --no-audit --no-fund --silent
fi

if [ "$(cargo pgrx --version 2>/dev/null || true)" != "cargo-pgrx $CARGO_PGRX_VERSION" ]; then
    echo "setup: installing cargo-pgrx $CARGO_PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "$CARGO_PGRX_VERSION" --locked --quiet
fi

# A private, relocatable Postgres: same relative layout as Debian's, so its own
# pg_config reports paths under $SYNAPSE_PG_ROOT. Built in a temporary folder
# and renamed into place, so an interrupted run never leaves half a copy.
if [ ! -x "$PG_CONFIG" ]; then
    echo "setup: copying Postgres 15 into $SYNAPSE_PG_ROOT"
    tmp="$SYNAPSE_PG_ROOT.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp/usr/lib/postgresql" "$tmp/usr/share/postgresql" "$tmp/usr/include"
    cp -a /usr/lib/postgresql/15 "$tmp/usr/lib/postgresql/"
    cp -a /usr/share/postgresql/15 "$tmp/usr/share/postgresql/"
    cp -a /usr/include/postgresql "$tmp/usr/include/"
    mv "$tmp" "$SYNAPSE_PG_ROOT"
fi

if ! grep -qs "$PG_CONFIG" "$PGRX_HOME/config.toml"; then
    mkdir -p "$PGRX_HOME"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# The cluster runs as a non-root user (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$SYNAPSE_HOME" 2>/dev/null || true
fi
echo "setup: ready"
