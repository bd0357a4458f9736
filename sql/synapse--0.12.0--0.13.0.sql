-- 0.12.0 → 0.13.0: a step with one inbound edge keeps no counts of its
-- inbound edges; the engine decides it from that edge's state. Resolving the
-- edges of a wide fan-out wrote each of its steps once for the count and once
-- more to queue it, in one transaction.
COMMENT ON COLUMN synapse.tasks.pending_inbound IS 'Inbound edges not resolved yet: the engine decides the step when it reaches 0 (join first or n: at every resolution). Kept for steps with more than one inbound edge; a step with one is decided by that edge''s state alone.';
COMMENT ON COLUMN synapse.tasks.taken_inbound IS 'Inbound edges resolved taken so far: with pending_inbound, what the engine decides a join from. Kept for steps with more than one inbound edge.';
