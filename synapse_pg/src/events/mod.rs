//! Events: every goal and task state change is recorded in the outbox in the
//! same transaction, and the forwarder is woken when it commits.
//!
//! Row triggers ([`state`]) enforce the state machines and keep the
//! timestamps consistent; statement triggers ([`written`]) record the events
//! of a whole statement with one INSERT ([`outbox`]), in the documented
//! formats ([`payload`]). They are Rust, not plpgsql: they run for every
//! change on the hot path, and a session's first change would otherwise
//! compile them.
mod columns;
mod outbox;
mod payload;
mod restore;
pub mod state;
pub mod wake;
pub mod written;

pub use outbox::payloads_of_row;
pub use wake::wake_at_commit;
