//! `http` steps reach only what the worker's `--allow-http` allows, with real
//! `synapse-worker` processes and small local HTTP servers: refused
//! destinations fail before anything connects, redirects are checked again
//! and keep the step's headers with their host, and bodies are capped.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{error_of, run_plan, task, worker_binary, Stack};

const WAIT: Duration = Duration::from_secs(60);

/// An HTTP server on 127.0.0.1 that answers each request with what `answer`
/// makes of its path (a raw HTTP/1.1 response, connection closed after it),
/// and keeps every request it received (head and body).
struct Server {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(answer: impl Fn(&str) -> String + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let request = read_request(&stream);
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                kept.lock().unwrap().push(request);
                let _ = stream.write_all(answer(&path).as_bytes());
            }
        });
        Server { port, received }
    }

    fn requests(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

/// One request's head and body.
fn read_request(stream: &std::net::TcpStream) -> String {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        request.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    request.push_str(&String::from_utf8_lossy(&body));
    request
}

fn ok_json(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn redirect(location: &str) -> String {
    format!(
        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

fn get(id: &str, queue: &str, url: &str) -> Value {
    json!({"id": id, "action": "http", "queue": queue, "retries": 2, "backoff": "100ms",
           "params": {"url": url}})
}

#[test]
fn an_http_step_reaches_only_what_allow_http_allows() {
    let stack = Stack::start("http_fence", &[]);
    let server = Server::start(|_| ok_json(r#"{"ok":true}"#));
    let port = server.port;
    // One worker per setting, each on a queue of its own.
    let _nothing = stack.start_worker("nothing", &["--queues", "nothing"]);
    let _loopback = stack.start_worker(
        "loopback",
        &["--queues", "loopback", "--allow-http", "127.0.0.1"],
    );
    let _by_name = stack.start_worker(
        "by_name",
        &["--queues", "by_name", "--allow-http", "localhost"],
    );
    let metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let local = format!("http://127.0.0.1:{port}/hook");
    let named = format!("http://localhost:{port}/named");

    // By default nothing is reached; no network is needed to say so.
    let status = run_plan(
        &stack,
        json!({"steps": [get("metadata", "nothing", metadata), get("local", "nothing", &local)]}),
    );
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(
        error_of(&status, "metadata"),
        format!(
            "GET {metadata}: 169.254.169.254:80 is not allowed: start the worker with \
             --allow-http 169.254.169.254 (or a CIDR or * that covers it)"
        )
    );
    assert_eq!(task(&status, "metadata")["attempts"], 1, "never retried");
    assert_eq!(
        error_of(&status, "local"),
        format!(
            "GET {local}: 127.0.0.1:{port} is not allowed: start the worker with \
             --allow-http 127.0.0.1 (or a CIDR or * that covers it)"
        )
    );
    assert!(server.requests().is_empty(), "nothing reached the server");

    // An address allows that address, on any port, and nothing else.
    let status = run_plan(
        &stack,
        json!({"steps": [get("local", "loopback", &local), get("metadata", "loopback", metadata)]}),
    );
    assert_eq!(
        task(&status, "local")["result"]["body"],
        json!({"ok": true}),
        "{status}"
    );
    assert!(
        error_of(&status, "metadata").ends_with(
            "169.254.169.254:80 is not allowed: start the worker with --allow-http \
             169.254.169.254 (or a CIDR or * that covers it)"
        ),
        "{status}"
    );
    assert_eq!(server.requests().len(), 1);

    // A host name allows the URLs that name it, not the address they resolve to.
    let status = run_plan(
        &stack,
        json!({"steps": [get("named", "by_name", &named), get("address", "by_name", &local)]}),
    );
    assert_eq!(
        task(&status, "named")["result"]["body"],
        json!({"ok": true}),
        "{status}"
    );
    assert!(
        error_of(&status, "address").ends_with(&format!(
            "127.0.0.1:{port} is not allowed: start the worker with --allow-http 127.0.0.1 \
             (or a CIDR or * that covers it)"
        )),
        "{status}"
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests[1].starts_with("GET /named HTTP/1.1\r\n"),
        "{requests:?}"
    );
}

#[test]
fn redirects_are_checked_again_and_the_step_s_headers_stay_with_their_host() {
    let stack = Stack::start("http_fence_redirects", &[]);
    let landing = Server::start(|_| ok_json(r#"{"landed":true}"#));
    let closed = closed_port();
    let (landing_port, closed_url) = (landing.port, format!("http://127.0.0.1:{closed}/inside"));
    let start = Server::start(move |path| match path {
        "/to-landing" => redirect(&format!("http://localhost:{landing_port}/landing")),
        "/to-closed" => redirect(&closed_url),
        _ => ok_json("{}"),
    });
    let allowed = format!("127.0.0.1:{},localhost:{landing_port}", start.port);
    let _worker = stack.start_worker("w", &["--allow-http", &allowed]);
    let secret = json!({"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"});
    let status = run_plan(
        &stack,
        json!({"steps": [
            {"id": "elsewhere", "action": "http",
             "params": {"url": format!("http://127.0.0.1:{}/to-landing", start.port), "headers": secret}},
            {"id": "outside", "action": "http", "retries": 2, "backoff": "100ms",
             "params": {"url": format!("http://127.0.0.1:{}/to-closed", start.port), "headers": secret}}
        ]}),
    );

    // Another allowed host is reached, without the step's headers.
    assert_eq!(
        task(&status, "elsewhere")["result"]["body"],
        json!({"landed": true}),
        "{status}"
    );
    let first = start.requests();
    assert!(
        first.iter().all(|request| request
            .to_ascii_lowercase()
            .contains("authorization: bearer s3cret\r\n")),
        "the first host gets them: {first:?}"
    );
    let landed = landing.requests();
    assert_eq!(landed.len(), 1, "{landed:?}");
    let landed = landed[0].to_ascii_lowercase();
    assert!(landed.starts_with("get /landing http/1.1\r\n"), "{landed}");
    assert!(!landed.contains("authorization"), "{landed}");
    assert!(!landed.contains("s3cret"), "{landed}");
    assert!(!landed.contains("x-api-key"), "{landed}");

    // A port that is not allowed is not reached, and the step fails saying so, once.
    assert_eq!(
        error_of(&status, "outside"),
        format!(
            "GET http://127.0.0.1:{port}/to-closed (redirected to http://127.0.0.1:{closed}/inside): \
             127.0.0.1:{closed} is not allowed: start the worker with --allow-http 127.0.0.1 \
             (or a CIDR or * that covers it)",
            port = start.port
        )
    );
    assert_eq!(task(&status, "outside")["attempts"], 1, "never retried");
}

/// Serves one endless body (no `Content-Length`) and reports how many bytes
/// it could write before the client hung up.
fn endless_server() -> (u16, std::sync::mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (written, report) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        read_request(&stream);
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        // At most 1 GiB: far more than any socket buffers hold.
        while sent < 1 << 30 && stream.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        let _ = written.send(sent);
    });
    (port, report)
}

#[test]
fn a_body_over_the_cap_fails_the_step_without_being_read_to_its_end() {
    let stack = Stack::start("http_fence_body", &[]);
    let _worker = stack.start_worker(
        "w",
        &["--allow-http", "127.0.0.1", "--max-result-size", "64KiB"],
    );
    let (port, written) = endless_server();
    let url = format!("http://127.0.0.1:{port}/stream");
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "big", "action": "http", "retries": 2, "params": {"url": url}}]}),
    );
    assert_eq!(
        error_of(&status, "big"),
        format!("GET {url}: result is larger than the 64 KiB limit (--max-result-size)")
    );
    assert_eq!(task(&status, "big")["attempts"], 1, "never retried");
    let sent = written.recv_timeout(WAIT).expect("the server's count");
    assert!(
        sent < 64 << 20,
        "the worker hung up after {sent} bytes: it read on past the cap"
    );
}

#[test]
fn a_bad_allow_http_entry_stops_the_worker_before_it_starts() {
    for (flag, env, message) in [
        (
            Some("10.0.0.1/8"),
            None,
            "error: --allow-http: invalid entry \"10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)",
        ),
        (
            None,
            Some("api.example.com,https://api.example.com"),
            "error: --allow-http: invalid entry \"https://api.example.com\": an entry is a host, \
             not a URL (e.g. api.example.com or api.example.com:443)",
        ),
    ] {
        let mut command = std::process::Command::new(worker_binary());
        command
            .arg("run")
            .env_remove("SYNAPSE_ALLOW_HTTP")
            // Nothing is reached: the entry is refused first.
            .env("SYNAPSE_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
            .env("SYNAPSE_REDIS_URL", "redis://127.0.0.1:1/0");
        if let Some(flag) = flag {
            command.args(["--allow-http", flag]);
        }
        if let Some(env) = env {
            command.env("SYNAPSE_ALLOW_HTTP", env);
        }
        let output = command.output().expect("running synapse-worker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
    }
}
