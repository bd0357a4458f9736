//! `plan_preview`: what `submit_goal` would plan, validated, writing nothing.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use synapse_worker::blueprint::Problem;
use synapse_worker::template::{self, Candidate, ChooseError};

use super::plan::JsonbArg;
use crate::error::{Error, Result};

/// Longest goal text, as `submit_goal` allows.
const MAX_GOAL_CHARS: usize = 10_000;

/// The template the planner would choose for `goal`, its params, its blueprint
/// and the blueprint's problems (as `validate_blueprint` lists them):
/// `{template, params, blueprint, problems}`. Nothing is written.
#[pg_extern(stable)]
fn plan_preview(
    goal: Option<&str>,
    input: default!(Option<JsonbArg>, "'{}'"),
    planner: default!(Option<&str>, "'template'"),
) -> std::result::Result<JsonB, ErrorReport> {
    Ok(JsonB(preview(goal, input, planner)?))
}

fn preview(goal: Option<&str>, input: Option<JsonbArg>, planner: Option<&str>) -> Result<Value> {
    // The same checks as submit_goal, so a preview refuses what it would refuse.
    let goal = goal
        .filter(|g| !g.trim().is_empty())
        .ok_or_else(|| Error::InvalidParameter("goal must be a non-empty text".into()))?;
    let chars = goal.chars().count();
    if chars > MAX_GOAL_CHARS {
        return Err(Error::InvalidParameter(format!(
            "goal is {chars} characters; the limit is {MAX_GOAL_CHARS}"
        )));
    }
    input
        .ok_or_else(|| Error::InvalidParameter("input must be JSON, not NULL (use '{}')".into()))?
        .check("input")?;
    let planner = planner.filter(|p| valid_planner_name(p)).ok_or_else(|| {
        Error::InvalidParameter(format!(
            "planner must be a planner name like 'template', got {}",
            planner.map_or("NULL".to_owned(), |p| format!(
                "'{}'",
                p.replace('\'', "''")
            ))
        ))
    })?;
    if planner != "template" {
        return Ok(answer(
            None,
            None,
            None,
            vec![problem(
                "planner",
                format!(
                    "planner \"{planner}\" runs only in workers and cannot be previewed; \
                     plan_preview previews the template planner (planner => 'template')"
                ),
            )],
        ));
    }
    let templates = templates()?;
    let candidates: Vec<Candidate<'_>> = templates
        .iter()
        .map(|(name, pattern)| Candidate { name, pattern })
        .collect();
    let (index, params) = match template::choose(&candidates, goal, template::compile_pattern) {
        Ok(chosen) => chosen,
        Err(error @ ChooseError::NoMatch(_)) => {
            return Ok(answer(
                None,
                None,
                None,
                vec![problem("goal", error.to_string())],
            ))
        }
        Err(error @ ChooseError::InvalidPattern { .. }) => {
            return Ok(answer(
                None,
                None,
                None,
                vec![problem("template", error.to_string())],
            ))
        }
    };
    let name = &templates[index].0;
    let blueprint = template_blueprint(name)?;
    let problems = match super::plan::check(&blueprint) {
        Ok(_) => Vec::new(),
        Err(Error::InvalidBlueprint(problems)) => problems,
        Err(other) => return Err(other),
    };
    Ok(answer(
        Some(name),
        Some(Value::Object(params)),
        Some(blueprint),
        problems,
    ))
}

fn valid_planner_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn problem(path: &str, message: String) -> Problem {
    Problem {
        path: path.into(),
        message,
    }
}

fn answer(
    template: Option<&str>,
    params: Option<Value>,
    blueprint: Option<Value>,
    problems: Vec<Problem>,
) -> Value {
    json!({
        "template": template,
        "params": params,
        "blueprint": blueprint,
        "problems": problems,
    })
}

/// Every template's name and pattern, in the order the planner tries them.
fn templates() -> Result<Vec<(String, String)>> {
    Ok(Spi::connect(|client| {
        client
            .select(
                "SELECT name, pattern FROM synapse.templates ORDER BY priority DESC, name",
                None,
                &[],
            )?
            .map(|row| Ok((row.get::<String>(1)?, row.get::<String>(2)?)))
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })?
    .into_iter()
    .filter_map(|(name, pattern)| Some((name?, pattern?)))
    .collect())
}

/// A template's blueprint, refused over the JSON limits before it is read
/// (only a template written around `add_template` can be).
fn template_blueprint(name: &str) -> Result<Value> {
    let what = format!("the blueprint of template \"{name}\"");
    Spi::run_with_args(
        "SELECT synapse._check_json(blueprint, $2) FROM synapse.templates WHERE name = $1",
        &[name.into(), what.as_str().into()],
    )?;
    Spi::get_one_with_args::<JsonB>(
        "SELECT blueprint FROM synapse.templates WHERE name = $1",
        &[name.into()],
    )?
    .map(|JsonB(doc)| doc)
    .ok_or_else(|| Error::InvalidParameter(format!("template \"{name}\" has no blueprint")))
}
