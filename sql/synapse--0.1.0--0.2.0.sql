-- Synapse 0.1.0 -> 0.2.0. Released: never edit; add the next version's script instead.
-- What changed: a failed forwarder statement is retried (never an exit); Redis
-- refusals are kept per event and set aside in outbox_parked; the timers skip
-- locked rows and fail a task whose last lease lapsed; the sweep only re-sends
-- to empty Redis lists; finished goals are deleted after synapse.retention;
-- planning attempts are counted; cancelled steps resolve their edges; pg_dump
-- keeps every table; a restore (COPY) is not refused by the state machine.
\echo Use "ALTER EXTENSION synapse UPDATE TO '0.2.0'" to load this file. \quit

-- Planning attempts (goals).
ALTER TABLE synapse.goals ADD COLUMN plan_attempts integer NOT NULL DEFAULT 0 CHECK (plan_attempts >= 0);
COMMENT ON COLUMN synapse.goals.plan_attempts IS 'Times a planner claimed the goal; a goal whose planning keeps failing is failed instead of re-sent forever.';

-- Events Redis kept refusing.
CREATE TABLE synapse.outbox_parked (
    id        bigint      PRIMARY KEY,
    event     text        NOT NULL,
    goal_id   bigint      NOT NULL,
    task_id   bigint,
    dispatch  text,
    payload   text        NOT NULL,
    streamed  boolean     NOT NULL,
    created_at timestamptz NOT NULL,
    failures  integer     NOT NULL,
    error     text        NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE synapse.outbox_parked IS 'Events Redis refused too often, set aside with the error so that the others flow; synapse.replay_parked_events() sends them again.';
COMMENT ON COLUMN synapse.outbox_parked.dispatch IS 'The Redis list still owed the payload (NULL if only the event stream was refused).';
COMMENT ON COLUMN synapse.outbox_parked.failures IS 'Times Redis refused it.';
COMMENT ON COLUMN synapse.outbox_parked.error IS 'The last refusal.';

-- Per-event refusals on the outbox.
ALTER TABLE synapse.outbox ADD COLUMN failures integer NOT NULL DEFAULT 0,
                           ADD COLUMN streamed boolean NOT NULL DEFAULT false,
                           ADD COLUMN retry_at timestamptz,
                           ADD COLUMN error text;
COMMENT ON COLUMN synapse.outbox.failures IS 'Times Redis refused a command for this event.';
COMMENT ON COLUMN synapse.outbox.streamed IS 'The event is already in the {prefix}:events stream; only its dispatch is owed.';
COMMENT ON COLUMN synapse.outbox.retry_at IS 'After a refusal: not sent again before this time.';
COMMENT ON COLUMN synapse.outbox.error IS 'The last refusal.';
CREATE INDEX outbox_retry ON synapse.outbox (retry_at) WHERE retry_at IS NOT NULL;
CREATE INDEX goals_finished ON synapse.goals (finished_at) WHERE finished_at IS NOT NULL;

-- A restore is neither refused by the state machine nor recorded as events again.
CREATE FUNCTION synapse._restoring() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT current_query() ~* '^\s*copy\s+synapse\.'
$$;

CREATE OR REPLACE FUNCTION synapse._goal_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('submitted', 'running', 'failed') THEN
            RAISE EXCEPTION 'a new goal cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            WHEN 'submitted' THEN NEW.status IN ('planning', 'running', 'failed', 'cancelled')
            WHEN 'planning'  THEN NEW.status IN ('submitted', 'running', 'failed', 'cancelled')
            WHEN 'running'   THEN NEW.status IN ('succeeded', 'failed', 'cancelled')
            ELSE false END) THEN
        RAISE EXCEPTION 'goal %: status cannot change from % to %', NEW.id, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'submitted' THEN
        NEW.dispatched_at := now();
    ELSIF NEW.status = 'running' THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION synapse._goals_written() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM synapse._emit(array(
            SELECT synapse._goal_event('goal.' || g.status, g.id) FROM new_goals g ORDER BY g.id));
    ELSE
        PERFORM synapse._emit(array(
            SELECT synapse._goal_event('goal.' || g.status, g.id)
              FROM new_goals g JOIN old_goals o ON o.id = g.id
             WHERE o.status IS DISTINCT FROM g.status AND g.status <> 'planning'
             ORDER BY g.id));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION synapse._task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'queued') THEN
            RAISE EXCEPTION 'a new task cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            WHEN 'pending'  THEN NEW.status IN ('queued', 'skipped', 'failed', 'cancelled')
            WHEN 'queued'   THEN NEW.status IN ('running', 'cancelled')
            WHEN 'running'  THEN NEW.status IN ('succeeded', 'failed', 'retrying', 'queued', 'cancelled')
            WHEN 'retrying' THEN NEW.status IN ('queued', 'cancelled')
            ELSE false END) THEN
        RAISE EXCEPTION 'task % (step %): status cannot change from % to %', NEW.id, NEW.step, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'queued' THEN
        NEW.queued_at := now();
        NEW.run_at := NULL;
    ELSIF NEW.status = 'running' THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    IF NEW.status <> 'running' THEN
        NEW.lease_expires_at := NULL;
        NEW.leased_by := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION synapse._tasks_written() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM synapse._emit(array(
            SELECT synapse._task_event('task.queued', t.goal_id, t.id, t.step, t.queue, t.attempts + 1)
              FROM new_tasks t WHERE t.status = 'queued' ORDER BY t.id));
    ELSE
        PERFORM synapse._emit(array(
            SELECT synapse._task_event('task.' || t.status, t.goal_id, t.id, t.step, t.queue,
                       CASE WHEN t.status = 'queued' THEN t.attempts + 1 ELSE t.attempts END,
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at END,
                       -- The last attempt's lease lapsed (the forwarder failed it): no
                       -- worker is there to resolve its edges, so one is asked to.
                       t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status
             ORDER BY t.id));
    END IF;
    RETURN NULL;
END $$;


-- Writers take their transaction id before outbox ids (the forwarder's read floor).
CREATE OR REPLACE FUNCTION synapse._emit(events synapse._event[]) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(events), 0) > 0 THEN
        PERFORM pg_current_xact_id();
        INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, due_at)
        SELECT e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at
          FROM unnest(events) WITH ORDINALITY AS e(event, goal_id, task_id, dispatch, payload, due_at, n)
         ORDER BY e.n;
        IF current_setting('synapse.notify', true) IS DISTINCT FROM 'off' THEN
            PERFORM pg_notify('synapse_events', e.payload)
               FROM unnest(events) WITH ORDINALITY AS e(event, goal_id, task_id, dispatch, payload, due_at, n)
              ORDER BY e.n;
        END IF;
    END IF;
    RETURN coalesce(cardinality(events), 0);
