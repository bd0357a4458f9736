-- 0.16.0 → 0.17.0: the events of one statement that only observers read share
-- an outbox row per event name (their payloads one a line); an event that
-- dispatches work keeps a row of its own. Writing a row was most of what an
-- event cost. Adding the columns rewrites nothing.
ALTER TABLE synapse.outbox ALTER COLUMN goal_id DROP NOT NULL;
ALTER TABLE synapse.outbox ADD COLUMN events integer NOT NULL DEFAULT 1;
COMMENT ON COLUMN synapse.outbox.goal_id IS 'Goal the event concerns (NULL: the row''s events concern several).';
COMMENT ON COLUMN synapse.outbox.payload IS 'Compact JSON payload, schema version first; for a row of several events, theirs one a line.';
COMMENT ON COLUMN synapse.outbox.events IS 'How many events the row carries: one, or several of one name that only observers read, written by one statement (payload has one a line).';

ALTER TABLE synapse.outbox_parked ALTER COLUMN goal_id DROP NOT NULL;
ALTER TABLE synapse.outbox_parked ADD COLUMN events integer NOT NULL DEFAULT 1;
COMMENT ON COLUMN synapse.outbox_parked.events IS 'How many events the row carries (see synapse.outbox.events).';

CREATE OR REPLACE FUNCTION synapse.replay_parked_events() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    -- The transaction id first, then outbox ids (see synapse._emit).
    PERFORM pg_current_xact_id();
    WITH parked AS (DELETE FROM synapse.outbox_parked RETURNING *),
         replayed AS (
             INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, streamed, created_at, events)
             SELECT event, goal_id, task_id, dispatch, payload, streamed, created_at, events FROM parked ORDER BY id
             RETURNING events)
    SELECT coalesce(sum(events), 0) INTO n FROM replayed;
    RETURN n;
END $$;
