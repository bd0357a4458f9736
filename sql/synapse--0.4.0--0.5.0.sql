-- 0.4.0 → 0.5.0: plans that wait. A wait step holds its task in waiting,
-- with no worker, until a signal of its name is delivered (synapse.signal,
-- durable) or its time comes; schedules submit goals at the times of a cron
-- expression; retry_goal runs a finished goal again from some of its steps.
-- The forwarder's timers end the waits that are due and submit the runs of
-- schedules. And safe to share: goals have owners, row security shows each
-- goal to the members of its owner, nothing is granted to PUBLIC, and
-- grant_submitter, grant_worker and grant_admin give roles what they need.

-- Goals have an owner: the role that submitted them. Idempotency keys are
-- per owner. Goals submitted before this release belong to the role that
-- updates the extension.
CREATE FUNCTION synapse._caller() RETURNS regrole LANGUAGE sql STABLE AS $$
    SELECT CASE current_setting('role') WHEN 'none' THEN session_user ELSE current_setting('role') END::regrole
$$;
ALTER TABLE synapse.goals ADD COLUMN owner regrole NOT NULL DEFAULT synapse._caller(),
                          DROP CONSTRAINT goals_idempotency_key_key,
                          ADD CONSTRAINT goals_owner_idempotency_key_key UNIQUE (owner, idempotency_key);
COMMENT ON COLUMN synapse.goals.idempotency_key IS 'Optional caller key: the same owner submitting again with the same key gets the same goal.';
COMMENT ON COLUMN synapse.goals.owner IS 'The role that submitted the goal (a child goal: its parent''s owner; a scheduled goal: the schedule''s). Row security shows a goal to the members of its owner, and to admins and workers.';

-- Plans that wait (SPEC §4.9): a `wait` step holds its task in `waiting`,
-- with no worker and no polling, until a signal of its name is delivered or
-- its time comes. The deadline is the task's run_at; the forwarder's timers
-- end the waits that are due (timers.sql). Signals are durable: one sent
-- before its step waits is kept here and taken when the step waits.

COMMENT ON COLUMN synapse.tasks.run_at IS 'retrying: when the forwarder queues the next attempt. waiting (a wait step): when its time comes, or when its signal times out.';
-- The forwarder's next wait deadline, and the waits that are due.
CREATE INDEX tasks_wait_due ON synapse.tasks (run_at) WHERE status = 'waiting' AND run_at IS NOT NULL;

CREATE TABLE synapse.signals (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    goal_id  bigint      NOT NULL REFERENCES synapse.goals (id) ON DELETE CASCADE,
    -- The rule of synapse_worker::blueprint::wait::check_signal_name.
    name     text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$'),
    payload  jsonb       NOT NULL DEFAULT '{}',
    sent_at  timestamptz NOT NULL DEFAULT now(),
    taken_by bigint,
    taken_at timestamptz,
    CONSTRAINT signals_taken_check CHECK ((taken_by IS NULL) = (taken_at IS NULL))
);
COMMENT ON TABLE synapse.signals IS 'Signals delivered to goals with synapse.signal(): kept until a wait step of that name takes them, each by one step; deleted with their goal.';
COMMENT ON COLUMN synapse.signals.id IS 'Delivery order: a waiting step takes the oldest kept signal of its name.';
COMMENT ON COLUMN synapse.signals.goal_id IS 'The goal the signal was sent to.';
COMMENT ON COLUMN synapse.signals.name IS 'The name wait steps wait for (params.signal).';
COMMENT ON COLUMN synapse.signals.payload IS 'JSON the step that takes it gets in its result.';
COMMENT ON COLUMN synapse.signals.sent_at IS 'When synapse.signal() was called (received_at in the step''s result).';
COMMENT ON COLUMN synapse.signals.taken_by IS 'The task of the wait step that took it; NULL while kept.';
COMMENT ON COLUMN synapse.signals.taken_at IS 'When a wait step took it.';
CREATE INDEX signals_kept ON synapse.signals (goal_id, name, id) WHERE taken_by IS NULL;
SELECT pg_catalog.pg_extension_config_dump('synapse.signals', '');

