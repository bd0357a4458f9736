-- Events: every goal and task state change writes one outbox row in the same
-- transaction (and, with synapse.notify on, a NOTIFY). The BEFORE triggers
-- also enforce the state machines and keep the timestamps consistent.

ALTER TABLE synapse.goals ADD COLUMN dispatched_at timestamptz;
COMMENT ON COLUMN synapse.goals.dispatched_at IS 'submitted: when the goal was last sent to the planner list; the sweep sends it again after synapse.sweep_interval.';
CREATE INDEX goals_submitted_since ON synapse.goals (dispatched_at) WHERE status = 'submitted';

-- Records one event. dispatch names the Redis list (without prefix) that also
-- gets the payload: 'planner' or 'queue:<name>'.
CREATE FUNCTION synapse._emit(event text, goal_id bigint, task_id bigint, dispatch text, payload text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    outbox_id bigint;
BEGIN
    INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload)
    VALUES (event, goal_id, task_id, dispatch, payload)
    RETURNING id INTO outbox_id;
    IF current_setting('synapse.notify', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('synapse_events', payload);
    END IF;
    RETURN outbox_id;
END $$;

-- task.* payload, exactly as documented: {"v":1,"event":...,"goal_id":...,
-- "task_id":...,"step":...,"queue":...,"attempt":...}. attempt is the attempt
-- the event is about: the next one for task.queued, the current one otherwise.
CREATE FUNCTION synapse._emit_task(event text, goal_id bigint, task_id bigint, step text, queue text, attempt integer)
RETURNS bigint LANGUAGE sql AS $$
    SELECT synapse._emit(event, goal_id, task_id,
        CASE WHEN event = 'task.queued' THEN 'queue:' || queue END,
        format('{"v":1,"event":%s,"goal_id":%s,"task_id":%s,"step":%s,"queue":%s,"attempt":%s}',
               to_json(event), goal_id, task_id, to_json(step), to_json(queue), attempt));
$$;

CREATE FUNCTION synapse._emit_goal(event text, goal_id bigint)
RETURNS bigint LANGUAGE sql AS $$
    SELECT synapse._emit(event, goal_id, NULL,
        CASE WHEN event = 'goal.submitted' THEN 'planner' END,
        format('{"v":1,"event":%s,"goal_id":%s}', to_json(event), goal_id));
$$;

-- BEFORE INSERT/UPDATE: checks the transition and sets timestamps; an UPDATE
-- also records its event here. An INSERT records it AFTER, so a row that
-- ON CONFLICT DO NOTHING skipped leaves no event behind.
CREATE FUNCTION synapse._goal_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_WHEN = 'AFTER' THEN
        PERFORM synapse._emit_goal('goal.' || NEW.status, NEW.id);
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('submitted', 'running', 'failed') THEN
            RAISE EXCEPTION 'a new goal cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            WHEN 'submitted' THEN NEW.status IN ('planning', 'running', 'failed', 'cancelled')
            WHEN 'planning'  THEN NEW.status IN ('submitted', 'running', 'failed', 'cancelled')
            WHEN 'running'   THEN NEW.status IN ('succeeded', 'failed', 'cancelled')
            ELSE false END) THEN
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
    -- 'planning' is internal to the planner: no event.
    IF TG_OP = 'UPDATE' AND NEW.status <> 'planning' THEN
        PERFORM synapse._emit_goal('goal.' || NEW.status, NEW.id);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER goal_inserting BEFORE INSERT ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();
CREATE TRIGGER goal_inserted AFTER INSERT ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();
CREATE TRIGGER goal_status_changed BEFORE UPDATE OF status ON synapse.goals
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._goal_changed();

-- Same split as goals: events of inserted rows are recorded AFTER INSERT.
CREATE FUNCTION synapse._task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_WHEN = 'AFTER' THEN
        PERFORM synapse._emit_task('task.' || NEW.status, NEW.goal_id, NEW.id, NEW.step, NEW.queue,
            NEW.attempts + 1);
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'queued') THEN
            RAISE EXCEPTION 'a new task cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            WHEN 'pending'  THEN NEW.status IN ('queued', 'skipped', 'failed', 'cancelled')
            WHEN 'queued'   THEN NEW.status IN ('running', 'cancelled')
            WHEN 'running'  THEN NEW.status IN ('succeeded', 'failed', 'retrying', 'queued', 'cancelled')
            WHEN 'retrying' THEN NEW.status IN ('queued', 'cancelled')
            ELSE false END) THEN
        RAISE EXCEPTION 'task % (step %): status cannot change from % to %', NEW.id, NEW.step, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'queued' THEN
        NEW.queued_at := now();
        NEW.run_at := NULL;
    ELSIF NEW.status = 'running' THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    IF NEW.status <> 'running' THEN
        NEW.lease_expires_at := NULL;
        NEW.leased_by := NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        PERFORM synapse._emit_task('task.' || NEW.status, NEW.goal_id, NEW.id, NEW.step, NEW.queue,
            CASE WHEN NEW.status = 'queued' THEN NEW.attempts + 1 ELSE NEW.attempts END);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER task_inserting BEFORE INSERT ON synapse.tasks
    FOR EACH ROW EXECUTE FUNCTION synapse._task_changed();
-- Only queued tasks announce themselves when created; pending ones wait silently.
CREATE TRIGGER task_inserted AFTER INSERT ON synapse.tasks
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION synapse._task_changed();
CREATE TRIGGER task_status_changed BEFORE UPDATE OF status ON synapse.tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._task_changed();

-- Whatever writes an event wakes the forwarder right after commit.
CREATE TRIGGER outbox_wake AFTER INSERT ON synapse.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION synapse.wake_forwarder_at_commit();
