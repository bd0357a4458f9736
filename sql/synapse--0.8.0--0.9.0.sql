-- 0.8.0 → 0.9.0: the triggers that check every goal and task change and
-- record its events are the extension's Rust instead of plpgsql (and so are
-- the helpers the sweep records its events with): one statement of the
-- hot path runs one trigger call and one INSERT into the outbox, and a new
-- session compiles nothing on its first change.
--
-- The statement triggers write the outbox as the tables' owner themselves,
-- instead of being SECURITY DEFINER functions with a pinned search_path.
CREATE OR REPLACE FUNCTION synapse."_goal_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_goal_changed_wrapper';
CREATE OR REPLACE FUNCTION synapse."_task_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_task_changed_wrapper';
CREATE OR REPLACE FUNCTION synapse."_goals_written"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_goals_written_wrapper';
CREATE OR REPLACE FUNCTION synapse."_tasks_written"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_tasks_written_wrapper';

CREATE OR REPLACE FUNCTION synapse."_emit"(
	"events" synapse._event[]
) RETURNS INT
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'emit_sql_wrapper';

CREATE OR REPLACE FUNCTION synapse."_goal_event"(
	"event" TEXT,
	"goal_id" bigint,
	"parent_task_id" bigint DEFAULT NULL,
	"to_queue" TEXT DEFAULT NULL
) RETURNS synapse._event
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'goal_event_sql_wrapper';

CREATE OR REPLACE FUNCTION synapse."_task_event"(
	"event" TEXT,
	"goal_id" bigint,
	"task_id" bigint,
	"step" TEXT,
	"queue" TEXT,
	"attempt" INT,
	"due_at" timestamp with time zone DEFAULT NULL,
	"to_worker" bool DEFAULT false,
	"map_index" INT DEFAULT NULL
) RETURNS synapse._event
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'task_event_sql_wrapper';
