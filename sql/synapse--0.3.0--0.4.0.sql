-- 0.3.0 → 0.4.0: plans that grow. Map steps run once per item of a list
-- found at run time (their instances are task rows with map_index), loops run
-- a step until a condition holds, and joins "first" and n start a step
-- without waiting for every parent.

-- A step stays unique per goal, and each instance of a map step per index:
-- edges now hang off the goal, since a step's name no longer names one row.
ALTER TABLE synapse.edges DROP CONSTRAINT edges_goal_id_from_step_fkey,
                          DROP CONSTRAINT edges_goal_id_to_step_fkey;
ALTER TABLE synapse.tasks DROP CONSTRAINT tasks_goal_id_step_key;
ALTER TABLE synapse.edges ADD FOREIGN KEY (goal_id) REFERENCES synapse.goals (id) ON DELETE CASCADE;

ALTER TABLE synapse.tasks
    DROP CONSTRAINT tasks_status_check,
    ADD CONSTRAINT tasks_status_check CHECK (status IN ('pending', 'queued', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'skipped', 'cancelled')),
    DROP CONSTRAINT tasks_join_mode_check,
    ADD CONSTRAINT tasks_join_mode_check CHECK (join_mode ~ '^(any|all|first|[1-9][0-9]{0,4})$'),
    ADD COLUMN cancel_others    boolean     NOT NULL DEFAULT false,
    ADD COLUMN for_each_expr    text,
    ADD COLUMN max_parallel     integer     CHECK (max_parallel >= 1),
    ADD COLUMN tolerate         integer     NOT NULL DEFAULT 0 CHECK (tolerate >= 0),
    ADD COLUMN map_size         integer     CHECK (map_size >= 0),
    ADD COLUMN map_next         integer     CHECK (map_next >= 0),
    ADD COLUMN map_ended        integer     CHECK (map_ended >= 0),
    ADD COLUMN map_failed       integer     CHECK (map_failed >= 0),
    ADD COLUMN map_index        integer     CHECK (map_index >= 0),
    ADD COLUMN map_item         jsonb,
    ADD COLUMN until_expr       text,
    ADD COLUMN max_iterations   integer     CHECK (max_iterations BETWEEN 1 AND 1000),
    ADD COLUMN iteration        integer     CHECK (iteration >= 1),
    ADD COLUMN attempts_before  integer     NOT NULL DEFAULT 0 CHECK (attempts_before >= 0);
CREATE UNIQUE INDEX tasks_step ON synapse.tasks (goal_id, step, coalesce(map_index, -1));
ALTER TABLE synapse.tasks ADD COLUMN child_goal_id bigint;

-- Child goals: a goal step's attempt runs a goal of its own.
ALTER TABLE synapse.goals
    ADD COLUMN parent_goal_id  bigint      REFERENCES synapse.goals (id) ON DELETE CASCADE,
    ADD COLUMN parent_task_id  bigint,
    ADD COLUMN depth           integer     NOT NULL DEFAULT 0 CHECK (depth >= 0),
    ADD CONSTRAINT goals_parent_check CHECK ((parent_goal_id IS NULL) = (parent_task_id IS NULL));
CREATE INDEX goals_children ON synapse.goals (parent_goal_id) WHERE parent_goal_id IS NOT NULL;
INSERT INTO synapse.actions (name, description, builtin) VALUES
    ('goal', 'Runs a child goal (params.goal, planned by params.planner, or params.blueprint) with the input; ends with it.', true)
