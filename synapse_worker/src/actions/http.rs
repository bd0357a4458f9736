//! The `http` built-in: one HTTP request per attempt, to the destinations
//! `--allow-http` allows.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
    TRANSFER_ENCODING,
};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::http_fence::{HttpFence, NameCheck};
use super::limit::ResultLimit;
use super::simple::{expected, optional_str, param, required_str};
use super::{Action, ActionContext, ActionError, ActionFuture};

/// The methods blueprint validation accepts.
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// How much of an error response's body goes into the error message.
const BODY_QUOTE_CHARS: usize = 200;

/// How much of an error response's body is read: enough for the quote, in any
/// UTF-8.
const ERROR_BODY_BYTES: usize = 4 * BODY_QUOTE_CHARS;

/// The most redirects one request follows.
const MAX_REDIRECTS: usize = 5;

/// How many clients pinned to a host name's addresses are kept.
const PINNED_CLIENTS: usize = 16;

/// `http`: sends one request and returns `{status, headers, body}`.
///
/// Params (as validation accepts them): `url` (required, `http://` or `https://`),
/// `method` (default `GET`), `headers` (an object of strings), `body` (any JSON).
/// Without a `body` (or with `"body": null`), `POST`, `PUT` and `PATCH` send the
/// step input as the JSON body; other methods send none. A string `body` is sent
/// as is when `headers` sets a non-JSON `Content-Type` (e.g. a form or plain
/// text); any other body is sent as JSON.
///
/// The result's `headers` has lower-case names (repeated headers joined with
/// `", "`), and its `body` is the parsed JSON when the response says it is JSON
/// and parses, else the text. A non-2xx answer fails the attempt: 5xx, 408 and
/// 429 retryably, like connection errors and timeouts; any other status
/// permanently. The attempt's timeout bounds the whole request, redirects
/// included. Credentials in the URL's userinfo are sent as basic auth but never
/// appear in messages.
///
/// Only destinations the [`HttpFence`] allows are reached (`--allow-http`;
/// nothing by default), and a refused one fails the attempt permanently,
/// saying what to allow. The worker resolves the URL's host name itself,
/// checks every address it resolves to, and connects only to those: the name
/// is never looked up again, so a DNS answer that changes after the check
/// cannot redirect the request. Proxy settings of the environment are ignored
/// (a proxy would choose the address itself). Redirects (301, 302, 303, 307,
/// 308) are followed up to 5 times, each destination checked the same way; a
/// redirect to another origin (scheme, host and port) drops every header the
/// step set. 301, 302 and 303 turn the request into a `GET` without a body,
/// as browsers do.
///
/// The body is read as it arrives and no further than the result limit (1 MiB
/// unless [`Http::with_result_limit`] says otherwise): a longer one fails the
/// attempt permanently, and so does a `Content-Length` over the limit, before
/// any of the body is read.
pub struct Http {
    fence: HttpFence,
    limit: ResultLimit,
    /// The client of URLs whose host is an IP address: they resolve nothing.
    direct: reqwest::Client,
    pinned: PinnedClients,
}

impl Http {
    /// An `http` action that reaches only what `fence` allows (the worker's
    /// `--allow-http`); [`HttpFence::none`] allows nothing.
    ///
    /// # Panics
    ///
    /// If the TLS backend cannot be initialised (e.g. the system's TLS library is
    /// unusable): the worker cannot make HTTPS requests at all then, and says so
    /// at start rather than on every step.
    pub fn new(fence: HttpFence) -> Self {
        let direct = client_builder()
            .build()
            .expect("the HTTP client (TLS backend) could not be initialised");
        Self {
            fence,
            limit: ResultLimit::default(),
            direct,
            pinned: PinnedClients::default(),
        }
    }

    /// The same action with bodies bounded by `limit` instead of 1 MiB.
    pub fn with_result_limit(mut self, limit: ResultLimit) -> Self {
        self.limit = limit;
        self
    }

    /// The destinations this action may reach, as given to [`Http::new`].
    pub fn fence(&self) -> &HttpFence {
        &self.fence
    }

