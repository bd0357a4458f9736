//! Writing what the engine decided of steps (queued, skipped, failed,
//! parents cancelled), and the transaction's last round trip.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::by_id::{by_id, ids};
use super::claim::{claimed_tasks, Claim, ClaimArguments, ClaimedTask, CLAIM_TASKS};
use super::edges::{resolve_statement, EdgeResolution, ResolveColumns};
use super::goals::{finish_goals_with, GoalFinish, FINISH_GOALS};
use super::input::{given_by_id, TaskInput};
use super::{column, Result};
use crate::engine::decide::{EndedStep, Outcome};

/// Fails a step that has not run because its condition or input could not be
/// evaluated (a definition error); `None` if it was no longer pending.
pub async fn fail_pending_task(
    tx: &impl GenericClient,
    goal_id: i64,
    step: &str,
    error: &str,
) -> Result<Option<EndedStep>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks SET status = 'failed', error = $3, failure_kind = 'definition'
              WHERE goal_id = $1 AND step = $2 AND coalesce(map_index, -1) = -1 AND status = 'pending'",
        )
        .await?;
    let failed = tx.execute(&statement, &[&goal_id, &step, &error]).await? == 1;
    Ok(failed.then(|| EndedStep {
        step: step.to_owned(),
        outcome: Outcome::Failed,
        result: Value::Null,
        error: Some(error.to_owned()),
        input: Value::Null,
        definition_error: true,
    }))
}

/// Queues `tasks` (id, input): `pending → queued`.
pub async fn queue_tasks(
    tx: &impl GenericClient,
    tasks: &[(i64, TaskInput)],
) -> Result<Vec<Queued>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(QUEUE_TASKS).await?;
    tx.query(&statement, &[&ids(tasks), &given_by_id(tasks)])
        .await?
        .iter()
        .map(|row| {
            Ok(Queued {
                id: column(row, 0)?,
                queue: column(row, 1)?,
            })
        })
        .collect()
}

/// What a transaction writes with its last round trip.
pub struct LastWrites<'a> {
    /// Edge resolutions, written first.
    pub resolutions: &'a [EdgeResolution],
    /// Tasks to queue (id, input).
    pub tasks: &'a [(i64, TaskInput)],
    /// Goals that finished, written last.
    pub finishes: &'a [GoalFinish],
}

/// The transaction's last round trip: writes `last` (the edge resolutions,
/// the tasks queued, the goals finished), claims for the worker what `claim`
/// names (tasks queued earlier in the transaction, and pending ones it queues
/// as it claims them) and commits with
/// [`commit_and_chain`], the statements sent together. A statement that fails
/// aborts the transaction, whose COMMIT then fails too: its error is the
/// answer. Returns the tasks claimed.
pub async fn queue_claim_and_commit(
    client: &deadpool_postgres::Client,
    last: LastWrites<'_>,
    claim: Option<&Claim<'_>>,
) -> Result<Vec<ClaimedTask>> {
    // Prepared first (cached after a connection's first use): a statement
    // still to be prepared would go out after the COMMIT.
    let resolve = client
        .prepare_cached(resolve_statement(last.resolutions))
        .await?;
    let queue = client.prepare_cached(QUEUE_TASKS).await?;
    let finish = client.prepare_cached(FINISH_GOALS).await?;
    let claiming = client.prepare_cached(CLAIM_TASKS).await?;
    let LastWrites {
        resolutions,
        tasks,
        finishes,
    } = last;
    let resolve_columns = ResolveColumns::of(resolutions);
    let (ids, inputs) = (ids(tasks), given_by_id(tasks));
    let claim_arguments = claim.map(ClaimArguments::of);
    let resolving = async {
        if resolutions.is_empty() {
            return Ok(0);
        }
        client
            .execute(&resolve, &resolve_columns.parameters())
            .await
    };
    let queuing = async {
        if tasks.is_empty() {
            return Ok(0);
        }
        client.execute(&queue, &[&ids, &inputs]).await
    };
    let finishing = finish_goals_with(client, &finish, finishes);
    let claimed = async {
        match &claim_arguments {
            Some(arguments) => client.query(&claiming, &arguments.parameters()).await,
            None => Ok(Vec::new()),
        }
    };
    let committed = commit_and_chain(client);
    let (resolved, queued, finished, claimed, committed) =
        futures_util::join!(resolving, queuing, finishing, claimed, committed);
    resolved?;
    queued?;
    finished?;
    let claimed = claimed?;
    committed?;
    Ok(claimed_tasks(
        &claimed,
        claim.map_or("", |claim| claim.worker),
    ))
}

/// Commits the transaction on `client` and leaves it in a new, empty one
/// with the same characteristics, which the next batch may use
/// ([`super::open::Kept`]).
pub async fn commit_and_chain(client: &deadpool_postgres::Client) -> Result<()> {
    Ok(client.batch_execute("COMMIT AND CHAIN").await?)
}

// By id, joined to nothing (see by_id).
const QUEUE_TASKS: &str = concat!(
    "UPDATE synapse.tasks t SET status = 'queued', input = ",
    given_or_parent_results!("$2"),
    "
      WHERE t.id = ANY($1::bigint[]) AND t.status = 'pending'
  RETURNING t.id, t.queue"
);

/// A task the engine queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Task id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
}

/// Cancels the direct parents of `step` that have not ended (with their
/// instances, for a map step): `step` started without them (`cancel_others`).
/// A running parent stops at its next heartbeat and its outcome is not
/// recorded. Returns the parent steps cancelled.
pub async fn cancel_parents(
    tx: &impl GenericClient,
    goal_id: i64,
    step: &str,
) -> Result<Vec<String>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks t SET status = 'cancelled', error = format('cancelled: step %s started without it', $2::text)
               FROM (SELECT from_step FROM synapse.edges
                      WHERE goal_id = $1 AND to_step = $2 AND state = 'pending') p
              WHERE t.goal_id = $1 AND t.step = p.from_step
                AND t.status IN ('pending', 'queued', 'running', 'retrying', 'waiting')
          RETURNING t.step, t.map_index IS NULL",
        )
        .await?;
    let mut cancelled = Vec::new();
    for row in tx.query(&statement, &[&goal_id, &step]).await? {
        if column::<bool>(&row, 1)? {
            cancelled.push(column(&row, 0)?);
        }
    }
    Ok(cancelled)
}

/// `pending → skipped`, each with its reason, in one statement.
pub async fn skip_tasks(tx: &impl GenericClient, tasks: &[(i64, String)]) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            // By id, joined to nothing (see by_id).
            "UPDATE synapse.tasks t SET status = 'skipped', error = $2::jsonb ->> t.id::text
              WHERE t.id = ANY($1::bigint[]) AND t.status = 'pending'",
        )
        .await?;
    tx.execute(&statement, &[&ids(tasks), &by_id(tasks)])
        .await?;
    Ok(())
}