END $$;


-- task.failed of a lapsed last lease goes to its queue (to_worker).
DROP FUNCTION synapse._task_event(text, bigint, bigint, text, text, integer, timestamptz);
CREATE FUNCTION synapse._task_event(event text, goal_id bigint, task_id bigint, step text, queue text, attempt integer,
                                    due_at timestamptz DEFAULT NULL, to_worker boolean DEFAULT false)
RETURNS synapse._event LANGUAGE sql STABLE AS $$
    SELECT ROW(event, goal_id, task_id, CASE WHEN event = 'task.queued' OR to_worker THEN 'queue:' || queue END,
               format('{"v":1,"event":%s,"goal_id":%s,"task_id":%s,"step":%s,"queue":%s,"attempt":%s}',
                      to_json(event), goal_id, task_id, to_json(step), to_json(queue), attempt),
               due_at)::synapse._event;
$$;


-- JSON size and depth checked at the door.
CREATE FUNCTION synapse."_check_json"(
	"value" jsonb,
	"what" TEXT
) RETURNS VOID
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'check_json_wrapper';
CREATE OR REPLACE FUNCTION synapse.submit_goal(
    goal text,
    input jsonb DEFAULT '{}',
    planner text DEFAULT 'template',
    idempotency_key text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    IF goal IS NULL OR btrim(goal) = '' THEN
        RAISE EXCEPTION 'goal must be a non-empty text' USING ERRCODE = '22023';
    END IF;
    IF length(goal) > 10000 THEN
        RAISE EXCEPTION 'goal is % characters; the limit is 10000', length(goal) USING ERRCODE = '22023';
    END IF;
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must be JSON, not NULL (use ''{}'')' USING ERRCODE = '22023';
    END IF;
    -- 1 MiB of JSON text and 64 levels of nesting (SQLSTATE 54000), checked on
    -- the jsonb value before anything parses it.
    PERFORM synapse._check_json(submit_goal.input, 'input');
    IF planner IS NULL OR planner !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'planner must be a planner name like ''template'', got %', coalesce(quote_literal(planner), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO synapse.goals AS g (goal, input, planner, idempotency_key)
    VALUES (submit_goal.goal, submit_goal.input, submit_goal.planner, submit_goal.idempotency_key)
    ON CONFLICT ON CONSTRAINT goals_idempotency_key_key DO NOTHING
    RETURNING g.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT g.id INTO new_id FROM synapse.goals AS g WHERE g.idempotency_key = submit_goal.idempotency_key;
    END IF;
    RETURN new_id;
END $$;


-- A dry run of the template planner.
CREATE FUNCTION synapse."plan_preview"(
	"goal" TEXT,
	"input" jsonb DEFAULT '{}',
	"planner" TEXT DEFAULT 'template'
) RETURNS jsonb
STABLE
LANGUAGE c
AS 'MODULE_PATHNAME', 'plan_preview_wrapper';
COMMENT ON COLUMN synapse.templates.pattern IS 'Case-insensitive regular expression that must match the whole goal text (it is anchored at both ends); named captures become goal.params.';

-- Why a task failed: its action, or its definition (an expression).
ALTER TABLE synapse.tasks ADD COLUMN failure_kind text CHECK (failure_kind IN ('action', 'definition'));
COMMENT ON COLUMN synapse.tasks.failure_kind IS 'failed: ''action'' (the action failed) or ''definition'' (an expression of the step, or the when of an edge into it, could not be evaluated: only always edges are taken and the goal fails); NULL otherwise, and for a task failed because its lease lapsed.';

-- Failed attempts, and the workers that say which queues they serve.
CREATE TABLE synapse.attempts (
    task_id     bigint      NOT NULL REFERENCES synapse.tasks (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL CHECK (attempt >= 1),
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    error       text        NOT NULL
);
CREATE INDEX attempts_of_task ON synapse.attempts (task_id, attempt);
COMMENT ON TABLE synapse.attempts IS 'Every failed attempt of a task: its error, worker, start and end. Written with the failure (by the worker, or by the forwarder when a lease lapsed); deleted with its task.';
COMMENT ON COLUMN synapse.attempts.task_id IS 'The task the attempt belongs to.';
COMMENT ON COLUMN synapse.attempts.attempt IS 'Attempt number (1 for the first); a goal run again with retry_goal numbers its attempts from 1 again.';
COMMENT ON COLUMN synapse.attempts.worker IS 'Identity of the worker that ran the attempt.';
COMMENT ON COLUMN synapse.attempts.started_at IS 'When the attempt was claimed.';
COMMENT ON COLUMN synapse.attempts.finished_at IS 'When the failure was recorded (for a lost worker: when its lease was found lapsed).';
COMMENT ON COLUMN synapse.attempts.error IS 'Why the attempt failed.';

-- Workers, as they say themselves: at start, at stop and with the heartbeats
-- of their running tasks (nothing polls, so an idle worker says nothing
-- between its start and its stop). A worker is live from its start until its
-- stop is recorded, or until the forwarder finds a lease of it lapsed (it
-- stopped responding) and it has not been seen since. goal_status tells
-- queued work that no live worker serves.
CREATE TABLE synapse.workers (
    identity     text        PRIMARY KEY,
    queues       text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    lost_at      timestamptz
);
COMMENT ON TABLE synapse.workers IS 'Workers and the queues they serve; a worker is live from its start until it stops, or until a lease of it lapsed and it was not seen since. Rows stopped more than 7 days ago are removed when a worker starts.';
COMMENT ON COLUMN synapse.workers.identity IS 'The worker''s identity (leased_by of the tasks it runs).';
COMMENT ON COLUMN synapse.workers.queues IS 'Queues it consumes, highest priority first.';
COMMENT ON COLUMN synapse.workers.started_at IS 'When it (last) started.';
COMMENT ON COLUMN synapse.workers.last_seen_at IS 'Its last sign of life: its start, a heartbeat of one of its tasks, or its stop.';
COMMENT ON COLUMN synapse.workers.stopped_at IS 'When it stopped cleanly; NULL while it runs.';
COMMENT ON COLUMN synapse.workers.lost_at IS 'When the forwarder found a lease of it lapsed: it stopped responding, unless seen after.';

CREATE OR REPLACE FUNCTION synapse.goal_status(goal_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    status jsonb;
BEGIN
    SELECT jsonb_build_object(
        'id', g.id, 'goal', g.goal, 'status', g.status, 'error', g.error, 'result', g.result,
        'planner', g.planner, 'template', g.template, 'input', g.input, 'params', g.params,
        'created_at', g.created_at, 'started_at', g.started_at, 'finished_at', g.finished_at,
        'tasks', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'step', t.step, 'action', t.action, 'status', t.status, 'attempts', t.attempts,
                       'result', t.result, 'error', t.error, 'failure_kind', t.failure_kind,
                       'started_at', t.started_at,
                       'finished_at', t.finished_at, 'queue', t.queue, 'run_at', t.run_at,
                       'attempts_history', coalesce((
                           SELECT jsonb_agg(jsonb_build_object(
                                      'attempt', a.attempt, 'worker', a.worker, 'started_at', a.started_at,
                                      'finished_at', a.finished_at, 'error', a.error)
                                  ORDER BY a.finished_at, a.attempt)
                             FROM synapse.attempts AS a WHERE a.task_id = t.id), '[]'))
                   ORDER BY t.id)
              FROM synapse.tasks AS t WHERE t.goal_id = g.id), '[]'),
        'edges', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'from', e.from_step, 'to', e.to_step, 'when', e.when_expr, 'on', e.on_outcome,
                       'state', e.state, 'error', e.error)
                   ORDER BY e.position)
              FROM synapse.edges AS e WHERE e.goal_id = g.id), '[]'),
        -- Work nothing will run: queued (or retrying) tasks of a queue no live
        -- worker serves, a goal waiting for a planner while no worker is live.
        -- Live: started, not stopped, and not lost (a lease of it lapsed)
        -- unless seen since (see synapse.workers).
        'notes', coalesce((
            SELECT jsonb_agg(n.note ORDER BY n.note)
              FROM (SELECT format('queue %s: no worker', q.queue) AS note
                      FROM (SELECT DISTINCT t.queue FROM synapse.tasks AS t
                             WHERE t.goal_id = g.id AND t.status IN ('queued', 'retrying')) AS q
                     WHERE NOT EXISTS (SELECT FROM synapse.workers AS w
                                        WHERE q.queue = ANY (w.queues) AND w.stopped_at IS NULL
                                          AND (w.lost_at IS NULL OR w.last_seen_at > w.lost_at))
                    UNION ALL
                    SELECT 'planner: no worker'
                     WHERE g.status = 'submitted'
                       AND NOT EXISTS (SELECT FROM synapse.workers AS w
                                        WHERE w.stopped_at IS NULL
                                          AND (w.lost_at IS NULL OR w.last_seen_at > w.lost_at))) AS n), '[]'))
      INTO status
      FROM synapse.goals AS g
     WHERE g.id = goal_status.goal_id;
    IF status IS NULL THEN
        RAISE EXCEPTION 'goal % does not exist', goal_status.goal_id USING ERRCODE = 'P0002';
    END IF;
    RETURN status;
