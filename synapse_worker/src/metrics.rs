//! Prometheus metrics of a worker, served as text on `--metrics-addr`.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::LazyLock;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::{
    register_histogram_vec_with_registry, register_histogram_with_registry,
    register_int_counter_vec_with_registry, register_int_gauge_with_registry, Histogram,
    HistogramVec, IntCounterVec, IntGauge, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Every metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Attempts by action and what became of them.
    pub tasks: IntCounterVec,
    /// Time an action ran, by action.
    pub task_duration: HistogramVec,
    /// Time from queued to claimed.
    pub queue_wait: Histogram,
    /// Time to plan a goal, by outcome.
    pub planning: HistogramVec,
    /// Tasks running now.
    pub in_flight: IntGauge,
    /// Reconnections, by target (redis, postgres).
    pub reconnects: IntCounterVec,
}

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let tasks = register_int_counter_vec_with_registry!(
        "synapse_tasks_total",
        "Task attempts by action and outcome (succeeded, retrying, failed, fenced, lost, released).",
        &["action", "outcome"],
        registry
    )
    .expect("valid metric");
    let task_duration = register_histogram_vec_with_registry!(
        "synapse_task_duration_seconds",
        "Time an attempt's action ran.",
        &["action"],
        DURATION_BUCKETS.to_vec(),
        registry
    )
    .expect("valid metric");
    let queue_wait = register_histogram_with_registry!(
        "synapse_task_queue_wait_seconds",
        "Time from a task being queued to a worker claiming it.",
        DURATION_BUCKETS.to_vec(),
        registry
    )
    .expect("valid metric");
    let planning = register_histogram_vec_with_registry!(
        "synapse_planning_seconds",
        "Time to plan a goal (planner and plan installation), by outcome (planned, failed).",
        &["outcome"],
        DURATION_BUCKETS.to_vec(),
        registry
    )
    .expect("valid metric");
    let in_flight = register_int_gauge_with_registry!(
        "synapse_tasks_in_flight",
        "Tasks running now.",
        registry
    )
    .expect("valid metric");
    let reconnects = register_int_counter_vec_with_registry!(
        "synapse_reconnects_total",
        "Connection losses recovered from, by target.",
        &["target"],
        registry
    )
    .expect("valid metric");
    Metrics {
        registry,
        tasks,
        task_duration,
        queue_wait,
        planning,
        in_flight,
        reconnects,
    }
});

/// The metrics in Prometheus text format.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&METRICS.registry.gather())
        .unwrap_or_default()
}

/// Serves `GET /metrics` (any path, in fact) on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving metrics");
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let response = hyper::Response::builder()
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(render())))
                    .expect("a valid response");
                Ok::<_, Infallible>(response)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                warn!(%error, "metrics connection failed");
            }
        });
    }
}
