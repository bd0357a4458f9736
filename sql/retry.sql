-- Running a finished goal again from some of its steps (SPEC §2 retry_goal),
-- once the cause of a failure was fixed outside: those steps and every step
-- downstream of them start afresh; what ran upstream is kept, not redone.

CREATE FUNCTION synapse.retry_goal(goal_id bigint, steps text[] DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    goal_status text;
    from_steps text[] := steps;
    unknown text;
    reset text[];
BEGIN
    -- The goal to itself first, as cancel_goal takes it: its gate, then its
    -- row FOR UPDATE, which waits for the completions of the goal's
    -- stragglers (they hold it FOR KEY SHARE) and holds off new ones until
    -- the goal runs again.
    PERFORM synapse._hold_goal(retry_goal.goal_id);
    SELECT g.status INTO goal_status FROM synapse.goals AS g
     WHERE g.id = retry_goal.goal_id AND synapse._may_act_on(g.owner) FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'goal % does not exist', retry_goal.goal_id USING ERRCODE = 'P0002';
    END IF;
    IF goal_status NOT IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT FROM synapse.tasks AS t WHERE t.goal_id = retry_goal.goal_id) THEN
        RAISE EXCEPTION 'goal % ended before it was planned: there is no step to run again; submit it again',
            retry_goal.goal_id USING ERRCODE = '55000';
    END IF;
    IF from_steps IS NULL THEN
        SELECT array_agg(t.step ORDER BY t.id) INTO from_steps FROM synapse.tasks AS t
         WHERE t.goal_id = retry_goal.goal_id AND t.map_index IS NULL AND t.status IN ('failed', 'cancelled');
        IF from_steps IS NULL THEN
            RAISE EXCEPTION 'goal % has no failed or cancelled step: name the steps to run again', retry_goal.goal_id
                USING ERRCODE = '22023';
        END IF;
    END IF;
    SELECT s.step INTO unknown FROM unnest(from_steps) AS s(step)
     WHERE NOT EXISTS (SELECT FROM synapse.tasks AS t
                        WHERE t.goal_id = retry_goal.goal_id AND t.step = s.step AND t.map_index IS NULL)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'goal % has no step %', retry_goal.goal_id, coalesce(quote_literal(unknown), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- The steps to run again: those named and everything downstream of them.
    WITH RECURSIVE downstream(step) AS (
        -- In byte order, as the edges' steps it meets.
        SELECT unnest(from_steps) COLLATE "C"
        UNION
        SELECT e.to_step FROM synapse.edges AS e JOIN downstream AS d ON e.from_step = d.step
         WHERE e.goal_id = retry_goal.goal_id)
    SELECT array_agg(step) INTO reset FROM downstream;
    -- Instances of map steps are made again when their step runs.
    DELETE FROM synapse.tasks AS t
     WHERE t.goal_id = retry_goal.goal_id AND t.step = ANY (reset) AND t.map_index IS NOT NULL;
    -- Edges out of the reset steps resolve again; edges into them from the
    -- steps kept keep their resolution (their source does not run again).
    UPDATE synapse.edges AS e SET state = 'pending', error = NULL, resolved_at = NULL
     WHERE e.goal_id = retry_goal.goal_id AND e.from_step = ANY (reset);
    UPDATE synapse.tasks AS t
       SET status = 'pending', attempts = 0, attempts_before = 0, input = NULL, result = NULL, error = NULL,
           failure_kind = NULL, run_at = NULL, queued_at = NULL, started_at = NULL, finished_at = NULL,
           map_size = NULL, map_next = NULL, map_ended = NULL, map_failed = NULL, child_goal_id = NULL,
           iteration = CASE WHEN t.until_expr IS NOT NULL THEN 1 END,
           (pending_inbound, taken_inbound, inbound) =
               (SELECT count(*) FILTER (WHERE e.state = 'pending'), count(*) FILTER (WHERE e.state = 'taken'), count(*)
                  FROM synapse.edges AS e WHERE e.goal_id = t.goal_id AND e.to_step = t.step)
     WHERE t.goal_id = retry_goal.goal_id AND t.step = ANY (reset) AND t.map_index IS NULL;
    -- Back to running: the goal's event goes to a worker, which starts the
    -- reset steps whose inbound edges have all resolved (events.sql).
    UPDATE synapse.goals AS g SET status = 'running', result = NULL, error = NULL, finished_at = NULL
     WHERE g.id = retry_goal.goal_id;
    RETURN true;
END $$;
COMMENT ON FUNCTION synapse.retry_goal(bigint, text[]) IS 'Runs a finished goal again from the given steps (default: its failed and cancelled ones) and everything downstream; upstream results are kept. False if the goal has not finished.';
