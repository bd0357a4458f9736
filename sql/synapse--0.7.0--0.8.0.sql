-- 0.7.0 → 0.8.0: a step's inbound edges are indexed with the step they come
-- from. Probed by (goal_id, to_step) alone, resolving one parent's edge into
-- a join read every edge into it: a fan-in of width W read W² index entries.
DROP INDEX synapse.edges_to_step;
-- A step's inbound edges; with from_step, one edge by either index: resolving
-- one parent's edge into a wide join must not read every edge into it.
CREATE INDEX edges_to_step ON synapse.edges (goal_id, to_step, from_step);
