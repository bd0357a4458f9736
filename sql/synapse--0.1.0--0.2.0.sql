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
    -- an attempt is left, else fail it (attempts unchanged) saying so.
    UPDATE synapse.tasks t
       SET status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'failed' END,
           error = format('lease of attempt %s expired (worker %s)%s', t.attempts, coalesce(t.leased_by, 'unknown'),
                          CASE WHEN t.attempts < t.max_attempts THEN '' ELSE '; no attempt left' END)
      FROM (SELECT id FROM synapse.tasks WHERE status = 'running' AND lease_expires_at <= now()
             ORDER BY lease_expires_at LIMIT batch FOR UPDATE SKIP LOCKED) lapsed
     WHERE t.id = lapsed.id;
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

-- A forwarder that failed against the old schema resumes now.
SELECT synapse._wake_forwarder();
