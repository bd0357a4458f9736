//! The destinations the `http` action may reach (`--allow-http`).
//!
//! A step's URL is written by whoever submits the goal, but the request leaves
//! from the worker's network: without a fence, any submitter could read cloud
//! metadata (`169.254.169.254`), the worker's own metrics, or services on the
//! private network. The fence is checked after the worker resolved the URL's
//! host name, on the addresses it then connects to (see [`super::Http`]).
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The destinations `http` may reach: nothing unless entries say otherwise.
///
/// Entries (as `--allow-http` takes them, comma-separated):
/// - a host name, `api.example.com` (exact, case-insensitive), or
///   `*.example.com` (any name below `example.com`, not `example.com` itself):
///   matches a URL that names the host so, whatever it resolves to;
/// - an IP address, `10.1.2.3` or `::1`, or a CIDR, `10.0.0.0/8` or `fd00::/8`:
///   matches every address it covers, whatever name the URL used;
/// - `*`: anything.
///
/// Each may end with a port (`api.example.com:443`, `10.0.0.0/8:8080`,
/// `[::1]:8080`, `*:443`); without one it allows every port. An IPv4 address
/// written as IPv6 (`::ffff:10.1.2.3`) is the IPv4 address.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpFence {
    entries: Vec<Entry>,
}

/// One `--allow-http` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    target: Target,
    /// `None`: every port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `*`.
    Any,
    /// A host name, lower case, without a trailing dot.
    Name(String),
    /// `*.suffix`: the suffix, lower case, without a trailing dot.
    Below(String),
    /// An address or a CIDR (an address is a CIDR of its full length); host
    /// bits are zero.
    Network(IpAddr, u8),
}

/// What the fence says about a URL's host name before it is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameCheck {
    /// An entry names it: whatever it resolves to may be reached.
    Allowed,
    /// Only address entries may allow it: resolve it and check every address
    /// with [`HttpFence::check_resolved`].
    Resolve,
}

impl HttpFence {
    /// A fence that lets nothing through.
    pub fn none() -> Self {
        Self::default()
    }

    /// A fence that lets everything through (`--allow-http '*'`).
    pub fn any() -> Self {
        Self {
            entries: vec![Entry {
                target: Target::Any,
                port: None,
            }],
        }
    }

