-- 0.22.0: completions of one goal no longer take turns. A worker's engine run
-- holds its goal's row FOR KEY SHARE (shared with the goal's other engine
-- runs), and takes it FOR NO KEY UPDATE only to decide whether the goal ended
-- or when the goal's runs must take turns (tasks_taking_turns); joins are
-- decided under their own rows' locks. cancel_goal, retry_goal and signal
-- therefore lock the goal FOR UPDATE, to wait for the engine runs in flight,
-- after closing the goal's gate (synapse._hold_goal), a lock that engine runs
-- pass shared (synapse._share_goals) and that, unlike a row lock, holds off
-- the runs that come after the one waiting for it.

-- The goals whose engine runs take turns: a step of theirs cancels running
-- tasks that other runs may be recording at that moment (a join with
-- cancel_others, a map step failing fast). Few rows: most goals have none.
CREATE INDEX tasks_taking_turns ON synapse.tasks (goal_id) WHERE cancel_others OR for_each_expr IS NOT NULL;

-- The gate in front of a goal's row (goal_gate.rs).
CREATE FUNCTION synapse."_share_goals"(
	"goal_ids" bigint[] /* pgrx::datum::array::Array<'_, i64> */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'share_goals_wrapper';
CREATE FUNCTION synapse."_hold_goal"(
	"goal_id" bigint /* i64 */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'hold_goal_wrapper';
REVOKE ALL ON FUNCTION synapse._share_goals(bigint[]), synapse._hold_goal(bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION synapse.cancel_goal(goal_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    -- The goal to itself: its gate closed first, so that engine runs still to
    -- come wait behind this cancel, then its row, once the runs in flight
    -- (which share it) have ended.
    PERFORM synapse._hold_goal(cancel_goal.goal_id);
    SELECT g.status INTO current_status FROM synapse.goals AS g
     WHERE g.id = cancel_goal.goal_id AND synapse._may_act_on(g.owner) FOR UPDATE;
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
                 WHERE u.goal_id = cancel_goal.goal_id AND u.status IN ('pending', 'queued', 'running', 'retrying', 'waiting')
                 ORDER BY u.id FOR UPDATE) AS open
         WHERE t.id = open.id
        RETURNING t.step)
    UPDATE synapse.edges AS e SET state = 'not_taken', resolved_at = now()
      FROM (SELECT DISTINCT step FROM cancelled) AS c
     WHERE e.goal_id = cancel_goal.goal_id AND e.from_step = c.step AND e.state = 'pending';
    UPDATE synapse.goals AS g SET status = 'cancelled', error = 'cancelled by ' || session_user
     WHERE g.id = cancel_goal.goal_id;
    -- Child goals go with their parent (children have higher ids: the lock
    -- order holds).
    PERFORM synapse.cancel_goal(c.id)
       FROM synapse.goals AS c
      WHERE c.parent_goal_id = cancel_goal.goal_id AND c.status IN ('submitted', 'planning', 'running')
      ORDER BY c.id;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION synapse.retry_goal(goal_id bigint, steps text[] DEFAULT NULL) RETURNS boolean
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
    -- The goal to itself, as cancel_goal takes it (its gate, then its row FOR
    -- UPDATE): it waits for the engine runs of the goal (they hold it FOR
    -- KEY SHARE, one of them maybe starting a wait step), so a wait and a
    -- signal never miss each other.
    PERFORM synapse._hold_goal(signal.goal_id);
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
ALTER FUNCTION synapse.cancel_goal(bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION synapse.retry_goal(bigint, text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION synapse.signal(bigint, text, jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Workers pass the gates.
CREATE OR REPLACE FUNCTION synapse._apply_grants(role regrole) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    capabilities text[];
    functions text[] := '{}';
    readable text[] := '{}';
    f text;
    t text;
    goal_columns text;
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA synapse FROM %s', role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA synapse FROM %s', role);
    EXECUTE format('REVOKE ALL ON SCHEMA synapse FROM %s', role);
    SELECT array_agg(g.capability) INTO capabilities FROM synapse.role_grants AS g WHERE g.role = _apply_grants.role;
    IF capabilities IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA synapse TO %s', role);
    -- Everyone granted anything reads through row security.
    functions := ARRAY['synapse._caller()', 'synapse.goal_status(bigint)',
                       'synapse.goal_graph(bigint, text)', 'synapse.validate_blueprint(jsonb)'];
    readable := ARRAY['goals', 'tasks', 'edges', 'signals', 'attempts', 'workers', 'actions', 'role_grants'];
    IF capabilities && ARRAY['submitter', 'admin'] THEN
        functions := functions || ARRAY[
            'synapse.submit_goal(text, jsonb, text, text)', 'synapse.submit_plan(jsonb, jsonb, text)',
            'synapse.submit_plans(jsonb, jsonb[], text[])',
            'synapse.plan_preview(text, jsonb, text)', 'synapse.cancel_goal(bigint)',
            'synapse.signal(bigint, text, jsonb)', 'synapse.retry_goal(bigint, text[])',
            -- A sql step of theirs leaves their identity with it, given the
            -- worker's token (see step_role.rs).
            'synapse._leave_step(text)'];
    END IF;
    IF 'worker' = ANY (capabilities) THEN
        -- Planning, claiming, recording, registering actions: the state
        -- machine's triggers check every change it makes.
        functions := functions || ARRAY[
            'synapse._restoring()', 'synapse._install_plan(bigint, jsonb, text, jsonb)',
            'synapse._start_child(bigint, integer, text, text, jsonb, jsonb)', 'synapse._start_maps(bigint[])',
            'synapse._start_waits(jsonb)', 'synapse._enter_step(bigint, integer)', 'synapse._leave_step(text)',
            'synapse._share_goals(bigint[])'];
        readable := readable || ARRAY['templates'];
        SELECT string_agg(quote_ident(a.attname), ', ') INTO goal_columns
          FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = 'synapse.goals'::regclass AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname NOT IN ('id', 'owner');
        EXECUTE format('GRANT UPDATE (%s) ON synapse.goals TO %s', goal_columns, role);
        EXECUTE format('GRANT UPDATE ON synapse.tasks, synapse.edges TO %s', role);
        EXECUTE format('GRANT INSERT ON synapse.attempts TO %s', role);
        EXECUTE format('GRANT INSERT, UPDATE, DELETE ON synapse.workers TO %s', role);
        EXECUTE format('GRANT INSERT, UPDATE ON synapse.actions TO %s', role);
    END IF;
    IF 'admin' = ANY (capabilities) THEN
        functions := functions || ARRAY[
            'synapse.add_template(text, text, jsonb, text, integer)',
            'synapse.schedule(text, text, text, jsonb, text, text)', 'synapse.unschedule(text)',
            'synapse.forwarder_status()', 'synapse.replay_parked_events()', 'synapse._wake_forwarder()',
            'synapse.grant_submitter(regrole)', 'synapse.grant_worker(regrole)', 'synapse.grant_admin(regrole)',
            'synapse.revoke_submitter(regrole)', 'synapse.revoke_worker(regrole)', 'synapse.revoke_admin(regrole)'];
        SELECT array_agg(c.relname::text) INTO readable FROM pg_catalog.pg_class AS c
         WHERE c.relnamespace = 'synapse'::regnamespace AND c.relkind IN ('r', 'p', 'v');
    END IF;
    FOREACH f IN ARRAY functions LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    FOREACH t IN ARRAY readable LOOP
        EXECUTE format('GRANT SELECT ON synapse.%I TO %s', t, role);
    END LOOP;
END $$;
SELECT synapse._apply_grants(g.role) FROM (SELECT DISTINCT role FROM synapse.role_grants) AS g;
