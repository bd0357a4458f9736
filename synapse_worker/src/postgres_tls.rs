//! TLS to Postgres as the connection string asks for it, with libpq's meaning
//! of `sslmode` and `sslrootcert`. Every connection the worker and the CLI
//! make is configured by [`configure`].
//!
//! | `sslmode`                   | encrypted                  | the server's certificate            |
//! |-----------------------------|----------------------------|-------------------------------------|
//! | `disable`                   | never                      | —                                   |
//! | `allow`, `prefer` (default) | when the server offers TLS | checked only against `sslrootcert`  |
//! | `require`                   | always                     | checked only against `sslrootcert`  |
//! | `verify-ca`                 | always                     | signed by a trusted CA              |
//! | `verify-full`               | always                     | signed by a trusted CA, for the host |
//!
//! The trusted CAs are those of the `sslrootcert` file, or the system's when
//! none is given (or with `sslrootcert=system`, which wants `verify-full`).
//! tokio-postgres reads only `sslmode=disable|prefer|require` and refuses
//! `sslrootcert`, so both are taken out of the string here and tokio-postgres
//! parses the rest; the connector made here checks what the mode asks.
use std::path::PathBuf;

use native_tls::{Certificate, TlsConnector};
pub use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::Host;

/// How much TLS a connection asks for (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// libpq tries without TLS first; tokio-postgres cannot, so it is taken
    /// as [`SslMode::Prefer`], which encrypts whenever `allow` could.
    Allow,
    /// TLS when the server offers it, plaintext otherwise (libpq's default).
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, and a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, and a certificate signed by a trusted CA for the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConfigError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(ConfigError::SslMode(value.to_owned())),
        })
    }

    /// Its name in a connection string.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted CA certificates come from (libpq's `sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// The system's trust store (`sslrootcert=system`).
    System,
    /// A PEM file of one or more CA certificates, trusted instead of the system's.
    File(PathBuf),
}

/// What the server's certificate must pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: the connection is encrypted, the server not authenticated.
    None,
    /// A chain to a trusted CA, whatever host it names.
    Chain,
    /// A chain to a trusted CA, naming the host connected to.
    Full,
}

/// The TLS settings of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`; `prefer` when absent (`verify-full` with `sslrootcert=system`).
    pub mode: SslMode,
    /// `sslrootcert`, if given.
    pub root_cert: Option<RootCert>,
}

impl TlsSettings {
    /// What the server's certificate must pass. Like libpq, a root
    /// certificate file makes the weaker modes check the chain too.
    pub fn verification(&self) -> Verification {
        match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Verification::Full,
            (SslMode::VerifyCa, _) | (_, Some(RootCert::File(_))) => Verification::Chain,
            _ => Verification::None,
        }
    }

    /// The mode tokio-postgres applies, which encrypts or refuses (the
    /// connector checks the rest).
    fn transport(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Transport;
        match self.mode {
            SslMode::Disable => Transport::Disable,
            SslMode::Allow | SslMode::Prefer => Transport::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Transport::Require,
        }
    }

    /// The connector that checks what [`TlsSettings::verification`] says;
    /// it reads the `sslrootcert` file.
    pub fn connector(&self) -> Result<MakeTlsConnector, ConfigError> {
        let mut builder = TlsConnector::builder();
        match self.verification() {
            Verification::None => {
                builder.danger_accept_invalid_certs(true);
            }
            Verification::Chain => {
                builder.danger_accept_invalid_hostnames(true);
            }
            Verification::Full => {}
        }
        let root_file = match &self.root_cert {
            Some(RootCert::File(path)) if self.mode != SslMode::Disable => Some(path),
            _ => None,
        };
        if let Some(path) = root_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::RootCertUnreadable {
                path: path.clone(),
                source,
            })?;
            let certificates = Certificate::stack_from_pem(&pem)
                .ok()
                .filter(|certificates| !certificates.is_empty())
                .ok_or_else(|| ConfigError::RootCertEmpty(path.clone()))?;
            builder.disable_built_in_roots(true);
            for certificate in certificates {
                builder.add_root_certificate(certificate);
            }
        }
        builder
            .build()
            .map(MakeTlsConnector::new)
            .map_err(|error| ConfigError::Tls(error.to_string()))
    }
}

