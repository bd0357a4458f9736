-- Events: every goal and task state change writes one outbox row in the same
-- transaction (the forwarder also NOTIFYs it, with synapse.notify on). Row triggers enforce
-- the state machines and keep the timestamps consistent; statement triggers
-- record the events of a whole statement with one INSERT.

ALTER TABLE synapse.goals ADD COLUMN dispatched_at timestamptz;
COMMENT ON COLUMN synapse.goals.dispatched_at IS 'submitted: when the goal was last sent to the planner list; the sweep sends it again after synapse.sweep_interval.';
CREATE INDEX goals_submitted_since ON synapse.goals (dispatched_at) WHERE status = 'submitted';

-- When a timer of the forwarder is due because of an event: a retry's run_at,
-- a claim's lease expiry. (Dispatched events are due for the sweep after
-- synapse.sweep_interval; the forwarder adds that itself.) The forwarder
-- learns every new deadline from the events it forwards, so it runs its
-- timers only when one is due.
ALTER TABLE synapse.outbox ADD COLUMN due_at timestamptz;
COMMENT ON COLUMN synapse.outbox.due_at IS 'task.retrying: the retry''s run_at; task.running: the lease expiry. The forwarder''s timers wake then.';

-- When Redis refuses a command for an event and accepts the others, only that
-- event waits: it is retried after a growing pause and set aside (see
-- synapse.outbox_parked) when Redis keeps refusing it.
ALTER TABLE synapse.outbox ADD COLUMN failures integer NOT NULL DEFAULT 0,
                           ADD COLUMN streamed boolean NOT NULL DEFAULT false,
                           ADD COLUMN retry_at timestamptz,
                           ADD COLUMN error text;
COMMENT ON COLUMN synapse.outbox.failures IS 'Times Redis refused a command for this event.';
COMMENT ON COLUMN synapse.outbox.streamed IS 'The event is already in the {prefix}:events stream; only its dispatch is owed.';
COMMENT ON COLUMN synapse.outbox.retry_at IS 'After a refusal: not sent again before this time.';
COMMENT ON COLUMN synapse.outbox.error IS 'The last refusal.';
CREATE INDEX outbox_retry ON synapse.outbox (retry_at) WHERE retry_at IS NOT NULL;

-- NOTIFY is sent by the forwarder, from its own transaction, as it reads the
-- event: a writer's commit never takes the database-wide lock a NOTIFY holds
-- until its commit is flushed, which made every writer wait its turn.
ALTER TABLE synapse.outbox ADD COLUMN notify boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN synapse.outbox.notify IS 'The writing session had synapse.notify on: the forwarder still owes a pg_notify(''synapse_events'', payload).';

-- Why a failed task failed: its action failed ('action'), or one of its
-- expressions (or the condition of an edge into it) could not be evaluated
-- ('definition'). A definition error takes only `always` edges and fails the goal.
ALTER TABLE synapse.tasks ADD COLUMN failure_kind text CHECK (failure_kind IN ('action', 'definition'));
COMMENT ON COLUMN synapse.tasks.failure_kind IS 'failed: ''action'' (the action failed) or ''definition'' (an expression of the step, or the when of an edge into it, could not be evaluated: only always edges are taken and the goal fails); NULL otherwise, and for a task failed because its lease lapsed.';

-- Finished goals are deleted after synapse.retention, oldest first.
CREATE INDEX goals_finished ON synapse.goals (finished_at) WHERE finished_at IS NOT NULL;

-- One event: the outbox row to write. dispatch names the Redis list (without
-- prefix) that also gets the payload: 'planner' or 'queue:<name>'.
CREATE TYPE synapse._event AS (event text, goal_id bigint, task_id bigint, dispatch text, payload text, due_at timestamptz);

-- Payloads, exactly as documented, schema version first. task.*:
-- {"v":1,"event":...,"goal_id":...,"task_id":...,"step":...,"queue":...,"attempt":...},
-- and "index" for an instance of a map step;
-- attempt is the attempt the event is about: the next one for task.queued,
-- the current one otherwise. task.queued goes to the task's queue, and so does
-- an event a worker must act on although nothing is to run (to_worker).
CREATE FUNCTION synapse._task_event(event text, goal_id bigint, task_id bigint, step text, queue text, attempt integer,
                                    due_at timestamptz DEFAULT NULL, to_worker boolean DEFAULT false,
                                    map_index integer DEFAULT NULL)
RETURNS synapse._event LANGUAGE sql STABLE AS $$
    SELECT ROW(event, goal_id, task_id, CASE WHEN event = 'task.queued' OR to_worker THEN 'queue:' || queue END,
               format('{"v":1,"event":%s,"goal_id":%s,"task_id":%s,"step":%s,"queue":%s,"attempt":%s%s}',
                      to_json(event), goal_id, task_id, to_json(step), to_json(queue), attempt,
                      ',"index":' || map_index),
               due_at)::synapse._event;
