//! The last blueprint `submit_plan` validated in this session, kept with
//! what it was checked against: a bulk submission of one blueprint
//! (`SELECT submit_plan(b) FROM …`) reads and validates it once. A
//! validation depends on the document and, if it names an action that is not
//! built in, the registered actions (their names and `params_schema`s)
//! alone, so the plan is reused only when both are what they were.
use std::cell::RefCell;
use std::rc::Rc;

use synapse_worker::blueprint::Blueprint;

use super::{registered_actions, validate_reading, JsonbArg, Registered};
use crate::error::{Error, Result};

/// Larger blueprints are validated on every call rather than kept (in every
/// session) in memory.
const MAX_KEPT_BYTES: usize = 64 * 1024;

struct Validated {
    /// The blueprint's binary `jsonb` form.
    bytes: Vec<u8>,
    /// The registered actions it was checked against; `None` if it names
    /// built-in actions alone.
    actions: Option<Registered>,
    plan: Rc<Blueprint>,
}

thread_local! {
    static LAST: RefCell<Option<Validated>> = const { RefCell::new(None) };
}

/// Whether `blueprint` is the one kept.
fn is_kept(blueprint: JsonbArg) -> bool {
    blueprint.with_bytes(|bytes| {
        LAST.with_borrow(|last| last.as_ref().is_some_and(|last| last.bytes == bytes))
    })
}

/// Refuses `blueprint` if it is over the JSON limits (SQLSTATE 54000); the
/// one kept passed them already.
pub(super) fn check_limits(blueprint: JsonbArg) -> Result<()> {
    if is_kept(blueprint) {
        return Ok(());
    }
    blueprint.check("blueprint")
}

/// `blueprint`, its limits checked ([`check_limits`]), validated, failing
/// with every problem listed.
pub(super) fn validated(blueprint: JsonbArg) -> Result<Rc<Blueprint>> {
    let kept = blueprint.with_bytes(|bytes| {
        LAST.with_borrow(|last| {
            last.as_ref()
                .filter(|last| last.bytes == bytes)
                .map(|last| (last.plan.clone(), last.actions.is_some()))
        })
    });
    match kept {
        Some((plan, false)) => return Ok(plan),
        Some((plan, true)) => {
            let actions = registered_actions()?;
            let unchanged = LAST.with_borrow(|last| {
                last.as_ref()
                    .is_some_and(|last| last.actions.as_ref() == Some(&actions))
            });
            if unchanged {
                return Ok(plan);
            }
        }
        None => {}
    }
    let doc = blueprint.parse("blueprint")?;
    let (outcome, actions) = validate_reading(&doc)?;
    let plan = Rc::new(outcome.map_err(Error::InvalidBlueprint)?);
    blueprint.with_bytes(|bytes| {
        if bytes.len() <= MAX_KEPT_BYTES {
            LAST.set(Some(Validated {
                bytes: bytes.to_vec(),
                actions,
                plan: plan.clone(),
            }));
        }
    });
    Ok(plan)
}
