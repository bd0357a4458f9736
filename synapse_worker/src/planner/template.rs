//! The template planner: the first template (by priority, then name) whose
//! pattern matches the whole goal text gives the blueprint; named captures
//! become `goal.params`. No match fails the goal, naming the closest templates.
use std::collections::HashMap;
use std::sync::Mutex;

use deadpool_postgres::Transaction;
use regex::Regex;

use super::{GoalRequest, Plan, PlanError, PlanFuture, Planner};
use crate::store;
use crate::template::{choose, compile_pattern, Candidate};

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
            let mut templates = store::templates(tx).await?;
            let candidates: Vec<Candidate<'_>> = templates
                .iter()
                .map(|(name, pattern, _)| Candidate { name, pattern })
                .collect();
            // add_template checked the patterns; a bad one here was written around the API.
            let (index, params) = choose(&candidates, &goal.goal, |pattern| self.compiled(pattern))
                .map_err(|error| PlanError::Rejected(error.to_string()))?;
            let (name, _, blueprint) = templates.swap_remove(index);
            Ok(Plan {
                blueprint,
                template: Some(name),
                params,
            })
        })
    }
}
