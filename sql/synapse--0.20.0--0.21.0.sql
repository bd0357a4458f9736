-- 0.21.0: the roles with the worker or admin capability get a policy bound to
-- them by name, which spares their statements the row-security subplans.
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

REVOKE ALL ON FUNCTION synapse._bind_seeing_all(), synapse._role_grants_changed() FROM PUBLIC;
SELECT synapse._bind_seeing_all();
