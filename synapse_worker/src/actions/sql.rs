//! The `sql` built-in: one statement per attempt, in a transaction of its own,
//! on a connection pool of its own.

use std::time::Duration;

use postgres_native_tls::MakeTlsConnector;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use super::limit::ResultLimit;
use super::numeric::Numeric;
use super::simple::{evaluate_param, expected, optional_str, required_str};
use super::statement;
use super::{Action, ActionContext, ActionError, ActionFuture};

/// A statement parameter, ready to bind. `Send` so the attempt's future stays `Send`.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// How much of an argument a conversion error quotes.
const VALUE_QUOTE_CHARS: usize = 100;

/// What a step may have left on its session, undone before the connection
/// serves another step: `DISCARD ALL` in statements that may run in one
/// message (`DISCARD ALL` itself may not). Settings made with
/// `set_config(…, false)`, roles, cursors, prepared statements, LISTENs,
/// advisory locks, temporary tables. `statement_timeout` goes first, in case
/// the step set it low.
const RESET_SESSION: &str =
    "SET statement_timeout = 0; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; \
    RESET ALL; DEALLOCATE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; \
    DISCARD TEMP; DISCARD SEQUENCES";

/// `sql`: runs `params.query` with `$1…` bound from `params.args`, a CEL
/// expression over `input` and `params` that must yield a list.
///
/// `params.query` holds exactly one statement. Each attempt runs it in a
/// transaction of its own, with the step's timeout as `statement_timeout`;
/// the transaction commits when the statement succeeds and rolls back when it
/// fails (or its result is too large). Statements that control transactions
/// (`BEGIN`, `COMMIT`, `SAVEPOINT`, …) or change the session (`SET`, `RESET`,
/// `LISTEN`, `PREPARE`, cursors, …) are refused before anything runs, and
/// after every attempt the session is reset (`DISCARD ALL`), so whatever a
/// statement changed through a function (`set_config(…, false)`) never reaches
/// the next step; a connection that cannot be reset is closed. Give this
/// action a pool of its own: never the engine's.
///
/// Rows come back as JSON objects (column name → value, converted by
/// Postgres's `to_jsonb`, so every column type works; a `numeric` is a JSON
/// number with all its digits and its scale, `1250.00` stays `1250.00`, and
/// `NaN` or `±Infinity` become the strings `to_jsonb` gives): the query is wrapped as
/// `WITH q AS (<query>) SELECT coalesce(jsonb_agg(to_jsonb(q)), '[]') FROM q`,
/// which covers `SELECT`, `VALUES` and `INSERT`/`UPDATE`/`DELETE … RETURNING`;
/// the result is `{"rows": [...]}`, and rows larger than the result limit fail
/// the attempt (Postgres measures them, so they are never sent). A statement
/// Postgres refuses inside `WITH` (DML without `RETURNING`, DDL, `SELECT …
/// INTO`) runs as written instead, and the result is `{"rows": [],
/// "rows_affected": n}`. The fallback is decided when the wrapped statement is
/// prepared, before anything has run, so a statement never runs twice.
///
/// Arguments are bound by the type Postgres infers for each parameter: `bool`,
/// `int2`/`int4`/`int8` (JSON integers, or strings holding one), `float4`/`float8`
/// (numbers or numeric strings), `numeric` (a JSON number digit for digit, as
/// written, or a string holding a number, `NaN` or `Infinity`; never through a
/// float), `text`/`varchar`/`bpchar`/`name` and parameters of
/// unknown type (strings; numbers and booleans as their JSON text, arrays and
/// objects as JSON text), `json`/`jsonb` (any JSON value). JSON `null` binds SQL
/// `NULL`. Parameters of other types must be written `$N::text::type` in the
/// query; the error for them says so.
///
/// Errors: bad params, refused statements and unbindable arguments are
/// permanent; Postgres errors of SQLSTATE class 40 (serialization failure,
/// deadlock), 08 (connection) and 57 (operator intervention, including
/// `statement_timeout`) are retryable, like failing to get a connection; other
/// Postgres errors are permanent, and their message gives the SQLSTATE. A
/// cancelled attempt cancels its running statement and closes its connection.
#[derive(Clone)]
pub struct Sql {
    pool: deadpool_postgres::Pool,
    limit: ResultLimit,
    tls: MakeTlsConnector,
}

/// A step's statement, checked, with its arguments evaluated.
pub(crate) struct StepStatement {
    query: String,
    wrapped: String,
    args: Vec<Value>,
}

