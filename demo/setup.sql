-- Demo data and templates. Safe to run again.
CREATE TABLE IF NOT EXISTS public.incidents (
    id       bigint PRIMARY KEY,
    title    text NOT NULL,
    priority int  NOT NULL,
    status   text NOT NULL DEFAULT 'open'
);
INSERT INTO public.incidents (id, title, priority) VALUES
    (42, 'checkout latency above 2s', 5),
    (43, 'typo on the pricing page', 1)
ON CONFLICT (id) DO UPDATE SET status = 'open';

CREATE TABLE IF NOT EXISTS public.daily_totals (day date PRIMARY KEY, total bigint NOT NULL);

SELECT synapse.add_template(
    'incident-triage',
    'triage incident (?P<id>\d+)',
    $${
      "name": "incident triage",
      "steps": [
        {"id": "fetch", "action": "sql", "input": "{'id': int(goal.params.id)}",
         "params": {"query": "select id, title, priority from incidents where id = $1", "args": "[input.id]"},
         "retries": 2},
        {"id": "classify", "action": "transform", "input": "steps.fetch.result.rows[0]",
         "params": {"expr": "{'incident': input.id, 'title': input.title, 'severity': input.priority > 3 ? 'high' : 'low'}"}},
        {"id": "page", "action": "http", "input": "steps.classify.result",
         "params": {"method": "POST", "url": "http://127.0.0.1:58080/page"}, "retries": 3, "backoff": "250ms"},
        {"id": "backlog", "action": "sql", "input": "steps.classify.result",
         "params": {"query": "update incidents set status = 'backlog' where id = $1 returning id, status", "args": "[input.incident]"}},
        {"id": "close", "action": "sql", "input": "steps.classify.result",
         "params": {"query": "update incidents set status = 'closed' where id = $1 and status <> 'backlog' returning id, status", "args": "[input.incident]"}}
      ],
      "edges": [
        {"from": "fetch", "to": "classify"},
        {"from": "classify", "to": "page", "when": "result.severity == 'high'"},
        {"from": "classify", "to": "backlog", "when": "result.severity != 'high'"},
        {"from": "page", "to": "close"},
        {"from": "backlog", "to": "close"}
      ],
      "output": "{'severity': steps.classify.result.severity, 'paged': steps.page.status == 'succeeded', 'filed': steps.backlog.status == 'succeeded'}"
    }$$::jsonb,
    'Fetch an incident, classify it, page on-call or file it to the backlog, then close it.');

SELECT synapse.add_template(
    'daily-totals',
    'compute totals for (?P<day>\d{4}-\d{2}-\d{2})',
    $${
      "name": "daily totals",
      "steps": [
        {"id": "extract", "action": "sleep", "input": "{'day': goal.params.day, 'amounts': [120, 80, 40]}",
         "params": {"ms": 1500}},
        {"id": "flaky_load", "action": "fail", "params": {"message": "warehouse connection reset"},
         "retries": 2, "backoff": "200ms"},
        {"id": "fallback_load", "action": "sql", "input": "steps.extract.result",
         "params": {"query": "insert into daily_totals values ($1::text::date, $2) on conflict (day) do update set total = excluded.total returning day::text, total",
                    "args": "[input.day, input.amounts[0] + input.amounts[1] + input.amounts[2]]"}},
        {"id": "report", "action": "transform", "input": "steps.fallback_load.result.rows[0]",
         "params": {"expr": "{'day': input.day, 'total': input.total, 'loaded_by': 'fallback'}"}}
      ],
      "edges": [
        {"from": "extract", "to": "flaky_load"},
        {"from": "flaky_load", "to": "fallback_load", "on": "failure"},
        {"from": "fallback_load", "to": "report"}
      ]
    }$$::jsonb,
    'Load daily totals; when the primary load keeps failing after its retries, a failure edge loads through the fallback.');

