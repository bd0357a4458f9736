#!/usr/bin/env bash
# A local Postgres cluster (synapse preloaded) and a local Redis, on their own
# ports, in their own folder. `make up`/`make down` use the defaults; tests run
# their own stacks by setting SYNAPSE_STACK_DIR and the ports.
#
#   stack.sh up | down | status | pg-start | pg-stop [fast|immediate] | redis-start | redis-stop
set -euo pipefail
. "$(dirname "$0")/env.sh"

STACK_DIR="${SYNAPSE_STACK_DIR:-$SYNAPSE_HOME/stack}"
# Below the kernel's ephemeral range (32768+), so outgoing connections never hold them.
PGPORT="${SYNAPSE_PGPORT:-25432}"
REDIS_PORT="${SYNAPSE_REDIS_PORT:-26379}"
DATABASE="${SYNAPSE_DATABASE:-synapse}"
DATA="$STACK_DIR/pgdata"
# Extra postgresql.conf lines, e.g. "synapse.sweep_interval = '2s'".
EXTRA_CONF="${SYNAPSE_PG_CONF:-}"
# Optional: Redis over TLS (a self-signed CA made here) and/or with a password.
REDIS_TLS="${SYNAPSE_REDIS_TLS:-}"
REDIS_PASSWORD="${SYNAPSE_REDIS_PASSWORD:-}"
# Optional: Postgres over TLS (a certificate from the same CA) and only over TLS,
# with a password, for every role but the superuser postgres.
PG_TLS="${SYNAPSE_PG_TLS:-}"
TLS_DIR="$STACK_DIR/tls"
REDIS_SCHEME=redis
[ -n "$REDIS_TLS" ] && REDIS_SCHEME=rediss
REDIS_URL="$REDIS_SCHEME://${REDIS_PASSWORD:+:$REDIS_PASSWORD@}127.0.0.1:$REDIS_PORT/0"
DATABASE_URL="postgresql://postgres@127.0.0.1:$PGPORT/$DATABASE"
# The stack's connection settings, which synapse-worker reads from ./.synapse/env when
# neither a flag nor the environment says. Test stacks (SYNAPSE_STACK_DIR) keep theirs
# in their own folder, never replacing the one of `make up`.
if [ -n "${SYNAPSE_STACK_DIR:-}" ]; then ENV_FILE="$STACK_DIR/env"; else ENV_FILE="$SYNAPSE_HOME/env"; fi

redis_cli() {
    local flags=(-p "$REDIS_PORT")
    [ -n "$REDIS_TLS" ] && flags+=(--tls --cacert "$TLS_DIR/ca.crt")
    [ -n "$REDIS_PASSWORD" ] && flags+=(-a "$REDIS_PASSWORD" --no-auth-warning)
    redis-cli "${flags[@]}" "$@"
}

make_certificates() {
    [ -f "$TLS_DIR/ca.crt" ] && return 0
    mkdir -p "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=127.0.0.1" \
        -addext "subjectAltName=IP:127.0.0.1" -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
    chmod 644 "$TLS_DIR/server.key"
}

# Postgres's certificate, for 127.0.0.1 and localhost, signed by the CA above.
make_postgres_certificate() {
    make_certificates
    [ -f "$TLS_DIR/postgres.crt" ] && return 0
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$TLS_DIR/postgres.key" -out "$TLS_DIR/postgres.csr" 2>/dev/null
    openssl x509 -req -days 30 -in "$TLS_DIR/postgres.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/server.key" \
        -CAcreateserial -CAserial "$TLS_DIR/ca.srl" -out "$TLS_DIR/postgres.crt" \
        -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n') 2>/dev/null
    # Readable by the cluster's user, which copies it (Postgres wants its own 0600 copy).
    chmod 644 "$TLS_DIR/postgres.key"
}

# TLS on, and pg_hba.conf letting in only TLS connections with a password;
# the superuser postgres also without TLS, for the test harness's own client.
configure_postgres_tls() {
    make_postgres_certificate
    as_pg cp "$TLS_DIR/postgres.crt" "$DATA/server.crt"
    as_pg cp "$TLS_DIR/postgres.key" "$DATA/server.key"
    as_pg chmod 600 "$DATA/server.key"
    cat >"$STACK_DIR/pg_hba.conf" <<HBA
host    all postgres 127.0.0.1/32 trust
hostssl all all      127.0.0.1/32 scram-sha-256
HBA
    as_pg cp "$STACK_DIR/pg_hba.conf" "$DATA/pg_hba.conf"
}

# initdb refuses to run as root: run the cluster as postgres then.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then sudo -u postgres env -u PGDATA "$@"; else "$@"; fi
}
psql_admin() { PGOPTIONS="-c client_min_messages=warning -c statement_timeout=0 -c lock_timeout=0" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }

pg_start() {
    if [ ! -f "$DATA/PG_VERSION" ]; then
        mkdir -p "$STACK_DIR"
        [ "$(id -u)" -eq 0 ] && chown postgres "$STACK_DIR"
        rm -rf "$DATA.tmp"
        as_pg "$PG_BIN/initdb" -D "$DATA.tmp" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
        echo "include_if_exists = 'synapse.conf'" >>"$DATA.tmp/postgresql.conf"
        mv "$DATA.tmp" "$DATA"
    fi
    # Rewritten at every start, so changed ports or settings always apply.
    cat >"$STACK_DIR/synapse.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
shared_preload_libraries = 'synapse,pg_stat_statements'
synapse.database = '$DATABASE'
synapse.redis_url = '$REDIS_URL'
max_connections = 200
log_min_messages = warning
${PG_TLS:+ssl = on}
$EXTRA_CONF
CONF
    as_pg cp "$STACK_DIR/synapse.conf" "$DATA/synapse.conf"
    if [ -n "$PG_TLS" ]; then configure_postgres_tls; fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        # With TLS, the forwarder trusts the stack's own CA.
        local trust=()
        [ -n "$REDIS_TLS" ] && trust=(SSL_CERT_FILE="$TLS_DIR/ca.crt")
        as_pg env RUST_BACKTRACE=0 "${trust[@]}" "$PG_BIN/pg_ctl" -D "$DATA" -l "$STACK_DIR/postgres.log" -w -t 60 start >/dev/null
    fi
    if ! psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1; then
        psql_admin -d postgres -c "CREATE DATABASE $DATABASE"
    fi
    # A stack kept from an earlier release is updated to the installed one.
    psql_admin -d "$DATABASE" -c "CREATE EXTENSION IF NOT EXISTS synapse; ALTER EXTENSION synapse UPDATE; CREATE EXTENSION IF NOT EXISTS pg_stat_statements;"
    # Workers run as a role with the worker capability only, never as a superuser.
    psql_admin -d "$DATABASE" -qc "DO \$\$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'synapse_worker') THEN
                CREATE ROLE synapse_worker LOGIN NOSUPERUSER;
            END IF;
        END \$\$; SELECT synapse.grant_worker('synapse_worker');" >/dev/null
}

pg_stop() {
    local mode="${1:-fast}"
    if [ -f "$DATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m "$mode" -w stop >/dev/null
    fi
}

REDIS_PIDFILE="$STACK_DIR/redis/redis.pid"

# True when the Redis answering on REDIS_PORT is the one this stack started: a
# server of another stack on the same port is never adopted, nor stopped.
redis_is_ours() {
    [ -f "$REDIS_PIDFILE" ] || return 1
    local answering
    answering=$(redis_cli info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
    [ -n "$answering" ] && [ "$answering" = "$(cat "$REDIS_PIDFILE")" ]
}

redis_start() {
    mkdir -p "$STACK_DIR/redis"
    redis_is_ours && return 0
    # Redis writes its pid file only once it listens: a stale one would vouch for a stranger.
    rm -f "$REDIS_PIDFILE"
    local listen=(--port "$REDIS_PORT")
    if [ -n "$REDIS_TLS" ]; then
        make_certificates
        listen=(--port 0 --tls-port "$REDIS_PORT" --tls-cert-file "$TLS_DIR/ca.crt"
                --tls-key-file "$TLS_DIR/server.key" --tls-ca-cert-file "$TLS_DIR/ca.crt" --tls-auth-clients no)
    fi
    [ -n "$REDIS_PASSWORD" ] && listen+=(--requirepass "$REDIS_PASSWORD")
    redis-server "${listen[@]}" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
        --dir "$STACK_DIR/redis" --pidfile "$REDIS_PIDFILE" \
        --logfile "$STACK_DIR/redis/redis.log" >/dev/null
    for _ in $(seq 100); do redis_is_ours && return 0; sleep 0.05; done
    echo "redis did not start on port $REDIS_PORT (is the port taken?); see $STACK_DIR/redis/redis.log" >&2
    return 1
}

redis_stop() {
    [ -f "$REDIS_PIDFILE" ] || return 0
    local pid
    pid=$(cat "$REDIS_PIDFILE")
    # Only this stack's server: the pid must still be a redis-server.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -f "$REDIS_PIDFILE"
}

case "${1:-}" in
    up)
        redis_start
        pg_start
        umask 077
        cat >"$ENV_FILE.tmp" <<ENV
# Written by scripts/stack.sh up: the local stack's connection settings.
# synapse-worker reads this file (as ./.synapse/env) when no flag or environment
# variable says otherwise; \`source\` it to set them in a shell.
export SYNAPSE_DATABASE_URL='$DATABASE_URL'
export SYNAPSE_REDIS_URL='$REDIS_URL'
ENV
        mv "$ENV_FILE.tmp" "$ENV_FILE"
        echo "postgres: $DATABASE_URL"
        echo "redis:    $REDIS_SCHEME://127.0.0.1:$REDIS_PORT/0"
        echo "Written to $ENV_FILE, which synapse-worker reads from the repository's root"
        echo "(or paste into a shell):"
        echo "  export SYNAPSE_DATABASE_URL='$DATABASE_URL'"
        echo "  export SYNAPSE_REDIS_URL='$REDIS_SCHEME://${REDIS_PASSWORD:+:***@}127.0.0.1:$REDIS_PORT/0'"
        ;;
    down)
        # The demo's worker and receiver, if `make demo` started them.
        for pidfile in "$SYNAPSE_HOME"/demo/*.pid; do
            [ -f "$pidfile" ] && [ -z "${SYNAPSE_STACK_DIR:-}" ] && { kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; }
        done
        pg_stop fast; redis_stop
        # Nothing serves these settings any more.
        rm -f "$ENV_FILE" ;;
    status)
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" status || true
        redis_cli ping || true
        ;;
    pg-start) pg_start ;;
    pg-stop) pg_stop "${2:-fast}" ;;
    redis-start) redis_start ;;
    redis-stop) redis_stop ;;
    *) echo "usage: $0 up|down|status|pg-start|pg-stop [mode]|redis-start|redis-stop" >&2; exit 2 ;;
esac