-- Wait task task_id (waiting) takes kept signal signal_id: the step succeeds
-- with {signal, payload, received_at}. False when the task is no longer
-- waiting (a timer or a cancel got there first). The one place a signal and
-- a wait meet, whichever came first; the caller holds the goal's lock.
CREATE FUNCTION synapse._take_signal(task_id bigint, signal_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE synapse.tasks AS t
       SET status = 'succeeded',
           result = jsonb_build_object('signal', s.name, 'payload', s.payload, 'received_at', s.sent_at)
      FROM synapse.signals AS s
     WHERE t.id = _take_signal.task_id AND t.status = 'waiting' AND s.id = _take_signal.signal_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE synapse.signals SET taken_by = _take_signal.task_id, taken_at = now()
     WHERE id = _take_signal.signal_id;
    RETURN true;
END $$;

CREATE FUNCTION synapse.signal(goal_id bigint, name text, payload jsonb DEFAULT '{}') RETURNS boolean
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
    -- The goal's lock, as the engine holds it when a step starts to wait:
    -- a wait and a signal never miss each other.
    SELECT g.status INTO goal_status FROM synapse.goals AS g
     WHERE g.id = signal.goal_id AND synapse._may_act_on(g.owner) FOR NO KEY UPDATE;
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
COMMENT ON FUNCTION synapse.signal(bigint, text, jsonb) IS 'Delivers a signal to a goal: true if a waiting step took it now, false if it is kept until a step waits for it.';

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
           pending_inbound = (SELECT count(*) FROM synapse.edges AS e
                               WHERE e.goal_id = t.goal_id AND e.to_step = t.step AND e.state = 'pending')
     WHERE t.goal_id = retry_goal.goal_id AND t.step = ANY (reset) AND t.map_index IS NULL;
    -- Back to running: the goal's event goes to a worker, which starts the
    -- reset steps whose inbound edges have all resolved (events.sql).
    UPDATE synapse.goals AS g SET status = 'running', result = NULL, error = NULL, finished_at = NULL
     WHERE g.id = retry_goal.goal_id;
    RETURN true;
END $$;
COMMENT ON FUNCTION synapse.retry_goal(bigint, text[]) IS 'Runs a finished goal again from the given steps (default: its failed and cancelled ones) and everything downstream; upstream results are kept. False if the goal has not finished.';

-- The built-in action.
INSERT INTO synapse.actions (name, description, builtin) VALUES
    ('wait', 'Waits, with no worker, for a signal (params.signal, optional params.timeout) or a time (params.for or params.until).', true)
ON CONFLICT (name) DO UPDATE SET description = excluded.description, builtin = true, updated_at = now();
COMMENT ON COLUMN synapse.tasks.status IS 'pending: waiting for its inbound edges. queued: runnable, dispatched to Redis. running: claimed by a worker holding a lease. retrying: failed, waits for run_at. waiting: a map step whose instances run, a goal step whose child goal runs, or a wait step waiting for its signal or time (no worker holds it). succeeded / failed / skipped / cancelled: finished.';

-- A goal run again goes to a worker, which starts its steps.
DROP FUNCTION synapse._goal_event(text, bigint, bigint, text);
CREATE FUNCTION synapse._goal_event(event text, goal_id bigint, parent_task_id bigint DEFAULT NULL,
                                    to_queue text DEFAULT NULL)
RETURNS synapse._event LANGUAGE sql STABLE AS $$
    SELECT ROW(event, goal_id, NULL,
               CASE WHEN event = 'goal.submitted' THEN 'planner'
                    WHEN to_queue IS NOT NULL THEN 'queue:' || to_queue END,
               format('{"v":1,"event":%s,"goal_id":%s%s}', to_json(event), goal_id,
                      ',"parent_task_id":' || parent_task_id),
               NULL)::synapse._event;
$$;

-- Goals and tasks run again; wait steps wait unqueued, and their ends go
-- to a worker.
CREATE OR REPLACE FUNCTION synapse._goal_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('submitted', 'running', 'failed') THEN
            RAISE EXCEPTION 'a new goal cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            WHEN 'submitted' THEN NEW.status IN ('planning', 'running', 'failed', 'cancelled')
            WHEN 'planning'  THEN NEW.status IN ('submitted', 'running', 'failed', 'cancelled')
            WHEN 'running'   THEN NEW.status IN ('succeeded', 'failed', 'cancelled')
            -- retry_goal runs a finished goal again.
            ELSE NEW.status = 'running' END) THEN
        RAISE EXCEPTION 'goal %: status cannot change from % to %', NEW.id, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'submitted' THEN
        NEW.dispatched_at := now();
    ELSIF NEW.status = 'running' THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION synapse._goals_written() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM synapse._emit(array(
            SELECT synapse._goal_event('goal.' || g.status, g.id) FROM new_goals g ORDER BY g.id));
    ELSE
        PERFORM synapse._emit(array(
            SELECT synapse._goal_event('goal.' || g.status, g.id, g.parent_task_id,
                       -- Only a child goal's end looks its parent step up (a join here
                       -- may be planned as a scan of every task).
                       CASE WHEN g.parent_task_id IS NOT NULL AND g.status IN ('succeeded', 'failed', 'cancelled')
                            THEN (SELECT p.queue FROM synapse.tasks p WHERE p.id = g.parent_task_id)
                            -- Run again: the queue of a step that can start (a wait step
                            -- needs no particular worker: the others' queues first).
                            WHEN g.status = 'running' AND o.status IN ('succeeded', 'failed', 'cancelled')
                            THEN (SELECT t.queue FROM synapse.tasks t
                                   WHERE t.goal_id = g.id AND t.status = 'pending' AND t.map_index IS NULL
                                   ORDER BY t.pending_inbound > 0, t.action = 'wait', t.id LIMIT 1) END)
              FROM new_goals g JOIN old_goals o ON o.id = g.id
             WHERE o.status IS DISTINCT FROM g.status AND g.status <> 'planning'
             ORDER BY g.id));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION synapse._task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'queued') THEN
            RAISE EXCEPTION 'a new task cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            -- Only a map step waits for its instances, or succeeds unrun (an empty
            -- list); a wait step waits without being queued.
            WHEN 'pending'  THEN NEW.status IN ('queued', 'skipped', 'failed', 'cancelled')
                                 OR (NEW.status IN ('waiting', 'succeeded') AND NEW.for_each_expr IS NOT NULL)
                                 OR (NEW.status = 'waiting' AND NEW.action = 'wait')
            WHEN 'queued'   THEN NEW.status IN ('running', 'cancelled')
            -- A goal step waits for its child goal, and retries with a new one.
            WHEN 'running'  THEN NEW.status IN ('succeeded', 'failed', 'retrying', 'queued', 'cancelled')
                                 OR (NEW.status = 'waiting' AND NEW.child_goal_id IS NOT NULL)
            WHEN 'retrying' THEN NEW.status IN ('queued', 'cancelled')
            WHEN 'waiting'  THEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                                 OR (NEW.status = 'retrying' AND NEW.child_goal_id IS NOT NULL)
            -- retry_goal: an ended step starts afresh, its attempts from 1 again.
            ELSE NEW.status = 'pending' AND NEW.attempts = 0 END) THEN
        RAISE EXCEPTION 'task % (step %): status cannot change from % to %', NEW.id, NEW.step, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'queued' THEN
        NEW.queued_at := now();
        NEW.run_at := NULL;
    ELSIF NEW.status IN ('running', 'waiting') THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    IF NEW.status <> 'running' THEN
        NEW.lease_expires_at := NULL;
        NEW.leased_by := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION synapse._tasks_written() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    events synapse._event[];
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM synapse._emit(array(
            SELECT synapse._task_event('task.queued', t.goal_id, t.id, t.step, t.queue, t.attempts + 1,
                                       map_index => t.map_index)
              FROM new_tasks t WHERE t.status = 'queued' ORDER BY t.id));
    ELSIF (SELECT count(*) FROM new_tasks) <= 64 THEN
        PERFORM synapse._emit(array(
            SELECT synapse._task_event('task.' || t.status, t.goal_id, t.id, t.step, t.queue,
                       CASE WHEN t.status = 'queued' THEN t.attempts + 1 ELSE t.attempts END,
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at
                                   WHEN 'waiting' THEN t.run_at END,
                       -- The last attempt's lease lapsed (the forwarder failed it), a
                       -- root map step's list was empty when its plan was installed, or a
                       -- wait ended (its signal came, or its time): no worker is there to
                       -- resolve its edges, so one is asked to.
                       (t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
                       OR (t.status = 'succeeded' AND o.status = 'pending' AND t.for_each_expr IS NOT NULL)
                       OR (t.status IN ('succeeded', 'failed') AND o.status = 'waiting' AND t.action = 'wait'),
                       t.map_index)
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status AND t.status <> 'pending'
             ORDER BY t.id));
    ELSE
        EXECUTE $q$
            SELECT array(
            SELECT synapse._task_event('task.' || t.status, t.goal_id, t.id, t.step, t.queue,
                       CASE WHEN t.status = 'queued' THEN t.attempts + 1 ELSE t.attempts END,
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at
                                   WHEN 'waiting' THEN t.run_at END,
                       (t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
                       OR (t.status = 'succeeded' AND o.status = 'pending' AND t.for_each_expr IS NOT NULL)
                       OR (t.status IN ('succeeded', 'failed') AND o.status = 'waiting' AND t.action = 'wait'),
                       t.map_index)
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status AND t.status <> 'pending'
             ORDER BY t.id)
        $q$ INTO events;
        PERFORM synapse._emit(events);
    END IF;
    RETURN NULL;
END $$;

-- Goals are submitted for an owner; goal_status shows the owner and the
-- signals; only members of a goal's owner (and admins) cancel it.
CREATE FUNCTION synapse._submit_goal(goal text, input jsonb, planner text, idempotency_key text, owner regrole)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    IF goal IS NULL OR btrim(goal) = '' THEN
        RAISE EXCEPTION 'goal must be a non-empty text' USING ERRCODE = '22023';
    END IF;
    IF length(goal) > 10000 THEN
        RAISE EXCEPTION 'goal is % characters; the limit is 10000', length(goal) USING ERRCODE = '22023';
    END IF;
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must be JSON, not NULL (use ''{}'')' USING ERRCODE = '22023';
    END IF;
    -- 1 MiB of JSON text and 64 levels of nesting (SQLSTATE 54000), checked on
    -- the jsonb value before anything parses it.
    PERFORM synapse._check_json(_submit_goal.input, 'input');
    IF planner IS NULL OR planner !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'planner must be a planner name like ''template'', got %', coalesce(quote_literal(planner), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO synapse.goals AS g (goal, input, planner, idempotency_key, owner)
    VALUES (_submit_goal.goal, _submit_goal.input, _submit_goal.planner, _submit_goal.idempotency_key,
            _submit_goal.owner)
    ON CONFLICT ON CONSTRAINT goals_owner_idempotency_key_key DO NOTHING
    RETURNING g.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT g.id INTO new_id FROM synapse.goals AS g
         WHERE g.owner = _submit_goal.owner AND g.idempotency_key = _submit_goal.idempotency_key;
    END IF;
    RETURN new_id;
END $$;

CREATE OR REPLACE FUNCTION synapse.submit_goal(
    goal text,
    input jsonb DEFAULT '{}',
    planner text DEFAULT 'template',
    idempotency_key text DEFAULT NULL
) RETURNS bigint LANGUAGE sql AS $$
    SELECT synapse._submit_goal(goal, input, planner, idempotency_key, synapse._caller())
$$;
COMMENT ON FUNCTION synapse.submit_goal(text, jsonb, text, text) IS 'Records a goal for a planner; returns its id. The same idempotency key (per owner) returns the same id.';

CREATE OR REPLACE FUNCTION synapse.goal_status(goal_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    status jsonb;
BEGIN
    SELECT jsonb_build_object(
        'id', g.id, 'goal', g.goal, 'status', g.status, 'error', g.error, 'result', g.result,
        'planner', g.planner, 'template', g.template, 'input', g.input, 'params', g.params,
        'created_at', g.created_at, 'started_at', g.started_at, 'finished_at', g.finished_at,
        'parent', CASE WHEN g.parent_goal_id IS NOT NULL THEN jsonb_build_object(
                      'goal_id', g.parent_goal_id,
                      'step', (SELECT p.step FROM synapse.tasks AS p WHERE p.id = g.parent_task_id),
                      'index', (SELECT p.map_index FROM synapse.tasks AS p WHERE p.id = g.parent_task_id))
                  END,
        'depth', g.depth, 'owner', g.owner,
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
                   -- A map step once, with its instances; a loop with its iteration.
                   || CASE WHEN t.for_each_expr IS NOT NULL THEN jsonb_build_object(
                          'for_each', t.for_each_expr, 'size', t.map_size, 'ended', t.map_ended,
                          'failed', t.map_failed,
                          'instances', coalesce((
                              SELECT jsonb_agg(jsonb_build_object(
                                         'index', i.map_index, 'status', i.status, 'attempts', i.attempts,
                                         'result', i.result, 'error', i.error, 'started_at', i.started_at,
                                         'finished_at', i.finished_at)
                                     || CASE WHEN i.child_goal_id IS NOT NULL
                                             THEN jsonb_build_object('child_goal_id', i.child_goal_id)
                                             ELSE '{}' END
                                     ORDER BY i.map_index)
                                FROM synapse.tasks AS i
                               WHERE i.goal_id = t.goal_id AND i.step = t.step AND i.map_index IS NOT NULL), '[]'))
                      ELSE '{}' END
                   || CASE WHEN t.child_goal_id IS NOT NULL
                           THEN jsonb_build_object('child_goal_id', t.child_goal_id) ELSE '{}' END
                   || CASE WHEN t.until_expr IS NOT NULL THEN jsonb_build_object(
                          'until', t.until_expr, 'iteration', t.iteration,
                          'max_iterations', t.max_iterations)
                      ELSE '{}' END
                   ORDER BY t.id)
              FROM synapse.tasks AS t WHERE t.goal_id = g.id AND t.map_index IS NULL), '[]'),
        -- Signals delivered to the goal: taken by a wait step, or kept for one.
        'signals', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'name', s.name, 'payload', s.payload, 'sent_at', s.sent_at, 'taken_at', s.taken_at,
                       'taken_by', (SELECT w.step FROM synapse.tasks AS w WHERE w.id = s.taken_by))
                   ORDER BY s.id)
              FROM synapse.signals AS s WHERE s.goal_id = g.id), '[]'),
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

