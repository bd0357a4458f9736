-- The part of the SQL API that is plain SQL. The rest (submit_plan,
-- validate_blueprint, add_template, goal_graph, forwarder_status) is Rust.

-- submit_goal for owner: the caller's, or a schedule's.
CREATE FUNCTION synapse._submit_goal(goal text, input jsonb, planner text, idempotency_key text, owner regrole)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    IF goal IS NULL OR btrim(goal) = '' THEN
        RAISE EXCEPTION 'goal must be a non-empty text' USING ERRCODE = '22023';
    END IF;
    IF length(goal) > 10000 THEN
        RAISE EXCEPTION 'goal is % characters; the limit is 10000', length(goal) USING ERRCODE = '22023';
    END IF;
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must be JSON, not NULL (use ''{}'')' USING ERRCODE = '22023';
    END IF;
    -- 1 MiB of JSON text and 64 levels of nesting (SQLSTATE 54000), checked on
    -- the jsonb value before anything parses it.
    PERFORM synapse._check_json(_submit_goal.input, 'input');
    IF planner IS NULL OR planner !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'planner must be a planner name like ''template'', got %', coalesce(quote_literal(planner), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO synapse.goals AS g (goal, input, planner, idempotency_key, owner)
    VALUES (_submit_goal.goal, _submit_goal.input, _submit_goal.planner, _submit_goal.idempotency_key,
            _submit_goal.owner)
    ON CONFLICT ON CONSTRAINT goals_owner_idempotency_key_key DO NOTHING
    RETURNING g.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT g.id INTO new_id FROM synapse.goals AS g
         WHERE g.owner = _submit_goal.owner AND g.idempotency_key = _submit_goal.idempotency_key;
    END IF;
    RETURN new_id;
END $$;

CREATE FUNCTION synapse.submit_goal(
    goal text,
    input jsonb DEFAULT '{}',
    planner text DEFAULT 'template',
    idempotency_key text DEFAULT NULL
) RETURNS bigint LANGUAGE sql AS $$
    SELECT synapse._submit_goal(goal, input, planner, idempotency_key, synapse._caller())
$$;
COMMENT ON FUNCTION synapse.submit_goal(text, jsonb, text, text) IS 'Records a goal for a planner; returns its id. The same idempotency key (per owner) returns the same id.';

CREATE FUNCTION synapse.goal_status(goal_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    status jsonb;
    -- The answer is one JSON value, which holds 256 MB at most: the tasks'
    -- largest results are left out (result_omitted) until the others, with
    -- the goal's, hold 192 MB.
    omitted bigint[];
BEGIN
    SELECT coalesce(array_agg(r.id), '{}') INTO omitted
      FROM (SELECT t.id, sum(pg_column_size(t.result || '[]'::jsonb)) OVER (ORDER BY pg_column_size(t.result || '[]'::jsonb), t.id)
                         + (SELECT coalesce(pg_column_size(g.result || '[]'::jsonb), 0)
                              FROM synapse.goals AS g WHERE g.id = goal_status.goal_id) AS held
              FROM synapse.tasks AS t
             WHERE t.goal_id = goal_status.goal_id AND t.result IS NOT NULL) AS r
     WHERE r.held > 201326592;
    SELECT jsonb_build_object(
        'id', g.id, 'goal', g.goal, 'status', g.status, 'error', g.error, 'result', g.result,
        'planner', g.planner, 'template', g.template, 'input', g.input, 'params', g.params,
        'created_at', g.created_at, 'started_at', g.started_at, 'finished_at', g.finished_at,
        'parent', CASE WHEN g.parent_goal_id IS NOT NULL THEN jsonb_build_object(
                      'goal_id', g.parent_goal_id,
                      'step', (SELECT p.step FROM synapse.tasks AS p WHERE p.id = g.parent_task_id),
                      'index', (SELECT p.map_index FROM synapse.tasks AS p WHERE p.id = g.parent_task_id))
                  END,
        'depth', g.depth, 'owner', g.owner,
        'tasks', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'step', t.step, 'action', t.action, 'status', t.status, 'attempts', t.attempts,
                       'result', CASE WHEN t.id <> ALL (omitted) THEN t.result END, 'error', t.error,
                       'failure_kind', t.failure_kind,
                       'started_at', t.started_at,
                       'finished_at', t.finished_at, 'queue', t.queue, 'run_at', t.run_at,
                       'attempts_history', coalesce((
                           SELECT jsonb_agg(jsonb_build_object(
                                      'attempt', a.attempt, 'worker', a.worker, 'started_at', a.started_at,
                                      'finished_at', a.finished_at, 'error', a.error)
                                  ORDER BY a.finished_at, a.attempt)
                             FROM synapse.attempts AS a WHERE a.task_id = t.id), '[]'))
                   || CASE WHEN t.id = ANY (omitted) THEN '{"result_omitted": true}'::jsonb ELSE '{}' END
                   -- A map step once, with its instances; a loop with its iteration.
                   || CASE WHEN t.for_each_expr IS NOT NULL THEN jsonb_build_object(
                          'for_each', t.for_each_expr, 'size', t.map_size, 'ended', t.map_ended,
                          'failed', t.map_failed,
                          'instances', coalesce((
                              SELECT jsonb_agg(jsonb_build_object(
                                         'index', i.map_index, 'status', i.status, 'attempts', i.attempts,
                                         'result', CASE WHEN i.id <> ALL (omitted) THEN i.result END,
                                         'error', i.error, 'started_at', i.started_at,
                                         'finished_at', i.finished_at)
                                     || CASE WHEN i.id = ANY (omitted) THEN '{"result_omitted": true}'::jsonb
                                             ELSE '{}' END
                                     || CASE WHEN i.child_goal_id IS NOT NULL
                                             THEN jsonb_build_object('child_goal_id', i.child_goal_id)
                                             ELSE '{}' END
                                     ORDER BY i.map_index)
                                FROM synapse.tasks AS i
                               WHERE i.goal_id = t.goal_id AND i.step = t.step AND i.map_index IS NOT NULL), '[]'))
                      ELSE '{}' END
                   || CASE WHEN t.child_goal_id IS NOT NULL
                           THEN jsonb_build_object('child_goal_id', t.child_goal_id) ELSE '{}' END
                   || CASE WHEN t.until_expr IS NOT NULL THEN jsonb_build_object(
                          'until', t.until_expr, 'iteration', t.iteration,
                          'max_iterations', t.max_iterations)
                      ELSE '{}' END
                   ORDER BY t.id)
              FROM synapse.tasks AS t WHERE t.goal_id = g.id AND t.map_index IS NULL), '[]'),
        -- Signals delivered to the goal: taken by a wait step, or kept for one.
        'signals', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'name', s.name, 'payload', s.payload, 'sent_at', s.sent_at, 'taken_at', s.taken_at,
                       'taken_by', (SELECT w.step FROM synapse.tasks AS w WHERE w.id = s.taken_by))
                   ORDER BY s.id)
              FROM synapse.signals AS s WHERE s.goal_id = g.id), '[]'),
        'edges', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'from', e.from_step, 'to', e.to_step, 'when', e.when_expr, 'on', e.on_outcome,
                       'state', e.state, 'error', e.error)
                   ORDER BY e.position)
              FROM synapse.edges AS e WHERE e.goal_id = g.id), '[]'),
        -- Work nothing will run: queued (or retrying) tasks of a queue no live
        -- worker serves, a goal waiting for a planner while no worker is live.
        -- Live: started, not stopped, and not lost (a lease of it lapsed)
        -- unless seen since (see synapse.workers).
        'notes', coalesce((
            SELECT jsonb_agg(n.note ORDER BY n.note)
              FROM (SELECT format('queue %s: no worker', q.queue) AS note
                      FROM (SELECT DISTINCT t.queue FROM synapse.tasks AS t
                             WHERE t.goal_id = g.id AND t.status IN ('queued', 'retrying')) AS q
                     WHERE NOT EXISTS (SELECT FROM synapse.workers AS w
                                        WHERE q.queue = ANY (w.queues) AND w.stopped_at IS NULL
                                          AND (w.lost_at IS NULL OR w.last_seen_at > w.lost_at))
                    UNION ALL
                    SELECT 'planner: no worker'
                     WHERE g.status = 'submitted'
                       AND NOT EXISTS (SELECT FROM synapse.workers AS w
                                        WHERE w.stopped_at IS NULL
                                          AND (w.lost_at IS NULL OR w.last_seen_at > w.lost_at))) AS n), '[]'))
      INTO status
      FROM synapse.goals AS g
     WHERE g.id = goal_status.goal_id;
    IF status IS NULL THEN
        RAISE EXCEPTION 'goal % does not exist', goal_status.goal_id USING ERRCODE = 'P0002';
    END IF;
    RETURN status;