    async fn execute(&self, context: &ActionContext) -> Result<Value, ActionError> {
        let request = Request::from_params(context)?;
        let deadline = Instant::now() + context.timeout;
        let (mut response, what) = self.send(request, context.timeout, deadline).await?;
        let status = response.status();
        let headers = headers_json(response.headers());
        let is_json = is_json(response.headers());
        let cap = if status.is_success() {
            let announced = response.content_length().unwrap_or(0);
            if usize::try_from(announced).map_or(true, |length| length > self.limit.bytes()) {
                return Err(self.limit.exceeded(&what));
            }
            self.limit.bytes()
        } else {
            ERROR_BODY_BYTES
        };
        let (bytes, cut) = read_body(&mut response, cap).await.map_err(|e| {
            let how = if e.is_timeout() {
                format!("timed out after {:?} reading the response", context.timeout)
            } else {
                format!("failed reading the response: {}", error_chain(e))
            };
            ActionError::Retryable(format!("{what} {how}"))
        })?;
        if cut && status.is_success() {
            return Err(self.limit.exceeded(&what));
        }
        let text = String::from_utf8_lossy(&bytes);

        if !status.is_success() {
            let quoted: String = text.trim().chars().take(BODY_QUOTE_CHARS).collect();
            let message = if quoted.is_empty() {
                format!("{what} answered {}", status.as_u16())
            } else {
                format!("{what} answered {}: {quoted}", status.as_u16())
            };
            return Err(if is_retryable_status(status) {
                ActionError::Retryable(message)
            } else {
                ActionError::Permanent(message)
            });
        }

        let body = if is_json {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
        } else {
            Value::String(text.into_owned())
        };
        Ok(json!({"status": status.as_u16(), "headers": headers, "body": body}))
    }

    /// Sends `request`, following allowed redirects, until `deadline`; returns
    /// the last answer and what messages call the request (`GET url`, plus
    /// where it was redirected).
    async fn send(
        &self,
        request: Request<'_>,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<(reqwest::Response, String), ActionError> {
        let Request {
            mut method,
            mut url,
            mut headers,
            mut body,
        } = request;
        let first = format!("{method} {}", without_userinfo(&url));
        let mut what = first.clone();
        let mut redirects = 0;
        loop {
            let client = self
                .client_for(&url, deadline)
                .await
                .map_err(|refusal| refusal.into_error(&what, timeout))?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut builder = client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .timeout(remaining);
            builder = match &body {
                Body::None => builder,
                Body::Raw(text) => builder.body(text.clone()),
                Body::Json(value) => builder.json(value),
            };
            let response = builder
                .send()
                .await
                .map_err(|e| send_error(&what, timeout, e))?;

            let status = response.status();
            let Some(location) = redirect_location(&response) else {
                return Ok((response, what));
            };
            // Parse errors never quote the URL, which may hold credentials.
            let next = url.join(location).map_err(|e| {
                ActionError::Permanent(format!("{what}: redirected to an invalid URL: {e}"))
            })?;
            let shown_next = without_userinfo(&next);
            if !matches!(next.scheme(), "http" | "https") {
                return Err(ActionError::Permanent(format!(
                    "{what}: redirected to {shown_next}: only http and https redirects are followed"
                )));
            }
            if redirects == MAX_REDIRECTS {
                return Err(ActionError::Permanent(format!(
                    "{what}: redirected again, to {shown_next}: more than {MAX_REDIRECTS} redirects"
                )));
            }
            redirects += 1;
            if next.origin() != url.origin() {
                // Tokens and keys the step set were meant for its host only.
                headers.clear();
            }
            if matches!(
                status,
                StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER
            ) {
                body = Body::None;
                for name in [
                    CONTENT_TYPE,
                    CONTENT_LENGTH,
                    CONTENT_ENCODING,
                    TRANSFER_ENCODING,
                ] {
                    headers.remove(name);
                }
                if method != Method::GET && method != Method::HEAD {
                    method = Method::GET;
                }
            }
            what = format!("{first} (redirected to {shown_next})");
            url = next;
        }
    }

