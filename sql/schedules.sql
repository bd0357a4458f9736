-- Schedules (SPEC §2): at each time of a cron expression the forwarder
-- submits a goal once. next_run_at is the forwarder's deadline: it sleeps
-- until the earliest one (timers.sql), never polls.

CREATE TABLE synapse.schedules (
    name         text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    cron         text        NOT NULL,
    time_zone    text        NOT NULL DEFAULT 'UTC',
    goal         text        NOT NULL CHECK (length(goal) BETWEEN 1 AND 10000),
    input        jsonb       NOT NULL DEFAULT '{}',
    planner      text        NOT NULL DEFAULT 'template',
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,
    last_goal_id bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    owner        regrole     NOT NULL DEFAULT synapse._caller()
);
COMMENT ON TABLE synapse.schedules IS 'Goals submitted at the times of a cron expression, by the forwarder; change them with synapse.schedule() and synapse.unschedule().';
COMMENT ON COLUMN synapse.schedules.name IS 'Unique schedule name; part of the idempotency key of each run (schedule:<name>:<time>).';
COMMENT ON COLUMN synapse.schedules.cron IS 'Cron expression: 5 fields (minute hour day month weekday), or 6 with seconds first.';
COMMENT ON COLUMN synapse.schedules.time_zone IS 'IANA time zone the cron expression is read in.';
COMMENT ON COLUMN synapse.schedules.goal IS 'Goal text each run submits.';
COMMENT ON COLUMN synapse.schedules.input IS 'Input each run''s goal gets.';
COMMENT ON COLUMN synapse.schedules.planner IS 'Planner each run''s goal is planned by.';
COMMENT ON COLUMN synapse.schedules.next_run_at IS 'When the next run is submitted.';
COMMENT ON COLUMN synapse.schedules.last_run_at IS 'The time of the last run (its idempotency key''s time; after downtime, the one missed run made up).';
COMMENT ON COLUMN synapse.schedules.last_goal_id IS 'The goal the last run submitted (it may since have been deleted by retention).';
COMMENT ON COLUMN synapse.schedules.created_at IS 'When the schedule was first made.';
COMMENT ON COLUMN synapse.schedules.updated_at IS 'When it was last changed.';
COMMENT ON COLUMN synapse.schedules.owner IS 'The role that last made or changed the schedule: the owner of the goals it submits.';
CREATE INDEX schedules_due ON synapse.schedules (next_run_at);
SELECT pg_catalog.pg_extension_config_dump('synapse.schedules', '');

CREATE FUNCTION synapse.schedule(name text, cron text, goal text, input jsonb DEFAULT '{}',
                                 planner text DEFAULT 'template', time_zone text DEFAULT 'UTC')
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    next_run timestamptz;
BEGIN
    IF name IS NULL OR length(name) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'schedule name must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    IF goal IS NULL OR btrim(goal) = '' OR length(goal) > 10000 THEN
        RAISE EXCEPTION 'goal must be a non-empty text of at most 10000 characters' USING ERRCODE = '22023';
    END IF;
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must be JSON, not NULL (use ''{}'')' USING ERRCODE = '22023';
    END IF;
    PERFORM synapse._check_json(schedule.input, 'input');
    IF planner IS NULL OR planner !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'planner must be a planner name like ''template'', got %', coalesce(quote_literal(planner), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- Checks the cron expression and the time zone (22023 naming the bad one).
    next_run := synapse._cron_next(schedule.cron, schedule.time_zone, now());
    INSERT INTO synapse.schedules AS s (name, cron, time_zone, goal, input, planner, next_run_at)
    VALUES (schedule.name, schedule.cron, schedule.time_zone, schedule.goal, schedule.input, schedule.planner, next_run)
    ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
       SET cron = excluded.cron, time_zone = excluded.time_zone, goal = excluded.goal, input = excluded.input,
           planner = excluded.planner, next_run_at = excluded.next_run_at, updated_at = now(),
           owner = excluded.owner;
    -- No event carries this deadline: the forwarder learns it at commit.
    PERFORM synapse._timers_due(next_run, false);
    RETURN next_run;
END $$;
COMMENT ON FUNCTION synapse.schedule(text, text, text, jsonb, text, text) IS 'Makes or replaces a schedule: at each time of the cron expression (in time_zone) the goal is submitted once; returns the next run.';

CREATE FUNCTION synapse.unschedule(name text) RETURNS boolean LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM synapse.schedules AS s WHERE s.name = unschedule.name RETURNING 1)
    SELECT count(*) > 0 FROM gone
$$;
COMMENT ON FUNCTION synapse.unschedule(text) IS 'Removes a schedule; false if there was none.';

-- Submits the runs that are due, each once (the idempotency key
-- schedule:<name>:<time> makes a run repeated after a crash the same goal),
-- and moves each schedule to its next time after now: after downtime, the
-- runs missed are made up by one. Returns how many runs it submitted.
CREATE FUNCTION synapse._run_schedules(batch integer) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    due record;
    goal_id bigint;
    runs bigint := 0;
BEGIN
    FOR due IN SELECT s.name, s.cron, s.time_zone, s.goal, s.input, s.planner, s.next_run_at, s.owner
                 FROM synapse.schedules AS s
                WHERE s.next_run_at <= now()
                ORDER BY s.next_run_at LIMIT batch FOR UPDATE SKIP LOCKED LOOP
        goal_id := synapse._submit_goal(due.goal, due.input, due.planner,
                       format('schedule:%s:%s', due.name,
                              to_char(due.next_run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
                       due.owner);
        UPDATE synapse.schedules AS s
           SET last_run_at = due.next_run_at, last_goal_id = goal_id,
               next_run_at = synapse._cron_next(due.cron, due.time_zone, greatest(now(), due.next_run_at))
         WHERE s.name = due.name;
        runs := runs + 1;
    END LOOP;
    RETURN runs;
END $$;
