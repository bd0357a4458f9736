//! Synapse worker library.
//!
//! The [`blueprint`], [`template`], [`graph`] and [`stored`] modules are built without any
//! runtime dependency and are shared with the `synapse` Postgres extension.
//! With the `runtime` feature (the default), the rest is the worker itself:
//! the consumer pops Redis lists, the planner turns goals into plans, the
//! executor claims and runs tasks, the completer records their outcomes in
//! batches, and the engine resolves the DAG — all state
//! lives in Postgres, reached through the store.

// Its statement fragments serve every module after it.
#[macro_use]
pub mod stored;

pub mod blueprint;
pub mod graph;
pub mod template;

#[cfg(feature = "runtime")]
pub mod actions;
#[cfg(feature = "runtime")]
pub mod backoff;
#[cfg(feature = "runtime")]
pub mod completer;
#[cfg(feature = "runtime")]
pub mod connection_error;
#[cfg(feature = "runtime")]
pub mod console;
#[cfg(feature = "runtime")]
pub mod consumer;
#[cfg(feature = "runtime")]
pub mod continuation;
#[cfg(feature = "runtime")]
pub mod engine;
#[cfg(feature = "runtime")]
pub mod executor;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod password_file;
#[cfg(feature = "runtime")]
pub mod planner;
#[cfg(feature = "runtime")]
pub mod postgres_tls;
#[cfg(feature = "runtime")]
pub mod slots;
#[cfg(feature = "runtime")]
pub mod sql_step;
#[cfg(feature = "runtime")]
pub mod store;
#[cfg(feature = "runtime")]
pub mod worker;

#[cfg(feature = "runtime")]
pub use worker::{Worker, WorkerConfig};
