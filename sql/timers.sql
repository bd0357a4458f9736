-- The forwarder's timers. One call does all that is due and returns the
-- milliseconds until the next deadline (NULL: nothing scheduled, sleep until
-- an event wakes the forwarder).
CREATE FUNCTION synapse._run_timers(sweep_seconds integer) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    sweep constant interval := make_interval(secs => sweep_seconds);
    next_due timestamptz;
    redispatched bigint;
BEGIN
    -- Retries whose backoff elapsed become runnable.
    UPDATE synapse.tasks SET status = 'queued'
     WHERE status = 'retrying' AND run_at <= now();
    -- A lease that lapsed means the worker died or hung: run the task again. A
    -- worker that claims it with no attempt left fails it instead of running it.
    UPDATE synapse.tasks
       SET status = 'queued',
           error = format('lease of attempt %s expired (worker %s)', attempts, coalesce(leased_by, 'unknown'))
     WHERE status = 'running' AND lease_expires_at <= now();
    -- Safety net for lost Redis messages: dispatch long-queued work again.
    WITH stale AS (
        UPDATE synapse.tasks SET queued_at = now()
         WHERE status = 'queued' AND queued_at <= now() - sweep
        RETURNING goal_id, id, step, queue, attempts)
    SELECT synapse._emit(array_agg(
               synapse._task_event('task.queued', goal_id, id, step, queue, attempts + 1) ORDER BY id))
      INTO redispatched FROM stale;
    WITH stale AS (
        UPDATE synapse.goals SET dispatched_at = now()
         WHERE status = 'submitted' AND dispatched_at <= now() - sweep
        RETURNING id)
    SELECT redispatched + synapse._emit(array_agg(synapse._goal_event('goal.submitted', id) ORDER BY id))
      INTO redispatched FROM stale;
    SELECT least(
        (SELECT min(run_at) FROM synapse.tasks WHERE status = 'retrying'),
        (SELECT min(lease_expires_at) FROM synapse.tasks WHERE status = 'running'),
        (SELECT min(queued_at) FROM synapse.tasks WHERE status = 'queued') + sweep,
        (SELECT min(dispatched_at) FROM synapse.goals WHERE status = 'submitted') + sweep)
      INTO next_due;
    RETURN extract(epoch FROM next_due - clock_timestamp()) * 1000;
END $$;

-- A forwarder that started before the extension existed sleeps until now.
SELECT synapse._wake_forwarder();
