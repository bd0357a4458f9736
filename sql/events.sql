-- Events: every goal and task state change is recorded in the outbox in the same
-- transaction (the forwarder also NOTIFYs it, with synapse.notify on). Row triggers enforce
-- the state machines and keep the timestamps consistent; statement triggers
-- record the events of a whole statement with one INSERT. The trigger
-- functions are the extension's Rust (synapse_pg/src/events).

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

-- Writing a row is most of what an event costs: the events of one statement
-- share a row per event name and list they dispatch to (none for those only
-- observers read), their payloads one a line.
ALTER TABLE synapse.outbox ADD COLUMN events integer NOT NULL DEFAULT 1;
COMMENT ON COLUMN synapse.outbox.events IS 'How many events the row carries: one, or several of one name (and list dispatched to) written by one statement (payload has one a line).';

-- Why a failed task failed: its action failed ('action'), or one of its
-- expressions (or the condition of an edge into it) could not be evaluated
-- ('definition'). A definition error takes only `always` edges and fails the goal.
ALTER TABLE synapse.tasks ADD COLUMN failure_kind synapse.failure_kind;
COMMENT ON COLUMN synapse.tasks.failure_kind IS 'failed: ''action'' (the action failed) or ''definition'' (an expression of the step, or the when of an edge into it, could not be evaluated: only always edges are taken and the goal fails); NULL otherwise, and for a task failed because its lease lapsed.';

-- Finished goals are deleted after synapse.retention, oldest first.
CREATE INDEX goals_finished ON synapse.goals (finished_at) WHERE finished_at IS NOT NULL;

-- BEFORE INSERT/UPDATE of each row: checks the transition, sets the
-- timestamps, and checks that the row has the columns its status needs (an
-- ended goal its finished_at, a failed one its error, ...). Those checks are
-- here rather than CHECK constraints, which Postgres parses again at every
-- statement that writes the table. The events are recorded per statement,
-- after it (below): one INSERT into the outbox for all the rows a statement
-- changed, and only for rows really written (ON CONFLICT DO NOTHING skips
-- leave none).
CREATE TRIGGER goal_inserting BEFORE INSERT ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();
CREATE TRIGGER goal_changing
    BEFORE UPDATE OF status, finished_at, blueprint, error, parent_goal_id, parent_task_id ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();

-- goal.<status> for each inserted goal, or each goal whose status an UPDATE
-- changed ('planning' is internal to the planner: no event).
CREATE TRIGGER goals_inserted AFTER INSERT ON synapse.goals
    REFERENCING NEW TABLE AS new_goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_written();
CREATE TRIGGER goals_updated AFTER UPDATE ON synapse.goals
    REFERENCING OLD TABLE AS old_goals NEW TABLE AS new_goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_written();

-- Same split as goals: checks and timestamps per row, events per statement.
CREATE TRIGGER task_inserting BEFORE INSERT ON synapse.tasks
    FOR EACH ROW EXECUTE FUNCTION synapse._task_changed();
CREATE TRIGGER task_changing
    BEFORE UPDATE OF status, queued_at, run_at, lease_expires_at, finished_at ON synapse.tasks
    FOR EACH ROW EXECUTE FUNCTION synapse._task_changed();

-- task.<status> for each task whose status an UPDATE changed, and
-- task.queued for each task inserted queued (pending ones wait silently).
CREATE TRIGGER tasks_inserted AFTER INSERT ON synapse.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._tasks_written();
CREATE TRIGGER tasks_updated AFTER UPDATE ON synapse.tasks
    REFERENCING OLD TABLE AS old_tasks NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._tasks_written();

-- Whatever writes an event wakes the forwarder right after commit.
CREATE TRIGGER outbox_wake AFTER INSERT ON synapse.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION synapse.wake_forwarder_at_commit();