CREATE OR REPLACE FUNCTION synapse.cancel_goal(goal_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
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
COMMENT ON FUNCTION synapse.cancel_goal(bigint) IS 'Cancels what has not finished; false if the goal had already finished.';

-- The timers end due waits and submit due schedules.
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
    -- Waits whose time came: a `for` or `until` wait succeeds, a signal wait
    -- times out (an action failure, so that `on: failure` edges handle it).
    -- Their events ask a worker to resolve the steps' edges (events.sql).
    UPDATE synapse.tasks t
       SET status = CASE WHEN t.params ? 'signal' THEN 'failed' ELSE 'succeeded' END,
           result = CASE WHEN t.params ? 'signal' THEN NULL ELSE jsonb_build_object('woke_at', now()) END,
           error = CASE WHEN t.params ? 'signal'
                        THEN format('timed out after %s waiting for signal "%s"', t.params ->> 'timeout',
                                    t.params ->> 'signal') END,
           failure_kind = CASE WHEN t.params ? 'signal' THEN 'action' END
      FROM (SELECT id FROM synapse.tasks WHERE status = 'waiting' AND run_at <= now()
             ORDER BY run_at LIMIT batch FOR UPDATE SKIP LOCKED) due
     WHERE t.id = due.id AND t.action = 'wait';
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    changed := changed + synapse._run_schedules(batch);
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
        (SELECT min(run_at) FROM synapse.tasks WHERE status = 'waiting' AND run_at IS NOT NULL),
        (SELECT min(next_run_at) FROM synapse.schedules),
        CASE WHEN retention_seconds > 0 THEN
            (SELECT min(finished_at) FROM synapse.goals WHERE finished_at IS NOT NULL)
                + make_interval(secs => retention_seconds) END)
      INTO next_due;