impl Sql {
    /// An `sql` action running statements on connections from `pool`, which
    /// should serve nothing else: this action resets every connection it uses.
    /// `tls` is the connector the pool connects with: cancel requests check
    /// the server as the connections do.
    pub fn new(pool: deadpool_postgres::Pool, tls: MakeTlsConnector) -> Self {
        Self {
            pool,
            limit: ResultLimit::default(),
            tls,
        }
    }

    /// The same action with rows bounded by `limit` instead of 1 MiB.
    pub fn with_result_limit(mut self, limit: ResultLimit) -> Self {
        self.limit = limit;
        self
    }

    /// `params.query` checked (one statement that neither controls the
    /// transaction nor changes the session) and `params.args` evaluated.
    pub(crate) fn statement(&self, context: &ActionContext) -> Result<StepStatement, ActionError> {
        let query = required_str(context, "query")?;
        let query = statement::single(query)
            .map_err(|refusal| ActionError::Permanent(refusal.message()))?
            .text;
        let args = match optional_str(context, "args")? {
            None => Vec::new(),
            Some(expr) => match evaluate_param(context, "args", expr)? {
                Value::Array(items) => items,
                other => {
                    return Err(ActionError::Definition(
                        expected("args", "the expression to yield a list", &other)
                            .message()
                            .to_owned(),
                    ))
                }
            },
        };
        Ok(StepStatement {
            wrapped: wrap(query, self.limit),
            query: query.to_owned(),
            args,
        })
    }

    /// A connection of this action's pool, for one attempt.
    pub(crate) async fn connection(&self) -> Result<Busy, ActionError> {
        let object = self.pool.get().await.map_err(|e| {
            ActionError::Retryable(format!("sql: could not get a database connection: {e}"))
        })?;
        Ok(Busy::new(object, self.tls.clone()))
    }

    /// The most a result may weigh.
    pub(crate) fn limit(&self) -> ResultLimit {
        self.limit
    }

    /// The statement in a transaction of its own (the worker runs its steps
    /// in the transaction that records them instead: see `sql_step`).
    async fn execute(&self, context: &ActionContext) -> Result<Value, ActionError> {
        let statement = self.statement(context)?;
        let mut connection = self.connection().await?;
        let outcome = async {
            let tx = connection
                .object_mut()
                .transaction()
                .await
                .map_err(postgres_error)?;
            tx.batch_execute(&statement_timeout(context.timeout))
                .await
                .map_err(postgres_error)?;
            let value = execute_in(&tx, &statement, self.limit).await?;
            tx.commit().await.map_err(postgres_error)?;
            Ok(value)
        }
        .await;
        connection.finish(outcome).await
    }
}

/// `SET LOCAL statement_timeout` to a step's timeout.
pub(crate) fn statement_timeout(timeout: Duration) -> String {
    let timeout_ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    format!("SET LOCAL statement_timeout = {timeout_ms}")
}

impl Action for Sql {
    fn name(&self) -> &str {
        "sql"
    }

    fn description(&self) -> &str {
        "Runs params.query (one statement, in a transaction of its own) with $1… bound from params.args (a CEL list over goal, steps and input); the result is {rows: [...]}."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "required": ["query"],
            "properties": {
                "query": {"type": "string", "minLength": 1},
                "args": {"type": "string", "description": "CEL over goal, steps and input yielding a list"}
            }
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(self.execute(context))
    }
}

/// The query wrapped so that Postgres returns all rows as one `jsonb` array,
/// with its size: the array only if it fits `limit`. The line breaks keep a
/// trailing `--` comment in the query from swallowing the `)`.
fn wrap(query: &str, limit: ResultLimit) -> String {
    format!(
        "WITH q AS (\n{query}\n), r AS (SELECT coalesce(jsonb_agg(to_jsonb(q)), '[]'::jsonb) AS rows FROM q) \
         SELECT CASE WHEN s.size <= {} THEN r.rows END, s.size FROM r, LATERAL (SELECT octet_length(r.rows::text)::int8 AS size) s",
        limit.bytes()
    )
}

/// A prepared statement, and whether it is the wrapped form.
enum Prepared {
    Wrapped(Statement),
    AsWritten(Statement),
}

