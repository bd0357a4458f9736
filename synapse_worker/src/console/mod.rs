//! `synapse-worker ui`: a live web console (SPEC §8). An HTTP server whose
//! page, script and styles are in the binary; it reads Postgres with its own
//! role (row security decides what it shows), draws each goal's plan as SVG,
//! pushes changes to the browser as server-sent events, and calls the SQL API
//! for its buttons.
//!
//! - `access`: who may listen where, tokens, `Host`, CSRF;
//! - `read`: the goal list, a goal, the system;
//! - `act`: cancel, signal, retry;
//! - `dag`: a goal's plan laid out and drawn;
//! - `history`: a goal's events, from what Postgres keeps;
//! - `live`: LISTEN → server-sent events.
pub mod access;
pub mod act;
pub mod dag;
pub mod history;
pub mod live;
pub mod read;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::info;

use dag::Direction;
use live::Changes;

/// The page, its script and its styles, served from the binary.
const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLES: &str = include_str!("assets/app.css");

/// Connections the console's pages share.
const CONNECTIONS: usize = 8;

/// How the console is started.
pub struct ConsoleConfig {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Required of every request when set (and to listen beyond loopback).
    pub token: Option<String>,
    /// Postgres, as the console's own role.
    pub database_url: String,
}

impl std::fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("database_url", &"<hidden>")
            .finish()
    }
}

/// What every request shares.
struct Console {
    pool: deadpool_postgres::Pool,
    changes: Changes,
    token: Option<String>,
    csrf: String,
    addr: SocketAddr,
    index: String,
}

type Shared = State<Arc<Console>>;

/// An answer that went wrong: its status, and `{"error": …, "sqlstate": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// What to show.
    pub message: String,
    sqlstate: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            sqlstate: None,
        }
    }

    /// A request that cannot be served as it is (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Something the console did not expect (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "postgres: {}",
                    crate::connection_error::describe("", &error)
                ),
            );
        };
        let code = db.code().code();
        let status = match code {
            "P0002" => StatusCode::NOT_FOUND,
            "42501" => StatusCode::FORBIDDEN,
            "55000" | "55P03" => StatusCode::CONFLICT,
            _ if code.starts_with("22") || code.starts_with("23") || code == "54000" => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: db.message().to_owned(),
            sqlstate: Some(code.to_owned()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "postgres: {}",
                crate::connection_error::describe("", &error)
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "sqlstate": self.sqlstate})),
        )
            .into_response()
    }
}

