//! The template planner: the first template (by priority, then name) whose
//! pattern matches the goal text gives the blueprint; named captures become
//! `goal.params`.
use std::collections::HashMap;
use std::sync::Mutex;

use deadpool_postgres::Transaction;
use regex::Regex;

use super::{GoalRequest, Plan, PlanError, PlanFuture, Planner};
use crate::store;
use crate::template::{compile_pattern, match_goal};

/// Matches goals against `synapse.templates`.
#[derive(Default)]
pub struct TemplatePlanner {
    /// Compiled patterns by source text: templates change rarely, goals often.
    compiled: Mutex<HashMap<String, Regex>>,
}

impl TemplatePlanner {
    fn compiled(&self, pattern: &str) -> Result<Regex, String> {
        let mut cache = self
            .compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(regex) = cache.get(pattern) {
            return Ok(regex.clone());
        }
        let regex = compile_pattern(pattern)?;
        cache.insert(pattern.to_owned(), regex.clone());
        Ok(regex)
    }
}

impl Planner for TemplatePlanner {
    fn name(&self) -> &str {
        "template"
    }

    fn plan<'a>(&'a self, tx: &'a Transaction<'a>, goal: &'a GoalRequest) -> PlanFuture<'a> {
        Box::pin(async move {
            for (name, pattern, blueprint) in store::templates(tx).await? {
                // add_template checked the pattern; a bad one here was written around the API.
                let regex = self.compiled(&pattern).map_err(|error| {
                    PlanError::Rejected(format!(
                        "template \"{name}\" has an invalid pattern: {error}"
                    ))
                })?;
                if let Some(params) = match_goal(&regex, &goal.goal) {
                    return Ok(Plan {
                        blueprint,
                        template: Some(name),
                        params,
                    });
                }
            }
            Err(PlanError::Rejected(format!(
                "no template matches goal {:?}",
                goal.goal
            )))
        })
    }
}
