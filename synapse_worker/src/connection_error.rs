//! Why a Postgres connection failed, in words a person can act on, and the
//! connection string with its password masked. The worker's logs and every
//! command of the CLI describe connection failures with this, so "db error"
//! or "error connecting to server" never reach a user alone.
use std::error::Error;
use std::sync::LazyLock;

use regex::Regex;

/// `cannot connect to Postgres at <masked url>: <why>`.
pub fn cannot_connect(url: &str, error: &(dyn Error + 'static)) -> String {
    format!(
        "cannot connect to Postgres at {}: {}",
        mask(url),
        describe(url, error)
    )
}

/// Why `error` (or the first Postgres or I/O error among its causes)
/// happened: the server's message with its SQLSTATE (`database "x" does not
/// exist`, `password authentication failed for user "app"`), `connection
/// refused`, `could not translate host name "x" to address: …`, `connection
/// timed out`, `the server does not accept TLS`, `the server's certificate
/// is not trusted: …`; otherwise every message of the chain. `url` names the
/// host a failed name lookup was for and the `sslrootcert` a certificate was
/// checked against; it is never part of the answer otherwise.
pub fn describe(url: &str, error: &(dyn Error + 'static)) -> String {
    let mut cause: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(postgres) = current.downcast_ref::<tokio_postgres::Error>() {
            if let Some(db) = postgres.as_db_error() {
                let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
                // pg_hba.conf refused a plaintext connection: the server's words
                // do not say that TLS may be let in.
                if db.code().code().starts_with("28") && db.message().ends_with("no encryption") {
                    text.push_str(
                        "; the server may accept it over TLS: set sslmode=verify-full (or require) in the URL",
                    );
                }
                return text;
            }
            if postgres.is_closed() {
                return "the server closed the connection".to_owned();
            }
            if let Some(tls) = describe_tls(url, postgres) {
                return tls;
            }
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return describe_io(url, io);
        }
        cause = current.source();
    }
    chain(error)
}

/// Whether `error` is a TLS handshake the server's certificate failed, or
/// that a server without TLS refused: the URL's TLS settings must change,
/// waiting would not help.
pub fn tls_refused(error: &tokio_postgres::Error) -> bool {
    if error.to_string() != "error performing TLS handshake" {
        return false;
    }
    error.source().is_some_and(|cause| {
        let text = cause.to_string();
        text == "server does not support TLS"
            || (cause.downcast_ref::<native_tls::Error>().is_some()
                && text.contains("certificate verify failed"))
    })
}

/// Why a TLS handshake failed, if `error` says one did.
fn describe_tls(url: &str, error: &tokio_postgres::Error) -> Option<String> {
    // tokio-postgres tells this failure only by its message.
    if error.to_string() != "error performing TLS handshake" {
        return None;
    }
    let Some(cause) = error.source() else {
        return Some("the TLS handshake failed".to_owned());
    };
    let text = cause.to_string();
    if cause.downcast_ref::<native_tls::Error>().is_none() {
        return Some(match text.as_str() {
            "server does not support TLS" => {
                "the server does not accept TLS, which the URL's sslmode requires".to_owned()
            }
            _ => format!("the TLS handshake failed: {text}"),
        });
    }
    if !text.contains("certificate verify failed") {
        return Some(format!("the TLS handshake failed: {text}"));
    }
    // OpenSSL's reason comes last, in parentheses, after its error stack.
    let reason = text
        .rsplit_once(" (")
        .and_then(|(_, reason)| reason.strip_suffix(')'))
        .unwrap_or(&text);
    if reason == "hostname mismatch" {
        return Some(match host(url) {
            Some(host) => {
                format!("the server's certificate is not for host \"{host}\" (hostname mismatch)")
            }
            None => "the server's certificate is not for the host connected to (hostname mismatch)"
                .to_owned(),
        });
    }
    let trusted = match crate::postgres_tls::split(url).map(|(_, tls)| tls.root_cert) {
        Ok(Some(crate::postgres_tls::RootCert::File(path))) => {
            format!("by the CAs of sslrootcert {}", path.display())
        }
        _ => "by the system's CAs; give its CA's file as sslrootcert".to_owned(),
    };
    Some(format!(
        "the server's certificate is not trusted: {reason} ({trusted})"
    ))
}

/// Every message of the chain, joined by `: `, each once (a wrapper that
/// repeats its cause's text adds nothing).
fn chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = current.source();
    }
    out
}