/// Runs `statement` in the open transaction `tx` (its `statement_timeout`
/// set by the caller): wrapped, so that Postgres returns all rows as one
/// `jsonb` array, if Postgres accepts that (tried under a savepoint, so a
/// refusal aborts nothing), else as written. An error leaves `tx` aborted:
/// the caller rolls back (to its savepoint).
pub(crate) async fn execute_in(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &StepStatement,
    limit: ResultLimit,
) -> Result<Value, ActionError> {
    tx.batch_execute("SAVEPOINT synapse_wrap")
        .await
        .map_err(postgres_error)?;
    let prepared = match tx.prepare(&statement.wrapped).await {
        Ok(prepared) => Prepared::Wrapped(prepared),
        Err(e) if cannot_wrap(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT synapse_wrap")
                .await
                .map_err(postgres_error)?;
            Prepared::AsWritten(tx.prepare(&statement.query).await.map_err(postgres_error)?)
        }
        Err(e) => return Err(postgres_error(e)),
    };
    let types = match &prepared {
        Prepared::Wrapped(prepared) | Prepared::AsWritten(prepared) => prepared.params(),
    };
    let params = bind_all(types, &statement.args)?;
    match prepared {
        Prepared::Wrapped(prepared) => {
            let row = tx
                .query_one(&prepared, &param_refs(&params))
                .await
                .map_err(postgres_error)?;
            let size: i64 = row.try_get(1).map_err(postgres_error)?;
            let rows: Option<Value> = row.try_get(0).map_err(postgres_error)?;
            match rows {
                Some(rows) if usize::try_from(size).is_ok_and(|size| size <= limit.bytes()) => {
                    Ok(json!({ "rows": rows }))
                }
                _ => Err(limit.exceeded("sql")),
            }
        }
        Prepared::AsWritten(prepared) => {
            let affected = tx
                .execute(&prepared, &param_refs(&params))
                .await
                .map_err(postgres_error)?;
            Ok(json!({ "rows": [], "rows_affected": affected }))
        }
    }
}

/// Whether preparing the wrapped query failed because the statement cannot stand
/// in a `WITH` (DML without `RETURNING` is 0A000, DDL a syntax error). A genuine
/// syntax error fails again, and is reported, when the query is prepared as is.
fn cannot_wrap(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED || *code == SqlState::SYNTAX_ERROR
    )
}

/// Converts `args` for a statement whose parameters have `types`.
fn bind_all(types: &[Type], args: &[Value]) -> Result<Vec<Param>, ActionError> {
    if types.len() != args.len() {
        let (expected, got) = (types.len(), args.len());
        let detail = if got < expected {
            format!("${} has no value", got + 1)
        } else if expected == 0 {
            "the query has no parameters".to_owned()
        } else {
            format!("there is no ${}", expected + 1)
        };
        return Err(ActionError::Permanent(format!(
            "params.args: the query takes {expected} parameter{} but args gave {got} value{}: {detail}",
            plural(expected),
            plural(got)
        )));
    }
    types
        .iter()
        .zip(args)
        .enumerate()
        .map(|(i, (ty, value))| to_param(i + 1, ty, value))
        .collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The parameters as `query` wants them.
fn param_refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Converts the JSON argument for parameter `$n`, of Postgres type `ty`, to a
/// value tokio-postgres can bind (see [`Sql`] for the rules).
///
/// Values that do not fit the type, and types outside the supported set, are
/// permanent errors naming `$n`.
pub(crate) fn to_param(n: usize, ty: &Type, value: &Value) -> Result<Param, ActionError> {
    let misfit = || {
        let mut shown = value.to_string();
        if shown.chars().count() > VALUE_QUOTE_CHARS {
            shown = shown.chars().take(VALUE_QUOTE_CHARS).collect::<String>() + "…";
        }
        ActionError::Permanent(format!(
            "params.args: parameter ${n} has type {}; {shown} does not fit it",
            ty.name()
        ))
    };
    match *ty {
        Type::BOOL => nullable(value, || to_bool(value).ok_or_else(misfit)),
        Type::INT2 => nullable(value, || {
            to_int(value)
                .and_then(|i| i16::try_from(i).ok())
                .ok_or_else(misfit)
        }),
        Type::INT4 => nullable(value, || {
            to_int(value)
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(misfit)
        }),
        Type::INT8 => nullable(value, || to_int(value).ok_or_else(misfit)),
        Type::FLOAT4 => nullable(value, || {
            to_float(value)
                // Out of range for float4 (a finite value that would become infinite).
                .filter(|f| !f.is_finite() || f.abs() <= f64::from(f32::MAX))
                .map(|f| f as f32)
                .ok_or_else(misfit)
        }),
        Type::FLOAT8 => nullable(value, || to_float(value).ok_or_else(misfit)),
        Type::NUMERIC => nullable(value, || to_numeric(value).ok_or_else(misfit)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            nullable(value, || Ok(to_text(value)))
        }
        Type::JSON | Type::JSONB => nullable(value, || Ok(value.clone())),
        _ => Err(ActionError::Permanent(format!(
            "params.args: parameter ${n} has type {0}; pass it as text and cast in SQL (${n}::text::{0})",
            ty.name()
        ))),
    }
}

/// SQL `NULL` for JSON `null`, else the converted value.
fn nullable<T: ToSql + Sync + Send + 'static>(
    value: &Value,
    convert: impl FnOnce() -> Result<T, ActionError>,
) -> Result<Param, ActionError> {
    if value.is_null() {
        Ok(Box::new(None::<T>))
    } else {
        Ok(Box::new(convert()?))
    }
}