    /// Parses `--allow-http` entries (blank ones are skipped). An entry that is
    /// none of the forms above is an error naming it and saying why.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for text in entries {
            let text = text.as_ref().trim();
            if text.is_empty() {
                continue;
            }
            let entry = parse_entry(text)
                .map_err(|why| format!("--allow-http: invalid entry \"{text}\": {why}"))?;
            parsed.push(entry);
        }
        Ok(Self { entries: parsed })
    }

    /// Whether it lets nothing through.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether an entry allows `address` on `port`, whatever the URL called it.
    pub fn allows_address(&self, address: IpAddr, port: u16) -> bool {
        let address = address.to_canonical();
        self.entries.iter().any(|entry| {
            entry.port.is_none_or(|allowed| allowed == port)
                && match &entry.target {
                    Target::Any => true,
                    Target::Network(network, length) => contains(*network, *length, address),
                    Target::Name(_) | Target::Below(_) => false,
                }
        })
    }

    /// Whether an entry names the host `name` (`*` included) on `port`, so that
    /// whatever it resolves to may be reached.
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        let name = normal_name(name);
        self.entries.iter().any(|entry| {
            entry.port.is_none_or(|allowed| allowed == port)
                && match &entry.target {
                    Target::Any => true,
                    Target::Name(allowed) => *allowed == name,
                    Target::Below(suffix) => name
                        .strip_suffix(suffix.as_str())
                        .and_then(|head| head.strip_suffix('.'))
                        .is_some_and(|head| !head.is_empty()),
                    Target::Network(..) => false,
                }
        })
    }

    /// Checks a URL whose host is an IP address; the error says what to allow.
    pub(crate) fn check_address(&self, address: IpAddr, port: u16) -> Result<(), String> {
        if self.allows_address(address, port) {
            return Ok(());
        }
        let shown = address.to_canonical();
        Err(format!(
            "{} is not allowed: start the worker with --allow-http {shown} (or a CIDR or * that covers it)",
            socket(shown, port)
        ))
    }

    /// Checks a URL's host name before it is resolved: refused at once when no
    /// entry could allow it (nothing is resolved then).
    pub(crate) fn check_name(&self, name: &str, port: u16) -> Result<NameCheck, String> {
        if self.allows_name(name, port) {
            return Ok(NameCheck::Allowed);
        }
        let by_address = self.entries.iter().any(|entry| {
            matches!(entry.target, Target::Network(..))
                && entry.port.is_none_or(|allowed| allowed == port)
        });
        if by_address {
            return Ok(NameCheck::Resolve);
        }
        let name = normal_name(name);
        Err(format!(
            "{name}:{port} is not allowed: start the worker with --allow-http {name} \
             (or a wildcard, CIDR or * that covers it)"
        ))
    }

    /// Checks the addresses a host name resolved to (after
    /// [`NameCheck::Resolve`]): every one must be allowed.
    pub(crate) fn check_resolved(
        &self,
        name: &str,
        port: u16,
        addresses: &[IpAddr],
    ) -> Result<(), String> {
        match addresses
            .iter()
            .find(|address| !self.allows_address(**address, port))
        {
            None => Ok(()),
            Some(denied) => {
                let name = normal_name(name);
                let denied = denied.to_canonical();
                Err(format!(
                    "{name}:{port} resolves to {denied}, which is not allowed: start the worker \
                     with --allow-http {name} (or an IP address, CIDR or * that covers {denied})"
                ))
            }
        }
    }
}

impl fmt::Display for HttpFence {
    /// The entries as they would be written, comma-separated; `none` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            return f.write_str("none");
        }
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{entry}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HttpFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.target {
            Target::Any => "*".to_owned(),
            Target::Name(name) => name.clone(),
            Target::Below(suffix) => format!("*.{suffix}"),
            Target::Network(address, length) if *length == full_length(*address) => {
                address.to_string()
            }
            Target::Network(address, length) => format!("{address}/{length}"),
        };
        match (self.port, &self.target) {
            (None, _) => f.write_str(&host),
            (Some(port), Target::Network(IpAddr::V6(_), _)) => write!(f, "[{host}]:{port}"),
            (Some(port), _) => write!(f, "{host}:{port}"),
        }
    }
}

/// `address:port`, with brackets around an IPv6 address.
fn socket(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// A host name as entries hold them: lower case, without a trailing dot.
fn normal_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    if text.contains("://") {
        return Err(
            "an entry is a host, not a URL (e.g. api.example.com or api.example.com:443)"
                .to_owned(),
        );
    }
    let (host, port, bracketed) = split_port(text)?;
    if bracketed && !host.contains(':') {
        return Err("brackets are for IPv6 addresses (e.g. [::1]:8080)".to_owned());
    }
    let target = if host == "*" {
        Target::Any
    } else if let Some(suffix) = host.strip_prefix("*.") {
        Target::Below(host_name(suffix)?)
    } else if host.contains('*') {
        return Err(
            "a wildcard is `*` alone or `*.` before a domain (e.g. *.example.com)".to_owned(),
        );
    } else if let Some((address, length)) = host.split_once('/') {
        network(address, length)?
    } else if let Ok(address) = host.parse::<IpAddr>() {
        let address = address.to_canonical();
        Target::Network(address, full_length(address))
    } else {
        Target::Name(host_name(host)?)
    };
    Ok(Entry { target, port })
}

