-- Safe to share (SPEC §7). Installing Synapse widens nobody's rights: nothing
-- is granted to PUBLIC, and roles get what they need with grant_submitter,
-- grant_worker and grant_admin. Only the extension's own code writes the
-- tables: the API functions that write run as the extension's owner
-- (SECURITY DEFINER, with a pinned search_path), and the triggers that write
-- events write them as that owner, so no role needs (or gets) a write
-- privilege on the outbox.
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

-- Whether the caller may act on a goal of owner: a member of it, or an admin.
CREATE FUNCTION synapse._may_act_on(owner regrole) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(synapse._caller(), owner, 'MEMBER')
        OR EXISTS (SELECT FROM synapse.role_grants AS g
                    WHERE g.capability = 'admin' AND pg_catalog.pg_has_role(synapse._caller(), g.role, 'MEMBER'))
$$;

-- Each policy's first test: whether the querying role sees every goal (an
-- admin or a worker). Written out in the policy, not called as a function:
-- the planner makes it an InitPlan run once per statement, where a SQL
-- function would be parsed and planned again by every statement of a worker.
DO $$
DECLARE
    sees_all text := $q$EXISTS (SELECT FROM synapse.role_grants AS r
                                 WHERE r.capability IN ('admin', 'worker') AND pg_catalog.pg_has_role(r.role, 'MEMBER'))$q$;
BEGIN
    ALTER TABLE synapse.goals ENABLE ROW LEVEL SECURITY;
    EXECUTE format('CREATE POLICY goals_of_members ON synapse.goals USING (%s OR pg_catalog.pg_has_role(owner, ''MEMBER''))', sees_all);
    ALTER TABLE synapse.tasks ENABLE ROW LEVEL SECURITY;
    EXECUTE format('CREATE POLICY tasks_of_visible_goals ON synapse.tasks USING (%s OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id))', sees_all);
    ALTER TABLE synapse.edges ENABLE ROW LEVEL SECURITY;
    EXECUTE format('CREATE POLICY edges_of_visible_goals ON synapse.edges USING (%s OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id))', sees_all);
    ALTER TABLE synapse.signals ENABLE ROW LEVEL SECURITY;
    EXECUTE format('CREATE POLICY signals_of_visible_goals ON synapse.signals USING (%s OR EXISTS (SELECT FROM synapse.goals AS g WHERE g.id = goal_id))', sees_all);
    ALTER TABLE synapse.attempts ENABLE ROW LEVEL SECURITY;
    EXECUTE format('CREATE POLICY attempts_of_visible_tasks ON synapse.attempts USING (%s OR EXISTS (SELECT FROM synapse.tasks AS t WHERE t.id = task_id))', sees_all);
END $$;

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

-- The roles with the worker or admin capability see every row, as the tables'
-- policies say; this policy says it to the planner. Bound to those roles by name,
-- it makes the row-security test of their statements a constant, which the
-- planner drops: without it each table a worker's statement reads carries the
-- policies' subplans, which every execution sets up again (about a fifth of a
-- chain step's Postgres time). Postgres plans again when a policy changes, so it is
-- re-created when that set of roles changes, and only then (creating a policy
-- takes an exclusive lock on its table): after every change of role_grants,
-- a restore's included (pg_dump keeps the table, not this policy).
CREATE FUNCTION synapse._bind_seeing_all() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    roles oid[];
    t text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT g.role::oid ORDER BY g.role::oid), '{}') INTO roles
      FROM synapse.role_grants AS g
     WHERE g.capability IN ('admin', 'worker') AND EXISTS (SELECT FROM pg_catalog.pg_roles AS r WHERE r.oid = g.role);
    FOREACH t IN ARRAY ARRAY['goals', 'tasks', 'edges', 'signals', 'attempts'] LOOP
        CONTINUE WHEN roles = coalesce(
            (SELECT array_agg(r ORDER BY r) FROM pg_catalog.pg_policy AS p, unnest(p.polroles) AS r
              WHERE p.polrelid = format('synapse.%I', t)::regclass AND p.polname = 'seeing_all'), '{}');
        EXECUTE format('DROP POLICY IF EXISTS seeing_all ON synapse.%I', t);
        IF roles <> '{}' THEN
            EXECUTE format('CREATE POLICY seeing_all ON synapse.%I TO %s USING (true)', t,
                           (SELECT string_agg(r::regrole::text, ', ') FROM unnest(roles) AS r));
        END IF;
    END LOOP;
END $$;

CREATE FUNCTION synapse._role_grants_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM synapse._bind_seeing_all();
    RETURN NULL;
END $$;
CREATE TRIGGER seeing_all_follows AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON synapse.role_grants
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._role_grants_changed();

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
            'synapse.submit_plans(jsonb, jsonb[], text[])',
        'synapse.plan_preview(text, jsonb, text)', 'synapse.cancel_goal(bigint)',
        'synapse.signal(bigint, text, jsonb)', 'synapse.retry_goal(bigint, text[])',
        'synapse.add_template(text, text, jsonb, text, integer)',
        'synapse.schedule(text, text, text, jsonb, text, text)', 'synapse.unschedule(text)',
        'synapse.replay_parked_events()', 'synapse.forwarder_status()',
        'synapse._install_plan(bigint, jsonb, text, jsonb)',
        'synapse._start_child(bigint, integer, text, text, jsonb, jsonb)', 'synapse._start_maps(bigint[])',
        'synapse._start_waits(jsonb)',
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
SELECT synapse._bind_seeing_all();

-- A forwarder that started before the extension existed sleeps until now.
SELECT synapse._wake_forwarder();
