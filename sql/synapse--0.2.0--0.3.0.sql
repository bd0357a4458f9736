-- 0.2.0 → 0.3.0

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

-- Lapsed leases keep the attempt and mark the worker lost.
CREATE OR REPLACE FUNCTION synapse._run_timers(retention_seconds integer, batch integer DEFAULT 1000,
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

SELECT pg_catalog.pg_extension_config_dump('synapse.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.workers', '');

-- synapse.observe: which state changes become events. The deadlines of the
-- events it leaves out reach the forwarder through shared memory.
CREATE FUNCTION synapse."_timers_due"(
	"due" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"goals_finished" bool /* bool */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'timers_due_wrapper';

CREATE OR REPLACE FUNCTION synapse._emit(events synapse._event[]) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    observe text := lower(coalesce(current_setting('synapse.observe', true), 'all'));
BEGIN
    IF observe <> 'all' AND coalesce(cardinality(events), 0) > 0 THEN
        PERFORM synapse._timers_due(min(e.due_at), bool_or(e.event IN ('goal.succeeded', 'goal.failed', 'goal.cancelled')))
           FROM unnest(events) AS e
          WHERE e.dispatch IS NULL AND (observe = 'dispatch' OR e.task_id IS NOT NULL)
         HAVING count(*) > 0;
        events := array(
            SELECT ROW(e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at)::synapse._event
              FROM unnest(events) WITH ORDINALITY AS e(event, goal_id, task_id, dispatch, payload, due_at, n)
             WHERE e.dispatch IS NOT NULL OR (observe = 'goals' AND e.task_id IS NULL)
             ORDER BY e.n);
    END IF;
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
-- Each task counts its inbound edges still pending: the engine decides a step
-- when its count reaches 0, instead of looking for pending edges (through an
-- index that kept an entry for every edge resolved since the last vacuum).
ALTER TABLE synapse.tasks ADD COLUMN pending_inbound integer NOT NULL DEFAULT 0 CHECK (pending_inbound >= 0);
COMMENT ON COLUMN synapse.tasks.pending_inbound IS 'Inbound edges not resolved yet: the engine decides the step when it reaches 0.';
UPDATE synapse.tasks t SET pending_inbound = p.pending
  FROM (SELECT goal_id, to_step, count(*)::int AS pending FROM synapse.edges
         WHERE state = 'pending' GROUP BY 1, 2) p
 WHERE t.goal_id = p.goal_id AND t.step = p.to_step;
DROP INDEX synapse.edges_pending_into;

-- A statement changing many tasks is planned for its own size (see events.sql).
CREATE OR REPLACE FUNCTION synapse._tasks_written() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    events synapse._event[];
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM synapse._emit(array(
            SELECT synapse._task_event('task.queued', t.goal_id, t.id, t.step, t.queue, t.attempts + 1)
              FROM new_tasks t WHERE t.status = 'queued' ORDER BY t.id));
    ELSIF (SELECT count(*) FROM new_tasks) <= 64 THEN
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
    ELSE
        EXECUTE $q$
            SELECT array(
            SELECT synapse._task_event('task.' || t.status, t.goal_id, t.id, t.step, t.queue,
                       CASE WHEN t.status = 'queued' THEN t.attempts + 1 ELSE t.attempts END,
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at END,
                       t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status
             ORDER BY t.id)
        $q$ INTO events;
        PERFORM synapse._emit(events);
    END IF;
    RETURN NULL;
END $$;

-- synapse._restoring() reads the statement's first bytes in place, in C: the
-- row triggers call it for every inserted row.
CREATE OR REPLACE FUNCTION synapse."_restoring"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'restoring_wrapper';

-- A forwarder that failed against the old schema resumes now.
SELECT synapse._wake_forwarder();