ON CONFLICT (name) DO UPDATE SET description = excluded.description, builtin = true;
COMMENT ON COLUMN synapse.tasks.join_mode IS 'any: once every inbound edge resolved, runs if at least one was taken. all: runs only if every inbound edge was taken. first / n: runs as soon as 1 / n inbound edges are taken; skipped as soon as that can no longer happen.';
COMMENT ON COLUMN synapse.tasks.status IS 'pending: waiting for its inbound edges. queued: runnable, dispatched to Redis. running: claimed by a worker holding a lease. retrying: failed, waits for run_at. waiting: a map step whose instances run, or a goal step whose child goal runs (no worker holds it). succeeded / failed / skipped / cancelled: finished.';
COMMENT ON COLUMN synapse.tasks.pending_inbound IS 'Inbound edges not resolved yet: the engine decides the step when it reaches 0 (join first or n: at every resolution).';
COMMENT ON COLUMN synapse.tasks.cancel_others IS 'join first or n: when the step starts, its direct parents that have not ended are cancelled.';
COMMENT ON COLUMN synapse.tasks.for_each_expr IS 'Map step: CEL list evaluated when the step would run; the step then runs once per item, as instances (rows with map_index).';
COMMENT ON COLUMN synapse.tasks.max_parallel IS 'Map step: most instances queued or running at once (NULL: no bound).';
COMMENT ON COLUMN synapse.tasks.tolerate IS 'Map step: instances that may fail with the step still succeeding.';
COMMENT ON COLUMN synapse.tasks.map_size IS 'Map step: number of instances (set when it starts).';
COMMENT ON COLUMN synapse.tasks.map_next IS 'Map step: index of the next instance to queue; those from here on wait for max_parallel.';
COMMENT ON COLUMN synapse.tasks.map_ended IS 'Map step: instances ended so far.';
COMMENT ON COLUMN synapse.tasks.map_failed IS 'Map step: instances failed so far.';
COMMENT ON COLUMN synapse.tasks.map_index IS 'Instance of a map step: its index in the for_each list (NULL for a step).';
COMMENT ON COLUMN synapse.tasks.map_item IS 'Instance of a map step: its item, when the step''s input is not the item itself.';
COMMENT ON COLUMN synapse.tasks.until_expr IS 'Loop: CEL over result; the step runs again until it holds.';
COMMENT ON COLUMN synapse.tasks.max_iterations IS 'Loop: most runs; the step fails after them if until never held.';
COMMENT ON COLUMN synapse.tasks.iteration IS 'Loop: the current run, 1 for the first.';
COMMENT ON COLUMN synapse.tasks.child_goal_id IS 'A goal step: the child goal its current attempt waits for.';
COMMENT ON COLUMN synapse.tasks.attempts_before IS 'Loop: attempts spent by earlier iterations (each iteration has its own retries; attempts keeps counting, as the fencing token).';
COMMENT ON COLUMN synapse.goals.parent_goal_id IS 'A child goal: the goal whose goal step started it (cancelling that goal cancels this one).';
COMMENT ON COLUMN synapse.goals.parent_task_id IS 'A child goal: the task of the goal step (or of its map instance) that waits for it.';
COMMENT ON COLUMN synapse.goals.depth IS 'How many parents the goal has (0 for a goal submitted directly); at most synapse.max_depth.';

-- Events of an instance carry its index; a map step waits while its
-- instances run.
DROP FUNCTION synapse._task_event(text, bigint, bigint, text, text, integer, timestamptz, boolean);
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

CREATE OR REPLACE FUNCTION synapse._task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND synapse._restoring() THEN
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'queued') THEN
            RAISE EXCEPTION 'a new task cannot start as %', NEW.status USING ERRCODE = '22023';
        END IF;
    ELSIF NOT (CASE OLD.status
            -- Only a map step waits for its instances, or succeeds unrun (an empty list).
            WHEN 'pending'  THEN NEW.status IN ('queued', 'skipped', 'failed', 'cancelled')
                                 OR (NEW.status IN ('waiting', 'succeeded') AND NEW.for_each_expr IS NOT NULL)
            WHEN 'queued'   THEN NEW.status IN ('running', 'cancelled')
            -- A goal step waits for its child goal, and retries with a new one.
            WHEN 'running'  THEN NEW.status IN ('succeeded', 'failed', 'retrying', 'queued', 'cancelled')
                                 OR (NEW.status = 'waiting' AND NEW.child_goal_id IS NOT NULL)
            WHEN 'retrying' THEN NEW.status IN ('queued', 'cancelled')
            WHEN 'waiting'  THEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                                 OR (NEW.status = 'retrying' AND NEW.child_goal_id IS NOT NULL)
            ELSE false END) THEN
        RAISE EXCEPTION 'task % (step %): status cannot change from % to %', NEW.id, NEW.step, OLD.status, NEW.status
            USING ERRCODE = '55000';
    END IF;
    IF NEW.status = 'queued' THEN
        NEW.queued_at := now();
        NEW.run_at := NULL;
    ELSIF NEW.status IN ('running', 'waiting') THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        NEW.finished_at := now();
    END IF;
    IF NEW.status <> 'running' THEN
        NEW.lease_expires_at := NULL;
        NEW.leased_by := NULL;
    END IF;
    RETURN NEW;