    /// A client for one request to `url`: its destination checked against the
    /// fence, its host name resolved here, once, and the client pinned to the
    /// addresses checked.
    async fn client_for(&self, url: &Url, deadline: Instant) -> Result<reqwest::Client, Refusal> {
        // http and https URLs always have a host and a known default port.
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(80);
        let literal = host
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(address) = literal.parse::<IpAddr>() {
            // An address is connected to as it is: there is nothing to resolve.
            self.fence
                .check_address(address, port)
                .map_err(Refusal::Denied)?;
            return Ok(self.direct.clone());
        }
        let check = self.fence.check_name(host, port).map_err(Refusal::Denied)?;
        let resolved = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| Refusal::TimedOut)?
            .map_err(|e| Refusal::Unresolved(format!("cannot resolve {host}: {e}")))?;
        let mut addresses: Vec<IpAddr> = resolved.map(|address| address.ip()).collect();
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(Refusal::Unresolved(format!(
                "cannot resolve {host}: no address"
            )));
        }
        if check == NameCheck::Resolve {
            self.fence
                .check_resolved(host, port, &addresses)
                .map_err(Refusal::Denied)?;
        }
        self.pinned.get(host, addresses).await
    }
}

impl Default for Http {
    /// An `http` action that reaches nothing.
    fn default() -> Self {
        Self::new(HttpFence::none())
    }
}

impl Action for Http {
    fn name(&self) -> &str {
        "http"
    }

    fn description(&self) -> &str {
        "Sends an HTTP request (params.method, url, headers, body); the result is {status, headers, body}; non-2xx fails."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "pattern": "^https?://"},
                "method": {"enum": METHODS},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {}
            }
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(self.execute(context))
    }
}

/// Clients pinned to a host name's addresses, the most recently used first:
/// building one loads the TLS trust store (tens of milliseconds), and a kept
/// one keeps its idle connections for the next request.
///
/// A client is shared only by requests whose host name resolved to exactly its
/// addresses, each of them checked against the fence for its own port.
#[derive(Default)]
struct PinnedClients {
    clients: std::sync::Mutex<std::collections::VecDeque<Pinned>>,
}

/// A client that connects `host` to `addresses` (sorted) and nothing else.
struct Pinned {
    host: String,
    addresses: Vec<IpAddr>,
    client: reqwest::Client,
}

impl PinnedClients {
    /// The client that connects `host` to `addresses` (sorted) and nothing
    /// else: a kept one, or a new one, kept.
    async fn get(&self, host: &str, addresses: Vec<IpAddr>) -> Result<reqwest::Client, Refusal> {
        if let Some(client) = self.find(host, &addresses) {
            return Ok(client);
        }
        // Port 0: the URL's port is used (its default when it names none).
        let pinned: Vec<SocketAddr> = addresses
            .iter()
            .map(|address| SocketAddr::new(*address, 0))
            .collect();
        let name = host.to_owned();
        // Loading the trust store is blocking work.
        let client = tokio::task::spawn_blocking(move || {
            client_builder().resolve_to_addrs(&name, &pinned).build()
        })
        .await
        .map_err(|e| Refusal::Client(e.to_string()))?
        .map_err(|e| Refusal::Client(error_chain(e)))?;
        let mut clients = self.lock();
        if let Some(kept) = clients
            .iter()
            .find(|kept| kept.host == host && kept.addresses == addresses)
        {
            // Built meanwhile by another request: one is enough.
            return Ok(kept.client.clone());
        }
        clients.push_front(Pinned {
            host: host.to_owned(),
            addresses,
            client: client.clone(),
        });
        clients.truncate(PINNED_CLIENTS);
        Ok(client)
    }

    fn find(&self, host: &str, addresses: &[IpAddr]) -> Option<reqwest::Client> {
        let mut clients = self.lock();
        let at = clients
            .iter()
            .position(|kept| kept.host == host && kept.addresses == addresses)?;
        let kept = clients.remove(at)?;
        let client = kept.client.clone();
        clients.push_front(kept);
        Some(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Pinned>> {
        // The list stays consistent whatever panicked while holding it.
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a request could not be sent to where its URL points.
enum Refusal {
    /// The fence does not allow it (says what to allow).
    Denied(String),
    /// The host name did not resolve.
    Unresolved(String),
    /// The deadline passed while resolving.
    TimedOut,
    /// No client could be built.
    Client(String),
}

impl Refusal {
    fn into_error(self, what: &str, timeout: Duration) -> ActionError {
        match self {
            // The worker's configuration decides, not the moment.
            Refusal::Denied(why) => ActionError::Permanent(format!("{what}: {why}")),
            Refusal::Unresolved(why) => ActionError::Retryable(format!("{what} failed: {why}")),
            Refusal::TimedOut => {
                ActionError::Retryable(format!("{what} timed out after {timeout:?}"))
            }
            Refusal::Client(why) => ActionError::Retryable(format!("{what} failed: {why}")),
        }
    }
}

/// The settings every request's client shares.
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("synapse-worker/", env!("CARGO_PKG_VERSION")))
        // A proxy would pick the address, out of the fence's sight.
        .no_proxy()
        // Followed by `Http::send`, each destination checked.
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Unresolved)
}

/// The resolver of the clients: resolves nothing. The only names a client may
/// reach are those pinned (`resolve_to_addrs`) after the fence checked them,
/// so no name is ever looked up again behind the check.
struct Unresolved;

impl reqwest::dns::Resolve for Unresolved {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let message = format!("{} was not checked against --allow-http", name.as_str());
        Box::pin(std::future::ready(Err(message.into())))
    }
}

