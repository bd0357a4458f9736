//! The `http` built-in: one HTTP request per attempt.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};

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
/// permanently. The attempt's timeout bounds the whole request. Credentials in
/// the URL's userinfo are sent as basic auth but never appear in messages.
///
/// The body is read as it arrives and no further than the result limit (1 MiB
/// unless [`Http::with_result_limit`] says otherwise): a longer one fails the
/// attempt permanently, and so does a `Content-Length` over the limit, before
/// any of the body is read.
pub struct Http {
    client: reqwest::Client,
    limit: ResultLimit,
}

impl Http {
    /// An `http` action with its own connection pool, shared by all its requests.
    ///
    /// # Panics
    ///
    /// If the TLS backend cannot be initialised (e.g. the system's TLS library is
    /// unusable): the worker cannot make HTTPS requests at all then, and says so
    /// at start rather than on every step.
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("synapse-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client (TLS backend) could not be initialised");
        Self {
            client,
            limit: ResultLimit::default(),
        }
    }

    /// The same action with bodies bounded by `limit` instead of 1 MiB.
    pub fn with_result_limit(mut self, limit: ResultLimit) -> Self {
        self.limit = limit;
        self
    }

    async fn execute(&self, context: &ActionContext) -> Result<Value, ActionError> {
        let request = Request::from_params(context)?;
        let shown = request.shown_url();
        let method = request.method.clone();

        let mut builder = self
            .client
            .request(request.method, request.url)
            .headers(request.headers)
            .timeout(context.timeout);
        builder = match request.body {
            Body::None => builder,
            Body::Raw(text) => builder.body(text),
            Body::Json(value) => builder.json(value),
        };

        let mut response = builder
            .send()
            .await
            .map_err(|e| send_error(&method, &shown, context.timeout, e))?;
        let status = response.status();
        let headers = headers_json(response.headers());
        let is_json = is_json(response.headers());
        let cap = if status.is_success() {
            let announced = response.content_length().unwrap_or(0);
            if usize::try_from(announced).map_or(true, |length| length > self.limit.bytes()) {
                return Err(self.limit.exceeded(&format!("{method} {shown}")));
            }
            self.limit.bytes()
        } else {
            ERROR_BODY_BYTES
        };
        let (bytes, cut) = read_body(&mut response, cap).await.map_err(|e| {
            let what = if e.is_timeout() {
                format!("timed out after {:?} reading the response", context.timeout)
            } else {
                format!("failed reading the response: {}", error_chain(e))
            };
            ActionError::Retryable(format!("{method} {shown} {what}"))
        })?;
        if cut && status.is_success() {
            return Err(self.limit.exceeded(&format!("{method} {shown}")));
        }
        let text = String::from_utf8_lossy(&bytes);

        if !status.is_success() {
            let quoted: String = text.trim().chars().take(BODY_QUOTE_CHARS).collect();
            let message = if quoted.is_empty() {
                format!("{method} {shown} answered {}", status.as_u16())
            } else {
                format!("{method} {shown} answered {}: {quoted}", status.as_u16())
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
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
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

    /// The URL as messages show it: without user name and password.
    fn shown_url(&self) -> String {
        without_userinfo(&self.url)
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

/// The error of a request that got no response.
fn send_error(
    method: &Method,
    shown: &str,
    timeout: Duration,
    error: reqwest::Error,
) -> ActionError {
    if error.is_timeout() {
        return ActionError::Retryable(format!("{method} {shown} timed out after {timeout:?}"));
    }
    // A request that cannot be built, or a redirect loop, will not get better.
    let permanent = error.is_builder() || error.is_redirect();
    let message = format!("{method} {shown} failed: {}", error_chain(error));
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
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
            String::from_utf8_lossy(&received).into_owned()
        });
        (format!("http://{address}"), server)
    }

    fn response(status: &str, content_type: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Thing: A\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    async fn run(params: Value, input: Value) -> Result<Value, ActionError> {
        Http::new().run(&context(params, input)).await
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
        let limited = || Http::new().with_result_limit(ResultLimit::new(1000));
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
        let err = Http::new().run(&ctx).await.unwrap_err();
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
}
