#!/usr/bin/env bash
# `make demo`: with the stack up (make up), starts a worker and a stand-in
# paging service, installs the demo templates and runs goals that take
# different branches, printing each result and its graph.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$SYNAPSE_ROOT"

PGPORT="${SYNAPSE_PGPORT:-25432}"
REDIS_PORT="${SYNAPSE_REDIS_PORT:-26379}"
export SYNAPSE_DATABASE_URL="postgresql://postgres@127.0.0.1:$PGPORT/synapse"
export SYNAPSE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
DEMO="$SYNAPSE_HOME/demo"
mkdir -p "$DEMO"

cargo build -q -p synapse_worker --bin synapse-worker
WORKER="$SYNAPSE_ROOT/target/debug/synapse-worker"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! running "$DEMO/receiver.pid"; then
    python3 demo/receiver.py 58080 >"$DEMO/receiver.log" 2>&1 &
    echo $! >"$DEMO/receiver.pid"
fi
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/58080) 2>/dev/null && break; sleep 0.05; done
PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$SYNAPSE_DATABASE_URL" -f demo/setup.sql >/dev/null
# The worker runs as a role that is not a superuser (demo/setup.sql makes it),
# reaching exactly the demo's own paging receiver.
if ! running "$DEMO/worker.pid"; then
    "$WORKER" run --concurrency 8 --allow-http 127.0.0.1:58080 \
        --database-url "postgresql://synapse_demo_worker@127.0.0.1:$PGPORT/synapse" >"$DEMO/worker.log" 2>&1 &
    echo $! >"$DEMO/worker.pid"
fi

# The console, as a role with the admin capability (not a superuser).
CONSOLE_PORT="${SYNAPSE_CONSOLE_PORT:-8765}"
if ! running "$DEMO/console.pid"; then
    "$WORKER" ui --addr "127.0.0.1:$CONSOLE_PORT" \
        --database-url "postgresql://synapse_demo_console@127.0.0.1:$PGPORT/synapse" >"$DEMO/console.log" 2>&1 &
    echo $! >"$DEMO/console.pid"
fi

show_status() {
    python3 - "$1" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
print(f"goal {s['id']}: {s['status']}  result={json.dumps(s['result'])}" + (f"  error={s['error']}" if s['error'] else ""))
for t in s["tasks"]:
    extra = ""
    if "instances" in t:
        extra = "  instances: " + ", ".join(f"{i['index']}→goal {i.get('child_goal_id', '-')} {i['status']}" for i in t["instances"])
    elif "child_goal_id" in t:
        extra = f"  child goal {t['child_goal_id']}"
    print(f"  {t['step']:<14} {t['status']:<10} attempts={t['attempts']}" + (f"  ({t['error']})" if t['error'] else "") + extra)
for e in s["edges"]:
    label = f" when {e['when']}" if e["when"] else ""
    label += f" on {e['on']}" if e["on"] != "success" else ""
    print(f"  {e['from']} -> {e['to']}{label}: {e['state']}")
PY
}

run_goal() {
    local goal="$1" live="${2:-}"
    echo
    local status
    if [ -n "$live" ]; then
        echo "━━━ synapse-worker submit '$goal'; synapse-worker watch ID   (live, redrawn at each event)"
        local submitted
        submitted=$("$WORKER" submit "$goal")
        "$WORKER" watch "$submitted" || true
        status=$("$WORKER" status "$submitted")
    else
        echo "━━━ synapse-worker submit '$goal' --wait"
        status=$("$WORKER" submit "$goal" --wait --json --timeout 60s 2>/dev/null) || true
    fi
    show_status "$status"
    local id
    id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$status")
    "$WORKER" graph "$id" >"$DEMO/goal-$id.mmd"
    "$WORKER" graph "$id" --format dot | dot -Tsvg >"$DEMO/goal-$id.svg"
    echo "  graph: $DEMO/goal-$id.svg (Mermaid: $DEMO/goal-$id.mmd)"
    LAST_GOAL=$id
}

run_goal "review open incidents" live
run_goal "triage incident 42"
FIRST_GOAL=$LAST_GOAL
run_goal "triage incident 43"
run_goal "compute totals for 2026-11-24" live
run_goal "deploy the moon base"

echo
echo "━━━ an approval: the goal waits (no worker held) until someone sends the signal"
EXPENSE_GOAL=$("$WORKER" submit "approve expense 7")
for _ in $(seq 200); do
    [ "$("$WORKER" status "$EXPENSE_GOAL" | python3 -c 'import json,sys; print(next(t["status"] for t in json.load(sys.stdin)["tasks"] if t["step"] == "approval"))')" = waiting ] && break
    sleep 0.05
done
echo "goal $EXPENSE_GOAL: step approval is waiting for the signal \"approval\""
echo "\$ synapse-worker signal $EXPENSE_GOAL approval --payload '{\"approved\": true, \"by\": \"ana\"}'"
"$WORKER" signal "$EXPENSE_GOAL" approval --payload '{"approved": true, "by": "ana"}'
"$WORKER" watch "$EXPENSE_GOAL" >/dev/null || true
show_status "$("$WORKER" status "$EXPENSE_GOAL")"

echo
echo "━━━ a schedule: the forwarder submits \"record a heartbeat\" every 5 seconds (no polling: it sleeps until the next run)"
PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -At "$SYNAPSE_DATABASE_URL" \
    -c "SELECT 'next run at ' || synapse.schedule('demo-heartbeat', '*/5 * * * * *', 'record a heartbeat')"
SCHEDULED=""
for _ in $(seq 200); do
    SCHEDULED=$(PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -At "$SYNAPSE_DATABASE_URL" \
        -c "SELECT last_goal_id FROM synapse.schedules WHERE name = 'demo-heartbeat'")
    [ -n "$SCHEDULED" ] && break
    sleep 0.05
done
"$WORKER" watch "$SCHEDULED" >/dev/null || true
PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -At "$SYNAPSE_DATABASE_URL" \
    -c "SELECT format('goal %s (idempotency key %s): %s', id, idempotency_key, status) FROM synapse.goals WHERE id = $SCHEDULED" \
    -c "SELECT 'now every hour, next run at ' || synapse.schedule('demo-heartbeat', '0 * * * *', 'record a heartbeat')"

echo
echo "Mermaid of goal $FIRST_GOAL (paste into any Mermaid viewer):"
cat "$DEMO/goal-$FIRST_GOAL.mmd"
echo
echo "The console: http://127.0.0.1:$CONSOLE_PORT/ (every goal above, its plan drawn, live)"
echo "The stack is still up (worker log: $DEMO/worker.log). Stop everything with: make down"
