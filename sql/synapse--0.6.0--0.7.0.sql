-- 0.6.0 → 0.7.0: NOTIFY moves from the writing transaction to the forwarder.
-- Rows already in the outbox were NOTIFYed when they were written (notify
-- false); new ones carry the writing session's synapse.notify.
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
