-- 0.6.0 → 0.7.0: NOTIFY moves from the writing transaction to the forwarder,
-- and the states and counters of goals, tasks and edges become domains.
-- Rows already in the outbox were NOTIFYed when they were written (notify
-- false); new ones carry the writing session's synapse.notify. The new
-- column types rewrite goals, tasks and edges (under an exclusive lock).
-- NOTIFY is sent by the forwarder, from its own transaction, as it reads the
-- event: a writer's commit never takes the database-wide lock a NOTIFY holds
-- until its commit is flushed, which made every writer wait its turn.
ALTER TABLE synapse.outbox ADD COLUMN notify boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN synapse.outbox.notify IS 'The writing session had synapse.notify on: the forwarder still owes a pg_notify(''synapse_events'', payload).';

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
        INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, due_at, notify)
        SELECT e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at,
               current_setting('synapse.notify', true) IS DISTINCT FROM 'off'
          FROM unnest(events) WITH ORDINALITY AS e(event, goal_id, task_id, dispatch, payload, due_at, n)
         ORDER BY e.n;
    END IF;
    RETURN coalesce(cardinality(events), 0);
END $$;

-- The states and the counters are domains, not column checks: Postgres reads
-- a table's check constraints again at every INSERT or UPDATE statement
-- (every SPI call of submit_plan), while a domain's check is kept with the
-- type, read once per session. The checks that tie columns together stay on
-- the tables.
CREATE DOMAIN synapse.goal_state AS text
    CHECK (VALUE IN ('submitted', 'planning', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE DOMAIN synapse.task_state AS text
    CHECK (VALUE IN ('pending', 'queued', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'skipped', 'cancelled'));
CREATE DOMAIN synapse.edge_on AS text CHECK (VALUE IN ('success', 'failure', 'always'));
CREATE DOMAIN synapse.edge_state AS text CHECK (VALUE IN ('pending', 'taken', 'not_taken', 'error'));
CREATE DOMAIN synapse.non_negative AS integer CHECK (VALUE >= 0);
CREATE DOMAIN synapse.positive AS integer CHECK (VALUE >= 1);
CREATE DOMAIN synapse.positive_ms AS bigint CHECK (VALUE > 0);
COMMENT ON DOMAIN synapse.goal_state IS 'A goal''s state (see synapse.goals.status).';
COMMENT ON DOMAIN synapse.task_state IS 'A task''s state (see synapse.tasks.status).';
COMMENT ON DOMAIN synapse.edge_on IS 'The outcomes an edge follows.';
COMMENT ON DOMAIN synapse.edge_state IS 'How an edge resolved.';
COMMENT ON DOMAIN synapse.non_negative IS 'A count or index, 0 or more.';
COMMENT ON DOMAIN synapse.positive IS 'A number from 1.';
COMMENT ON DOMAIN synapse.positive_ms IS 'A duration in milliseconds, more than 0.';

-- The triggers whose WHEN reads a status stand in the way of its new type.
DROP TRIGGER goal_status_changing ON synapse.goals;
DROP TRIGGER task_status_changing ON synapse.tasks;
ALTER TABLE synapse.goals
    DROP CONSTRAINT goals_status_check,
    DROP CONSTRAINT goals_plan_attempts_check,
    DROP CONSTRAINT goals_depth_check,
    ALTER COLUMN status TYPE synapse.goal_state,
    ALTER COLUMN plan_attempts TYPE synapse.non_negative,
    ALTER COLUMN depth TYPE synapse.non_negative;
ALTER TABLE synapse.tasks
    DROP CONSTRAINT tasks_status_check,
    DROP CONSTRAINT tasks_backoff_ms_check,
    DROP CONSTRAINT tasks_timeout_ms_check,
    DROP CONSTRAINT tasks_attempts_check,
    DROP CONSTRAINT tasks_pending_inbound_check,
    DROP CONSTRAINT tasks_max_parallel_check,
    DROP CONSTRAINT tasks_tolerate_check,
    DROP CONSTRAINT tasks_map_size_check,
    DROP CONSTRAINT tasks_map_next_check,
    DROP CONSTRAINT tasks_map_ended_check,
    DROP CONSTRAINT tasks_map_failed_check,
    DROP CONSTRAINT tasks_map_index_check,
    DROP CONSTRAINT tasks_iteration_check,
    DROP CONSTRAINT tasks_attempts_before_check,
    ALTER COLUMN status TYPE synapse.task_state,
    ALTER COLUMN backoff_ms TYPE synapse.positive_ms,
    ALTER COLUMN timeout_ms TYPE synapse.positive_ms,
    ALTER COLUMN attempts TYPE synapse.non_negative,
    ALTER COLUMN pending_inbound TYPE synapse.non_negative,
    ALTER COLUMN max_parallel TYPE synapse.positive,
    ALTER COLUMN tolerate TYPE synapse.non_negative,
    ALTER COLUMN map_size TYPE synapse.non_negative,
    ALTER COLUMN map_next TYPE synapse.non_negative,
    ALTER COLUMN map_ended TYPE synapse.non_negative,
    ALTER COLUMN map_failed TYPE synapse.non_negative,
    ALTER COLUMN map_index TYPE synapse.non_negative,
    ALTER COLUMN iteration TYPE synapse.positive,
    ALTER COLUMN attempts_before TYPE synapse.non_negative;
ALTER TABLE synapse.edges
    DROP CONSTRAINT edges_on_outcome_check,
    DROP CONSTRAINT edges_state_check,
    ALTER COLUMN on_outcome TYPE synapse.edge_on,
    ALTER COLUMN state TYPE synapse.edge_state;
CREATE TRIGGER goal_status_changing BEFORE UPDATE OF status ON synapse.goals
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._goal_changed();
CREATE TRIGGER task_status_changing BEFORE UPDATE OF status ON synapse.tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._task_changed();
