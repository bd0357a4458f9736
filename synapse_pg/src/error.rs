//! The extension's errors, each mapped to the SQLSTATE a client can act on.
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use synapse_worker::blueprint::Problem;

/// Everything the SQL API can refuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A blueprint broke one or more rules; all of them are listed.
    #[error("invalid blueprint: {}", first_problem(.0))]
    InvalidBlueprint(Vec<Problem>),
    /// An argument is out of its domain.
    #[error("{0}")]
    InvalidParameter(String),
    /// A template pattern is not a valid regular expression.
    #[error("invalid pattern for template \"{name}\": {reason}")]
    InvalidPattern {
        /// Template name.
        name: String,
        /// What the regex parser said.
        reason: String,
    },
    /// A value is over a budget (JSON size or nesting); `message` names the field.
    #[error("{message}")]
    LimitExceeded {
        /// Where in the JSON document, `$` for the whole value.
        path: String,
        /// What is over which limit.
        message: String,
    },
    /// The goal id names no goal.
    #[error("goal {0} does not exist")]
    GoalNotFound(i64),
    /// A task is not in the state the call needs (e.g. a lapsed attempt).
    #[error("{0}")]
    NotRunning(String),
    /// SPI failed underneath us.
    #[error("internal error: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

fn first_problem(problems: &[Problem]) -> String {
    match problems {
        [] => "no problems".into(),
        [only] => format!("{}: {}", only.path, only.message),
        [first, rest @ ..] => {
            format!(
                "{}: {} (and {} more problems)",
                first.path,
                first.message,
                rest.len()
            )
        }
    }
}

impl Error {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            Error::InvalidBlueprint(_) | Error::InvalidParameter(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            Error::InvalidPattern { .. } => PgSqlErrorCode::ERRCODE_INVALID_REGULAR_EXPRESSION,
            Error::LimitExceeded { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            Error::GoalNotFound(_) => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            Error::NotRunning(_) => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
}

impl From<Error> for ErrorReport {
    fn from(error: Error) -> Self {
        let code = error.sqlstate();
        let report = ErrorReport::new(code, error.to_string(), "synapse");
        match error {
            Error::InvalidBlueprint(problems) => report
                .set_detail(
                    problems
                        .iter()
                        .map(|p| format!("{}: {}", p.path, p.message))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
                .set_hint("synapse.validate_blueprint(blueprint) lists every problem as JSON."),
            Error::LimitExceeded { path, .. } if path != "$" => {
                report.set_detail(format!("at {path}"))
            }
            _ => report,
        }
    }
}

/// Result of the extension's plain-Rust functions.
pub type Result<T> = std::result::Result<T, Error>;