/// Serves the console until `stop`.
pub async fn serve(config: ConsoleConfig, stop: CancellationToken) -> anyhow::Result<()> {
    access::check_listen(&config.addr, config.token.as_deref()).map_err(anyhow::Error::msg)?;
    let pool = crate::worker::pool(&config.database_url, CONNECTIONS)?;
    // A console that cannot read says so now, not on the first page.
    {
        let client = pool.get().await.map_err(|error| {
            anyhow::anyhow!(
                "{}",
                crate::connection_error::cannot_connect(&config.database_url, &error)
            )
        })?;
        client
            .query_one("SELECT count(*) FROM synapse.goals WHERE false", &[])
            .await
            .map_err(|error| match error.as_db_error() {
                Some(db) => anyhow::anyhow!(
                    "the console's role cannot read synapse.goals: {} (grant it a capability, e.g. SELECT synapse.grant_submitter('<role>'))",
                    db.message()
                ),
                None => anyhow::Error::new(error),
            })?;
    }
    let changes = Changes::new();
    tokio::spawn(live::listen(
        config.database_url.clone(),
        changes.clone(),
        stop.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    // The port actually bound (0 asks for any): the one requests must name.
    let bound = listener.local_addr()?;
    let csrf = access::random_token();
    let console = Arc::new(Console {
        pool,
        changes,
        token: config.token,
        index: INDEX.replace("{{CSRF}}", &csrf),
        csrf,
        addr: bound,
    });
    info!(url = %format!("http://{bound}/"), "console started");
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .context("serving the console")
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/app.css", get(styles))
        .route("/api/goals", get(goals))
        .route("/api/goals/{id}", get(goal))
        .route("/api/goals/{id}/cancel", post(cancel))
        .route("/api/goals/{id}/signal", post(signal))
        .route("/api/goals/{id}/retry", post(retry))
        .route("/api/system", get(system))
        .route("/api/events", get(events))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Every request: the `Host` it names, then the token (a `?token=` link
/// sets the cookie and leads to the page), then CSRF for actions.
async fn guard(State(console): Shared, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = header_text(headers, header::HOST);
    let token = console.token.as_deref();
    if !access::host_allowed(host, &console.addr, token) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers only to loopback names (start it with --token to serve others)",
        )
        .into_response();
    }
    if let (Some(token), Some(query)) = (token, request.uri().query()) {
        let given = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="));
        if given.is_some_and(|given| access::token_matches(token, given)) {
            let mut response = Redirect::to(request.uri().path()).into_response();
            let cookie = format!(
                "{}={token}; HttpOnly; SameSite=Strict; Path=/",
                access::TOKEN_COOKIE
            );
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            return response;
        }
    }
    if !access::authorized(
        token,
        header_text(headers, header::AUTHORIZATION),
        header_text(headers, header::COOKIE),
    ) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this console needs its token: open the link with ?token=…, or send Authorization: Bearer …",
        )
        .into_response();
    }
    if request.method() == axum::http::Method::POST
        && !access::action_allowed(
            &console.csrf,
            headers
                .get(access::CSRF_HEADER)
                .and_then(|value| value.to_str().ok()),
            header_text(headers, header::ORIGIN),
            host,
        )
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "an action must come from the console's own page (its CSRF token is missing or wrong)",
        )
        .into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // Nothing from elsewhere runs or loads here; the page is never framed.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn asset(content_type: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index(State(console): Shared) -> Response {
    asset("text/html; charset=utf-8", console.index.clone())
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT.to_owned())
}

async fn styles() -> Response {
    asset("text/css; charset=utf-8", STYLES.to_owned())
}

/// A goal's id from the path.
type GoalId = Result<Path<i64>, PathRejection>;

fn goal_id(id: GoalId) -> Result<i64, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

async fn goals(
    State(console): Shared,
    filter: Result<Query<read::GoalFilter>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(filter) = filter.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let client = console.pool.get().await?;
    Ok(Json(read::goals(&client, &filter).await?))
}

#[derive(Deserialize)]
struct GoalView {
    dir: Option<String>,
}

async fn goal(
    State(console): Shared,
    id: GoalId,
    Query(view): Query<GoalView>,
) -> Result<Json<Value>, ApiError> {
    let id = goal_id(id)?;
    let direction = match view.dir.as_deref() {
        None | Some("LR") => Direction::LeftToRight,
        Some("TB") => Direction::TopDown,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dir: {other:?} is neither LR nor TB"
            )))
        }
    };
    let client = console.pool.get().await?;
    Ok(Json(read::goal(&client, id, direction).await?))
}

async fn cancel(State(console): Shared, id: GoalId) -> Result<Json<Value>, ApiError> {
    let id = goal_id(id)?;
    let client = console.pool.get().await?;
    Ok(Json(act::cancel(&client, id).await?))
}

async fn signal(
    State(console): Shared,
    id: GoalId,
    body: Result<Json<act::Signal>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = goal_id(id)?;
    let Json(signal) = body.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let client = console.pool.get().await?;
    Ok(Json(act::signal(&client, id, &signal).await?))
}

async fn retry(
    State(console): Shared,
    id: GoalId,
    body: Result<Json<act::Retry>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = goal_id(id)?;
    let Json(retry) = body.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let client = console.pool.get().await?;
    Ok(Json(act::retry(&client, id, &retry).await?))
}

async fn system(State(console): Shared) -> Result<Json<Value>, ApiError> {
    let client = console.pool.get().await?;
    Ok(Json(read::system(&client).await))
}

/// Server-sent events: each change as `event: change`; a page that fell
/// behind is told to read everything again.
async fn events(State(console): Shared) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = console.changes.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let data = match receiver.recv().await {
            Ok(change) => change,
            Err(RecvError::Lagged(_)) => live::resync(),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().event("change").data(data)), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
