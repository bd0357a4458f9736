//! A `sql` step runs as its goal's owner (SPEC §7). The worker brackets the
//! step's statement, inside the transaction that records its outcome, with
//! `synapse._enter_step(task, attempt)` and `synapse._leave_step(token)`.
//! Between them the session acts as the owner in a security-restricted
//! operation, as Postgres runs `REFRESH MATERIALIZED VIEW` or `ANALYZE` for a
//! table's owner: the statement can neither change role (`SET ROLE`,
//! `set_config('role', …)`) nor create temporary objects, and every setting
//! it changes is undone when the step is left. Leaving is called as the owner,
//! so owners may call it; only the token `_enter_step` gave the worker opens
//! the way back, which the step's own statement never sees. So a step never
//! does more than its owner could, and nothing of it reaches the worker's
//! session.
use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::Cell;

use crate::error::{Error, Result};

/// The step the session is in: whom it acts for, and what to go back to.
#[derive(Clone, Copy)]
struct Entered {
    token: [u8; 16],
    owner: pg_sys::Oid,
    context: i32,
    previous_user: pg_sys::Oid,
    previous_context: i32,
    guc_level: i32,
}

thread_local! {
    static ENTERED: Cell<Option<Entered>> = const { Cell::new(None) };
}

/// Whether the session still acts as it did when `entered` began: a rollback
/// to a savepoint taken before it undoes the step, user and settings both.
fn still_in(entered: &Entered) -> bool {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads two backend globals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    user == entered.owner && context == entered.context
}

/// Acts as the owner of the goal of `task_id`, whose running attempt must
/// be `attempt` of a `sql` step; returns the token that leaves the step.
#[pg_extern(name = "_enter_step", volatile, parallel_unsafe)]
fn enter_step(
    task_id: i64,
    attempt: i32,
) -> std::result::Result<String, pgrx::pg_sys::panic::ErrorReport> {
    Ok(enter(task_id, attempt)?)
}

fn enter(task_id: i64, attempt: i32) -> Result<String> {
    if let Some(entered) = ENTERED.get() {
        if still_in(&entered) {
            return Err(Error::InvalidParameter(
                "a step is already entered: leave it first".into(),
            ));
        }
    }
    let owner = Spi::get_two_with_args::<pg_sys::Oid, String>(
        "SELECT g.owner::oid, g.owner::text FROM synapse.goals g
          WHERE g.id = (SELECT t.goal_id FROM synapse.tasks t
                         WHERE t.id = $1 AND t.attempts = $2 AND t.status = 'running' AND t.action = 'sql')",
        &[task_id.into(), attempt.into()],
    );
    let owner = match owner {
        Ok((Some(owner), Some(_))) => owner,
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => {
            return Err(Error::NotRunning(format!(
                "task {task_id} is not running attempt {attempt} of a sql step"
            )))
        }
        Err(error) => return Err(error.into()),
    };
    let mut token = [0u8; 16];
    // SAFETY: fills the buffer it is given, of the length it is told.
    if !unsafe { pg_sys::pg_strong_random(token.as_mut_ptr().cast(), token.len()) } {
        return Err(Error::InvalidParameter(
            "no random bytes for the step's token".into(),
        ));
    }
    let (mut previous_user, mut previous_context) = (pg_sys::InvalidOid, 0);
    // SAFETY: the same calls Postgres makes around REFRESH MATERIALIZED VIEW:
    // a nest level for the settings the step changes, then the owner's
    // identity in a security-restricted operation. `leave` (or a rollback)
    // undoes both.
    let entered = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut previous_user, &mut previous_context);
        let guc_level = pg_sys::NewGUCNestLevel();
        let context = previous_context
            | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
            | pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
        pg_sys::SetUserIdAndSecContext(owner, context);
        Entered {
            token,
            owner,
            context,
            previous_user,
            previous_context,
            guc_level,
        }
    };
    ENTERED.set(Some(entered));
    guard_commit();
    Ok(hex(&token))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Acts as the worker again, undoing every setting the step changed.
#[pg_extern(name = "_leave_step", volatile, parallel_unsafe)]
fn leave_step(token: &str) -> std::result::Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(leave(token)?)
}

fn leave(token: &str) -> Result<()> {
    let Some(entered) = ENTERED.get() else {
        return Err(Error::InvalidParameter("no step is entered".into()));
    };
    if hex(&entered.token) != token {
        return Err(Error::InvalidParameter(
            "only the worker that entered a step leaves it".into(),
        ));
    }
    ENTERED.set(None);
    if !still_in(&entered) {
        // Rolled back meanwhile: nothing is left to undo.
        return Ok(());
    }
    // SAFETY: undoes `enter` in reverse order; the nest level is still on the
    // stack (a rollback would have taken the identity back too).
    unsafe {
        pg_sys::AtEOXact_GUC(false, entered.guc_level);
        pg_sys::SetUserIdAndSecContext(entered.previous_user, entered.previous_context);
    }
    Ok(())
}

thread_local! {
    static GUARD_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Never lets a transaction commit, nor the session go on, as a step's owner:
/// a step not left when its transaction ends is left then (a rollback
/// restores the identity by itself).
fn guard_commit() {
    if GUARD_REGISTERED.replace(true) {
        return;
    }
    for ending in [
        PgXactCallbackEvent::PreCommit,
        PgXactCallbackEvent::PrePrepare,
    ] {
        register_xact_callback(ending, leave_at_the_end);
    }
    for ended in [
        PgXactCallbackEvent::Commit,
        PgXactCallbackEvent::Abort,
        PgXactCallbackEvent::Prepare,
    ] {
        register_xact_callback(ended, || {
            GUARD_REGISTERED.set(false);
            ENTERED.set(None);
        });
    }
}

/// Restores the identity a step replaced (settings are popped by the end of
/// the transaction itself). No allocation, no error path.
fn leave_at_the_end() {
    if let Some(entered) = ENTERED.take() {
        if still_in(&entered) {
            // SAFETY: sets two backend globals back.
            unsafe {
                pg_sys::SetUserIdAndSecContext(entered.previous_user, entered.previous_context)
            };
        }
    }
}