/// Splits `host:port`, `[v6]:port` or `[v6]`; a bare IPv6 address (more than
/// one colon) has no port. The flag says whether the host was in brackets.
fn split_port(text: &str) -> Result<(&str, Option<u16>, bool), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err("a `[` without its `]`".to_owned());
        };
        if after.is_empty() {
            return Ok((inside, None, true));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err("expected `:port` after `]`".to_owned());
        };
        return Ok((inside, Some(parse_port(port)?), true));
    }
    match text.split_once(':') {
        Some((host, port)) if !port.contains(':') => Ok((host, Some(parse_port(port)?), false)),
        _ => Ok((text, None, false)),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!(
            "the port must be a number from 1 to 65535, got \"{text}\""
        )),
    }
}

/// `address/length` as a network; its host bits must be zero.
fn network(address: &str, length: &str) -> Result<Target, String> {
    let Ok(address) = address.parse::<IpAddr>() else {
        return Err(format!(
            "\"{address}\" is not an IP address (a CIDR is e.g. 10.0.0.0/8 or fd00::/8)"
        ));
    };
    let full = full_length(address);
    let length = match length.parse::<u8>() {
        Ok(bits) if bits <= full && length.bytes().all(|b| b.is_ascii_digit()) => bits,
        _ => {
            return Err(format!(
                "the prefix length must be a number from 0 to {full}, got \"{length}\""
            ))
        }
    };
    let masked = mask(address, length);
    if masked != address {
        return Err(format!(
            "host bits are set (did you mean {masked}/{length}?)"
        ));
    }
    // An IPv4 network written in IPv6 (`::ffff:10.0.0.0/104`) is the IPv4 one.
    if let IpAddr::V6(v6) = address {
        if let (true, Some(v4)) = (length >= 96, v6.to_ipv4_mapped()) {
            return Ok(Target::Network(IpAddr::V4(v4), length - 96));
        }
    }
    Ok(Target::Network(address, length))
}

/// A host name entry (or the part after `*.`): letters, digits, `-` and `_`
/// in dot-separated labels. International names are written in their ASCII
/// (punycode) form, the form URLs carry them in.
fn host_name(text: &str) -> Result<String, String> {
    let name = normal_name(text);
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 characters".to_owned());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each part of a host name between dots has 1 to 63 characters".to_owned());
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{bad:?} cannot appear in a host name (an entry is a host name, `*.domain`, \
                 an IP address, a CIDR or `*`, each optionally with `:port`)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part of a host name cannot start or end with `-`".to_owned());
        }
    }
    // URLs read `10.1` or `0x7f.1` as IPv4 addresses: such a name would never match.
    let last = name.rsplit('.').next().unwrap_or_default();
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            "this is not a full IP address (write it as four numbers, e.g. 10.0.0.1, or as a CIDR)"
                .to_owned(),
        );
    }
    Ok(name)
}

