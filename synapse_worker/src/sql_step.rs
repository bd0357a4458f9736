//! A `sql` step's attempt (SPEC §7): its statement runs as the goal's owner,
//! in the transaction that records the attempt's outcome and runs the engine
//! for it. The outcome is fenced by the attempt, so an attempt that lost its
//! lease (or its goal) rolls its writes back with it: a step's effect on the
//! user's tables commits exactly once.
//!
//! On a connection of the `sql` pool:
//! `BEGIN; SET LOCAL statement_timeout; SAVEPOINT;` `_enter_step` (the session
//! acts as the owner, in a security-restricted operation), the statement,
//! `_leave_step` (or, if it failed, a rollback to the savepoint: its writes
//! and its identity go together), the outcome and the engine, `COMMIT`; then
//! the session is reset.
use tokio_util::sync::CancellationToken;

use crate::actions::sql::{execute_in, postgres_error, statement_timeout, StepStatement};
use crate::actions::ActionContext;
use crate::completer::record_in;
use crate::executor::{hold_lease, outcome_of, record, Handled};
use crate::slots::Slot;
use crate::store::{self, AttemptOutcome, ClaimedTask, StoreError};
use crate::worker::Shared;

/// The action's name.
pub const ACTION: &str = "sql";

/// Once the step is over, the transaction records it as the engine's pool
/// does: no step timeout, and only the system catalogs on the path (the
/// step itself ran with the database's).
const ENGINE_SETTINGS: &str =
    "SET LOCAL statement_timeout = 0; SET LOCAL search_path = pg_catalog, pg_temp";

/// Runs and records one attempt of a `sql` step, holding `slot` until the
/// outcome is committed.
pub async fn run(
    shared: &Shared,
    task: &ClaimedTask,
    context: &ActionContext,
    abort: &CancellationToken,
    slot: Slot,
) -> Result<Handled, StoreError> {
    // What can be refused before connecting is recorded the usual way.
    let statement = match shared.sql.statement(context) {
        Ok(statement) => statement,
        Err(error) => {
            return record(shared, task, outcome_of(task, context, Err(error)), slot).await
        }
    };
    let mut connection = match shared.sql.connection().await {
        Ok(connection) => connection,
        Err(error) => {
            return record(shared, task, outcome_of(task, context, Err(error)), slot).await
        }
    };
    // The step's timeout bounds the statement (statement_timeout); this one
    // bounds the whole attempt, recording included, should the server hang.
    let limit = task.timeout + shared.config.lease;
    let attempt = tokio::time::timeout(
        limit,
        run_and_record(connection.object_mut(), task, context, &statement, shared),
    );
    let handled = tokio::select! {
        handled = attempt => match handled {
            Ok(handled) => handled,
            Err(_) => Err(StoreError::Data(format!(
                "the attempt did not end within {}",
                crate::blueprint::format_duration(limit)
            ))),
        },
        // The statement is cancelled and the connection closed: nothing of
        // the attempt commits.
        () = hold_lease(shared, task) => return Ok(Handled::Lost),
        () = abort.cancelled() => {
            drop(connection);
            let mut client = shared.pool.get().await?;
            let tx = store::begin(&mut client).await?;
            store::release_task(&tx, task.id, task.attempt).await?;
            tx.commit().await?;
            return Ok(Handled::Released);
        }
    };
    let handled = connection.finish(handled).await;
    drop(slot);
    handled
}

/// The attempt's transaction (see the module doc).
async fn run_and_record(
    client: &mut deadpool_postgres::Object,
    task: &ClaimedTask,
    context: &ActionContext,
    statement: &StepStatement,
    shared: &Shared,
) -> Result<Handled, StoreError> {
    let tx = store::begin(client).await?;
    tx.batch_execute(&format!(
        "{}; SAVEPOINT synapse_step",
        statement_timeout(task.timeout)
    ))
    .await?;
    let entered = tx
        .query_one(
            "SELECT synapse._enter_step($1, $2)",
            &[&task.id, &task.attempt],
        )
        .await;
    let token: String = match entered {
        Ok(row) => row.get(0),
        // Not running this attempt any more (cancelled, or the lease lapsed).
        Err(error) if error.code().is_some_and(|code| code.code() == "55000") => {
            return Ok(Handled::Lost)
        }
        // An extension older than this worker: the step cannot run as its
        // owner, so it does not run at all.
        Err(error) if error.code().is_some_and(|code| code.code() == "42883") => {
            tx.batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT synapse_step; {ENGINE_SETTINGS}"
            ))
            .await?;
            let outcome = AttemptOutcome::Failed(
                "sql: the synapse extension is older than this worker, whose sql steps run as \
                 their goal's owner: run ALTER EXTENSION synapse UPDATE"
                    .to_owned(),
            );
            return commit_outcome(tx, task, outcome).await;
        }
        Err(error) => return Err(error.into()),
    };
    let result = execute_in(&tx, statement, shared.sql.limit()).await;
    let result = match result {
        Ok(value) => match tx
            .execute("SELECT synapse._leave_step($1)", &[&token])
            .await
        {
            Ok(_) => Ok(value),
            // The statement's work goes with the attempt.
            Err(error) => Err(postgres_error(error)),
        },
        Err(error) => Err(error),
    };
    // Kept if the statement succeeded; else its writes and its identity go
    // together. Recording is the worker's own work again.
    let back = match result {
        Ok(_) => "RELEASE SAVEPOINT synapse_step",
        Err(_) => "ROLLBACK TO SAVEPOINT synapse_step",
    };
    tx.batch_execute(&format!("{back}; {ENGINE_SETTINGS}"))
        .await?;
    commit_outcome(tx, task, outcome_of(task, context, result)).await
}

/// Records `outcome` and runs the engine in `tx`, then commits, unless a
/// newer attempt owns the task: this one's writes then go with it.
async fn commit_outcome(
    tx: deadpool_postgres::Transaction<'_>,
    task: &ClaimedTask,
    outcome: AttemptOutcome,
) -> Result<Handled, StoreError> {
    let (mut handled, _) = record_in(&tx, &[(task, &outcome)], false).await?;
    let handled = handled.pop().unwrap_or(Handled::Fenced);
    if !matches!(handled, Handled::Fenced) {
        tx.commit().await?;
    }
    Ok(handled)
}
