-- The forwarder's timers. Each call does what is due, in bounded batches, and
-- never waits on a row lock: a row someone holds is skipped and taken at the
-- next turn. The forwarder runs them in READ COMMITTED, catches every error
-- and retries with a pause.

-- Moves due retries to queued, re-queues tasks whose lease lapsed (or fails
-- them when no attempt is left), ends the waits whose time came, submits the
-- scheduled goals that are due and deletes goals finished longer ago than
-- retention_seconds (0: never). Returns how many rows it changed, and when
-- the next of these deadlines comes (NULL: none; sleep until an event).
CREATE FUNCTION synapse._run_timers(retention_seconds integer, batch integer DEFAULT 1000,
                                    OUT changed bigint, OUT next_due timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    changed := 0;
    -- Retries whose backoff elapsed become runnable.
    UPDATE synapse.tasks t SET status = 'queued'
      FROM (SELECT id FROM synapse.tasks WHERE status = 'retrying' AND run_at <= now()
             ORDER BY run_at LIMIT batch FOR UPDATE SKIP LOCKED) due
     WHERE t.id = due.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    -- A lease that lapsed means the worker died or hung: run the task again if
    -- an attempt is left, else fail it (attempts unchanged) saying so. Either
    -- way the attempt is kept in synapse.attempts, and the worker counts as
    -- lost until it is seen again (a heartbeat) or restarts.
    WITH lapsed AS (
        SELECT id, leased_by FROM synapse.tasks WHERE status = 'running' AND lease_expires_at <= now()
         ORDER BY lease_expires_at LIMIT batch FOR UPDATE SKIP LOCKED),
    moved AS (
        UPDATE synapse.tasks t
           SET status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'failed' END,
               error = format('lease of attempt %s expired: worker %s stopped responding; '
                              'whatever the step did may or may not have happened; %s',
                              t.attempts, coalesce(t.leased_by, 'unknown'),
                              CASE WHEN t.attempts < t.max_attempts THEN 'it runs again' ELSE 'no attempt left' END)
          FROM lapsed
         WHERE t.id = lapsed.id
        RETURNING t.id, t.attempts, lapsed.leased_by, t.started_at, t.error),
    lost AS (
        UPDATE synapse.workers w SET lost_at = now()
          FROM (SELECT identity FROM synapse.workers
                 WHERE identity IN (SELECT leased_by FROM moved) FOR UPDATE SKIP LOCKED) l
         WHERE w.identity = l.identity)
    INSERT INTO synapse.attempts (task_id, attempt, worker, started_at, error)
    SELECT id, attempts, leased_by, started_at, error FROM moved;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    -- Waits whose time came: a `for` or `until` wait succeeds, a signal wait
    -- times out (an action failure, so that `on: failure` edges handle it).
    -- Their events ask a worker to resolve the steps' edges (events.sql).
    UPDATE synapse.tasks t
       SET status = CASE WHEN t.params ? 'signal' THEN 'failed' ELSE 'succeeded' END,
           result = CASE WHEN t.params ? 'signal' THEN NULL ELSE jsonb_build_object('woke_at', now()) END,
           error = CASE WHEN t.params ? 'signal'
                        THEN format('timed out after %s waiting for signal "%s"', t.params ->> 'timeout',
                                    t.params ->> 'signal') END,
           failure_kind = CASE WHEN t.params ? 'signal' THEN 'action' END
      FROM (SELECT id FROM synapse.tasks WHERE status = 'waiting' AND run_at <= now()
             ORDER BY run_at LIMIT batch FOR UPDATE SKIP LOCKED) due
     WHERE t.id = due.id AND t.action = 'wait';
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    changed := changed + synapse._run_schedules(batch);
    -- Retention: whole goals, with their tasks and edges (ON DELETE CASCADE).
    IF retention_seconds > 0 THEN
        DELETE FROM synapse.goals g
         USING (SELECT id FROM synapse.goals
                 WHERE finished_at < now() - make_interval(secs => retention_seconds)
                 ORDER BY finished_at LIMIT greatest(batch / 10, 1) FOR UPDATE SKIP LOCKED) old
         WHERE g.id = old.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := changed + n;
    END IF;
    SELECT least(
        (SELECT min(run_at) FROM synapse.tasks WHERE status = 'retrying'),
        (SELECT min(lease_expires_at) FROM synapse.tasks WHERE status = 'running'),
        (SELECT min(run_at) FROM synapse.tasks WHERE status = 'waiting' AND run_at IS NOT NULL),
        (SELECT min(next_run_at) FROM synapse.schedules),
        CASE WHEN retention_seconds > 0 THEN
            (SELECT min(finished_at) FROM synapse.goals WHERE finished_at IS NOT NULL)
                + make_interval(secs => retention_seconds) END)
      INTO next_due;
END $$;

-- The sweep, a safety net for lost Redis messages (a flushed Redis, a worker
-- killed between popping and claiming). Redis lists that may have lost work:
-- those with a task queued (or, for 'planner', a goal submitted) for longer
-- than sweep_seconds. The forwarder asks Redis which of them are empty and
-- re-dispatches only for those: work whose message still waits in Redis (a
-- queue nobody consumes) stays one message. The forwarder sweeps only right
-- after the outbox was drained, so no dispatch is still owed by the outbox.
CREATE FUNCTION synapse._sweep_candidates(sweep_seconds integer, OUT list text, OUT stale bigint)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT 'queue:' || queue, count(*) FROM synapse.tasks
     WHERE status = 'queued' AND queued_at <= now() - make_interval(secs => sweep_seconds)
     GROUP BY queue
    UNION ALL
    SELECT 'planner', count(*) FROM synapse.goals
     WHERE status = 'submitted' AND dispatched_at <= now() - make_interval(secs => sweep_seconds)
    HAVING count(*) > 0
$$;

-- Dispatches again the work of `lists` queued longer than sweep_seconds;
-- returns how many messages that makes.
CREATE FUNCTION synapse._sweep(lists text[], sweep_seconds integer, batch integer DEFAULT 10000)
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

-- When the sweep is next due: the oldest queued task or submitted goal plus
-- sweep_seconds (NULL: nothing waits).
CREATE FUNCTION synapse._sweep_due(sweep_seconds integer) RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT least((SELECT min(queued_at) FROM synapse.tasks WHERE status = 'queued'),
                 (SELECT min(dispatched_at) FROM synapse.goals WHERE status = 'submitted'))
           + make_interval(secs => sweep_seconds)
$$;

-- Sends the events Redis refused too often (synapse.outbox_parked) again,
-- e.g. after the key that refused them was fixed; returns how many.
CREATE FUNCTION synapse.replay_parked_events() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    -- The transaction id first, then outbox ids (see synapse._emit).
    PERFORM pg_current_xact_id();
    WITH parked AS (DELETE FROM synapse.outbox_parked RETURNING *),
         replayed AS (
             INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, streamed, created_at, events)
             SELECT event, goal_id, task_id, dispatch, payload, streamed, created_at, events FROM parked ORDER BY id
             RETURNING events)
    SELECT coalesce(sum(events), 0) INTO n FROM replayed;
    RETURN n;
END $$;
COMMENT ON FUNCTION synapse.replay_parked_events() IS 'Sends the events Redis refused too often (synapse.outbox_parked) again; returns how many.';
