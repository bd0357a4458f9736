-- 0.10.0 → 0.11.0: what a goal or task row needs for its status (an ended
-- one its finished_at, a running task its lease, a failed goal its error,
-- both or neither of a child goal's parent ids) is checked by the row
-- triggers that already check every status change, no longer by CHECK
-- constraints: Postgres parses a table's checks again at every statement
-- that writes it, several per task (a fifth of a one-step submit_plan's
-- time, 30 to 40 µs of each statement of a chain step). The triggers now
-- fire on an update of those columns too, so what the checks refused is
-- still refused. No rewrite.
ALTER TABLE synapse.goals
    DROP CONSTRAINT goals_check,
    DROP CONSTRAINT goals_check1,
    DROP CONSTRAINT goals_check2,
    DROP CONSTRAINT goals_parent_check;
ALTER TABLE synapse.tasks
    DROP CONSTRAINT tasks_check,
    DROP CONSTRAINT tasks_check1,
    DROP CONSTRAINT tasks_check2,
    DROP CONSTRAINT tasks_check3;
DROP TRIGGER goal_status_changing ON synapse.goals;
CREATE TRIGGER goal_changing
    BEFORE UPDATE OF status, finished_at, blueprint, error, parent_goal_id, parent_task_id ON synapse.goals
    FOR EACH ROW EXECUTE FUNCTION synapse._goal_changed();
DROP TRIGGER task_status_changing ON synapse.tasks;
CREATE TRIGGER task_changing
    BEFORE UPDATE OF status, queued_at, run_at, lease_expires_at, finished_at ON synapse.tasks
    FOR EACH ROW EXECUTE FUNCTION synapse._task_changed();
