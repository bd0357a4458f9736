//! The SQL API written in Rust. Thin `#[pg_extern]` wrappers over plain
//! functions; the rest of the API is SQL in `sql/api.sql`.
mod forwarder_status;
mod goal_gate;
mod graph;
mod plan;
mod preview;
mod schedule;
mod step_role;
mod templates;
