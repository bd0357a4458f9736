-- 0.2.0 → 0.3.0

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