END $$;
COMMENT ON FUNCTION synapse.goal_status(bigint) IS 'The goal, its tasks (with their failed attempts) and its edges (with how each resolved) as JSON, and notes on work no live worker serves; past 192 MB of results, the largest are left out (result_omitted).';

CREATE FUNCTION synapse.cancel_goal(goal_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    -- The goal to itself: its gate closed first, so that engine runs still to
    -- come wait behind this cancel, then its row, once the runs in flight
    -- (which share it) have ended.
    PERFORM synapse._hold_goal(cancel_goal.goal_id);
    SELECT g.status INTO current_status FROM synapse.goals AS g
     WHERE g.id = cancel_goal.goal_id AND synapse._may_act_on(g.owner) FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'goal % does not exist', cancel_goal.goal_id USING ERRCODE = 'P0002';
    END IF;
    IF current_status IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN false;
    END IF;
    -- Lock order, as everywhere: the goal row (above), then its task rows in id
    -- order. Running tasks are marked too: their worker sees it at its next
    -- heartbeat and stops. The edges out of every cancelled step resolve, not
    -- taken (SPEC §4 rule 2), so why each step did not run stays answerable.
    WITH cancelled AS (
        UPDATE synapse.tasks AS t SET status = 'cancelled', error = 'goal cancelled'
          FROM (SELECT u.id FROM synapse.tasks AS u
                 WHERE u.goal_id = cancel_goal.goal_id AND u.status IN ('pending', 'queued', 'running', 'retrying', 'waiting')
                 ORDER BY u.id FOR UPDATE) AS open
         WHERE t.id = open.id
        RETURNING t.step)
    UPDATE synapse.edges AS e SET state = 'not_taken', resolved_at = now()
      FROM (SELECT DISTINCT step FROM cancelled) AS c
     WHERE e.goal_id = cancel_goal.goal_id AND e.from_step = c.step AND e.state = 'pending';
    UPDATE synapse.goals AS g SET status = 'cancelled', error = 'cancelled by ' || session_user
     WHERE g.id = cancel_goal.goal_id;
    -- Child goals go with their parent (children have higher ids: the lock
    -- order holds).
    PERFORM synapse.cancel_goal(c.id)
       FROM synapse.goals AS c
      WHERE c.parent_goal_id = cancel_goal.goal_id AND c.status IN ('submitted', 'planning', 'running')
      ORDER BY c.id;
    RETURN true;
END $$;
COMMENT ON FUNCTION synapse.cancel_goal(bigint) IS 'Cancels what has not finished; false if the goal had already finished.';