END $$;

-- A child goal's end reaches the queue of the step that waits for it.
DROP FUNCTION synapse._goal_event(text, bigint);
CREATE FUNCTION synapse._goal_event(event text, goal_id bigint, parent_task_id bigint DEFAULT NULL,
                                    parent_queue text DEFAULT NULL)
RETURNS synapse._event LANGUAGE sql STABLE AS $$
    SELECT ROW(event, goal_id, NULL,
               CASE WHEN event = 'goal.submitted' THEN 'planner'
                    WHEN parent_queue IS NOT NULL THEN 'queue:' || parent_queue END,
               format('{"v":1,"event":%s,"goal_id":%s%s}', to_json(event), goal_id,
                      ',"parent_task_id":' || parent_task_id),
               NULL)::synapse._event;
$$;

CREATE OR REPLACE FUNCTION synapse._goals_written() RETURNS trigger LANGUAGE plpgsql AS $$
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
                            THEN (SELECT p.queue FROM synapse.tasks p WHERE p.id = g.parent_task_id) END)
              FROM new_goals g JOIN old_goals o ON o.id = g.id
             WHERE o.status IS DISTINCT FROM g.status AND g.status <> 'planning'
             ORDER BY g.id));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION synapse._tasks_written() RETURNS trigger LANGUAGE plpgsql AS $$
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
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at END,
                       -- The last attempt's lease lapsed (the forwarder failed it), or a
                       -- root map step's list was empty when its plan was installed: no
                       -- worker is there to resolve its edges, so one is asked to.
                       (t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
                       OR (t.status = 'succeeded' AND o.status = 'pending' AND t.for_each_expr IS NOT NULL),
                       t.map_index)
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status
             ORDER BY t.id));
    ELSE
        EXECUTE $q$
            SELECT array(
            SELECT synapse._task_event('task.' || t.status, t.goal_id, t.id, t.step, t.queue,
                       CASE WHEN t.status = 'queued' THEN t.attempts + 1 ELSE t.attempts END,
                       CASE t.status WHEN 'running' THEN t.lease_expires_at WHEN 'retrying' THEN t.run_at END,
                       (t.status = 'failed' AND o.status = 'running' AND o.lease_expires_at <= now())
                       OR (t.status = 'succeeded' AND o.status = 'pending' AND t.for_each_expr IS NOT NULL),
                       t.map_index)
              FROM new_tasks t JOIN old_tasks o ON o.id = t.id
             WHERE o.status IS DISTINCT FROM t.status
             ORDER BY t.id)
        $q$ INTO events;
        PERFORM synapse._emit(events);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION synapse._sweep(lists text[], sweep_seconds integer, batch integer DEFAULT 10000)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    sweep constant interval := make_interval(secs => sweep_seconds);
    tasks bigint;
    goals bigint;
