-- 0.14.0 → 0.15.0: a worker may queue and claim a step in one write, from
-- pending to running (local continuation: the step its own completion made
-- ready, for one of its free slots). The state machine that allows it is the
-- extension's library; this script updates what the columns say of it.
-- Workers of 0.15.0 need this release's library and refuse an older
-- extension; workers of 0.14.0 run on this one.
COMMENT ON COLUMN synapse.tasks.status IS 'pending: waiting for its inbound edges. queued: runnable, dispatched to Redis. running: claimed by a worker holding a lease (a step a worker claims for itself as its predecessor''s outcome makes it ready goes from pending to running in one write). retrying: failed, waits for run_at. waiting: a map step whose instances run, a goal step whose child goal runs, or a wait step waiting for its signal or time (no worker holds it). succeeded / failed / skipped / cancelled: finished.';
COMMENT ON COLUMN synapse.tasks.queued_at IS 'When the task was last queued or re-dispatched (a step queued and claimed in one write: its started_at); the sweep re-dispatches tasks queued longer than synapse.sweep_interval.';
