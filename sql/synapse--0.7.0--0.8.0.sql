-- 0.7.0 → 0.8.0: a step's inbound edges are indexed with the step they come
-- from. Probed by (goal_id, to_step) alone, resolving one parent's edge into
-- a join read every edge into it: a fan-in of width W read W² index entries.
DROP INDEX synapse.edges_to_step;
-- A step's inbound edges; with from_step, one edge by either index: resolving
-- one parent's edge into a wide join must not read every edge into it.
CREATE INDEX edges_to_step ON synapse.edges (goal_id, to_step, from_step);

-- A goal's and a task's timestamps are the time of the statement that
-- changed them: a sql step's outcome is recorded, and its successors started,
-- in the transaction that ran its query, whose now() is from before the query.
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

CREATE OR REPLACE FUNCTION synapse._take_signal(task_id bigint, signal_id bigint) RETURNS boolean
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

ALTER TABLE synapse.attempts ALTER COLUMN finished_at SET DEFAULT statement_timestamp();
