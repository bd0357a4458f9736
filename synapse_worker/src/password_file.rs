//! Passwords read from files (`--database-password-file`,
//! `--redis-password-file`), so that they appear in neither `ps` output nor
//! the environment: the file holds the password (trailing whitespace, such as
//! the last line break, is not part of it, as for the forwarder's
//! `synapse.redis_password_file`), put into the
//! connection string the worker builds its connections from (never printed
//! unmasked).
use std::path::Path;

use anyhow::{bail, Context};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

/// The password in `path`.
pub fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let password = text.trim_end();
    if password.is_empty() {
        bail!("{flag}: {} holds no password", path.display());
    }
    Ok(password.to_owned())
}

/// `url` (either form Postgres takes) with `password` as its password: a
/// `password` parameter after the others, which tokio-postgres reads after
/// the user info, so it replaces one given there.
pub fn postgres_url_with(url: &str, password: &str) -> String {
    if url.contains("://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        let encoded = utf8_percent_encode(password, NON_ALPHANUMERIC);
        format!("{url}{separator}password={encoded}")
    } else {
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} password='{quoted}'")
    }
}

/// `url` with `password` as its password (the user, if any, kept).
pub fn redis_url_with(url: &str, password: &str) -> anyhow::Result<String> {
    let mut parsed =
        url::Url::parse(url).map_err(|error| anyhow::anyhow!("invalid Redis URL: {error}"))?;
    if parsed.set_password(Some(password)).is_err() {
        bail!(
            "a Redis URL of scheme {} takes no password",
            parsed.scheme()
        );
    }
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres_password(url: &str) -> String {
        let (config, _) = crate::postgres_tls::parse(url).unwrap();
        String::from_utf8(config.get_password().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn the_file_password_replaces_the_urls_in_either_form() {
        let tricky = "p@ss w'rd&x=\\1%";
        for url in [
            "postgresql://app@db/app",
            "postgresql://app:old@db:5433/app?sslmode=disable",
            "host=db user=app dbname=app",
            "host=db user=app password=old dbname=app",
        ] {
            assert_eq!(
                postgres_password(&postgres_url_with(url, tricky)),
                tricky,
                "{url}"
            );
        }
        let url = postgres_url_with("postgresql://app@db/app?sslmode=require", "s3cret");
        assert_eq!(
            crate::connection_error::mask(&url),
            "postgresql://app@db/app?sslmode=require&password=***"
        );
    }

    #[test]
    fn redis_urls_take_the_password_and_keep_their_user() {
        assert_eq!(
            redis_url_with("redis://127.0.0.1:6379/0", "p@ss").unwrap(),
            "redis://:p%40ss@127.0.0.1:6379/0"
        );
        assert_eq!(
            redis_url_with("rediss://worker:old@redis:6380/1", "new").unwrap(),
            "rediss://worker:new@redis:6380/1"
        );
        assert!(redis_url_with("not a url", "x").is_err());
    }

    #[test]
    fn a_file_gives_its_text_without_the_line_break() {
        let dir = std::env::temp_dir().join(format!("synapse-password-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read(&file, "--x").unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(
            read(&file, "--x").unwrap_err().to_string(),
            format!("--x: {} holds no password", file.display())
        );
        let missing = dir.join("missing");
        assert!(read(&missing, "--x")
            .unwrap_err()
            .to_string()
            .starts_with(&format!("--x: cannot read {}", missing.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
