-- 0.9.0 → 0.10.0: a step's join is decided from counts kept on its row,
-- not from a read of all its inbound edges: `inbound` (how many there are)
-- and `taken_inbound` (how many resolved taken), beside `pending_inbound`.
-- The engine counts them in the statement that resolves the edges; a join
-- of 2 000 parents whose input does not need their results is decided
-- without reading 2 000 edges.
--
-- The checks of single columns of goals and tasks are domains, as 0.7.0 did
-- for states and counters: Postgres reads a table's check constraints again
-- at every INSERT or UPDATE statement (a fifth of a bulk submit_plan's
-- CPU), a domain's once per session. Rewrites goals and tasks.
--
-- Stop the workers before this update and start the new release's after it:
-- a worker of an earlier release resolves edges without counting them.
CREATE DOMAIN synapse.goal_text AS text CHECK (length(VALUE) BETWEEN 1 AND 10000);
CREATE DOMAIN synapse.step_id AS text CHECK (VALUE ~ '^[a-z][a-z0-9_]{0,62}$');
CREATE DOMAIN synapse.join_mode AS text CHECK (VALUE ~ '^(any|all|first|[1-9][0-9]{0,4})$');
CREATE DOMAIN synapse.attempt_limit AS integer CHECK (VALUE BETWEEN 1 AND 101);
CREATE DOMAIN synapse.iteration_limit AS integer CHECK (VALUE BETWEEN 1 AND 1000);
CREATE DOMAIN synapse.failure_kind AS text CHECK (VALUE IN ('action', 'definition'));
COMMENT ON DOMAIN synapse.goal_text IS 'A goal''s text: 1 to 10 000 characters.';
COMMENT ON DOMAIN synapse.step_id IS 'A step id: lowercase letters, digits and _, from a letter, at most 63.';
COMMENT ON DOMAIN synapse.join_mode IS 'How a step joins its inbound edges: any, all, first, or how many (1 to 99 999).';
COMMENT ON DOMAIN synapse.attempt_limit IS 'Most attempts of a step: 1 to 101.';
COMMENT ON DOMAIN synapse.iteration_limit IS 'Most iterations of a loop: 1 to 1 000.';
COMMENT ON DOMAIN synapse.failure_kind IS 'Why a step failed: action or definition.';
ALTER TABLE synapse.goals
    DROP CONSTRAINT goals_goal_check,
    ALTER COLUMN goal TYPE synapse.goal_text;
ALTER TABLE synapse.tasks
    DROP CONSTRAINT tasks_step_check,
    DROP CONSTRAINT tasks_join_mode_check,
    DROP CONSTRAINT tasks_max_attempts_check,
    DROP CONSTRAINT tasks_max_iterations_check,
    DROP CONSTRAINT tasks_failure_kind_check,
    ALTER COLUMN step TYPE synapse.step_id,
    ALTER COLUMN join_mode TYPE synapse.join_mode,
    ALTER COLUMN max_attempts TYPE synapse.attempt_limit,
    ALTER COLUMN max_iterations TYPE synapse.iteration_limit,
    ALTER COLUMN failure_kind TYPE synapse.failure_kind,
    ADD COLUMN inbound synapse.non_negative NOT NULL DEFAULT 0,
    ADD COLUMN taken_inbound synapse.non_negative NOT NULL DEFAULT 0;
COMMENT ON COLUMN synapse.tasks.inbound IS 'Inbound edges in all (0: a root step).';
COMMENT ON COLUMN synapse.tasks.taken_inbound IS 'Inbound edges resolved taken so far: with pending_inbound, what the engine decides a join from.';

-- Only the steps still to be decided need them; a goal run again counts
-- its steps afresh (retry_goal, below).
UPDATE synapse.tasks AS t
   SET (inbound, taken_inbound) =
       (SELECT count(*), count(*) FILTER (WHERE e.state = 'taken')
          FROM synapse.edges AS e WHERE e.goal_id = t.goal_id AND e.to_step = t.step)
 WHERE t.status = 'pending' AND t.map_index IS NULL;

CREATE OR REPLACE FUNCTION synapse.retry_goal(goal_id bigint, steps text[] DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    goal_status text;
    from_steps text[] := steps;
    unknown text;
    reset text[];
BEGIN
    -- The goal's lock first, as the engine and cancel_goal take it.
    SELECT g.status INTO goal_status FROM synapse.goals AS g
     WHERE g.id = retry_goal.goal_id AND synapse._may_act_on(g.owner) FOR NO KEY UPDATE;
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
        SELECT unnest(from_steps)
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
ALTER FUNCTION synapse.retry_goal(bigint, text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
