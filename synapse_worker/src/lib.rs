//! Synapse worker library.
//!
//! The [`blueprint`] module (plan model, validation, CEL) is built without any
//! runtime dependency and is shared with the `synapse` Postgres extension.

pub mod blueprint;
pub mod graph;
pub mod template;