END $$;

-- Starts the wait steps the engine decided to run.
CREATE FUNCTION synapse."_start_waits"(
	"waits" jsonb /* JsonB */
) RETURNS TABLE (
	"task_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"result" jsonb,  /* Option < JsonB > */
	"error" TEXT  /* Option < String > */
)
STRICT 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'start_waits_wrapper';

-- The next time of a cron expression in a time zone.
CREATE FUNCTION synapse."_cron_next"(
	"cron" TEXT, /* & str */
	"time_zone" TEXT, /* & str */
	"after" timestamp with time zone /* TimestampWithTimeZone */
) RETURNS timestamp with time zone /* std :: result :: Result < TimestampWithTimeZone, pgrx :: pg_sys :: panic ::
ErrorReport > */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cron_next_wrapper';

-- A sql step runs as its goal's owner: the worker enters it...
CREATE FUNCTION synapse."_enter_step"(
	"task_id" bigint, /* i64 */
	"attempt" INT /* i32 */
) RETURNS TEXT /* std :: result :: Result < String, pgrx :: pg_sys :: panic :: ErrorReport > */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'enter_step_wrapper';

-- ... and leaves it.
CREATE FUNCTION synapse."_leave_step"(
	"token" TEXT /* & str */
) RETURNS VOID /* std :: result :: Result < (), pgrx :: pg_sys :: panic :: ErrorReport > */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'leave_step_wrapper';