END $$;

COMMENT ON FUNCTION synapse.goal_status(bigint) IS 'The goal, its tasks (with their failed attempts) and its edges (with how each resolved) as JSON, and notes on work no live worker serves.';

-- Cancelled steps resolve their edges; one lock order.
CREATE OR REPLACE FUNCTION synapse.cancel_goal(goal_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    SELECT g.status INTO current_status FROM synapse.goals AS g WHERE g.id = cancel_goal.goal_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'goal % does not exist', cancel_goal.goal_id USING ERRCODE = 'P0002';
    END IF;
    IF current_status IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN false;
    END IF;
    -- Lock order, as everywhere: the goal row (above), then its task rows in id
    -- order. Running tasks are marked too: their worker sees it at its next
    -- heartbeat and stops. The edges out of every cancelled step resolve, not
    -- taken (SPEC §4 rule 2), so why each step did not run stays answerable.
    WITH cancelled AS (
        UPDATE synapse.tasks AS t SET status = 'cancelled', error = 'goal cancelled'
          FROM (SELECT u.id FROM synapse.tasks AS u
                 WHERE u.goal_id = cancel_goal.goal_id AND u.status IN ('pending', 'queued', 'running', 'retrying')
                 ORDER BY u.id FOR UPDATE) AS open
         WHERE t.id = open.id
        RETURNING t.step)
    UPDATE synapse.edges AS e SET state = 'not_taken', resolved_at = now()
      FROM cancelled
     WHERE e.goal_id = cancel_goal.goal_id AND e.from_step = cancelled.step AND e.state = 'pending';
    UPDATE synapse.goals AS g SET status = 'cancelled', error = 'cancelled by ' || session_user
     WHERE g.id = cancel_goal.goal_id;
    RETURN true;
END $$;


-- Timers: bounded, never waiting on a lock; the sweep asks Redis first; retention.
DROP FUNCTION synapse._run_timers(integer);
CREATE FUNCTION synapse._run_timers(retention_seconds integer, batch integer DEFAULT 1000,
                                    OUT changed bigint, OUT next_due timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    changed := 0;
    -- Retries whose backoff elapsed become runnable.
    UPDATE synapse.tasks t SET status = 'queued'
      FROM (SELECT id FROM synapse.tasks WHERE status = 'retrying' AND run_at <= now()
             ORDER BY run_at LIMIT batch FOR UPDATE SKIP LOCKED) due
     WHERE t.id = due.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    -- A lease that lapsed means the worker died or hung: run the task again if
    -- an attempt is left, else fail it (attempts unchanged) saying so. Either
    -- way the attempt is kept in synapse.attempts, and the worker counts as
    -- lost until it is seen again (a heartbeat) or restarts.
    WITH lapsed AS (
        SELECT id, leased_by FROM synapse.tasks WHERE status = 'running' AND lease_expires_at <= now()
         ORDER BY lease_expires_at LIMIT batch FOR UPDATE SKIP LOCKED),
    moved AS (
        UPDATE synapse.tasks t
           SET status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'failed' END,
               error = format('lease of attempt %s expired: worker %s stopped responding; '
                              'whatever the step did may or may not have happened; %s',
                              t.attempts, coalesce(t.leased_by, 'unknown'),
                              CASE WHEN t.attempts < t.max_attempts THEN 'it runs again' ELSE 'no attempt left' END)
          FROM lapsed
         WHERE t.id = lapsed.id
        RETURNING t.id, t.attempts, lapsed.leased_by, t.started_at, t.error),
    lost AS (
        UPDATE synapse.workers w SET lost_at = now()
          FROM (SELECT identity FROM synapse.workers
                 WHERE identity IN (SELECT leased_by FROM moved) FOR UPDATE SKIP LOCKED) l
         WHERE w.identity = l.identity)
    INSERT INTO synapse.attempts (task_id, attempt, worker, started_at, error)
    SELECT id, attempts, leased_by, started_at, error FROM moved;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    -- Retention: whole goals, with their tasks and edges (ON DELETE CASCADE).
    IF retention_seconds > 0 THEN
        DELETE FROM synapse.goals g
         USING (SELECT id FROM synapse.goals
                 WHERE finished_at < now() - make_interval(secs => retention_seconds)
                 ORDER BY finished_at LIMIT greatest(batch / 10, 1) FOR UPDATE SKIP LOCKED) old
         WHERE g.id = old.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := changed + n;
    END IF;
    SELECT least(
        (SELECT min(run_at) FROM synapse.tasks WHERE status = 'retrying'),
        (SELECT min(lease_expires_at) FROM synapse.tasks WHERE status = 'running'),
        CASE WHEN retention_seconds > 0 THEN
            (SELECT min(finished_at) FROM synapse.goals WHERE finished_at IS NOT NULL)
                + make_interval(secs => retention_seconds) END)
      INTO next_due;
END $$;

CREATE FUNCTION synapse._sweep_candidates(sweep_seconds integer, OUT list text, OUT stale bigint)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT 'queue:' || queue, count(*) FROM synapse.tasks
     WHERE status = 'queued' AND queued_at <= now() - make_interval(secs => sweep_seconds)
     GROUP BY queue
    UNION ALL
    SELECT 'planner', count(*) FROM synapse.goals
     WHERE status = 'submitted' AND dispatched_at <= now() - make_interval(secs => sweep_seconds)
    HAVING count(*) > 0
$$;

CREATE FUNCTION synapse._sweep(lists text[], sweep_seconds integer, batch integer DEFAULT 10000)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    sweep constant interval := make_interval(secs => sweep_seconds);
    tasks bigint;
    goals bigint;
BEGIN
    WITH stale AS (
        UPDATE synapse.tasks t SET queued_at = now()
          FROM (SELECT id FROM synapse.tasks
                 WHERE status = 'queued' AND queued_at <= now() - sweep AND 'queue:' || queue = ANY (lists)
                 ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED) s
         WHERE t.id = s.id
        RETURNING t.goal_id, t.id, t.step, t.queue, t.attempts)
    SELECT synapse._emit(array_agg(
               synapse._task_event('task.queued', goal_id, id, step, queue, attempts + 1) ORDER BY id))
      INTO tasks FROM stale;
    goals := 0;
    IF 'planner' = ANY (lists) THEN
        WITH stale AS (
            UPDATE synapse.goals g SET dispatched_at = now()
              FROM (SELECT id FROM synapse.goals
                     WHERE status = 'submitted' AND dispatched_at <= now() - sweep
                     ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED) s
             WHERE g.id = s.id
            RETURNING g.id)
        SELECT synapse._emit(array_agg(synapse._goal_event('goal.submitted', id) ORDER BY id))
          INTO goals FROM stale;
    END IF;
    RETURN tasks + goals;
END $$;

CREATE FUNCTION synapse._sweep_due(sweep_seconds integer) RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT least((SELECT min(queued_at) FROM synapse.tasks WHERE status = 'queued'),
                 (SELECT min(dispatched_at) FROM synapse.goals WHERE status = 'submitted'))
           + make_interval(secs => sweep_seconds)
$$;

CREATE FUNCTION synapse.replay_parked_events() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    -- The transaction id first, then outbox ids (see synapse._emit).
    PERFORM pg_current_xact_id();
    WITH parked AS (DELETE FROM synapse.outbox_parked RETURNING *)
    INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, streamed, created_at)
    SELECT event, goal_id, task_id, dispatch, payload, streamed, created_at FROM parked ORDER BY id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

COMMENT ON FUNCTION synapse.replay_parked_events() IS 'Sends the events Redis refused too often (synapse.outbox_parked) again; returns how many.';

-- pg_dump keeps every table (and the identity sequences).
SELECT pg_catalog.pg_extension_config_dump('synapse.goals', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.goals_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.tasks_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.edges', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.templates', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.actions', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox_parked', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.workers', '');

-- A forwarder that failed against the old schema resumes now.
SELECT synapse._wake_forwarder();
