-- 0.11.0 → 0.12.0: submit_plans(blueprint, inputs, idempotency_keys), many
-- goals of one blueprint in one call: the blueprint is validated once, and
-- every goal, task and edge is written by one statement each, as Graphile's
-- add_jobs or River's InsertMany do for jobs. Submitters may call it, like
-- submit_plan; it runs as the extension's owner, with a pinned search_path.
CREATE FUNCTION synapse."submit_plans"(
	"blueprint" jsonb, /* Option < JsonbArg > */
	"inputs" jsonb[], /* :: std :: option :: Option < Array < '_, JsonbArg > > */
	"idempotency_keys" TEXT[] DEFAULT NULL /* :: std :: option :: Option < Array < '_, & str > > */
) RETURNS bigint[] /* std :: result :: Result < Vec < i64 > , ErrorReport > */
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'submit_plans_wrapper';
ALTER FUNCTION synapse.submit_plans(jsonb, jsonb[], text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION synapse.submit_plans(jsonb, jsonb[], text[]) FROM PUBLIC;

-- Gives role exactly what its capabilities in role_grants allow, on every
-- object of the schema (after revoking what it had): the one place the
-- privileges of each capability are listed.
CREATE OR REPLACE FUNCTION synapse._apply_grants(role regrole) RETURNS void LANGUAGE plpgsql AS $$
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

-- What was granted is granted again, submit_plans with it.
SELECT synapse._apply_grants(g.role) FROM (SELECT DISTINCT role FROM synapse.role_grants) AS g;