-- Safe to share (SPEC §7). Installing Synapse widens nobody's rights: nothing
-- is granted to PUBLIC, and roles get what they need with grant_submitter,
-- grant_worker and grant_admin. Only the extension's own code writes the
-- tables: the API functions that write run as the extension's owner
-- (SECURITY DEFINER, with a pinned search_path), and so do the triggers that
-- write events, so no role needs (or gets) a write privilege on the outbox.
-- Row security shows each goal, with its tasks, edges, signals and attempts,
-- to the members of its owner, and to admins and workers.

CREATE TABLE synapse.role_grants (
    role       regrole     NOT NULL,
    capability text        NOT NULL CHECK (capability IN ('submitter', 'worker', 'admin')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, capability)
);
COMMENT ON TABLE synapse.role_grants IS 'The capabilities given with grant_submitter, grant_worker and grant_admin; every upgrade grants them again on what it adds.';
COMMENT ON COLUMN synapse.role_grants.role IS 'The role (and through it, its members).';
COMMENT ON COLUMN synapse.role_grants.capability IS 'submitter, worker or admin.';
COMMENT ON COLUMN synapse.role_grants.granted_at IS 'When it was granted.';
SELECT pg_catalog.pg_extension_config_dump('synapse.role_grants', '');

-- Whether the querying role sees every goal (an admin or a worker): the
-- row security policies' first test, evaluated once per statement.
CREATE FUNCTION synapse._sees_all() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM synapse.role_grants AS g
                    WHERE g.capability IN ('admin', 'worker') AND pg_catalog.pg_has_role(g.role, 'MEMBER'))