$$;

-- goal.*: {"v":1,"event":...,"goal_id":...}; goal.submitted goes to the planner list.
-- An event a worker must act on also goes to to_queue: a child goal's end to
-- the queue of the goal step waiting for it, with "parent_task_id" (a worker
-- there ends that step); a goal running again (retry_goal) to the queue of a
-- step it starts with (a worker there starts its steps).
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

-- Records events in order: one INSERT for all their outbox rows, marked to be
-- NOTIFYed by the forwarder when this session has synapse.notify on. Nothing
-- at all for no events: even an INSERT of no rows would wake the forwarder.
--
-- synapse.observe leaves out the events nobody has to act on: 'goals' keeps
-- goal events and those that dispatch work, 'dispatch' only the latter. The
-- deadlines the left-out events carried (a lease expiry, a retry's run_at, a
-- finished goal's end of retention) reach the forwarder directly.
--
-- The transaction has its id before it draws outbox ids (every writer of the
-- outbox keeps this rule): the forwarder relies on it to read only above what
-- it has forwarded once every transaction that could still commit a lower id
-- has ended, instead of wading through rows deleted but not yet vacuumed.
CREATE FUNCTION synapse._emit(events synapse._event[]) RETURNS integer LANGUAGE plpgsql AS $$
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

-- synapse._restoring() (events.rs) tells a restore apart: pg_dump's data
-- section, loaded by psql or pg_restore, copies rows in whatever state they
-- had, with their own timestamps; it must neither be refused by the state
-- machine nor record events again (the undelivered events are restored with
-- the outbox).

-- BEFORE INSERT/UPDATE of each row: checks the transition and sets the
-- timestamps. The events are recorded per statement, after it (below): one
-- INSERT into the outbox for all the rows a statement changed, and only for
-- rows really written (ON CONFLICT DO NOTHING skips leave none).
CREATE FUNCTION synapse._goal_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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
    -- The statement's time, not the transaction's: a sql step's outcome is
    -- recorded, and its successors started, in the transaction that ran its
    -- query, begun before the query ran.
    IF NEW.status = 'submitted' THEN
        NEW.dispatched_at := statement_timestamp();
    ELSIF NEW.status = 'running' THEN
        NEW.started_at := statement_timestamp();
    ELSIF NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        NEW.finished_at := statement_timestamp();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER goal_inserting BEFORE INSERT ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();
CREATE TRIGGER goal_status_changing BEFORE UPDATE OF status ON synapse.goals
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._goal_changed();

-- goal.<status> for each inserted goal, or each goal whose status an UPDATE
-- changed ('planning' is internal to the planner: no event).
CREATE FUNCTION synapse._goals_written() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER goals_inserted AFTER INSERT ON synapse.goals
    REFERENCING NEW TABLE AS new_goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_written();
CREATE TRIGGER goals_updated AFTER UPDATE ON synapse.goals
    REFERENCING OLD TABLE AS old_goals NEW TABLE AS new_goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_written();

-- Same split as goals: checks and timestamps per row, events per statement.
CREATE FUNCTION synapse._task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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
    -- The statement's time, as for goals.
    IF NEW.status = 'queued' THEN
        NEW.queued_at := statement_timestamp();
        NEW.run_at := NULL;
    ELSIF NEW.status IN ('running', 'waiting') THEN
        NEW.started_at := statement_timestamp();
    ELSIF NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        NEW.finished_at := statement_timestamp();
    END IF;
    IF NEW.status <> 'running' THEN
        NEW.lease_expires_at := NULL;
        NEW.leased_by := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER task_inserting BEFORE INSERT ON synapse.tasks
    FOR EACH ROW EXECUTE FUNCTION synapse._task_changed();
CREATE TRIGGER task_status_changing BEFORE UPDATE OF status ON synapse.tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION synapse._task_changed();

-- task.<status> for each task whose status an UPDATE changed, and
-- task.queued for each task inserted queued (pending ones wait silently).
--
-- plpgsql plans a query once per session, for the row count of its first
-- run: a join of old and new rows first planned for a few rows stays a
-- nested loop, O(n²) for a statement of thousands (a wide fan-out queued, a
-- large goal cancelled). A statement of many rows is planned for its own
-- size instead; the same query, written twice for that reason only.
CREATE FUNCTION synapse._tasks_written() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER tasks_inserted AFTER INSERT ON synapse.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._tasks_written();
CREATE TRIGGER tasks_updated AFTER UPDATE ON synapse.tasks
    REFERENCING OLD TABLE AS old_tasks NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._tasks_written();

-- Whatever writes an event wakes the forwarder right after commit.
CREATE TRIGGER outbox_wake AFTER INSERT ON synapse.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION synapse.wake_forwarder_at_commit();