/// Where a redirect answer sends the request: its `Location`, for the
/// statuses that are followed.
fn redirect_location(response: &reqwest::Response) -> Option<&str> {
    let followed = matches!(
        response.status(),
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    );
    if !followed {
        return None;
    }
    response.headers().get(LOCATION)?.to_str().ok()
}

/// What to send as the request body.
enum Body<'a> {
    None,
    Raw(String),
    Json(&'a Value),
}

/// A request as the step's params describe it.
struct Request<'a> {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Body<'a>,
}

impl<'a> Request<'a> {
    /// Reads and checks the params; every problem is permanent.
    fn from_params(context: &'a ActionContext) -> Result<Self, ActionError> {
        let url_text = required_str(context, "url")?;
        if !(url_text.starts_with("http://") || url_text.starts_with("https://")) {
            return Err(ActionError::Permanent(format!(
                "params.url: url must start with http:// or https://, got \"{}\"",
                without_userinfo_text(url_text)
            )));
        }
        // The parser's messages never quote the URL, so they are safe to show.
        let url = Url::parse(url_text)
            .map_err(|e| ActionError::Permanent(format!("params.url: invalid URL: {e}")))?;

        let method_text = optional_str(context, "method")?.unwrap_or("GET");
        if !METHODS.contains(&method_text) {
            return Err(ActionError::Permanent(format!(
                "params.method: unknown method \"{method_text}\" (expected one of: {})",
                METHODS.join(", ")
            )));
        }
        let method = Method::from_bytes(method_text.as_bytes())
            .map_err(|e| ActionError::Permanent(format!("params.method: {e}")))?;

        let mut headers = HeaderMap::new();
        match param(context, "headers")? {
            None => {}
            Some(Value::Object(fields)) => {
                for (name, value) in fields {
                    let Value::String(value) = value else {
                        return Err(expected(&format!("headers[\"{name}\"]"), "a string", value));
                    };
                    let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        ActionError::Permanent(format!(
                            "params.headers: \"{name}\" is not a valid header name"
                        ))
                    })?;
                    // The value may be a secret (a token): it is not quoted.
                    let header_value = HeaderValue::from_str(value).map_err(|_| {
                        ActionError::Permanent(format!(
                            "params.headers[\"{name}\"]: not a valid header value \
                             (control characters or non-ASCII text)"
                        ))
                    })?;
                    headers.append(header_name, header_value);
                }
            }
            Some(other) => return Err(expected("headers", "an object", other)),
        }

        let body = match param(context, "body")? {
            Some(Value::String(text)) if sets_non_json_content_type(&headers) => {
                Body::Raw(text.clone())
            }
            Some(value) if !value.is_null() => Body::Json(value),
            _ if matches!(method_text, "POST" | "PUT" | "PATCH") => Body::Json(&context.input),
            _ => Body::None,
        };

        Ok(Self {
            method,
            url,
            headers,
            body,
        })
    }
}

