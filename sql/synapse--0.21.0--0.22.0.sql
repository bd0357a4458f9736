-- 0.22.0: completions of one goal no longer take turns. A worker's engine run
-- holds its goal's row FOR KEY SHARE (shared with the goal's other engine
-- runs), and takes it FOR NO KEY UPDATE only to decide whether the goal ended
-- or when the goal's runs must take turns (tasks_taking_turns); joins are
-- decided under their own rows' locks. retry_goal and
-- signal therefore lock the goal FOR UPDATE, as cancel_goal does, to wait for
-- the engine runs in flight and hold off new ones.

-- The goals whose engine runs take turns: a step of theirs cancels running
-- tasks that other runs may be recording at that moment (a join with
-- cancel_others, a map step failing fast). Few rows: most goals have none.
CREATE INDEX tasks_taking_turns ON synapse.tasks (goal_id) WHERE cancel_others OR for_each_expr IS NOT NULL;

CREATE OR REPLACE FUNCTION synapse.retry_goal(goal_id bigint, steps text[] DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    goal_status text;
    from_steps text[] := steps;
    unknown text;
    reset text[];
BEGIN
    -- The goal's lock first, as cancel_goal takes it: FOR UPDATE, which waits
    -- for the completions of the goal's stragglers (they hold it FOR KEY
    -- SHARE) and holds off new ones until the goal runs again.
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

CREATE OR REPLACE FUNCTION synapse.signal(goal_id bigint, name text, payload jsonb DEFAULT '{}') RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    goal_status text;
    kept bigint;
    waiting bigint;
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$' THEN
        RAISE EXCEPTION 'signal name % is not valid: 1 to 200 letters, digits or _ . : / -, starting with a letter or digit',
            coalesce(quote_literal(name), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'payload must be JSON, not NULL (use ''{}'')' USING ERRCODE = '22023';
    END IF;
    PERFORM synapse._check_json(signal.payload, 'payload');
    -- The goal's lock FOR UPDATE: it waits for the engine runs of the goal
    -- (they hold it FOR KEY SHARE, one of them maybe starting a wait step),
    -- so a wait and a signal never miss each other.
    SELECT g.status INTO goal_status FROM synapse.goals AS g
     WHERE g.id = signal.goal_id AND synapse._may_act_on(g.owner) FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'goal % does not exist', signal.goal_id USING ERRCODE = 'P0002';
    END IF;
    IF goal_status IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'goal % has finished (%): no step can take signal "%"', signal.goal_id, goal_status, signal.name
            USING ERRCODE = '55000';
    END IF;
    INSERT INTO synapse.signals (goal_id, name, payload) VALUES (signal.goal_id, signal.name, signal.payload)
    RETURNING id INTO kept;
    -- The step that waits longest takes it. A timer ending that step at this
    -- moment makes _take_signal answer false: then the next one.
    LOOP
        SELECT t.id INTO waiting FROM synapse.tasks AS t
         WHERE t.goal_id = signal.goal_id AND t.status = 'waiting' AND t.action = 'wait'
           AND t.params ->> 'signal' = signal.name
         ORDER BY t.started_at, t.id LIMIT 1;
        IF waiting IS NULL THEN
            RETURN false;
        END IF;
        IF synapse._take_signal(waiting, kept) THEN
            RETURN true;
        END IF;
    END LOOP;
END $$;

-- Replaced, they lost what security.sql gave them.
ALTER FUNCTION synapse.retry_goal(bigint, text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION synapse.signal(bigint, text, jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