$$;

-- Whether the caller may act on a goal of owner: a member of it, or an admin.
CREATE FUNCTION synapse._may_act_on(owner regrole) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(synapse._caller(), owner, 'MEMBER')
        OR EXISTS (SELECT FROM synapse.role_grants AS g
                    WHERE g.capability = 'admin' AND pg_catalog.pg_has_role(synapse._caller(), g.role, 'MEMBER'))
$$;

ALTER TABLE synapse.goals ENABLE ROW LEVEL SECURITY;
CREATE POLICY goals_of_members ON synapse.goals
    USING ((SELECT synapse._sees_all()) OR pg_catalog.pg_has_role(owner, 'MEMBER'));
ALTER TABLE synapse.tasks ENABLE ROW LEVEL SECURITY;
CREATE POLICY tasks_of_visible_goals ON synapse.tasks
    USING ((SELECT synapse._sees_all()) OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id));
ALTER TABLE synapse.edges ENABLE ROW LEVEL SECURITY;
CREATE POLICY edges_of_visible_goals ON synapse.edges
    USING ((SELECT synapse._sees_all()) OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id));
ALTER TABLE synapse.signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY signals_of_visible_goals ON synapse.signals
    USING ((SELECT synapse._sees_all()) OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id));
ALTER TABLE synapse.attempts ENABLE ROW LEVEL SECURITY;
CREATE POLICY attempts_of_visible_tasks ON synapse.attempts
    USING ((SELECT synapse._sees_all()) OR EXISTS (SELECT FROM synapse.tasks AS t WHERE t.id = task_id));

