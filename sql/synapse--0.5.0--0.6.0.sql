-- 0.5.0 → 0.6.0: admins and workers read and write without row security's
-- per-statement work: a policy of their own that is simply true, kept in step
-- with their capabilities.

-- Admins and workers see every row. The policies above let them too, but
-- at a price in each of their statements (an InitPlan calling _sees_all, a
-- filter per row); a policy of their own that is simply true lets the
-- planner fold the whole test away. A policy names at least one role, so it
-- exists only while a role has one of these capabilities; it changes only
-- when their set does (altering a policy locks its table).
CREATE FUNCTION synapse._apply_see_all_policies() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    roles oid[];
    t text;
    policy text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT g.role::oid ORDER BY g.role::oid), '{}') INTO roles
      FROM synapse.role_grants AS g
     WHERE g.capability IN ('admin', 'worker')
       AND EXISTS (SELECT FROM pg_catalog.pg_roles AS r WHERE r.oid = g.role);
    FOREACH t IN ARRAY ARRAY['goals', 'tasks', 'edges', 'signals', 'attempts'] LOOP
        policy := t || '_of_admins_and_workers';
        CONTINUE WHEN roles = coalesce((
            SELECT array(SELECT unnest(p.polroles) ORDER BY 1) FROM pg_catalog.pg_policy AS p
             WHERE p.polrelid = ('synapse.' || t)::regclass AND p.polname = policy), '{}');
        EXECUTE format('DROP POLICY IF EXISTS %I ON synapse.%I', policy, t);
        IF roles <> '{}' THEN
            EXECUTE format('CREATE POLICY %I ON synapse.%I TO %s USING (true)', policy, t,
                           (SELECT string_agg(r::regrole::text, ', ') FROM unnest(roles) AS r));
        END IF;
    END LOOP;
END $$;

-- Whatever changes the capabilities (grant_*, revoke_*, and a restore's COPY
-- of role_grants, which pg_dump dumps without the policies) keeps them in step.
CREATE FUNCTION synapse._role_grants_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM synapse._apply_see_all_policies();
    RETURN NULL;
END $$;
CREATE TRIGGER role_grants_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON synapse.role_grants
    FOR EACH STATEMENT EXECUTE FUNCTION synapse._role_grants_changed();

REVOKE ALL ON FUNCTION synapse._apply_see_all_policies(), synapse._role_grants_changed() FROM PUBLIC;
SELECT synapse._apply_see_all_policies();