/// A connection string that cannot be used. None of these messages holds
/// the string itself (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// tokio-postgres refused what is left of it.
    #[error("{0}")]
    Parse(String),
    /// An `sslmode` libpq does not know.
    #[error(
        "invalid sslmode \"{0}\": use disable, allow, prefer, require, verify-ca or verify-full"
    )]
    SslMode(String),
    /// `sslrootcert=system` with a mode that would not check the host (libpq refuses it too).
    #[error("sslmode \"{0}\" may not be used with sslrootcert=system (use verify-full)")]
    WeakModeWithSystemRoots(&'static str),
    /// The `sslrootcert` file cannot be read.
    #[error("cannot read sslrootcert {}: {source}", .path.display())]
    RootCertUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The `sslrootcert` file holds no PEM certificate.
    #[error("sslrootcert {} holds no PEM certificate", .0.display())]
    RootCertEmpty(PathBuf),
    /// The TLS library could not make a connector.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl ConfigError {
    /// tokio-postgres says "invalid connection string" and keeps the reason
    /// in its source: both, on one line.
    fn parse(error: &tokio_postgres::Error) -> ConfigError {
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(error);
        while let Some(current) = cause {
            text.push_str(": ");
            text.push_str(&current.to_string());
            cause = current.source();
        }
        ConfigError::Parse(text)
    }
}

/// The configuration and TLS connector for `url`: what every connection of
/// the worker and the CLI is made with.
pub fn configure(url: &str) -> Result<(tokio_postgres::Config, MakeTlsConnector), ConfigError> {
    let (config, settings) = parse(url)?;
    Ok((config, settings.connector()?))
}

/// `url` parsed, with its TLS settings, without reading any file.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), ConfigError> {
    let (rest, settings) = split(url)?;
    let mut config: tokio_postgres::Config =
        rest.parse().map_err(|error| ConfigError::parse(&error))?;
    // TLS needs a host name, and tokio-postgres takes none from `hostaddr`:
    // the addresses name themselves (a certificate may hold an IP address).
    if config.get_hosts().is_empty() {
        let addresses: Vec<String> = config
            .get_hostaddrs()
            .iter()
            .map(|address| address.to_string())
            .collect();
        for address in addresses {
            config.host(address);
        }
    }
    // libpq never uses TLS over a Unix socket, whatever the mode.
    let unix_only = config.get_hostaddrs().is_empty()
        && !config
            .get_hosts()
            .iter()
            .any(|host| matches!(host, Host::Tcp(_)));
    config.ssl_mode(if unix_only {
        tokio_postgres::config::SslMode::Disable
    } else {
        settings.transport()
    });
    Ok((config, settings))
}