SELECT synapse.add_template(
    'review-open-incidents',
    'review open incidents',
    $${
      "name": "review open incidents",
      "steps": [
        {"id": "find", "action": "sql", "params": {"query": "select id from incidents where status = 'open' order by id"}},
        {"id": "triage", "action": "goal", "for_each": "steps.find.result.rows", "max_parallel": 2,
         "params": {"goal": "'triage incident ' + string(item.id)"}},
        {"id": "plan_summary", "action": "transform",
         "params": {"expr": "{'steps': [{'id': 'count', 'action': 'noop'}]}"}},
        {"id": "summary", "action": "goal", "params": {"blueprint": "steps.plan_summary.result"},
         "input": "{'triaged': size(steps.triage.result), 'paged': steps.triage.result.filter(r, r.paged).size()}"}
      ],
      "edges": [
        {"from": "find", "to": "triage"},
        {"from": "triage", "to": "plan_summary"},
        {"from": "plan_summary", "to": "summary"}
      ],
      "output": "steps.summary.result.count"
    }$$::jsonb,
    'Find the open incidents at run time, triage each as a child goal (a map over a goal step), then run a summary plan an earlier step made.');

CREATE TABLE IF NOT EXISTS public.expenses (
    id     bigint PRIMARY KEY,
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'submitted'
);
INSERT INTO public.expenses (id, amount) VALUES (7, 1250.00)
ON CONFLICT (id) DO UPDATE SET status = 'submitted';

SELECT synapse.add_template(
    'expense-approval',
    'approve expense (?P<id>\d+)',
    $${
      "name": "expense approval",
      "steps": [
        {"id": "fetch", "action": "sql", "input": "{'id': int(goal.params.id)}",
         "params": {"query": "select id, amount::text as amount from expenses where id = $1", "args": "[input.id]"}},
        {"id": "approval", "action": "wait", "params": {"signal": "approval", "timeout": "1h"}},
        {"id": "pay", "action": "sql", "input": "steps.fetch.result.rows[0]",
         "params": {"query": "update expenses set status = 'paid' where id = $1 returning id, status, amount::text as amount", "args": "[input.id]"}},
        {"id": "reject", "action": "sql", "input": "steps.fetch.result.rows[0]",
         "params": {"query": "update expenses set status = 'rejected' where id = $1 returning id, status", "args": "[input.id]"}},
        {"id": "escalate", "action": "noop", "input": "{'expense': int(goal.params.id), 'reason': 'no answer within the hour'}"}
      ],
      "edges": [
        {"from": "fetch", "to": "approval"},
        {"from": "approval", "to": "pay", "when": "result.payload.approved"},
        {"from": "approval", "to": "reject", "when": "!result.payload.approved"},
        {"from": "approval", "to": "escalate", "on": "failure"}
      ],
      "output": "{'status': steps.pay.status == 'succeeded' ? 'paid' : steps.reject.status == 'succeeded' ? 'rejected' : 'escalated', 'approved_by': steps.approval.status == 'succeeded' ? steps.approval.result.payload.by : null}"
    }$$::jsonb,
    'Fetch an expense, wait (no worker held) for a person to send the approval signal, then pay or reject it; with no answer within the hour, escalate.');

CREATE TABLE IF NOT EXISTS public.heartbeats (at timestamptz PRIMARY KEY DEFAULT now());

SELECT synapse.add_template(
    'heartbeat',
    'record a heartbeat',
    $${"steps": [{"id": "beat", "action": "sql",
                  "params": {"query": "insert into heartbeats default values returning at::text"}}]}$$::jsonb,
    'Insert a row into heartbeats: what the demo schedule runs.');

-- The demo's worker is not a superuser: the worker capability, nothing
-- more (its goals' sql steps run as their owner).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'synapse_demo_worker') THEN
        CREATE ROLE synapse_demo_worker LOGIN;
    END IF;
END $$;
SELECT synapse.grant_worker('synapse_demo_worker');
-- A stack made by an earlier demo gave it more.
REVOKE ALL ON public.incidents, public.expenses, public.daily_totals, public.heartbeats FROM synapse_demo_worker;

-- The console reads as an admin of Synapse (every goal, the forwarder's
-- state, templates, schedules), not as a superuser.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'synapse_demo_console') THEN
        CREATE ROLE synapse_demo_console LOGIN;
    END IF;
END $$;
SELECT synapse.grant_admin('synapse_demo_console');
