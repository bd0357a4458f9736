//! What each expression of a blueprint can see (SPEC §4 contexts): one table, used by
//! validation to refuse an unknown variable before anything runs, and by the engine and
//! the actions, which build exactly these variables.

use super::Step;

/// Where an expression sits in a blueprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// A step's `input`: evaluated when the step (or one of its instances or iterations)
    /// is about to run.
    StepInput,
    /// A step's `for_each`: evaluated once, when the step would run, before its instances
    /// exist (so without `item` and `index`).
    ForEach,
    /// A step's parameter expression (`params.expr`, `params.args`, a child goal's
    /// `params.goal` and `params.blueprint` when given as CEL, and a wait step's
    /// `params.until`): evaluated by the action (for a wait, by the engine when the step
    /// starts waiting), over the step's evaluated input.
    StepParam,
    /// A step's `until`: evaluated after each successful run of a loop step.
    Until,
    /// An edge's `when`: evaluated when its `from` step ends.
    When,
    /// The blueprint's `output`: evaluated when every step has ended.
    Output,
}

/// How a step runs, which decides the extra variables its own expressions see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepKind {
    /// Runs once.
    #[default]
    Plain,
    /// Has `for_each`: runs once per item, as instances that see `item` and `index`.
    Map,
    /// Has `until`: runs again until it holds; each run sees `previous` and `iteration`.
    Loop,
}

impl StepKind {
    /// The kind of a step with (or without) `for_each` and `until`. Validation refuses the
    /// two together; should both be given anyway, `for_each` wins, as it is evaluated first.
    pub fn from_fields(has_for_each: bool, has_until: bool) -> StepKind {
        match (has_for_each, has_until) {
            (true, _) => StepKind::Map,
            (false, true) => StepKind::Loop,
            (false, false) => StepKind::Plain,
        }
    }

    /// The kind of a blueprint step.
    pub fn of(step: &Step) -> StepKind {
        StepKind::from_fields(step.for_each.is_some(), step.until.is_some())
    }

    /// The variables each instance or iteration of such a step adds to its expressions.
    pub fn run_variables(self) -> &'static [&'static str] {
        match self {
            StepKind::Plain => &[],
            StepKind::Map => &["item", "index"],
            StepKind::Loop => &["previous", "iteration"],
        }
    }
}

impl Site {
    /// The variables an expression at this site sees, in the order messages list them.
    /// `kind` is that of the step the expression belongs to; `When` and `Output`, which
    /// belong to no step's run, ignore it.
    pub fn variables(self, kind: StepKind) -> Vec<&'static str> {
        let mut seen = vec!["goal", "steps"];
        match self {
            Site::ForEach | Site::Output => {}
            Site::StepInput => seen.extend(kind.run_variables()),
            Site::StepParam => {
                seen.push("input");
                seen.extend(kind.run_variables());
            }
            Site::Until => {
                seen.push("input");
                seen.extend(kind.run_variables());
                seen.push("result");
            }
            Site::When => seen.extend(["result", "error", "status", "input"]),
        }
        seen
    }

    /// Why `name`, a variable other kinds of step provide, is not visible here; `None`
    /// when there is nothing more useful to say than the list of visible variables.
    pub fn unseen_hint(self, kind: StepKind, name: &str) -> Option<&'static str> {
        let own_step = matches!(self, Site::StepInput | Site::StepParam | Site::Until);
        match name {
            "item" | "index" if self == Site::ForEach => Some(
                "for_each is evaluated before its instances exist, so it cannot see item or index",
            ),
            "item" | "index" if own_step && kind != StepKind::Map => {
                Some("item and index exist only in a map step (with for_each)")
            }
            "previous" | "iteration" if own_step && kind != StepKind::Loop => Some(
                "previous and iteration exist only in a loop step (with until, without for_each)",
            ),
            _ => None,
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

    const SITES: [Site; 6] = [
        Site::StepInput,
        Site::ForEach,
        Site::StepParam,
        Site::Until,
        Site::When,
        Site::Output,
    ];
    const KINDS: [StepKind; 3] = [StepKind::Plain, StepKind::Map, StepKind::Loop];

    #[test]
    fn every_site_sees_goal_and_steps_and_when_sees_the_outcome() {
        for site in SITES {
            for kind in KINDS {
                assert!(
                    site.variables(kind).starts_with(&["goal", "steps"]),
                    "{site:?} {kind:?}"
                );
            }
        }
        assert!(Site::StepParam
            .variables(StepKind::Plain)
            .contains(&"input"));
        assert!(!Site::Output.variables(StepKind::Plain).contains(&"input"));
        assert_eq!(
            Site::When.variables(StepKind::Map),
            ["goal", "steps", "result", "error", "status", "input"]
        );
        assert!(!Site::Output.reads_upstream_only());
        assert!(Site::When.reads_upstream_only());
        assert!(Site::ForEach.reads_upstream_only());
        assert!(Site::Until.reads_upstream_only());
    }

    #[test]
    fn instances_and_iterations_add_their_variables_to_the_step_expressions() {
        assert_eq!(
            Site::StepInput.variables(StepKind::Map),
            ["goal", "steps", "item", "index"]
        );
        assert_eq!(
            Site::StepParam.variables(StepKind::Loop),
            ["goal", "steps", "input", "previous", "iteration"]
        );
        assert_eq!(
            Site::Until.variables(StepKind::Loop),
            ["goal", "steps", "input", "previous", "iteration", "result"]
        );
        // for_each runs before the instances exist.
        assert_eq!(Site::ForEach.variables(StepKind::Map), ["goal", "steps"]);
        assert_eq!(
            Site::StepInput.variables(StepKind::Plain),
            ["goal", "steps"]
        );
    }

    #[test]
    fn step_kind_follows_for_each_then_until() {
        assert_eq!(StepKind::from_fields(false, false), StepKind::Plain);
        assert_eq!(StepKind::from_fields(true, false), StepKind::Map);
        assert_eq!(StepKind::from_fields(false, true), StepKind::Loop);
        assert_eq!(StepKind::from_fields(true, true), StepKind::Map);
    }

    #[test]
    fn hints_explain_the_variables_of_other_kinds() {
        assert!(Site::StepInput
            .unseen_hint(StepKind::Plain, "item")
            .is_some_and(|h| h.contains("for_each")));
        assert!(Site::ForEach
            .unseen_hint(StepKind::Map, "index")
            .is_some_and(|h| h.contains("before its instances")));
        assert!(Site::Until
            .unseen_hint(StepKind::Map, "previous")
            .is_some_and(|h| h.contains("until")));
        assert_eq!(Site::When.unseen_hint(StepKind::Plain, "item"), None);
        assert_eq!(Site::StepInput.unseen_hint(StepKind::Plain, "reslt"), None);
    }
}