BEGIN
    WITH stale AS (
        UPDATE synapse.tasks t SET queued_at = now()
          FROM (SELECT id FROM synapse.tasks
                 WHERE status = 'queued' AND queued_at <= now() - sweep AND 'queue:' || queue = ANY (lists)
                 ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED) s
         WHERE t.id = s.id
        RETURNING t.goal_id, t.id, t.step, t.queue, t.attempts, t.map_index)
    SELECT synapse._emit(array_agg(
               synapse._task_event('task.queued', goal_id, id, step, queue, attempts + 1, map_index => map_index)
               ORDER BY id))
      INTO tasks FROM stale;
    goals := 0;
    IF 'planner' = ANY (lists) THEN
        WITH stale AS (
            UPDATE synapse.goals g SET dispatched_at = now()
              FROM (SELECT id FROM synapse.goals
                     WHERE status = 'submitted' AND dispatched_at <= now() - sweep
                     ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED) s
             WHERE g.id = s.id
            RETURNING g.id)
        SELECT synapse._emit(array_agg(synapse._goal_event('goal.submitted', id) ORDER BY id))
          INTO goals FROM stale;
    END IF;
    RETURN tasks + goals;
END $$;

-- goal_status lists a map step once, with its instances, and a loop with its
-- iteration; cancel_goal cancels waiting map steps too.
CREATE OR REPLACE FUNCTION synapse.goal_status(goal_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    status jsonb;
BEGIN
    SELECT jsonb_build_object(
        'id', g.id, 'goal', g.goal, 'status', g.status, 'error', g.error, 'result', g.result,
        'planner', g.planner, 'template', g.template, 'input', g.input, 'params', g.params,
        'created_at', g.created_at, 'started_at', g.started_at, 'finished_at', g.finished_at,
        'parent', CASE WHEN g.parent_goal_id IS NOT NULL THEN jsonb_build_object(
                      'goal_id', g.parent_goal_id,
                      'step', (SELECT p.step FROM synapse.tasks AS p WHERE p.id = g.parent_task_id),
                      'index', (SELECT p.map_index FROM synapse.tasks AS p WHERE p.id = g.parent_task_id))
                  END,
        'depth', g.depth,
        'tasks', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'step', t.step, 'action', t.action, 'status', t.status, 'attempts', t.attempts,
                       'result', t.result, 'error', t.error, 'failure_kind', t.failure_kind,
                       'started_at', t.started_at,
                       'finished_at', t.finished_at, 'queue', t.queue, 'run_at', t.run_at,
                       'attempts_history', coalesce((
                           SELECT jsonb_agg(jsonb_build_object(
                                      'attempt', a.attempt, 'worker', a.worker, 'started_at', a.started_at,
                                      'finished_at', a.finished_at, 'error', a.error)
                                  ORDER BY a.finished_at, a.attempt)
                             FROM synapse.attempts AS a WHERE a.task_id = t.id), '[]'))
                   -- A map step once, with its instances; a loop with its iteration.
                   || CASE WHEN t.for_each_expr IS NOT NULL THEN jsonb_build_object(
                          'for_each', t.for_each_expr, 'size', t.map_size, 'ended', t.map_ended,
                          'failed', t.map_failed,
                          'instances', coalesce((
                              SELECT jsonb_agg(jsonb_build_object(
                                         'index', i.map_index, 'status', i.status, 'attempts', i.attempts,
                                         'result', i.result, 'error', i.error, 'started_at', i.started_at,
                                         'finished_at', i.finished_at)
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

CREATE OR REPLACE FUNCTION synapse.cancel_goal(goal_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    SELECT g.status INTO current_status FROM synapse.goals AS g WHERE g.id = cancel_goal.goal_id FOR UPDATE;
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

-- Starts the map steps the engine decided to run.
CREATE FUNCTION synapse."_start_maps"(
	"task_ids" bigint[] /* Vec < i64 > */
) RETURNS TABLE (
	"task_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"error" TEXT  /* Option < String > */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'start_maps_wrapper';

-- Starts the child goal of a goal step's attempt.
CREATE FUNCTION synapse."_start_child"(
	"task_id" bigint, /* i64 */
	"attempt" INT, /* i32 */
	"goal" TEXT, /* Option < & str > */
	"planner" TEXT, /* Option < & str > */
	"blueprint" jsonb, /* Option < JsonbArg > */
	"input" jsonb /* JsonbArg */
) RETURNS bigint /* std :: result :: Result < Option < i64 > , pgrx :: pg_sys :: panic ::
ErrorReport > */

LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'start_child_wrapper';