/// `url` without its `sslmode` and `sslrootcert`, and the settings they
/// give (the last of each counts). Both forms Postgres takes are read:
/// `postgresql://…?sslmode=…` and `host=… sslmode=…`. A string this cannot
/// read is returned whole, for tokio-postgres to say what is wrong with it.
pub fn split(url: &str) -> Result<(String, TlsSettings), ConfigError> {
    let (rest, taken) = take_tls_parameters(url).unwrap_or_else(|| (url.to_owned(), Vec::new()));
    let mut mode = None;
    let mut root_cert = None;
    for (key, value) in taken {
        match key {
            Key::SslMode => mode = Some(SslMode::parse(&value)?),
            // An empty value is no value, as in libpq.
            Key::SslRootCert if value.is_empty() => root_cert = None,
            Key::SslRootCert if value == "system" => root_cert = Some(RootCert::System),
            Key::SslRootCert => root_cert = Some(RootCert::File(PathBuf::from(value))),
        }
    }
    let system = root_cert == Some(RootCert::System);
    let mode = mode.unwrap_or(if system {
        SslMode::VerifyFull
    } else {
        SslMode::Prefer
    });
    if system && mode != SslMode::VerifyFull {
        return Err(ConfigError::WeakModeWithSystemRoots(mode.name()));
    }
    Ok((rest, TlsSettings { mode, root_cert }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    SslMode,
    SslRootCert,
}

fn key(name: &str) -> Option<Key> {
    match name {
        "sslmode" => Some(Key::SslMode),
        "sslrootcert" => Some(Key::SslRootCert),
        _ => None,
    }
}

type Taken = Vec<(Key, String)>;

/// Takes the TLS parameters out of `url`, read the way tokio-postgres reads it.
fn take_tls_parameters(url: &str) -> Option<(String, Taken)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"));
    match rest {
        Some(rest) => take_from_url(url, url.len() - rest.len()),
        None => take_from_key_values(url),
    }
}

/// `postgresql://user:password@hosts/db?key=value&…`: the credentials end at
/// the first `@`, and neither hosts nor the database name hold a `?`.
fn take_from_url(url: &str, scheme_len: usize) -> Option<(String, Taken)> {
    let rest = &url[scheme_len..];
    let authority = rest.find('@').map_or(0, |at| at + 1);
    let Some(question) = rest[authority..].find('?') else {
        return Some((url.to_owned(), Vec::new()));
    };
    let query_start = scheme_len + authority + question;
    let (head, query) = (&url[..query_start], &url[query_start + 1..]);
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for parameter in query.split('&').filter(|parameter| !parameter.is_empty()) {
        let (name, value) = parameter.split_once('=')?;
        match key(&percent_decode(name)?) {
            Some(key) => taken.push((key, percent_decode(value)?)),
            None => kept.push(parameter),
        }
    }
    let rest = if kept.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    Some((rest, taken))
}

/// `%XX` escapes decoded; `None` if the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `key = value …`, values bare or in single quotes, with `\` escapes.
fn take_from_key_values(text: &str) -> Option<(String, Taken)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let offset = |i: usize| chars.get(i).map_or(text.len(), |&(offset, _)| offset);
    let skip_space = |mut i: usize| {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        i
    };
    let mut kept = String::new();
    let mut copied = 0;
    let mut taken = Vec::new();
    let mut i = skip_space(0);
    while i < chars.len() {
        let start = i;
        while at(i).is_some_and(|c| !c.is_whitespace() && c != '=') {
            i += 1;
        }
        if i == start {
            break;
        }
        let name = &text[offset(start)..offset(i)];
        i = skip_space(i);
        if at(i) != Some('=') {
            return None;
        }
        i = skip_space(i + 1);
        let mut value = String::new();
        let quoted = at(i) == Some('\'');
        if quoted {
            i += 1;
        }
        loop {
            match at(i) {
                None if quoted => return None,
                None => break,
                Some('\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(c) if !quoted && c.is_whitespace() => break,
                Some('\\') => {
                    value.extend(at(i + 1));
                    i += 2;
                }
                Some(c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        if !quoted && value.is_empty() {
            return None;
        }
        if let Some(key) = key(name) {
            kept.push_str(&text[copied..offset(start)]);
            copied = offset(i);
            taken.push((key, value));
        }
        i = skip_space(i);
    }
    kept.push_str(&text[copied..]);
    Some((kept, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, root_cert: Option<RootCert>) -> TlsSettings {
        TlsSettings { mode, root_cert }
    }

    fn file(path: &str) -> Option<RootCert> {
        Some(RootCert::File(PathBuf::from(path)))
    }

    #[test]
    fn every_libpq_mode_is_read_and_prefer_is_the_default() {
        for (value, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let url = format!("postgresql://app:pw@db/app?sslmode={value}");
            assert_eq!(
                split(&url).unwrap(),
                (
                    "postgresql://app:pw@db/app".to_owned(),
                    settings(mode, None)
                )
            );
            assert_eq!(mode.name(), value);
        }
        assert_eq!(
            split("postgresql://db/app").unwrap().1,
            settings(SslMode::Prefer, None)
        );
        assert_eq!(
            split("host=db dbname=app").unwrap().1,
            settings(SslMode::Prefer, None)
        );
    }

    #[test]
    fn an_unknown_mode_says_which_ones_exist() {
        let error = split("postgresql://app:s3cret@db/app?sslmode=verify").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid sslmode \"verify\": use disable, allow, prefer, require, verify-ca or verify-full"
        );
        assert!(split("host=db sslmode=on").is_err());
    }

    #[test]
    fn sslrootcert_system_wants_verify_full() {
        assert_eq!(
            split("postgresql://db/app?sslrootcert=system").unwrap().1,
            settings(SslMode::VerifyFull, Some(RootCert::System))
        );
        let error = split("postgresql://db/app?sslrootcert=system&sslmode=require").unwrap_err();
        assert_eq!(
            error.to_string(),
            "sslmode \"require\" may not be used with sslrootcert=system (use verify-full)"
        );
    }

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept_in_order() {
        let (rest, tls) = split(
            "postgres://app:p%40ss@db:5433,db2/my%2Fdb?application_name=w&sslmode=verify-full&connect_timeout=3&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://app:p%40ss@db:5433,db2/my%2Fdb?application_name=w&connect_timeout=3"
        );
        assert_eq!(
            tls,
            settings(SslMode::VerifyFull, file("/etc/ca dir/ca.pem"))
        );
        // The last of a repeated parameter counts, as in tokio-postgres.
        let (rest, tls) =
            split("postgresql://db?sslmode=disable&sslmode=require&sslrootcert=").unwrap();
        assert_eq!(rest, "postgresql://db");
        assert_eq!(tls, settings(SslMode::Require, None));
        // A `?` in the password is not the start of the parameters.
        let (rest, tls) = split("postgresql://app:a?b@db/app?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://app:a?b@db/app");
        assert_eq!(tls.mode, SslMode::Require);
    }

    #[test]
    fn key_value_parameters_are_taken_out_with_their_quotes() {
        let (rest, tls) = split(
            "host=db sslmode = 'verify-ca' password='a b\\'c' sslrootcert='/etc/my ca/ca.pem' dbname=app",
        )
        .unwrap();
        assert_eq!(rest, "host=db  password='a b\\'c'  dbname=app");
        assert_eq!(tls, settings(SslMode::VerifyCa, file("/etc/my ca/ca.pem")));
        let (rest, tls) = split("sslrootcert=/ca\\ file.pem host=db").unwrap();
        assert_eq!(rest, " host=db");
        assert_eq!(tls, settings(SslMode::Prefer, file("/ca file.pem")));
        // What cannot be read is left to tokio-postgres, which says why.
        assert_eq!(split("host=db sslmode").unwrap().0, "host=db sslmode");
    }

    #[test]
    fn what_each_mode_checks() {
        use Verification as V;
        for (mode, without_file, with_file) in [
            (SslMode::Disable, V::None, V::Chain),
            (SslMode::Allow, V::None, V::Chain),
            (SslMode::Prefer, V::None, V::Chain),
            (SslMode::Require, V::None, V::Chain),
            (SslMode::VerifyCa, V::Chain, V::Chain),
            (SslMode::VerifyFull, V::Full, V::Full),
        ] {
            assert_eq!(
                settings(mode, None).verification(),
                without_file,
                "{mode:?}"
            );
            assert_eq!(
                settings(mode, file("/ca.pem")).verification(),
                with_file,
                "{mode:?}"
            );
        }
        assert_eq!(
            settings(SslMode::VerifyFull, Some(RootCert::System)).verification(),
            V::Full
        );
    }

    #[test]
    fn tokio_postgres_gets_a_mode_it_knows_and_the_other_parameters() {
        use tokio_postgres::config::SslMode as Transport;
        for (value, transport) in [
            ("disable", Transport::Disable),
            ("allow", Transport::Prefer),
            ("prefer", Transport::Prefer),
            ("require", Transport::Require),
            ("verify-ca", Transport::Require),
            ("verify-full", Transport::Require),
        ] {
            let url = format!(
                "postgresql://app:pw@db/app?sslmode={value}&sslrootcert=/nowhere.pem&application_name=w"
            );
            let (config, _) = parse(&url).unwrap();
            assert_eq!(config.get_ssl_mode(), transport, "{value}");
            assert_eq!(config.get_application_name(), Some("w"));
            assert_eq!(config.get_password(), Some(&b"pw"[..]));
        }
        assert_eq!(
            parse("postgresql://db/app").unwrap().0.get_ssl_mode(),
            Transport::Prefer
        );
        // An address alone names the host TLS checks.
        let (config, _) = parse("hostaddr=127.0.0.1 dbname=app sslmode=verify-full").unwrap();
        assert_eq!(config.get_hosts(), [Host::Tcp("127.0.0.1".to_owned())]);
        assert_eq!(config.get_ssl_mode(), Transport::Require);
        // No TLS over a Unix socket, as in libpq.
        let (config, _) = parse("host=/run/postgresql dbname=app sslmode=verify-full").unwrap();
        assert_eq!(config.get_ssl_mode(), Transport::Disable);
    }

    #[test]
    fn other_errors_are_tokio_postgres_s_with_their_reason() {
        let error = parse("postgresql://app:s3cret@db/app?sslcert=/x.pem").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid connection string: unknown option `sslcert`"
        );
    }

    /// A CA certificate (EC P-256), for reading only.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUEmCd2/jkCGFGwhgSW/6h8SeGiNswCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPc3luYXBzZSB0ZXN0IENBMB4XDTI2MTEzMDA4MzcyNVoXDTM2
MTEyNzA4MzcyNVowGjEYMBYGA1UEAwwPc3luYXBzZSB0ZXN0IENBMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEVgNa1Uy5+Z5YBCm2Vt4vGpLigvUta4jIqrqhm5tC
AYcaWQPpk6V/pU+sabMygUXWueJTI5EQOJmbKdt44opVXKNTMFEwHQYDVR0OBBYE
FEtQ4xcYFTePtj6Tl1aRvKV9iCEBMB8GA1UdIwQYMBaAFEtQ4xcYFTePtj6Tl1aR
vKV9iCEBMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgFC2qzo38
/t0GOAoGuqvIsqPAcMQpYWg5wosFgxmrl8cCIQDQsFkQAaHylWgomHS6S1lP+EcZ
hrpc4BqvTaBQ4KuQvg==
-----END CERTIFICATE-----
";

    #[test]
    fn the_root_certificate_file_is_read_when_the_connector_is_made() {
        let dir = std::env::temp_dir().join(format!("synapse-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, CA_PEM).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let url = |root: &std::path::Path| {
            format!(
                "postgresql://db/app?sslmode=verify-full&sslrootcert={}",
                root.display()
            )
        };

        assert!(configure(&url(&ca)).is_ok());
        let error = configure(&url(&dir.join("missing.pem")))
            .err()
            .expect("a missing file");
        assert!(
            error.to_string().starts_with(&format!(
                "cannot read sslrootcert {}/missing.pem: ",
                dir.display()
            )),
            "{error}"
        );
        let error = configure(&url(&not_pem)).err().expect("no certificate");
        assert_eq!(
            error.to_string(),
            format!("sslrootcert {} holds no PEM certificate", not_pem.display())
        );
        // Without TLS, the file is not needed.
        assert!(configure(&format!(
            "postgresql://db/app?sslmode=disable&sslrootcert={}/missing.pem",
            dir.display()
        ))
        .is_ok());
        // The system's roots, or none checked at all.
        assert!(configure("postgresql://db/app?sslmode=verify-full").is_ok());
        assert!(configure("postgresql://db/app?sslmode=require").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