/// A boolean, or a string Postgres would read as one (`true`, `f`, `yes`, `0`, …).
fn to_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
            "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// An integer: a JSON integer, a whole float (CEL arithmetic may produce one) or a
/// string holding an integer (regex captures in `goal.params` are strings).
fn to_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            // 2^63 is exactly representable; anything from there up does not fit.
            let fits = f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(63);
            fits.then_some(f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A float: a JSON number or a string holding one (`NaN` and `Infinity` included).
fn to_float(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An exact decimal: a JSON number as written (with `arbitrary_precision`, its
/// text is the input's), or a string holding a number, `NaN` or `Infinity`.
fn to_numeric(value: &Value) -> Option<Numeric> {
    match value {
        Value::Number(n) => Numeric::parse(&n.to_string()),
        Value::String(s) => Numeric::parse(s),
        _ => None,
    }
}

/// Text: strings as they are, anything else as its JSON text.
fn to_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An error from Postgres (or the connection), classified.
pub(crate) fn postgres_error(error: tokio_postgres::Error) -> ActionError {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let mut message = format!("sql: SQLSTATE {code}: {}", db.message());
        if let Some(detail) = db.detail() {
            message.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            message.push_str(&format!(" (hint: {hint})"));
        }
        return if is_retryable_sqlstate(code) {
            ActionError::Retryable(message)
        } else {
            ActionError::Permanent(message)
        };
    }
    let mut message = format!("sql: {error}");
    let mut source = std::error::Error::source(&error);
    let mut io = false;
    while let Some(cause) = source {
        io |= cause.is::<std::io::Error>();
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    // A lost connection may be back on the next attempt; anything else that is
    // not from the server (a value the type refused) would fail the same way.
    if error.is_closed() || io {
        ActionError::Retryable(message)
    } else {
        ActionError::Permanent(message)
    }
}

/// SQLSTATE classes worth retrying: 40 transaction rollback (serialization
/// failure, deadlock), 08 connection exception, 57 operator intervention
/// (query cancelled, server shutting down).
fn is_retryable_sqlstate(code: &str) -> bool {
    ["40", "08", "57"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// A pooled connection in use by an attempt.
///
/// If the attempt is dropped (timeout, cancellation, lost lease) while a
/// statement may still be running, the statement would otherwise run on in the
/// server and the connection go back to the pool busy. Dropping this instead
/// asks Postgres to cancel the statement and keeps the connection out of the
/// pool, closing it. Only [`Busy::finish`], once the transaction has ended and
/// the session was reset, gives the connection back.
pub(crate) struct Busy {
    object: Option<deadpool_postgres::Object>,
    tls: MakeTlsConnector,
}

impl Busy {
    fn new(object: deadpool_postgres::Object, tls: MakeTlsConnector) -> Self {
        Self {
            object: Some(object),
            tls,
        }
    }

    /// The connection, to open the attempt's transaction on.
    pub(crate) fn object_mut(&mut self) -> &mut deadpool_postgres::Object {
        match &mut self.object {
            Some(object) => object,
            // `object` is only taken by `finish` and `drop`, which consume `self`.
            None => unreachable!("connection used after release"),
        }
    }

    /// The attempt's transaction has ended (committed, or rolled back when
    /// dropped): resets the session, and gives the connection back only if
    /// that worked; else closes it, so no state of this step can reach
    /// another. Statements prepared on it are gone with the reset.
    pub(crate) async fn finish<T>(mut self, outcome: T) -> T {
        // A transaction not committed was rolled back when it was dropped.
        let object = self.object_mut();
        let clean = object.batch_execute(RESET_SESSION).await.is_ok();
        object.statement_cache.clear();
        let object = self.object.take();
        if !clean {
            // Detached from the pool and dropped: the connection closes.
            drop(object.map(deadpool_postgres::Object::take));
        }
        outcome
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        let token = object.cancel_token();
        // Detached from the pool and dropped: the connection closes.
        drop(deadpool_postgres::Object::take(object));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tls = self.tls.clone();
            // Best effort: cancel requests are answered on a fresh connection,
            // over TLS checked as the connection was, without authentication.
            runtime.spawn(async move {
                let _ = token.cancel_query(tls).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::types::IsNull;

    use super::super::simple::tests::context;
    use super::*;

    /// The wire bytes of `param` as type `ty` (`None` for SQL `NULL`), encoded
    /// the way tokio-postgres encodes it, without a server.
    fn encode(param: &Param, ty: &Type) -> Option<Vec<u8>> {
        let mut buf = Default::default();
        match param.to_sql_checked(ty, &mut buf).expect("type accepted") {
            IsNull::Yes => None,
            IsNull::No => Some(buf.to_vec()),
        }
    }

    fn bound(ty: Type, value: Value) -> Option<Vec<u8>> {
        let param = to_param(1, &ty, &value).unwrap_or_else(|e| panic!("{ty} {value}: {e:?}"));
        encode(&param, &ty)
    }

    fn refused(n: usize, ty: Type, value: Value) -> String {
        match to_param(n, &ty, &value) {
            Err(ActionError::Permanent(message)) => message,
            Err(other) => panic!("{ty} {value}: not permanent: {other:?}"),
            Ok(_) => panic!("{ty} {value}: accepted"),
        }
    }

    fn be(bytes: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        Some(bytes.as_ref().to_vec())
    }

    #[test]
    fn booleans() {
        assert_eq!(bound(Type::BOOL, json!(true)), be([1]));
        assert_eq!(bound(Type::BOOL, json!(false)), be([0]));
        assert_eq!(bound(Type::BOOL, json!("yes")), be([1]));
        assert_eq!(bound(Type::BOOL, json!("F")), be([0]));
        assert_eq!(bound(Type::BOOL, json!(null)), None);
        let message = refused(2, Type::BOOL, json!("maybe"));
        assert_eq!(
            message,
            "params.args: parameter $2 has type bool; \"maybe\" does not fit it"
        );
        refused(1, Type::BOOL, json!(1));
    }

    #[test]
    fn integers() {
        assert_eq!(bound(Type::INT2, json!(-2)), be((-2i16).to_be_bytes()));
        assert_eq!(bound(Type::INT4, json!(7)), be(7i32.to_be_bytes()));
        assert_eq!(
            bound(Type::INT8, json!(i64::MAX)),
            be(i64::MAX.to_be_bytes())
        );
        assert_eq!(bound(Type::INT8, json!("42")), be(42i64.to_be_bytes()));
        assert_eq!(bound(Type::INT4, json!(3.0)), be(3i32.to_be_bytes()));
        assert_eq!(bound(Type::INT8, json!(null)), None);

        assert_eq!(
            refused(1, Type::INT8, json!("abc")),
            "params.args: parameter $1 has type int8; \"abc\" does not fit it"
        );
        assert_eq!(
            refused(3, Type::INT4, json!(1.5)),
            "params.args: parameter $3 has type int4; 1.5 does not fit it"
        );
        refused(1, Type::INT2, json!(40_000));
        refused(1, Type::INT4, json!(i64::from(i32::MAX) + 1));
        refused(1, Type::INT8, json!(u64::MAX));
        refused(1, Type::INT8, json!(9.3e18));
        refused(1, Type::INT8, json!(true));
        refused(1, Type::INT8, json!([1]));
    }

    #[test]
    fn floats() {
        assert_eq!(bound(Type::FLOAT8, json!(1.5)), be(1.5f64.to_be_bytes()));
        assert_eq!(bound(Type::FLOAT8, json!(2)), be(2f64.to_be_bytes()));
        assert_eq!(
            bound(Type::FLOAT8, json!("-0.25")),
            be((-0.25f64).to_be_bytes())
        );
        assert_eq!(bound(Type::FLOAT4, json!(0.5)), be(0.5f32.to_be_bytes()));
        assert_eq!(
            bound(Type::FLOAT4, json!("Infinity")),
            be(f32::INFINITY.to_be_bytes())
        );
        assert_eq!(bound(Type::FLOAT4, json!(null)), None);
        refused(1, Type::FLOAT4, json!(1e300));
        refused(1, Type::FLOAT8, json!("1,5"));
        refused(1, Type::FLOAT8, json!({}));
    }

    #[test]
    fn numerics_bind_exactly() {
        let exact = |text: &str| be(Numeric::parse(text).unwrap().to_binary());
        let big: Value = serde_json::from_str("12345678901234567.89").unwrap();
        assert_eq!(bound(Type::NUMERIC, big), exact("12345678901234567.89"));
        let price: Value = serde_json::from_str("1250.00").unwrap();
        assert_eq!(bound(Type::NUMERIC, price), exact("1250.00"));
        assert_eq!(bound(Type::NUMERIC, json!(7)), exact("7"));
        assert_eq!(bound(Type::NUMERIC, json!(" -0.5 ")), exact("-0.5"));
        assert_eq!(bound(Type::NUMERIC, json!("NaN")), exact("NaN"));
        let huge: Value = serde_json::from_str("1e400").unwrap();
        assert_eq!(bound(Type::NUMERIC, huge), exact("1e400"));
        assert_eq!(bound(Type::NUMERIC, json!(null)), None);
        assert_eq!(
            refused(2, Type::NUMERIC, json!("12,50")),
            "params.args: parameter $2 has type numeric; \"12,50\" does not fit it"
        );
        refused(1, Type::NUMERIC, json!(true));
        refused(1, Type::NUMERIC, json!([1]));
        let beyond: Value = serde_json::from_str("1e200000").unwrap();
        refused(1, Type::NUMERIC, beyond);
    }

    #[test]
    fn text() {
        for ty in [
            Type::TEXT,
            Type::VARCHAR,
            Type::BPCHAR,
            Type::NAME,
            Type::UNKNOWN,
        ] {
            assert_eq!(bound(ty.clone(), json!("héllo")), be("héllo"), "{ty}");
        }
        assert_eq!(bound(Type::TEXT, json!(12)), be("12"));
        assert_eq!(bound(Type::TEXT, json!(1.5)), be("1.5"));
        assert_eq!(bound(Type::TEXT, json!(true)), be("true"));
        assert_eq!(bound(Type::TEXT, json!({"a": [1]})), be(r#"{"a":[1]}"#));
        assert_eq!(bound(Type::TEXT, json!(null)), None);
    }

    #[test]
    fn json_and_jsonb() {
        let value = json!({"a": [1, "x", null]});
        assert_eq!(
            bound(Type::JSON, value.clone()),
            be(r#"{"a":[1,"x",null]}"#)
        );
        // jsonb's binary format is a version byte, then the text.
        let mut expected = vec![1];
        expected.extend_from_slice(br#"{"a":[1,"x",null]}"#);
        assert_eq!(bound(Type::JSONB, value), Some(expected));
        assert_eq!(bound(Type::JSONB, json!("s")), be(b"\x01\"s\""));
        assert_eq!(bound(Type::JSONB, json!(null)), None);
    }

    #[test]
    fn other_types_must_be_cast_from_text() {
        assert_eq!(
            refused(2, Type::UUID, json!("7c0e0f9e-55b5-4a48-9a58-6d4b4e0a2f1a")),
            "params.args: parameter $2 has type uuid; pass it as text and cast in SQL ($2::text::uuid)"
        );
        refused(1, Type::TIMESTAMPTZ, json!(null));
        refused(1, Type::INT4_ARRAY, json!([1, 2]));
    }

    #[test]
    fn argument_count_must_match() {
        let two = [Type::INT4, Type::TEXT];
        let err = bind_all(&two, &[json!(1)]).err().unwrap();
        assert_eq!(
            err,
            ActionError::Permanent(
                "params.args: the query takes 2 parameters but args gave 1 value: $2 has no value"
                    .to_owned()
            )
        );
        let err = bind_all(&[Type::INT4], &[json!(1), json!(2)])
            .err()
            .unwrap();
        assert_eq!(
            err.message(),
            "params.args: the query takes 1 parameter but args gave 2 values: there is no $2"
        );
        let err = bind_all(&[], &[json!(1)]).err().unwrap();
        assert!(
            err.message().ends_with("the query has no parameters"),
            "{err:?}"
        );
        assert_eq!(bind_all(&two, &[json!(1), json!("x")]).unwrap().len(), 2);
        assert!(bind_all(&[], &[]).unwrap().is_empty());
    }

    #[test]
    fn a_misfit_names_its_parameter() {
        let err = bind_all(&[Type::INT4, Type::INT8], &[json!(1), json!("abc")])
            .err()
            .unwrap();
        assert!(
            err.message().contains("parameter $2 has type int8"),
            "{err:?}"
        );
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let message = refused(1, Type::INT8, json!("x".repeat(500)));
        assert!(message.ends_with("… does not fit it"), "{message}");
        assert!(message.len() < 250, "{message}");
    }

    #[test]
    fn wrapping() {
        assert_eq!(
            wrap("select 1 -- one", ResultLimit::new(1000)),
            "WITH q AS (\nselect 1 -- one\n), r AS (SELECT coalesce(jsonb_agg(to_jsonb(q)), '[]'::jsonb) AS rows FROM q) \
             SELECT CASE WHEN s.size <= 1000 THEN r.rows END, s.size FROM r, LATERAL (SELECT octet_length(r.rows::text)::int8 AS size) s"
        );
    }

    #[test]
    fn retryable_sqlstates() {
        for code in ["40001", "40P01", "08006", "08001", "57014", "57P01"] {
            assert!(is_retryable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42601", "42P01", "22P02", "0A000", "53300"] {
            assert!(!is_retryable_sqlstate(code), "{code}");
        }
    }

    /// The action on a pool whose server refuses connections: no Postgres needed.
    fn unreachable_sql() -> Sql {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgresql://nobody@127.0.0.1:{port}/none");
        let (config, tls) = crate::postgres_tls::configure(&url).unwrap();
        let manager = deadpool_postgres::Manager::new(config, tls.clone());
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .unwrap();
        Sql::new(pool, tls)
    }

    #[tokio::test]
    async fn no_connection_is_retryable() {
        let sql = unreachable_sql();
        let err = sql
            .run(&context(json!({"query": "select 1"}), json!({})))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(
            err.message()
                .starts_with("sql: could not get a database connection: "),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bad_params_fail_before_connecting() {
        let sql = unreachable_sql();
        for (params, message) in [
            (json!({}), "params.query: \"query\" is required"),
            (
                json!({"query": " "}),
                "params.query: query must not be empty",
            ),
            (
                json!({"query": 1}),
                "params.query: expected a string, got a number",
            ),
            (
                json!({"query": "select $1", "args": ["x"]}),
                "params.args: expected a string, got an array",
            ),
        ] {
            let err = sql
                .run(&context(params.clone(), json!({"id": 3})))
                .await
                .unwrap_err();
            assert_eq!(err, ActionError::Permanent(message.to_owned()), "{params}");
        }
        // An expression that gives the wrong type is a definition error, like one that
        // cannot be evaluated.
        let err = sql
            .run(&context(
                json!({"query": "select $1", "args": "input.id"}),
                json!({"id": 3}),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Definition(
                "params.args: expected the expression to yield a list, got a number".to_owned()
            )
        );
        let err = sql
            .run(&context(
                json!({"query": "select $1", "args": "[input.id"}),
                json!({}),
            ))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message()
                .starts_with("params.args: invalid CEL expression"),
            "{err:?}"
        );
    }

    /// The action on the database named by `SYNAPSE_TEST_DATABASE_URL`, with
    /// `options` (server settings such as `-c statement_timeout=100`).
    fn test_sql(options: &str) -> Sql {
        let url = std::env::var("SYNAPSE_TEST_DATABASE_URL")
            .expect("set SYNAPSE_TEST_DATABASE_URL to run this test");
        let (mut config, tls) = crate::postgres_tls::configure(&url).unwrap();
        config.options(options);
        let manager = deadpool_postgres::Manager::new(config, tls.clone());
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(2)
            .build()
            .unwrap();
        Sql::new(pool, tls)
    }

    #[tokio::test]
    #[ignore = "needs Postgres: set SYNAPSE_TEST_DATABASE_URL and run with --ignored"]
    async fn against_postgres() {
        let sql = test_sql("");
        let run = |params: Value, input: Value| {
            let sql = &sql;
            async move { sql.run(&context(params, input)).await }
        };
        let table = format!("synapse_sql_test_{}", std::process::id());

        let created = run(json!({"query": format!("create temp table if not exists {table} (id int8 primary key, name text, tags jsonb); drop table if exists {table}")}), json!({})).await;
        assert!(created.is_err(), "two statements are refused: {created:?}");
        run(
            json!({"query": format!("drop table if exists {table}")}),
            json!({}),
        )
        .await
        .unwrap();
        assert_eq!(
            run(json!({"query": format!("create table {table} (id int8 primary key, name text, tags jsonb);")}), json!({})).await,
            Ok(json!({"rows": [], "rows_affected": 0}))
        );
        let inserted = run(
            json!({"query": format!("insert into {table} values ($1, $2, $3), ($1 + 1, 'b', null)"),
                   "args": "[input.id, input.name, input.tags]"}),
            json!({"id": "1", "name": "a", "tags": ["x", {"y": 2}]}),
        )
        .await;
        assert_eq!(inserted, Ok(json!({"rows": [], "rows_affected": 2})));
        let returned = run(
            json!({"query": format!("update {table} set name = upper(name) where id = $1 returning id, name"),
                   "args": "[params.which]", "which": 2}),
            json!({}),
        )
        .await;
        assert_eq!(returned, Ok(json!({"rows": [{"id": 2, "name": "B"}]})));
        // `$2` has no type to infer but text: `true` arrives as "true".
        let selected = run(
            json!({"query": format!("select id, name, tags, $1::float8 as f, $2 as flag, now() is not null as t from {table} order by id -- all\n;"),
                   "args": "[0.5, true]"}),
            json!({}),
        )
        .await;
        assert_eq!(
            selected,
            Ok(json!({"rows": [
                {"id": 1, "name": "a", "tags": ["x", {"y": 2}], "f": 0.5, "flag": "true", "t": true},
                {"id": 2, "name": "B", "tags": null, "f": 0.5, "flag": "true", "t": true}
            ]}))
        );
        assert_eq!(
            run(
                json!({"query": format!("select * from {table} where false")}),
                json!({})
            )
            .await,
            Ok(json!({"rows": []}))
        );
        assert_eq!(
            run(json!({"query": "select $1::text::uuid as u, $2 as n", "args": "['7c0e0f9e-55b5-4a48-9a58-6d4b4e0a2f1a', null]"}), json!({})).await,
            Ok(json!({"rows": [{"u": "7c0e0f9e-55b5-4a48-9a58-6d4b4e0a2f1a", "n": null}]}))
        );

        let duplicate = run(
            json!({"query": format!("insert into {table} (id) values (1)")}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(!duplicate.is_retryable());
        assert!(
            duplicate
                .message()
                .starts_with("sql: SQLSTATE 23505: duplicate key"),
            "{duplicate:?}"
        );
        let syntax = run(json!({"query": "selec 1"}), json!({}))
            .await
            .unwrap_err();
        assert!(
            syntax.message().starts_with("sql: SQLSTATE 42601: "),
            "{syntax:?}"
        );
        let uuid = run(
            json!({"query": "select $1::uuid", "args": "['x']"}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert_eq!(uuid.message(), "params.args: parameter $1 has type uuid; pass it as text and cast in SQL ($1::text::uuid)");
        let misfit = run(
            json!({"query": "select $1::int4", "args": "[1.5]"}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(
            misfit.message().contains("parameter $1 has type int4"),
            "{misfit:?}"
        );
        let count = run(
            json!({"query": "select $1::int4, $2::int4", "args": "[1]"}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(count.message().ends_with("$2 has no value"), "{count:?}");

        // A dropped attempt cancels its statement.
        let marker = format!("synapse_cancel_{}", std::process::id());
        let running = |want: i64| {
            let run = &run;
            let pattern = format!("%as {marker}%");
            async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    let active = run(
                        json!({"query": "select count(*) as n from pg_stat_activity \
                                         where query like $1 and pid <> pg_backend_pid()",
                               "args": "[params.pattern]", "pattern": pattern}),
                        json!({}),
                    )
                    .await
                    .unwrap();
                    if active["rows"][0]["n"] == json!(want) {
                        return;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "want {want}: {active}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        };
        let ctx = context(
            json!({"query": format!("select pg_sleep(30) as {marker}")}),
            json!({}),
        );
        let mut slow = sql.run(&ctx);
        tokio::select! {
            outcome = &mut slow => panic!("pg_sleep(30) ended: {outcome:?}"),
            () = running(1) => {}
        }
        drop(slow);
        running(0).await;

        // The step's timeout is the statement's statement_timeout, whatever the
        // session's (57014, worth retrying).
        let limited = test_sql("-c statement_timeout=0");
        let mut ctx = context(json!({"query": "select pg_sleep(2)"}), json!({}));
        ctx.timeout = std::time::Duration::from_millis(100);
        let timed_out = limited.run(&ctx).await.unwrap_err();
        assert!(timed_out.is_retryable(), "{timed_out:?}");
        assert!(
            timed_out.message().starts_with("sql: SQLSTATE 57014: "),
            "{timed_out:?}"
        );

        // Refused before anything runs; whatever a function changed is undone.
        let refused = run(
            json!({"query": "-- x\nSET search_path = nowhere"}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(
            refused.message().starts_with("sql: SET is refused"),
            "{refused:?}"
        );
        let single = test_sql("");
        single
            .run(&context(
                json!({"query": "select set_config('search_path', 'nowhere', false)"}),
                json!({}),
            ))
            .await
            .unwrap();
        for _ in 0..3 {
            let path = single
                .run(&context(
                    json!({"query": "select current_setting('search_path') as p"}),
                    json!({}),
                ))
                .await
                .unwrap();
            assert_eq!(path, json!({"rows": [{"p": "\"$user\", public"}]}));
        }
        // Rows over the limit are measured by Postgres and never sent.
        let small = test_sql("").with_result_limit(ResultLimit::new(1000));
        let err = small
            .run(&context(
                json!({"query": "select repeat('x', 2000) as big"}),
                json!({}),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err.message(),
            "sql: result is larger than the 1000 bytes limit (--max-result-size)"
        );

        run(json!({"query": format!("drop table {table}")}), json!({}))
            .await
            .unwrap();
    }
}