/// `url` without its userinfo (`user:password@`).
fn without_userinfo(url: &Url) -> String {
    let mut shown = url.clone();
    // Both only fail for URLs that cannot have userinfo, which then has none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Like [`without_userinfo`] for text that did not parse as a URL: drops
/// everything between `://` and the last `@` of the authority.
fn without_userinfo_text(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Whether the user set a `Content-Type` that is not JSON.
fn sets_non_json_content_type(headers: &HeaderMap) -> bool {
    headers.contains_key(CONTENT_TYPE) && !is_json(headers)
}

/// Whether `Content-Type` says JSON: `application/json` or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// The body as it arrives, up to `cap` bytes; `true` if there was more (the
/// rest is never read: dropping the response closes its connection).
async fn read_body(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// Response headers as a JSON object; repeated headers are joined with `", "`, the
/// HTTP way of combining them.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut object = Map::new();
    for (name, value) in headers {
        // `HeaderName`s are stored in lower case already.
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match object.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                object.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    Value::Object(object)
}

/// Statuses worth retrying: server errors, request timeout, too many requests.
fn is_retryable_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// The error of a request (`what`) that got no response.
fn send_error(what: &str, timeout: Duration, error: reqwest::Error) -> ActionError {
    if error.is_timeout() {
        return ActionError::Retryable(format!("{what} timed out after {timeout:?}"));
    }
    // A request that cannot be built will not get better.
    let permanent = error.is_builder();
    let message = format!("{what} failed: {}", error_chain(error));
    if permanent {
        ActionError::Permanent(message)
    } else {
        ActionError::Retryable(message)
    }
}

/// The error and its causes on one line, without the URL reqwest attaches (it is
/// already in the message, with its userinfo stripped).
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::super::simple::tests::context;
    use super::*;

    /// Starts a server that answers one request with `response` (raw HTTP/1.1)
    /// and hands back the request it received.
    async fn serve_once(response: String) -> (String, JoinHandle<String>) {
        let (base, server) = serve(vec![response]).await;
        let server = tokio::spawn(async move { server.await.unwrap().remove(0) });
        (base, server)
    }

    /// Starts a server that answers one request per connection with each of
    /// `responses` in turn, and hands back the requests it received.
    async fn serve(responses: Vec<String>) -> (String, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            for response in responses {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut received = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    received.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&received).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if received.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                socket.write_all(response.as_bytes()).await.unwrap();
                socket.shutdown().await.unwrap();
                requests.push(String::from_utf8_lossy(&received).into_owned());
            }
            requests
        });
        (format!("http://{address}"), server)
    }

    fn redirect(status: &str, location: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
    }

    fn response(status: &str, content_type: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Thing: A\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// An `http` action that may reach this machine's 127.0.0.1 only.
    fn local() -> Http {
        Http::new(HttpFence::parse(&["127.0.0.1"]).unwrap())
    }

    async fn run(params: Value, input: Value) -> Result<Value, ActionError> {
        local().run(&context(params, input)).await
    }

    #[tokio::test]
    async fn get_with_json_response() {
        let (base, server) = serve_once(response(
            "200 OK",
            "application/json; charset=utf-8",
            r#"{"ok":true,"n":[1,2]}"#,
        ))
        .await;
        let result = run(
            json!({"url": format!("{base}/items?x=1"), "headers": {"X-Token": "t0k"}}),
            json!({"ignored": true}),
        )
        .await
        .unwrap();
        assert_eq!(result["status"], json!(200));
        assert_eq!(result["body"], json!({"ok": true, "n": [1, 2]}));
        assert_eq!(result["headers"]["x-thing"], json!("A"));
        assert_eq!(
            result["headers"]["content-type"],
            json!("application/json; charset=utf-8")
        );
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /items?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.to_ascii_lowercase().contains("x-token: t0k\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with("\r\n\r\n"),
            "GET sends no body: {request}"
        );
    }

    #[tokio::test]
    async fn post_sends_the_input_and_text_comes_back_as_text() {
        let (base, server) = serve_once(response("201 Created", "text/plain", "created")).await;
        let result = run(json!({"url": base, "method": "POST"}), json!({"a": 1}))
            .await
            .unwrap();
        assert_eq!(result["status"], json!(201));
        assert_eq!(result["body"], json!("created"));
        let request = server.await.unwrap();
        assert!(request.starts_with("POST / HTTP/1.1\r\n"), "{request}");
        assert!(
            request
                .to_ascii_lowercase()
                .contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with(r#"{"a":1}"#), "{request}");
    }

    #[tokio::test]
    async fn explicit_body_wins_and_a_string_can_be_sent_raw() {
        let (base, server) = serve_once(response("200 OK", "application/json", "not json")).await;
        let result = run(
            json!({"url": base, "method": "PUT", "body": "a=1&b=2",
                   "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
            json!({"input": "unused"}),
        )
        .await
        .unwrap();
        // Claimed JSON that does not parse comes back as text.
        assert_eq!(result["body"], json!("not json"));
        let request = server.await.unwrap();
        assert!(request.ends_with("\r\n\r\na=1&b=2"), "{request}");

        let (base, server) = serve_once(response("200 OK", "application/json", "{}")).await;
        run(
            json!({"url": base, "method": "DELETE", "body": [1, {"a": null}]}),
            json!({}),
        )
        .await
        .unwrap();
        let request = server.await.unwrap();
        assert!(request.starts_with("DELETE / HTTP/1.1\r\n"), "{request}");
        assert!(request.ends_with(r#"[1,{"a":null}]"#), "{request}");
    }

    #[tokio::test]
    async fn server_error_is_retryable_and_hides_credentials() {
        let (base, server) =
            serve_once(response("503 Service Unavailable", "text/plain", "busy")).await;
        let url = base.replace("http://", "http://alice:s3cret@") + "/page";
        let err = run(json!({"url": url, "method": "POST"}), json!({}))
            .await
            .unwrap_err();
        let expected_url = format!("{base}/page");
        assert_eq!(
            err,
            ActionError::Retryable(format!("POST {expected_url} answered 503: busy"))
        );
        let request = server.await.unwrap();
        // The userinfo went out as basic auth (base64 of "alice:s3cret").
        assert!(request.contains("YWxpY2U6czNjcmV0"), "{request}");
    }

    #[tokio::test]
    async fn too_many_requests_is_retryable() {
        let (base, _server) = serve_once(response("429 Too Many Requests", "text/plain", "")).await;
        let err = run(json!({"url": base}), json!({})).await.unwrap_err();
        assert_eq!(
            err,
            ActionError::Retryable(format!("GET {base}/ answered 429"))
        );
    }

    #[tokio::test]
    async fn not_found_is_permanent_and_quotes_200_chars() {
        let body = "n".repeat(300);
        let (base, _server) = serve_once(response("404 Not Found", "text/plain", &body)).await;
        let err = run(json!({"url": base}), json!({})).await.unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(format!("GET {base}/ answered 404: {}", "n".repeat(200)))
        );
    }

    #[tokio::test]
    async fn bodies_over_the_limit_fail_permanently_announced_or_not() {
        let limited = || local().with_result_limit(ResultLimit::new(1000));
        let expected = |base: &str| {
            ActionError::Permanent(format!(
                "GET {base}/big: result is larger than the 1000 bytes limit (--max-result-size)"
            ))
        };
        // Announced by Content-Length: refused before the body is read.
        let (base, _server) = serve_once(response("200 OK", "text/plain", &"x".repeat(2000))).await;
        let ctx = context(json!({"url": format!("{base}/big")}), json!({}));
        assert_eq!(limited().run(&ctx).await, Err(expected(&base)));
        // Not announced (the body runs until the connection closes): read up to the limit.
        let (base, _server) = serve_once(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{}",
            "y".repeat(5000)
        ))
        .await;
        let ctx = context(json!({"url": format!("{base}/big")}), json!({}));
        assert_eq!(limited().run(&ctx).await, Err(expected(&base)));
        // Up to the limit is fine.
        let (base, _server) = serve_once(response("200 OK", "text/plain", &"z".repeat(1000))).await;
        let ctx = context(json!({"url": format!("{base}/big")}), json!({}));
        let result = limited().run(&ctx).await.unwrap();
        assert_eq!(result["body"], json!("z".repeat(1000)));
        // A large error body is not a large result: the status is what counts.
        let (base, _server) =
            serve_once(response("500 Oops", "text/plain", &"e".repeat(5000))).await;
        let ctx = context(json!({"url": format!("{base}/big")}), json!({}));
        let err = limited().run(&ctx).await.unwrap_err();
        assert!(err.is_retryable());
        assert!(
            err.message()
                .starts_with(&format!("GET {base}/big answered 500: eee")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let err = run(
            json!({"url": format!("http://bob:hunter2@{address}/x")}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        let message = err.message();
        assert!(
            message.starts_with(&format!("GET http://{address}/x failed: ")),
            "{message}"
        );
        assert!(
            !message.contains("hunter2") && !message.contains("bob"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn timeout_is_retryable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut ctx = context(json!({"url": format!("http://{address}/slow")}), json!({}));
        ctx.timeout = Duration::from_millis(200);
        let err = local().run(&ctx).await.unwrap_err();
        server.abort();
        assert_eq!(
            err,
            ActionError::Retryable(format!("GET http://{address}/slow timed out after 200ms"))
        );
    }

    #[tokio::test]
    async fn bad_params_are_permanent() {
        for (params, message) in [
            (json!({}), "params.url: \"url\" is required"),
            (
                json!({"url": "ftp://u:p@x/y"}),
                "params.url: url must start with http:// or https://, got \"ftp://x/y\"",
            ),
            (
                json!({"url": "http://x", "method": "FETCH"}),
                "params.method: unknown method \"FETCH\" (expected one of: GET, POST, PUT, PATCH, DELETE, HEAD)",
            ),
            (
                json!({"url": "http://x", "method": "get"}),
                "params.method: unknown method \"get\" (expected one of: GET, POST, PUT, PATCH, DELETE, HEAD)",
            ),
            (
                json!({"url": "http://x", "headers": {"X-Retry": 3}}),
                "params.headers[\"X-Retry\"]: expected a string, got a number",
            ),
            (
                json!({"url": "http://x", "headers": ["a"]}),
                "params.headers: expected an object, got an array",
            ),
            (
                json!({"url": "http://x", "headers": {"bad name": "v"}}),
                "params.headers: \"bad name\" is not a valid header name",
            ),
        ] {
            assert_eq!(
                run(params.clone(), json!({})).await,
                Err(ActionError::Permanent(message.to_owned())),
                "{params}"
            );
        }
        let err = run(json!({"url": "http://[::1"}), json!({}))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message().starts_with("params.url: invalid URL: "),
            "{err:?}"
        );
    }

    #[test]
    fn userinfo_is_stripped_from_unparsed_text() {
        assert_eq!(without_userinfo_text("ftp://a:b@h/p@q"), "ftp://h/p@q");
        assert_eq!(without_userinfo_text("ftp://h/p"), "ftp://h/p");
        assert_eq!(without_userinfo_text("nonsense"), "nonsense");
    }

    #[test]
    fn json_content_types() {
        let mut headers = HeaderMap::new();
        assert!(!is_json(&headers));
        for (value, json) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/jsonl", false),
        ] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&headers), json, "{value}");
        }
    }

    #[test]
    fn retryable_statuses() {
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(
                is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [300, 400, 401, 403, 404, 409, 422] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }
    /// What an `http` action that reaches nothing says about `url`.
    async fn refused_by_default(url: &str) -> ActionError {
        let ctx = context(json!({ "url": url }), json!({}));
        Http::default().run(&ctx).await.unwrap_err()
    }

    #[tokio::test]
    async fn destinations_outside_the_fence_are_refused_before_connecting() {
        let err = refused_by_default("http://169.254.169.254/latest/meta-data/").await;
        assert_eq!(
            err,
            ActionError::Permanent(
                "GET http://169.254.169.254/latest/meta-data/: 169.254.169.254:80 is not allowed: \
                 start the worker with --allow-http 169.254.169.254 (or a CIDR or * that covers it)"
                    .to_owned()
            )
        );
        // Refused before it is resolved: no DNS answer is needed to say no.
        let err = refused_by_default("http://metadata.google.internal/computeMetadata/v1/").await;
        assert_eq!(
            err,
            ActionError::Permanent(
                "GET http://metadata.google.internal/computeMetadata/v1/: \
                 metadata.google.internal:80 is not allowed: start the worker with \
                 --allow-http metadata.google.internal (or a wildcard, CIDR or * that covers it)"
                    .to_owned()
            )
        );
        // An IPv4 address written as IPv6 is the IPv4 address.
        let err = run(json!({"url": "http://[::ffff:a9fe:a9fe]/"}), json!({}))
            .await
            .unwrap_err();
        assert!(
            err.message()
                .ends_with("169.254.169.254:80 is not allowed: start the worker with --allow-http 169.254.169.254 (or a CIDR or * that covers it)"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_host_name_is_allowed_by_name_or_by_every_address_it_resolves_to() {
        let (base, _server) = serve(vec![response("200 OK", "text/plain", "hi"); 2]).await;
        let port = base.rsplit(':').next().unwrap().to_owned();
        let url = format!("http://localhost:{port}/x");
        let by_name = Http::new(HttpFence::parse(&["LOCALHOST"]).unwrap());
        for _ in 0..2 {
            let result = by_name
                .run(&context(json!({"url": url}), json!({})))
                .await
                .unwrap();
            assert_eq!(result["body"], json!("hi"));
        }
        {
            // One client, pinned to what the name resolved to, serves both.
            let kept = by_name.pinned.lock();
            assert_eq!(kept.len(), 1);
            assert_eq!(kept[0].host, "localhost");
            assert!(kept[0].addresses.contains(&IpAddr::from([127, 0, 0, 1])));
        }

        let elsewhere = Http::new(HttpFence::parse(&["10.0.0.0/8"]).unwrap());
        let err = elsewhere
            .run(&context(json!({"url": url}), json!({})))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(format!(
                "GET {url}: localhost:{port} resolves to 127.0.0.1, which is not allowed: \
                 start the worker with --allow-http localhost (or an IP address, CIDR or * that \
                 covers 127.0.0.1)"
            ))
        );
    }

    #[tokio::test]
    async fn the_clients_resolve_no_name_themselves() {
        let err = client_builder()
            .build()
            .unwrap()
            .get("http://localhost:1/")
            .send()
            .await
            .unwrap_err();
        assert!(
            error_chain(err).contains("localhost was not checked against --allow-http"),
            "only names pinned after the check are reached"
        );
    }

    #[tokio::test]
    async fn redirects_are_followed_and_the_step_s_headers_stay_with_their_origin() {
        let (other, other_server) =
            serve_once(response("200 OK", "application/json", r#"{"at":"other"}"#)).await;
        let (base, server) = serve(vec![
            redirect("307 Temporary Redirect", "/moved"),
            redirect("302 Found", &format!("{other}/final")),
        ])
        .await;
        let result = run(
            json!({"url": format!("{base}/start"), "method": "POST",
                   "headers": {"Authorization": "Bearer t0k", "X-Api-Key": "k3y"}}),
            json!({"a": 1}),
        )
        .await
        .unwrap();
        assert_eq!(result["body"], json!({"at": "other"}));
        let requests = server.await.unwrap();
        // Same origin, 307: the same request again.
        let moved = requests[1].to_ascii_lowercase();
        assert!(moved.starts_with("post /moved http/1.1\r\n"), "{moved}");
        assert!(moved.contains("authorization: bearer t0k\r\n"), "{moved}");
        assert!(moved.contains("x-api-key: k3y\r\n"), "{moved}");
        assert!(moved.ends_with(r#"{"a":1}"#), "{moved}");
        // Another origin, 302: a GET without a body and without the step's headers.
        let last = other_server.await.unwrap().to_ascii_lowercase();
        assert!(last.starts_with("get /final http/1.1\r\n"), "{last}");
        assert!(!last.contains("authorization"), "{last}");
        assert!(!last.contains("x-api-key"), "{last}");
        assert!(!last.contains("content-type"), "{last}");
        assert!(last.ends_with("\r\n\r\n"), "{last}");
    }

    #[tokio::test]
    async fn redirects_out_of_the_fence_or_too_many_fail() {
        let (base, _server) = serve(vec![redirect(
            "301 Moved Permanently",
            "http://127.0.0.2:9/x",
        )])
        .await;
        let port = base.rsplit(':').next().unwrap();
        let only_this_port = Http::new(HttpFence::parse(&[format!("127.0.0.1:{port}")]).unwrap());
        let err = only_this_port
            .run(&context(json!({"url": format!("{base}/a")}), json!({})))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(format!(
                "GET {base}/a (redirected to http://127.0.0.2:9/x): 127.0.0.2:9 is not allowed: \
                 start the worker with --allow-http 127.0.0.2 (or a CIDR or * that covers it)"
            ))
        );

        let (base, _server) = serve(vec![redirect("302 Found", "/again"); 6]).await;
        let err = run(json!({"url": format!("{base}/a")}), json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(format!(
                "GET {base}/a (redirected to {base}/again): redirected again, to {base}/again: \
                 more than 5 redirects"
            ))
        );

        let (base, _server) = serve(vec![redirect("302 Found", "file:///etc/passwd")]).await;
        let err = run(json!({"url": format!("{base}/a")}), json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(format!(
                "GET {base}/a: redirected to file:///etc/passwd: only http and https redirects are followed"
            ))
        );
    }
}