fn full_length(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `address` with all but its first `length` bits zero.
fn mask(address: IpAddr, length: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// Whether the network `network/length` holds `address` (of the same family).
fn contains(network: IpAddr, length: u8, address: IpAddr) -> bool {
    match (network, address) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            mask(address, length) == network
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(entries: &[&str]) -> HttpFence {
        HttpFence::parse(entries).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn entries_parse_and_show_as_written() {
        let parsed = fence(&[
            "API.Example.com",
            "*.example.org",
            "10.1.2.3",
            "10.0.0.0/8:8080",
            "::1",
            "fd00::/8",
            "[::1]:8080",
            "[fd00::/8]:443",
            "*",
            "*:443",
            "localhost:80",
            " spaced.example ",
            "",
            "dot.example.",
            "::ffff:10.1.2.3",
            "::ffff:10.0.0.0/104",
        ]);
        assert_eq!(
            parsed.to_string(),
            "api.example.com,*.example.org,10.1.2.3,10.0.0.0/8:8080,::1,fd00::/8,[::1]:8080,\
             [fd00::/8]:443,*,*:443,localhost:80,spaced.example,dot.example,10.1.2.3,10.0.0.0/8"
        );
        assert_eq!(format!("{:?}", HttpFence::none()), "\"none\"");
        assert!(HttpFence::parse(&["", " "]).unwrap().is_empty());
        assert_eq!(HttpFence::any(), fence(&["*"]));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (entry, why) in [
            (
                "http://api.example.com",
                "an entry is a host, not a URL (e.g. api.example.com or api.example.com:443)",
            ),
            ("10.0.0.1/8", "host bits are set (did you mean 10.0.0.0/8?)"),
            (
                "10.0.0.0/33",
                "the prefix length must be a number from 0 to 32, got \"33\"",
            ),
            (
                "10.0.0.0/+8",
                "the prefix length must be a number from 0 to 32, got \"+8\"",
            ),
            (
                "example/8",
                "\"example\" is not an IP address (a CIDR is e.g. 10.0.0.0/8 or fd00::/8)",
            ),
            (
                "example.com:0",
                "the port must be a number from 1 to 65535, got \"0\"",
            ),
            (
                "example.com:65536",
                "the port must be a number from 1 to 65535, got \"65536\"",
            ),
            (
                "example.com:",
                "the port must be a number from 1 to 65535, got \"\"",
            ),
            (
                "api.*.example.com",
                "a wildcard is `*` alone or `*.` before a domain (e.g. *.example.com)",
            ),
            (
                "*example.com",
                "a wildcard is `*` alone or `*.` before a domain (e.g. *.example.com)",
            ),
            (
                "[example.com]:80",
                "brackets are for IPv6 addresses (e.g. [::1]:8080)",
            ),
            ("[::1", "a `[` without its `]`"),
            ("[::1]8080", "expected `:port` after `]`"),
            (
                "10.1",
                "this is not a full IP address (write it as four numbers, e.g. 10.0.0.1, or as a CIDR)",
            ),
            (
                "0x7f.1",
                "this is not a full IP address (write it as four numbers, e.g. 10.0.0.1, or as a CIDR)",
            ),
            ("-bad.example", "a part of a host name cannot start or end with `-`"),
            (
                "a..b",
                "each part of a host name between dots has 1 to 63 characters",
            ),
            (
                "user@host",
                "'@' cannot appear in a host name (an entry is a host name, `*.domain`, an IP \
                 address, a CIDR or `*`, each optionally with `:port`)",
            ),
        ] {
            assert_eq!(
                HttpFence::parse(&["ok.example", entry]),
                Err(format!("--allow-http: invalid entry \"{entry}\": {why}")),
                "{entry}"
            );
        }
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = HttpFence::none();
        assert!(!none.allows_address(ip("169.254.169.254"), 80));
        assert!(!none.allows_address(ip("127.0.0.1"), 8080));
        assert!(!none.allows_name("localhost", 80));
        assert_eq!(
            none.check_address(ip("169.254.169.254"), 80),
            Err(
                "169.254.169.254:80 is not allowed: start the worker with --allow-http \
                 169.254.169.254 (or a CIDR or * that covers it)"
                    .to_owned()
            )
        );
        assert_eq!(
            none.check_address(ip("::1"), 8080),
            Err(
                "[::1]:8080 is not allowed: start the worker with --allow-http ::1 \
                 (or a CIDR or * that covers it)"
                    .to_owned()
            )
        );
        assert_eq!(
            none.check_name("Api.Example.com.", 443),
            Err(
                "api.example.com:443 is not allowed: start the worker with --allow-http \
                 api.example.com (or a wildcard, CIDR or * that covers it)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn addresses_match_addresses_and_networks_on_their_ports() {
        let allowed = fence(&["10.1.2.3", "192.168.0.0/16:8080", "fd00::/8", "[::1]:9000"]);
        assert!(allowed.allows_address(ip("10.1.2.3"), 1));
        assert!(!allowed.allows_address(ip("10.1.2.4"), 80));
        assert!(allowed.allows_address(ip("192.168.44.1"), 8080));
        assert!(!allowed.allows_address(ip("192.168.44.1"), 8081));
        assert!(!allowed.allows_address(ip("192.169.0.1"), 8080));
        assert!(allowed.allows_address(ip("fdab::1"), 443));
        assert!(!allowed.allows_address(ip("fe80::1"), 443));
        assert!(allowed.allows_address(ip("::1"), 9000));
        assert!(!allowed.allows_address(ip("::1"), 9001));
        // An IPv4 address in IPv6 clothing is the IPv4 address, both ways.
        assert!(allowed.allows_address(ip("::ffff:10.1.2.3"), 80));
        assert!(!allowed.allows_address(ip("::ffff:169.254.169.254"), 80));
        assert!(fence(&["::ffff:10.0.0.0/104"]).allows_address(ip("10.9.9.9"), 80));
        // Families never mix.
        assert!(!fence(&["::/0"]).allows_address(ip("10.0.0.1"), 80));
        assert!(fence(&["0.0.0.0/0"]).allows_address(ip("10.0.0.1"), 80));
        assert!(!fence(&["0.0.0.0/0"]).allows_address(ip("::1"), 80));
        // Address entries say nothing about names, and the other way round.
        assert!(!allowed.allows_name("10.1.2.3", 80));
        assert!(!fence(&["localhost"]).allows_address(ip("127.0.0.1"), 80));
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let allowed = fence(&["api.example.com:443", "*.internal.example", "localhost"]);
        assert!(allowed.allows_name("api.example.com", 443));
        assert!(allowed.allows_name("API.EXAMPLE.COM.", 443));
        assert!(!allowed.allows_name("api.example.com", 80));
        assert!(!allowed.allows_name("x.api.example.com", 443));
        assert!(!allowed.allows_name("example.com", 443));
        assert!(allowed.allows_name("a.internal.example", 80));
        assert!(allowed.allows_name("a.b.internal.example", 80));
        assert!(!allowed.allows_name("internal.example", 80));
        assert!(!allowed.allows_name("xinternal.example", 80));
        assert!(allowed.allows_name("localhost", 5432));
        assert!(!allowed.allows_name("localhost.evil.example", 80));
    }

    #[test]
    fn a_star_allows_everything_on_its_ports() {
        let any = fence(&["*"]);
        assert!(any.allows_address(ip("169.254.169.254"), 80));
        assert!(any.allows_name("anything.example", 1));
        let https = fence(&["*:443"]);
        assert!(https.allows_address(ip("10.0.0.1"), 443));
        assert!(!https.allows_address(ip("10.0.0.1"), 80));
        assert!(https.allows_name("anything.example", 443));
        assert!(!https.allows_name("anything.example", 80));
    }

    #[test]
    fn a_name_is_allowed_by_name_or_by_every_address_it_resolves_to() {
        let allowed = fence(&["api.example.com", "10.0.0.0/8", "172.16.0.0/12:8443"]);
        assert_eq!(
            allowed.check_name("api.example.com", 80),
            Ok(NameCheck::Allowed)
        );
        assert_eq!(allowed.check_name("db.corp", 80), Ok(NameCheck::Resolve));
        assert_eq!(
            allowed.check_resolved("db.corp", 80, &[ip("10.0.0.5"), ip("10.0.0.6")]),
            Ok(())
        );
        assert_eq!(
            allowed.check_resolved("db.corp", 80, &[ip("10.0.0.5"), ip("169.254.169.254")]),
            Err(
                "db.corp:80 resolves to 169.254.169.254, which is not allowed: start the \
                 worker with --allow-http db.corp (or an IP address, CIDR or * that covers \
                 169.254.169.254)"
                    .to_owned()
            )
        );
        // The port counts with the network that allows an address.
        assert_eq!(
            allowed.check_resolved("db.corp", 8443, &[ip("172.16.0.1")]),
            Ok(())
        );
        assert!(allowed
            .check_resolved("db.corp", 80, &[ip("172.16.0.1")])
            .is_err());
        // No entry could allow it on this port: refused without resolving.
        let only_https = fence(&["10.0.0.0/8:443"]);
        assert!(only_https.check_name("db.corp", 80).is_err());
        assert_eq!(
            only_https.check_name("db.corp", 443),
            Ok(NameCheck::Resolve)
        );
    }
}
