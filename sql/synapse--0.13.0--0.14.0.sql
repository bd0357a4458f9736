-- 0.13.0 → 0.14.0: tasks and edges no longer hold foreign keys to their
-- goal. A key was checked once for every row inserted, and a wide plan inserts
-- thousands of rows of one goal; triggers on goals delete them instead.
ALTER TABLE synapse.tasks DROP CONSTRAINT tasks_goal_id_fkey;
ALTER TABLE synapse.edges DROP CONSTRAINT edges_goal_id_fkey;

-- A goal's tasks and edges are its own: they go with it, and never move to
-- another goal. Triggers, not foreign keys: a key is checked once for every
-- row inserted, and a wide plan inserts thousands of rows of one goal (the
-- checks were half of a 2 000-step submit_plan). The functions that insert
-- tasks and edges hold their goals once a statement instead, as the checks
-- did (`FOR KEY SHARE`: not deleted until the inserting transaction ends).
CREATE FUNCTION synapse._goals_deleted() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM synapse.edges WHERE goal_id IN (SELECT id FROM deleted_goals);
    DELETE FROM synapse.tasks WHERE goal_id IN (SELECT id FROM deleted_goals);
    RETURN NULL;
END $$;
CREATE TRIGGER goals_deleted AFTER DELETE ON synapse.goals
    REFERENCING OLD TABLE AS deleted_goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_deleted();
CREATE FUNCTION synapse._goals_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    TRUNCATE synapse.edges, synapse.tasks CASCADE;
    RETURN NULL;
END $$;
CREATE TRIGGER goals_truncated AFTER TRUNCATE ON synapse.goals
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._goals_truncated();
CREATE FUNCTION synapse._goal_kept() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
        MESSAGE = format('a row of synapse.%s belongs to goal %s and cannot move to goal %s',
                         TG_TABLE_NAME, OLD.goal_id, NEW.goal_id);
END $$;
CREATE TRIGGER task_goal_kept BEFORE UPDATE OF goal_id ON synapse.tasks
    FOR EACH ROW WHEN (OLD.goal_id IS DISTINCT FROM NEW.goal_id) EXECUTE FUNCTION synapse._goal_kept();
CREATE TRIGGER edge_goal_kept BEFORE UPDATE OF goal_id ON synapse.edges
    FOR EACH ROW WHEN (OLD.goal_id IS DISTINCT FROM NEW.goal_id) EXECUTE FUNCTION synapse._goal_kept();
REVOKE ALL ON FUNCTION synapse._goals_deleted(), synapse._goals_truncated(), synapse._goal_kept() FROM PUBLIC;
