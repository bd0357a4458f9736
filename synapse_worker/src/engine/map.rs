//! Map steps (SPEC §4.6): what to do when instances end. A map step waits
//! while its instances run; each batch that ends some of them counts them on
//! the step (in the statement that records them), and the engine then
//! queues the instances `max_parallel` held back, or ends the step once
//! every instance ended or more failed than it tolerates. Its outbound edges
//! resolve then, once.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::decide::{EndedStep, Outcome};
use crate::store::map::{self as statements, Progress};
use crate::store::{Queued, StoreError};

/// What a map step's progress calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapDecision {
    /// Instances still run, and none more may start.
    Wait,
    /// Queue the instances with these indexes.
    Queue(i32, i32),
    /// Every instance ended, no more failed than tolerated.
    Succeed,
    /// More instances failed than tolerated; the reason.
    Fail(String),
}

/// Decides a map step from its counts: failing fast once more instances
/// failed than `tolerate`, else keeping `max_parallel` instances in flight
/// until every one has ended.
pub fn decide(progress: &Progress) -> MapDecision {
    if progress.failed > progress.tolerate {
        return MapDecision::Fail(format!(
            "{} of {} instances failed (tolerate {})",
            progress.failed, progress.size, progress.tolerate
        ));
    }
    if progress.ended >= progress.size {
        return MapDecision::Succeed;
    }
    let limit = progress.max_parallel.unwrap_or(progress.size);
    let until = (progress.ended.saturating_add(limit)).min(progress.size);
    if until > progress.next {
        MapDecision::Queue(progress.next, until)
    } else {
        MapDecision::Wait
    }
}

/// Decides the waiting map steps `maps` (`(goal_id, step)`, of goals the
/// caller locked): queues what `max_parallel` allows, and returns the map
/// steps that ended, by goal, with the tasks it queued.
pub async fn instances_ended(
    tx: &impl GenericClient,
    maps: &[(i64, String)],
) -> Result<(Vec<(i64, EndedStep)>, Vec<Queued>), StoreError> {
    let mut ranges = Vec::new();
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    let mut goals = std::collections::HashMap::new();
    for progress in statements::progress(tx, maps).await? {
        goals.insert(progress.task_id, (progress.goal_id, progress.step.clone()));
        match decide(&progress) {
            MapDecision::Wait => {}
            MapDecision::Queue(from, to) => ranges.push((progress.task_id, from, to)),
            MapDecision::Succeed => succeeded.push(progress.task_id),
            MapDecision::Fail(reason) => failed.push((progress.task_id, reason)),
        }
    }
    let queued = statements::queue_instances(tx, &ranges).await?;
    let mut ended = Vec::new();
    for end in statements::end(tx, &succeeded).await? {
        let (goal_id, step) = goals[&end.task_id].clone();
        let ended_step = match end.result {
            Ok(result) => map_ended(step, Outcome::Succeeded, result, None, false),
            Err(error) => map_ended(step, Outcome::Failed, Value::Null, Some(error), true),
        };
        ended.push((goal_id, ended_step));
    }
    for failure in statements::fail(tx, &failed).await? {
        let (goal_id, step) = goals[&failure.task_id].clone();
        ended.push((
            goal_id,
            map_ended(
                step,
                Outcome::Failed,
                Value::Null,
                Some(failure.error),
                failure.definition_error,
            ),
        ));
    }
    Ok((ended, queued))
}

/// A map step that ended, as its outbound edges see it.
pub fn map_ended(
    step: String,
    outcome: Outcome,
    result: Value,
    error: Option<String>,
    definition_error: bool,
) -> EndedStep {
    EndedStep {
        step,
        outcome,
        result,
        error,
        input: Value::Null,
        definition_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(size: i32, next: i32, ended: i32, failed: i32) -> Progress {
        Progress {
            task_id: 1,
            goal_id: 1,
            step: "resize".into(),
            size,
            next,
            ended,
            failed,
            max_parallel: None,
            tolerate: 0,
        }
    }

    #[test]
    fn a_map_succeeds_once_every_instance_ended_within_its_tolerance() {
        assert_eq!(decide(&progress(3, 3, 2, 0)), MapDecision::Wait);
        assert_eq!(decide(&progress(3, 3, 3, 0)), MapDecision::Succeed);
        let tolerant = Progress {
            tolerate: 1,
            ..progress(3, 3, 3, 1)
        };
        assert_eq!(decide(&tolerant), MapDecision::Succeed);
    }

    #[test]
    fn a_map_fails_as_soon_as_more_instances_failed_than_tolerated() {
        assert_eq!(
            decide(&progress(10, 10, 1, 1)),
            MapDecision::Fail("1 of 10 instances failed (tolerate 0)".into())
        );
        let tolerant = Progress {
            tolerate: 2,
            ..progress(10, 10, 3, 2)
        };
        assert_eq!(decide(&tolerant), MapDecision::Wait);
        let over = Progress {
            tolerate: 2,
            ..progress(10, 10, 4, 3)
        };
        assert_eq!(
            decide(&over),
            MapDecision::Fail("3 of 10 instances failed (tolerate 2)".into())
        );
    }

    #[test]
    fn max_parallel_keeps_that_many_instances_in_flight() {
        let bounded = |next, ended| Progress {
            max_parallel: Some(2),
            ..progress(5, next, ended, 0)
        };
        // Two in flight: nothing more.
        assert_eq!(decide(&bounded(2, 0)), MapDecision::Wait);
        // One ended: one more.
        assert_eq!(decide(&bounded(2, 1)), MapDecision::Queue(2, 3));
        // Three ended at once: two more, never past the end.
        assert_eq!(decide(&bounded(3, 3)), MapDecision::Queue(3, 5));
        assert_eq!(decide(&bounded(5, 4)), MapDecision::Wait);
    }
}
