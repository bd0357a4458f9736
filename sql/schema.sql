-- Synapse schema: goals, the tasks and edges they are planned into, planner
-- templates, the action catalogue, and the outbox the forwarder drains.
--
-- Every state change of a goal or task goes through the BEFORE triggers below:
-- they reject transitions that are not in the state machine, keep the
-- timestamps honest, and record every change in the outbox (plus an optional
-- NOTIFY). Users read these tables; they change them only through the API.

-- The role a call of the API acts for: the role set with SET ROLE, else
-- the session's. Unlike current_user it stays the caller's inside the API's
-- SECURITY DEFINER functions, which run as the extension's owner.
CREATE FUNCTION synapse._caller() RETURNS regrole LANGUAGE sql STABLE AS $$
    SELECT CASE current_setting('role') WHEN 'none' THEN session_user ELSE current_setting('role') END::regrole
$$;

-- The states and the counters are domains, not column checks: Postgres reads
-- a table's check constraints again at every INSERT or UPDATE statement
-- (every SPI call of submit_plan), while a domain's check is kept with the
-- type, read once per session. The checks that tie columns together stay on
-- the tables.
CREATE DOMAIN synapse.goal_state AS text
    CHECK (VALUE IN ('submitted', 'planning', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE DOMAIN synapse.task_state AS text
    CHECK (VALUE IN ('pending', 'queued', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'skipped', 'cancelled'));
CREATE DOMAIN synapse.edge_on AS text CHECK (VALUE IN ('success', 'failure', 'always'));
CREATE DOMAIN synapse.edge_state AS text CHECK (VALUE IN ('pending', 'taken', 'not_taken', 'error'));
CREATE DOMAIN synapse.non_negative AS integer CHECK (VALUE >= 0);
CREATE DOMAIN synapse.positive AS integer CHECK (VALUE >= 1);
CREATE DOMAIN synapse.positive_ms AS bigint CHECK (VALUE > 0);
CREATE DOMAIN synapse.goal_text AS text CHECK (length(VALUE) BETWEEN 1 AND 10000);
-- Checked at every task row written: the length apart, as a bounded repetition
-- ({0,62}) makes Postgres's regular expression several times slower a match.
CREATE DOMAIN synapse.step_id AS text CHECK (VALUE ~ '^[a-z][a-z0-9_]*$' AND length(VALUE) <= 63);
CREATE DOMAIN synapse.join_mode AS text CHECK (VALUE ~ '^(any|all|first|[1-9][0-9]{0,4})$');
CREATE DOMAIN synapse.attempt_limit AS integer CHECK (VALUE BETWEEN 1 AND 101);
CREATE DOMAIN synapse.iteration_limit AS integer CHECK (VALUE BETWEEN 1 AND 1000);
CREATE DOMAIN synapse.failure_kind AS text CHECK (VALUE IN ('action', 'definition'));
COMMENT ON DOMAIN synapse.goal_state IS 'A goal''s state (see synapse.goals.status).';
COMMENT ON DOMAIN synapse.task_state IS 'A task''s state (see synapse.tasks.status).';
COMMENT ON DOMAIN synapse.edge_on IS 'The outcomes an edge follows.';
COMMENT ON DOMAIN synapse.edge_state IS 'How an edge resolved.';
COMMENT ON DOMAIN synapse.non_negative IS 'A count or index, 0 or more.';
COMMENT ON DOMAIN synapse.positive IS 'A number from 1.';
COMMENT ON DOMAIN synapse.positive_ms IS 'A duration in milliseconds, more than 0.';
COMMENT ON DOMAIN synapse.goal_text IS 'A goal''s text: 1 to 10 000 characters.';
COMMENT ON DOMAIN synapse.step_id IS 'A step id: lowercase letters, digits and _, from a letter, at most 63.';
COMMENT ON DOMAIN synapse.join_mode IS 'How a step joins its inbound edges: any, all, first, or how many (1 to 99 999).';
COMMENT ON DOMAIN synapse.attempt_limit IS 'Most attempts of a step: 1 to 101.';
COMMENT ON DOMAIN synapse.iteration_limit IS 'Most iterations of a loop: 1 to 1 000.';
COMMENT ON DOMAIN synapse.failure_kind IS 'Why a step failed: action or definition.';

CREATE TABLE synapse.goals (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    goal            synapse.goal_text NOT NULL,
    input           jsonb       NOT NULL DEFAULT '{}',
    params          jsonb       NOT NULL DEFAULT '{}',
    planner         text,
    template        text,
    blueprint       jsonb,
    status          synapse.goal_state NOT NULL DEFAULT 'submitted',
    error           text,
    result          jsonb,
    idempotency_key text,
    plan_attempts   synapse.non_negative NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    parent_goal_id  bigint      REFERENCES synapse.goals (id) ON DELETE CASCADE,
    parent_task_id  bigint,
    depth           synapse.non_negative NOT NULL DEFAULT 0,
    owner           regrole     NOT NULL DEFAULT synapse._caller(),
    CONSTRAINT goals_owner_idempotency_key_key UNIQUE (owner, idempotency_key)
);
COMMENT ON TABLE synapse.goals IS 'A high-level goal and the workflow it was planned into. One row per synapse.submit_goal / submit_plan call.';
COMMENT ON COLUMN synapse.goals.id IS 'Goal id returned by submit_goal / submit_plan.';
COMMENT ON COLUMN synapse.goals.goal IS 'The goal text as submitted; the template planner matches it against template patterns.';
COMMENT ON COLUMN synapse.goals.input IS 'Caller-supplied JSON, visible to expressions as goal.input.';
COMMENT ON COLUMN synapse.goals.params IS 'Named captures of the matching template pattern, visible as goal.params.';
COMMENT ON COLUMN synapse.goals.planner IS 'Planner that turns the goal into a blueprint (e.g. template); NULL when the blueprint was given (submit_plan).';
COMMENT ON COLUMN synapse.goals.template IS 'Name of the template the planner chose, if any.';
COMMENT ON COLUMN synapse.goals.blueprint IS 'The plan blueprint (DAG of steps); NULL until planned.';
COMMENT ON COLUMN synapse.goals.status IS 'submitted: waiting for a planner. planning: a worker is planning it. running: tasks exist and run. succeeded / failed / cancelled: finished.';
COMMENT ON COLUMN synapse.goals.error IS 'Why the goal failed: planning or validation problems, or the failed steps.';
COMMENT ON COLUMN synapse.goals.result IS 'The blueprint output expression evaluated, or the results of the succeeded leaf steps.';
COMMENT ON COLUMN synapse.goals.idempotency_key IS 'Optional caller key: the same owner submitting again with the same key gets the same goal.';
COMMENT ON COLUMN synapse.goals.owner IS 'The role that submitted the goal (a child goal: its parent''s owner; a scheduled goal: the schedule''s). Row security shows a goal to the members of its owner, and to admins and workers.';
COMMENT ON COLUMN synapse.goals.plan_attempts IS 'Times a planner claimed the goal; a goal whose planning keeps failing is failed instead of re-sent forever.';
COMMENT ON COLUMN synapse.goals.created_at IS 'When the goal was submitted.';
COMMENT ON COLUMN synapse.goals.started_at IS 'When the goal started running (its plan was installed).';
COMMENT ON COLUMN synapse.goals.finished_at IS 'When the goal reached succeeded, failed or cancelled.';
COMMENT ON COLUMN synapse.goals.parent_goal_id IS 'A child goal: the goal whose goal step started it (cancelling that goal cancels this one).';
COMMENT ON COLUMN synapse.goals.parent_task_id IS 'A child goal: the task of the goal step (or of its map instance) that waits for it.';
COMMENT ON COLUMN synapse.goals.depth IS 'How many parents the goal has (0 for a goal submitted directly); at most synapse.max_depth.';
CREATE INDEX goals_children ON synapse.goals (parent_goal_id) WHERE parent_goal_id IS NOT NULL;

CREATE TABLE synapse.tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    goal_id          bigint      NOT NULL,
    -- Byte order ("C"): step ids are ASCII, and every index that holds one
    -- compares them at each insert and lookup; the database's collation would
    -- call the C library's strcoll for each comparison.
    step             synapse.step_id COLLATE "C" NOT NULL,
    action           text        NOT NULL,
    params           jsonb       NOT NULL DEFAULT '{}',
    input_expr       text,
    input            jsonb,
    queue            text        NOT NULL DEFAULT 'default',
    join_mode        synapse.join_mode NOT NULL DEFAULT 'any',
    max_attempts     synapse.attempt_limit NOT NULL DEFAULT 1,
    backoff_ms       synapse.positive_ms NOT NULL DEFAULT 1000,
    timeout_ms       synapse.positive_ms NOT NULL DEFAULT 300000,
    status           synapse.task_state NOT NULL DEFAULT 'pending',
    attempts         synapse.non_negative NOT NULL DEFAULT 0,
    run_at           timestamptz,
    queued_at        timestamptz,
    lease_expires_at timestamptz,
    leased_by        text,
    result           jsonb,
    error            text,
    started_at       timestamptz,
    finished_at      timestamptz,
    pending_inbound  synapse.non_negative NOT NULL DEFAULT 0,
    inbound          synapse.non_negative NOT NULL DEFAULT 0,
    taken_inbound    synapse.non_negative NOT NULL DEFAULT 0,
    cancel_others    boolean     NOT NULL DEFAULT false,
    for_each_expr    text,
    max_parallel     synapse.positive,
    tolerate         synapse.non_negative NOT NULL DEFAULT 0,
    map_size         synapse.non_negative,
    map_next         synapse.non_negative,
    map_ended        synapse.non_negative,
    map_failed       synapse.non_negative,
    map_index        synapse.non_negative,
    map_item         jsonb,
    until_expr       text,
    max_iterations   synapse.iteration_limit,
    iteration        synapse.positive,
    attempts_before  synapse.non_negative NOT NULL DEFAULT 0,
    child_goal_id    bigint
);
COMMENT ON TABLE synapse.tasks IS 'One row per step of a planned goal: its configuration, state, attempts and outcome.';
COMMENT ON COLUMN synapse.tasks.id IS 'Task id, carried in task.* events and Redis queue messages.';
COMMENT ON COLUMN synapse.tasks.goal_id IS 'The goal whose blueprint this step belongs to.';
COMMENT ON COLUMN synapse.tasks.step IS 'Step id from the blueprint, unique within the goal.';
COMMENT ON COLUMN synapse.tasks.action IS 'Action a worker runs for this step (noop, http, sql, ... or a registered custom action).';
COMMENT ON COLUMN synapse.tasks.params IS 'Action parameters from the blueprint.';
COMMENT ON COLUMN synapse.tasks.input_expr IS 'CEL expression computing the step input when it is queued; NULL means the default mapping.';
COMMENT ON COLUMN synapse.tasks.input IS 'The evaluated input the action receives.';
COMMENT ON COLUMN synapse.tasks.queue IS 'Redis queue the task is dispatched to ({prefix}:queue:{queue}).';
COMMENT ON COLUMN synapse.tasks.join_mode IS 'any: once every inbound edge resolved, runs if at least one was taken. all: runs only if every inbound edge was taken. first / n: runs as soon as 1 / n inbound edges are taken; skipped as soon as that can no longer happen.';
COMMENT ON COLUMN synapse.tasks.max_attempts IS 'retries + 1.';
COMMENT ON COLUMN synapse.tasks.backoff_ms IS 'Base retry delay; doubles per attempt, with jitter.';
COMMENT ON COLUMN synapse.tasks.timeout_ms IS 'Limit of one attempt.';
COMMENT ON COLUMN synapse.tasks.status IS 'pending: waiting for its inbound edges. queued: runnable, dispatched to Redis. running: claimed by a worker holding a lease (a step a worker claims for itself as its predecessor''s outcome makes it ready goes from pending to running in one write). retrying: failed, waits for run_at. waiting: a map step whose instances run, a goal step whose child goal runs, or a wait step waiting for its signal or time (no worker holds it). succeeded / failed / skipped / cancelled: finished.';
COMMENT ON COLUMN synapse.tasks.attempts IS 'Attempts started so far. The current attempt number is the fencing token: only the worker holding it may record the outcome.';
COMMENT ON COLUMN synapse.tasks.run_at IS 'retrying: when the forwarder queues the next attempt.';
COMMENT ON COLUMN synapse.tasks.queued_at IS 'When the task was last queued or re-dispatched (a step queued and claimed in one write: its started_at); the sweep re-dispatches tasks queued longer than synapse.sweep_interval.';
COMMENT ON COLUMN synapse.tasks.lease_expires_at IS 'running: the claim lapses at this time unless the worker heartbeats; the forwarder then re-queues the task.';
COMMENT ON COLUMN synapse.tasks.leased_by IS 'Identity of the worker holding the lease.';
COMMENT ON COLUMN synapse.tasks.result IS 'Action result (JSON) of the succeeded attempt.';
COMMENT ON COLUMN synapse.tasks.error IS 'Error of the last failed attempt, or why the step was skipped or cancelled.';
COMMENT ON COLUMN synapse.tasks.started_at IS 'When the current or last attempt started.';
COMMENT ON COLUMN synapse.tasks.finished_at IS 'When the task reached succeeded, failed, skipped or cancelled.';
COMMENT ON COLUMN synapse.tasks.pending_inbound IS 'Inbound edges not resolved yet: the engine decides the step when it reaches 0 (join first or n: at every resolution). Kept for steps with more than one inbound edge; a step with one is decided by that edge''s state alone.';
COMMENT ON COLUMN synapse.tasks.inbound IS 'Inbound edges in all (0: a root step).';
COMMENT ON COLUMN synapse.tasks.taken_inbound IS 'Inbound edges resolved taken so far: with pending_inbound, what the engine decides a join from. Kept for steps with more than one inbound edge.';
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

-- The timers' hot paths: each is a partial index over the few rows in that state.
CREATE INDEX tasks_retry_due ON synapse.tasks (run_at) WHERE status = 'retrying';
CREATE INDEX tasks_lease_due ON synapse.tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_queued_since ON synapse.tasks (queued_at) WHERE status = 'queued';
-- The engine's "has every step of this goal ended?" check.
CREATE INDEX tasks_unfinished ON synapse.tasks (goal_id) WHERE finished_at IS NULL;
-- A step once per goal; the instances of a map step once per index.
CREATE UNIQUE INDEX tasks_step ON synapse.tasks (goal_id, step, coalesce(map_index, -1));
-- The goals whose engine runs take turns: a step of theirs cancels running
-- tasks that other runs may be recording at that moment (a join with
-- cancel_others, a map step failing fast). Few rows: most goals have none.
CREATE INDEX tasks_taking_turns ON synapse.tasks (goal_id) WHERE cancel_others OR for_each_expr IS NOT NULL;

CREATE TABLE synapse.edges (
    goal_id     bigint      NOT NULL,
    position    integer     NOT NULL,
    -- Byte order, as tasks.step.
    from_step   text        COLLATE "C" NOT NULL,
    to_step     text        COLLATE "C" NOT NULL,
    when_expr   text,
    on_outcome  synapse.edge_on NOT NULL DEFAULT 'success',
    state       synapse.edge_state NOT NULL DEFAULT 'pending',
    error       text,
    resolved_at timestamptz,
    PRIMARY KEY (goal_id, from_step, to_step),
    CHECK (from_step <> to_step),
    CHECK ((state = 'pending') = (resolved_at IS NULL)),
    CHECK (state <> 'error' OR error IS NOT NULL)
)
-- An edge is written once more, when it resolves, and grows then
-- (resolved_at): 60 % of a page left free lets every edge on it be resolved
-- in place (a HOT update, no index entry), even all at once (a fan-out's root).
WITH (fillfactor = 40);
COMMENT ON TABLE synapse.edges IS 'Edges of a goal''s DAG and how each resolved: why a step ran or was skipped.';
COMMENT ON COLUMN synapse.edges.goal_id IS 'The goal the edge belongs to.';
COMMENT ON COLUMN synapse.edges.position IS 'Position of the edge in the blueprint (1-based).';
COMMENT ON COLUMN synapse.edges.from_step IS 'Step whose outcome resolves the edge.';
COMMENT ON COLUMN synapse.edges.to_step IS 'Step the edge leads to.';
COMMENT ON COLUMN synapse.edges.when_expr IS 'CEL condition over the from step (result, error, status, input), goal and steps; NULL means true.';
COMMENT ON COLUMN synapse.edges.on_outcome IS 'Outcome of the from step the edge follows: success, failure or always.';
COMMENT ON COLUMN synapse.edges.state IS 'pending: from step not finished. taken / not_taken: resolved. error: the condition failed to evaluate (see error).';
COMMENT ON COLUMN synapse.edges.error IS 'Why the condition could not be evaluated.';
COMMENT ON COLUMN synapse.edges.resolved_at IS 'When the edge resolved.';
-- A step's inbound edges; with from_step, one edge by either index: resolving
-- one parent's edge into a wide join must not read every edge into it.
CREATE INDEX edges_to_step ON synapse.edges (goal_id, to_step, from_step);

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

CREATE TABLE synapse.templates (
    name        text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    pattern     text        NOT NULL,
    blueprint   jsonb       NOT NULL,
    description text,
    priority    integer     NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE synapse.templates IS 'Templates of the template planner: the first whose pattern matches a goal (highest priority, then name) gives its blueprint.';
COMMENT ON COLUMN synapse.templates.name IS 'Unique template name.';
COMMENT ON COLUMN synapse.templates.pattern IS 'Case-insensitive regular expression that must match the whole goal text (it is anchored at both ends); named captures become goal.params.';
COMMENT ON COLUMN synapse.templates.blueprint IS 'The plan blueprint the goal gets.';
COMMENT ON COLUMN synapse.templates.description IS 'What the template is for.';
COMMENT ON COLUMN synapse.templates.priority IS 'Higher priorities are tried first.';
COMMENT ON COLUMN synapse.templates.created_at IS 'When the template was first added.';
COMMENT ON COLUMN synapse.templates.updated_at IS 'When the template was last replaced.';

CREATE TABLE synapse.actions (
    name          text        PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    description   text,
    params_schema jsonb,
    builtin       boolean     NOT NULL DEFAULT false,
    registered_by text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE synapse.actions IS 'Catalogue of actions steps may use: the built-ins and those workers register when they start.';
COMMENT ON COLUMN synapse.actions.name IS 'Action name used in a step''s action field.';
COMMENT ON COLUMN synapse.actions.description IS 'What the action does.';
COMMENT ON COLUMN synapse.actions.params_schema IS 'Optional JSON schema of the step params.';
COMMENT ON COLUMN synapse.actions.builtin IS 'Shipped with every worker.';
COMMENT ON COLUMN synapse.actions.registered_by IS 'Worker identity that last registered the action.';
COMMENT ON COLUMN synapse.actions.updated_at IS 'When the action was last registered.';

INSERT INTO synapse.actions (name, description, builtin) VALUES
    ('noop', 'Result is the input.', true),
    ('sleep', 'Waits params.ms milliseconds; result is the input.', true),
    ('fail', 'Fails with params.message.', true),
    ('transform', 'Evaluates the CEL expression params.expr over input.', true),
    ('http', 'HTTP request (method, url, headers, body); result {status, headers, body}; non-2xx fails.', true),
    ('exec', 'Runs params.argv with the input as JSON on stdin; result is the JSON on stdout. Only programs the worker allows.', true),
    ('sql', 'Runs params.query with $1... bound from params.args (a CEL list); result {rows}.', true),
    ('goal', 'Runs a child goal (params.goal, planned by params.planner, or params.blueprint) with the input; ends with it.', true),
    ('wait', 'Waits, with no worker, for a signal (params.signal, optional params.timeout) or a time (params.for or params.until).', true);

CREATE TABLE synapse.outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event      text        NOT NULL,
    goal_id    bigint,
    task_id    bigint,
    dispatch   text,
    payload    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- A queue table: every row is deleted soon after it is written. Vacuum it
-- early, so the forwarder's "oldest first" scan does not wade through dead rows.
ALTER TABLE synapse.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                autovacuum_vacuum_insert_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
COMMENT ON TABLE synapse.outbox IS 'Events committed but not yet acknowledged by Redis. The forwarder deletes rows only after Redis acknowledged them.';
COMMENT ON COLUMN synapse.outbox.id IS 'Forwarding order.';
COMMENT ON COLUMN synapse.outbox.event IS 'Event name, e.g. task.queued.';
COMMENT ON COLUMN synapse.outbox.goal_id IS 'Goal the event concerns (NULL: the row''s events concern several).';
COMMENT ON COLUMN synapse.outbox.task_id IS 'Task the event concerns, for task.* events.';
COMMENT ON COLUMN synapse.outbox.dispatch IS 'Redis list (without prefix) the payload is also pushed to: planner or queue:<name>; NULL for observe-only events.';
COMMENT ON COLUMN synapse.outbox.payload IS 'Compact JSON payload, schema version first; for a row of several events, theirs one a line.';
COMMENT ON COLUMN synapse.outbox.created_at IS 'When the event was recorded.';

-- Events Redis kept refusing (say, a key of the wrong type): set aside so that
-- they never hold back the rest, with the error, until an admin replays them
-- with synapse.replay_parked_events().
CREATE TABLE synapse.outbox_parked (
    id        bigint      PRIMARY KEY,
    event     text        NOT NULL,
    goal_id   bigint,
    task_id   bigint,
    dispatch  text,
    payload   text        NOT NULL,
    streamed  boolean     NOT NULL,
    created_at timestamptz NOT NULL,
    failures  integer     NOT NULL,
    error     text        NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now(),
    events    integer     NOT NULL DEFAULT 1
);
COMMENT ON TABLE synapse.outbox_parked IS 'Events Redis refused too often, set aside with the error so that the others flow; synapse.replay_parked_events() sends them again.';
COMMENT ON COLUMN synapse.outbox_parked.dispatch IS 'The Redis list still owed the payload (NULL if only the event stream was refused).';
COMMENT ON COLUMN synapse.outbox_parked.failures IS 'Times Redis refused it.';
COMMENT ON COLUMN synapse.outbox_parked.error IS 'The last refusal.';
COMMENT ON COLUMN synapse.outbox_parked.events IS 'How many events the row carries (see synapse.outbox.events).';

-- pg_dump keeps the data of extension tables only when they are registered:
-- every goal, task, edge, template, registered action and undelivered event
-- (with the identity sequences, so restored ids do not collide with new ones).
SELECT pg_catalog.pg_extension_config_dump('synapse.goals', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.goals_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.tasks_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.edges', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.templates', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.actions', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.outbox_parked', '');

-- Failed attempts: one row per attempt that failed (the step retried, gave
-- up, or lost its worker), written in the statement that records the
-- failure. A success costs nothing here; the task keeps its last error too.
CREATE TABLE synapse.attempts (
    task_id     bigint      NOT NULL REFERENCES synapse.tasks (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL CHECK (attempt >= 1),
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    error       text        NOT NULL
);
CREATE INDEX attempts_of_task ON synapse.attempts (task_id, attempt);
COMMENT ON TABLE synapse.attempts IS 'Every failed attempt of a task: its error, worker, start and end. Written with the failure (by the worker, or by the forwarder when a lease lapsed); deleted with its task.';
COMMENT ON COLUMN synapse.attempts.task_id IS 'The task the attempt belongs to.';
COMMENT ON COLUMN synapse.attempts.attempt IS 'Attempt number (1 for the first); a goal run again with retry_goal numbers its attempts from 1 again.';
COMMENT ON COLUMN synapse.attempts.worker IS 'Identity of the worker that ran the attempt.';
COMMENT ON COLUMN synapse.attempts.started_at IS 'When the attempt was claimed.';
COMMENT ON COLUMN synapse.attempts.finished_at IS 'When the failure was recorded (for a lost worker: when its lease was found lapsed).';
COMMENT ON COLUMN synapse.attempts.error IS 'Why the attempt failed.';

-- Workers, as they say themselves: at start, at stop and with the heartbeats
-- of their running tasks (nothing polls, so an idle worker says nothing
-- between its start and its stop). A worker is live from its start until its
-- stop is recorded, or until the forwarder finds a lease of it lapsed (it
-- stopped responding) and it has not been seen since. goal_status tells
-- queued work that no live worker serves.
CREATE TABLE synapse.workers (
    identity     text        PRIMARY KEY,
    queues       text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    lost_at      timestamptz
);
COMMENT ON TABLE synapse.workers IS 'Workers and the queues they serve; a worker is live from its start until it stops, or until a lease of it lapsed and it was not seen since. Rows stopped more than 7 days ago are removed when a worker starts.';
COMMENT ON COLUMN synapse.workers.identity IS 'The worker''s identity (leased_by of the tasks it runs).';
COMMENT ON COLUMN synapse.workers.queues IS 'Queues it consumes, highest priority first.';
COMMENT ON COLUMN synapse.workers.started_at IS 'When it (last) started.';
COMMENT ON COLUMN synapse.workers.last_seen_at IS 'Its last sign of life: its start, a heartbeat of one of its tasks, or its stop.';
COMMENT ON COLUMN synapse.workers.stopped_at IS 'When it stopped cleanly; NULL while it runs.';
COMMENT ON COLUMN synapse.workers.lost_at IS 'When the forwarder found a lease of it lapsed: it stopped responding, unless seen after.';

SELECT pg_catalog.pg_extension_config_dump('synapse.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('synapse.workers', '');
