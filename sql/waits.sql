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
    UPDATE synapse.signals SET taken_by = _take_signal.task_id, taken_at = statement_timestamp()
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
COMMENT ON FUNCTION synapse.signal(bigint, text, jsonb) IS 'Delivers a signal to a goal: true if a waiting step took it now, false if it is kept until a step waits for it.';