fn describe_io(url: &str, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let text = error.to_string();
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        ErrorKind::TimedOut => "connection timed out".to_owned(),
        ErrorKind::ConnectionReset => "the server reset the connection".to_owned(),
        ErrorKind::NotFound => format!("no such socket: {text}"),
        _ if text.contains("failed to lookup address") => {
            let reason = text
                .split_once(": ")
                .map_or(text.as_str(), |(_, reason)| reason);
            match host(url) {
                Some(host) => {
                    format!("could not translate host name \"{host}\" to address: {reason}")
                }
                None => format!("could not translate host name to address: {reason}"),
            }
        }
        _ => text,
    }
}

/// The (first) host named by a connection string, if it parses.
fn host(url: &str) -> Option<String> {
    let (config, _) = crate::postgres_tls::parse(url).ok()?;
    config.get_hosts().iter().find_map(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => None,
    })
}

static KEY_VALUE_PASSWORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)").expect("valid pattern")
});

/// `url` with its password replaced by `***`, in either form Postgres takes:
/// `postgresql://user:secret@host/db` (and `?password=secret`), or
/// `host=… password=secret`.
pub fn mask(url: &str) -> String {
    let masked = match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((user_info, hosts)) => {
                    let user = match user_info.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => user_info.to_owned(),
                    };
                    format!("{scheme}://{user}@{hosts}{tail}")
                }
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    KEY_VALUE_PASSWORD
        .replace_all(&masked, "${1}***")
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_every_form() {
        assert_eq!(
            mask("postgresql://app:s3cret@db:5432/app"),
            "postgresql://app:***@db:5432/app"
        );
        assert_eq!(
            mask("postgres://app:p%40ss:w@rd@db/app?sslmode=disable"),
            "postgres://app:***@db/app?sslmode=disable"
        );
        assert_eq!(
            mask("postgresql://db/app?user=app&password=s3cret&sslmode=require"),
            "postgresql://db/app?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            mask("host=db user=app password='s 3cret' dbname=app"),
            "host=db user=app password=*** dbname=app"
        );
        assert_eq!(mask("host=db PASSWORD = s3cret"), "host=db PASSWORD = ***");
        assert_eq!(
            mask("postgresql://postgres@127.0.0.1:25432/synapse"),
            "postgresql://postgres@127.0.0.1:25432/synapse"
        );
        assert_eq!(mask("not a url"), "not a url");
    }

    #[test]
    fn io_failures_say_what_happened() {
        let url = "postgresql://app:s3cret@nosuchhost.invalid/app";
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(describe(url, &refused).starts_with("connection refused"));
        let lookup = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        assert_eq!(
            describe(url, &lookup),
            "could not translate host name \"nosuchhost.invalid\" to address: Name or service not known"
        );
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(describe(url, &timeout), "connection timed out");
    }

    #[tokio::test]
    async fn a_closed_port_is_connection_refused_through_every_wrapper() {
        // Port 1 on the loopback: nothing listens there.
        let url = "postgresql://app:s3cret@127.0.0.1:1/app";
        let (config, tls) = crate::postgres_tls::configure(url).unwrap();
        let error = config
            .connect(tls)
            .await
            .err()
            .expect("nothing listens on port 1");
        let text = cannot_connect(url, &error);
        assert!(
            text.starts_with("cannot connect to Postgres at postgresql://app:***@127.0.0.1:1/app: connection refused"),
            "{text}"
        );
        // Wrapped the way the worker's pool and anyhow wrap it.
        let pooled = deadpool_postgres::PoolError::Backend(error);
        assert!(describe(url, &pooled).starts_with("connection refused"));
        let wrapped = anyhow::Error::new(pooled).context("registering actions");
        assert!(describe(url, wrapped.as_ref()).starts_with("connection refused"));
        assert!(!text.contains("s3cret"));
    }

    /// A server that answers every TLS request with "no".
    async fn plaintext_only_server() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn a_server_without_tls_is_named_when_the_url_requires_it() {
        let port = plaintext_only_server().await;
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgresql://app:s3cret@127.0.0.1:{port}/app?sslmode={mode}");
            let (config, tls) = crate::postgres_tls::configure(&url).unwrap();
            let error = config.connect(tls).await.err().expect("TLS refused");
            let pooled = deadpool_postgres::PoolError::Backend(error);
            assert_eq!(
                cannot_connect(&url, &pooled),
                format!(
                    "cannot connect to Postgres at postgresql://app:***@127.0.0.1:{port}/app?sslmode={mode}: \
                     the server does not accept TLS, which the URL's sslmode requires"
                )
            );
        }
    }

    #[test]
    fn other_errors_keep_their_whole_chain() {
        let error = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe("", error.as_ref()), "outer: inner");
    }
}
