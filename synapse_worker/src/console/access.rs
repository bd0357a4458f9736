//! Who may use the console, decided per request: the address rule at start
//! (loopback, or a token), the token (a bearer header or the cookie the
//! `?token=` link sets), the `Host` a browser sent (so that a page elsewhere
//! cannot reach a loopback console through a name it controls), and CSRF on
//! every action. Plain functions over the request's parts, tested below.
use std::net::SocketAddr;

/// The cookie the `?token=` link sets.
pub const TOKEN_COOKIE: &str = "synapse_console";
/// The header every action carries, with the token the page was served with.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Whether the console may listen on `addr`: loopback always; any other
/// address only with a token.
pub fn check_listen(addr: &SocketAddr, token: Option<&str>) -> Result<(), String> {
    match token {
        _ if addr.ip().is_loopback() => Ok(()),
        Some(token) if token.len() >= 16 => Ok(()),
        Some(_) => Err("--token must be at least 16 characters".to_owned()),
        None => Err(format!(
            "{addr} is not a loopback address: give --token (or SYNAPSE_UI_TOKEN) so that only who knows it gets in"
        )),
    }
}

/// Whether a request for a console bound to `addr` may name `host`: any
/// name with a token (the token decides); without one, only loopback names,
/// so that a name resolving to 127.0.0.1 from another site does not reach it.
pub fn host_allowed(host: Option<&str>, addr: &SocketAddr, token: Option<&str>) -> bool {
    if token.is_some() {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let port_matches = host
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_none_or(|port| port == addr.port());
    port_matches
        && (name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
}

/// Whether a request carries `token`: `Authorization: Bearer …` or the cookie.
pub fn authorized(token: Option<&str>, authorization: Option<&str>, cookies: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let bearer = authorization.and_then(|value| value.strip_prefix("Bearer "));
    let cookie = cookies.and_then(|cookies| {
        cookies.split(';').find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == TOKEN_COOKIE).then_some(value)
        })
    });
    [bearer, cookie]
        .into_iter()
        .flatten()
        .any(|given| token_matches(token, given))
}

/// Whether `given` is `token`, compared in time that does not depend on where they differ.
pub fn token_matches(token: &str, given: &str) -> bool {
    same(given.as_bytes(), token.as_bytes())
}

/// Whether an action may go ahead: it carries the page's CSRF token, and, if
/// the browser said where it came from, it came from this console.
pub fn action_allowed(
    csrf: &str,
    given: Option<&str>,
    origin: Option<&str>,
    host: Option<&str>,
) -> bool {
    let token_matches = given.is_some_and(|given| same(given.as_bytes(), csrf.as_bytes()));
    let same_origin = match (origin, host) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
    };
    token_matches && same_origin
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A random token: 32 hex digits from the operating system's generator.
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_loopback_listens_without_a_token() {
        assert!(check_listen(&addr("127.0.0.1:8765"), None).is_ok());
        assert!(check_listen(&addr("[::1]:8765"), None).is_ok());
        let refused = check_listen(&addr("0.0.0.0:8765"), None).unwrap_err();
        assert!(refused.contains("give --token"), "{refused}");
        assert!(check_listen(&addr("10.0.0.5:8765"), Some("short")).is_err());
        assert!(check_listen(&addr("10.0.0.5:8765"), Some("0123456789abcdef")).is_ok());
    }

    #[test]
    fn a_loopback_console_answers_loopback_names_only() {
        let bound = addr("127.0.0.1:8765");
        for host in [
            "127.0.0.1:8765",
            "localhost:8765",
            "LOCALHOST",
            "[::1]:8765",
            "127.0.0.2:8765",
        ] {
            assert!(host_allowed(Some(host), &bound, None), "{host}");
        }
        for host in [
            "evil.example:8765",
            "127.0.0.1:9999",
            "localhost.evil.example",
            "",
        ] {
            assert!(!host_allowed(Some(host), &bound, None), "{host}");
        }
        assert!(!host_allowed(None, &bound, None));
        assert!(host_allowed(Some("console.internal"), &bound, Some("t")));
    }

    #[test]
    fn the_token_comes_as_a_bearer_or_a_cookie() {
        let token = Some("s3cret-s3cret-s3cret");
        assert!(authorized(None, None, None));
        assert!(!authorized(token, None, None));
        assert!(authorized(token, Some("Bearer s3cret-s3cret-s3cret"), None));
        assert!(!authorized(token, Some("Bearer wrong"), None));
        assert!(authorized(
            token,
            None,
            Some("a=b; synapse_console=s3cret-s3cret-s3cret")
        ));
        assert!(!authorized(token, None, Some("synapse_console=s3cret")));
    }

    #[test]
    fn actions_need_the_pages_token_and_this_origin() {
        let host = Some("127.0.0.1:8765");
        assert!(action_allowed("abc", Some("abc"), None, host));
        assert!(action_allowed(
            "abc",
            Some("abc"),
            Some("http://127.0.0.1:8765"),
            host
        ));
        assert!(!action_allowed("abc", None, None, host));
        assert!(!action_allowed("abc", Some("abd"), None, host));
        assert!(!action_allowed(
            "abc",
            Some("abc"),
            Some("http://evil.example"),
            host
        ));
        assert!(!action_allowed("abc", Some("abc"), Some("null"), host));
    }

    #[test]
    fn tokens_are_random() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
