//! What each expression of a blueprint can see (SPEC §4 contexts): one table, used by
//! validation to refuse an unknown variable before anything runs, and by the engine and
//! the actions, which build exactly these variables.

/// Where an expression sits in a blueprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// A step's `input`: evaluated when the step is about to run.
    StepInput,
    /// A step's parameter expression (`params.expr`, `params.args`): evaluated by the
    /// action, over the step's evaluated input.
    StepParam,
    /// An edge's `when`: evaluated when its `from` step ends.
    When,
    /// The blueprint's `output`: evaluated when every step has ended.
    Output,
}

impl Site {
    /// The variables an expression at this site sees, in the order messages list them.
    pub fn variables(self) -> &'static [&'static str] {
        match self {
            Site::StepInput | Site::Output => &["goal", "steps"],
            Site::StepParam => &["goal", "steps", "input"],
            Site::When => &["goal", "steps", "result", "error", "status", "input"],
        }
    }

    /// Whether the expression runs only after the steps upstream of its step ended, so
    /// that it may read only those (`output` runs last and may read any step).
    pub fn reads_upstream_only(self) -> bool {
        !matches!(self, Site::Output)
    }
}

/// Names that CEL itself resolves (type names and function namespaces): never unknown.
pub const CEL_NAMES: &[&str] = &[
    "bool",
    "bytes",
    "double",
    "dyn",
    "int",
    "list",
    "map",
    "null_type",
    "optional",
    "optional_type",
    "string",
    "type",
    "uint",
    "google",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_sees_goal_and_steps_and_when_sees_the_outcome() {
        for site in [Site::StepInput, Site::StepParam, Site::When, Site::Output] {
            assert!(site.variables().starts_with(&["goal", "steps"]), "{site:?}");
        }
        assert!(Site::StepParam.variables().contains(&"input"));
        assert!(!Site::Output.variables().contains(&"input"));
        assert!(!Site::Output.reads_upstream_only());
        assert!(Site::When.reads_upstream_only());
    }
}
