//! Planner templates.
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;

use super::plan::JsonbArg;
use crate::error::{Error, Result};

/// Adds or replaces a template of the template planner. Its pattern must
/// match the whole goal text; a NOTICE says so when it only matches because of
/// a leading or trailing `.*`.
#[pg_extern]
fn add_template(
    name: Option<&str>,
    pattern: Option<&str>,
    blueprint: Option<JsonbArg>,
    description: default!(Option<&str>, "NULL"),
    priority: default!(Option<i32>, "0"),
) -> std::result::Result<(), ErrorReport> {
    Ok(upsert(
        name,
        pattern,
        blueprint,
        description,
        priority.unwrap_or(0),
    )?)
}

fn upsert(
    name: Option<&str>,
    pattern: Option<&str>,
    blueprint: Option<JsonbArg>,
    description: Option<&str>,
    priority: i32,
) -> Result<()> {
    let name = name
        .filter(|n| !n.trim().is_empty() && n.len() <= 200)
        .ok_or_else(|| {
            Error::InvalidParameter(
                "name must be a non-empty text of at most 200 characters".into(),
            )
        })?;
    let pattern =
        pattern.ok_or_else(|| Error::InvalidParameter("pattern must not be NULL".into()))?;
    // The worker matches with the same engine and flags.
    synapse_worker::template::compile_pattern(pattern).map_err(|reason| Error::InvalidPattern {
        name: name.to_owned(),
        reason,
    })?;
    let doc = blueprint
        .ok_or_else(|| Error::InvalidParameter("blueprint must not be NULL".into()))?
        .into_value("blueprint")?;
    super::plan::check(&doc)?;
    if let Some(warning) = synapse_worker::template::loose_ends_warning(pattern) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("template \"{name}\": {warning}"),
            "synapse",
        )
        .report(PgLogLevel::NOTICE);
    }
    Spi::run_with_args(
        "INSERT INTO synapse.templates AS t (name, pattern, blueprint, description, priority)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (name) DO UPDATE
            SET pattern = excluded.pattern, blueprint = excluded.blueprint,
                description = excluded.description, priority = excluded.priority, updated_at = now()",
        &[name.into(), pattern.into(), JsonB(doc).into(), description.into(), priority.into()],
    )?;
    Ok(())
}