-- Gives role exactly what its capabilities in role_grants allow, on every
-- object of the schema (after revoking what it had): the one place the
-- privileges of each capability are listed.
CREATE FUNCTION synapse._apply_grants(role regrole) RETURNS void LANGUAGE plpgsql AS $$
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
    functions := ARRAY['synapse._caller()', 'synapse._sees_all()', 'synapse.goal_status(bigint)',
                       'synapse.goal_graph(bigint, text)', 'synapse.validate_blueprint(jsonb)'];
    readable := ARRAY['goals', 'tasks', 'edges', 'signals', 'attempts', 'workers', 'actions', 'role_grants'];
    IF capabilities && ARRAY['submitter', 'admin'] THEN
        functions := functions || ARRAY[
            'synapse.submit_goal(text, jsonb, text, text)', 'synapse.submit_plan(jsonb, jsonb, text)',
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
            'synapse._start_waits(jsonb)', 'synapse._enter_step(bigint, integer)', 'synapse._leave_step(text)'];
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

-- Records or removes a capability of role and applies what it gives.
CREATE FUNCTION synapse._set_capability(role regrole, capability text, granted boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF granted THEN
        INSERT INTO synapse.role_grants AS g (role, capability) VALUES (_set_capability.role, _set_capability.capability)
        ON CONFLICT ON CONSTRAINT role_grants_pkey DO NOTHING;
    ELSE
        DELETE FROM synapse.role_grants AS g WHERE g.role = _set_capability.role AND g.capability = _set_capability.capability;
    END IF;
    PERFORM synapse._apply_grants(role);
END $$;

CREATE FUNCTION synapse.grant_submitter(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'submitter', true)
$$;
COMMENT ON FUNCTION synapse.grant_submitter(regrole) IS 'Lets role (and its members) submit goals and see, cancel, signal and retry the goals of roles it is a member of.';
CREATE FUNCTION synapse.grant_worker(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'worker', true)
$$;
COMMENT ON FUNCTION synapse.grant_worker(regrole) IS 'Lets role run synapse-worker: plan goals, claim tasks, record outcomes, register actions.';
CREATE FUNCTION synapse.grant_admin(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'admin', true)
$$;
COMMENT ON FUNCTION synapse.grant_admin(regrole) IS 'Lets role do everything: every goal, templates, schedules, forwarder_status, and granting.';
CREATE FUNCTION synapse.revoke_submitter(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'submitter', false)
$$;
COMMENT ON FUNCTION synapse.revoke_submitter(regrole) IS 'Undoes grant_submitter.';
CREATE FUNCTION synapse.revoke_worker(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'worker', false)
$$;
COMMENT ON FUNCTION synapse.revoke_worker(regrole) IS 'Undoes grant_worker.';
CREATE FUNCTION synapse.revoke_admin(role regrole) RETURNS void LANGUAGE sql AS $$
    SELECT synapse._set_capability(role, 'admin', false)
$$;
COMMENT ON FUNCTION synapse.revoke_admin(regrole) IS 'Undoes grant_admin.';

-- What runs with the owner's rights, and so pins its search_path.
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'synapse.submit_goal(text, jsonb, text, text)', 'synapse.submit_plan(jsonb, jsonb, text)',
        'synapse.plan_preview(text, jsonb, text)', 'synapse.cancel_goal(bigint)',
        'synapse.signal(bigint, text, jsonb)', 'synapse.retry_goal(bigint, text[])',
        'synapse.add_template(text, text, jsonb, text, integer)',
        'synapse.schedule(text, text, text, jsonb, text, text)', 'synapse.unschedule(text)',
        'synapse.replay_parked_events()', 'synapse.forwarder_status()',
        'synapse._install_plan(bigint, jsonb, text, jsonb)',
        'synapse._start_child(bigint, integer, text, text, jsonb, jsonb)', 'synapse._start_maps(bigint[])',
        'synapse._start_waits(jsonb)', 'synapse._goals_written()', 'synapse._tasks_written()',
        'synapse.grant_submitter(regrole)', 'synapse.grant_worker(regrole)', 'synapse.grant_admin(regrole)',
        'synapse.revoke_submitter(regrole)', 'synapse.revoke_worker(regrole)', 'synapse.revoke_admin(regrole)']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END $$;

-- Nothing for PUBLIC; what was granted before (an upgrade) is granted again,
-- on everything that exists now.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA synapse FROM PUBLIC;
SELECT synapse._apply_grants(g.role) FROM (SELECT DISTINCT role FROM synapse.role_grants) AS g;

-- A forwarder that started before the extension existed sleeps until now.
SELECT synapse._wake_forwarder();
