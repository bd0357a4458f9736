//! The worker and the CLI reach Postgres over TLS as the URL asks (libpq's
//! `sslmode` and `sslrootcert`), against a server that lets the worker's
//! role in only over TLS.
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;
use synapse_e2e::{submit_plan, task, wait_for_goal, wait_until, worker_binary, Stack, DATABASE};
use synapse_worker::postgres_tls;

const PASSWORD: &str = "tls-s3cret";

const WAIT: Duration = Duration::from_secs(60);

/// The `app` role's URL to the stack through `host`, with `parameters`.
fn url(stack: &Stack, host: &str, parameters: &str) -> String {
    format!(
        "postgresql://app:{PASSWORD}@{host}:{}/{DATABASE}?{parameters}",
        stack.pg_port
    )
}

/// Runs the CLI on `url`, trusting only the system's CAs.
fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(worker_binary())
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running synapse-worker")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that `output` failed with `code`, saying each of `words`, and
/// never the password.
fn assert_refused(output: &Output, code: i32, words: &[&str]) {
    let said = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{said}");
    for word in words {
        assert!(said.contains(word), "{word:?} not in: {said}");
    }
    assert!(!said.contains(PASSWORD), "{said}");
}

#[test]
fn the_worker_and_the_cli_speak_tls_as_the_url_asks() {
    let stack = Stack::start_postgres_tls("tls");
    let mut admin = stack.pg();
    // A superuser: this test is about the transport, not about the roles' rights.
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        ))
        .unwrap();
    let ca = stack.ca_file().display().to_string();

    // sslmode=require: encrypted, the certificate not checked. The engine's
    // connections and the sql step's are all encrypted.
    let worker = stack.start_worker(
        "require",
        &[
            "--database-url",
            &url(&stack, "127.0.0.1", "sslmode=require"),
        ],
    );
    let goal = submit_plan(
        &mut admin,
        &json!({"steps": [
            {"id": "hello", "action": "noop"},
            {"id": "query", "action": "sql",
             "params": {"query": "select ssl from pg_stat_ssl where pid = pg_backend_pid()"}}],
         "edges": [{"from": "hello", "to": "query"}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(
        status["status"],
        "succeeded",
        "{status}\n{}",
        worker.log_text()
    );
    assert_eq!(
        task(&status, "query")["result"]["rows"],
        json!([{"ssl": true}])
    );
    let (connections, encrypted): (i64, i64) = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'app'",
            &[],
        )
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert!(connections >= 2, "the worker's connections: {connections}");
    assert_eq!(
        encrypted, connections,
        "every connection of the worker is encrypted"
    );
    drop(worker);

    // A cancel request goes over TLS too (the sql action cancels a dropped
    // step's statement so), and stops the statement.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (config, tls) =
        postgres_tls::configure(&url(&stack, "127.0.0.1", "sslmode=require")).unwrap();
    let cancel_tls = tls.clone();
    let client = runtime.block_on(async {
        let (client, connection) = config.connect(tls).await.expect("connecting over TLS");
        tokio::spawn(connection);
        client
    });
    let token = client.cancel_token();
    let sleeping = runtime.spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_until("the statement to run", Duration::from_secs(10), || {
        let running: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE usename = 'app' AND state = 'active' AND query = 'SELECT pg_sleep(60)'",
                &[],
            )
            .unwrap()
            .get(0);
        (running == 1).then_some(())
    });
    runtime
        .block_on(token.cancel_query(cancel_tls))
        .expect("the cancel request is sent");
    let error = runtime
        .block_on(sleeping)
        .unwrap()
        .expect_err("the statement is cancelled");
    assert_eq!(
        error.code().map(|code| code.code()),
        Some("57014"),
        "{error}"
    );

    // The password from a file: in neither the command line nor the environment.
    let file = stack.path("postgres-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let without_password = format!(
        "postgresql://app@127.0.0.1:{}/{DATABASE}?sslmode=verify-full&sslrootcert={ca}",
        stack.pg_port
    );
    let from_file = stack.start_worker(
        "password-file",
        &[
            "--database-url",
            &without_password,
            "--database-password-file",
            &file.display().to_string(),
        ],
    );
    for exposed in ["cmdline", "environ"] {
        let text = std::fs::read(format!("/proc/{}/{exposed}", from_file.pid())).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains(PASSWORD),
            "{exposed}"
        );
    }
    drop(from_file);
    let status = Command::new(worker_binary())
        .args([
            "--database-url",
            &without_password,
            "status",
            &goal.to_string(),
        ])
        .env("SYNAPSE_DATABASE_PASSWORD_FILE", &file)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    std::fs::write(&file, "wrong\n").unwrap();
    assert_refused(
        &cli(
            &without_password,
            &[
                "--database-password-file",
                &file.display().to_string(),
                "status",
                "1",
            ],
        ),
        1,
        &["password authentication failed for user \"app\""],
    );

    // verify-full against the stack's CA: by address and by name.
    let goal_id = goal.to_string();
    for host in ["127.0.0.1", "localhost"] {
        let verified = url(
            &stack,
            host,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        );
        let output = cli(&verified, &["status", &goal_id]);
        assert_eq!(output.status.code(), Some(0), "{host}: {}", stderr(&output));
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("succeeded"),
            "{output:?}"
        );
    }

    // A name the certificate does not hold: verify-ca lets it be, verify-full refuses.
    let elsewhere = |mode: &str| {
        url(
            &stack,
            "db.invalid",
            &format!("hostaddr=127.0.0.1&sslrootcert={ca}&sslmode={mode}"),
        )
    };
    let output = cli(&elsewhere("verify-ca"), &["status", &goal_id]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_refused(
        &cli(&elsewhere("verify-full"), &["status", &goal_id]),
        1,
        &[
            "postgresql://app:***@db.invalid:",
            "the server's certificate is not for host \"db.invalid\" (hostname mismatch)",
        ],
    );

    // verify-full with the system's CAs, which never signed the server's certificate.
    let system = url(&stack, "127.0.0.1", "sslmode=verify-full");
    assert_refused(
        &cli(&system, &["status", &goal_id]),
        1,
        &[
            "cannot connect to Postgres at postgresql://app:***@127.0.0.1:",
            "the server's certificate is not trusted: ",
            "(by the system's CAs; give its CA's file as sslrootcert)",
        ],
    );
    // The worker says the same, and ends: waiting would not make it trusted.
    let mut untrusted = stack.spawn_worker("untrusted", &["--database-url", &system], "info");
    let exit = untrusted.wait(Duration::from_secs(30));
    let logged = untrusted.log_text();
    assert_eq!(exit.code(), Some(1), "{logged}");
    assert!(
        logged.contains("the server's certificate is not trusted"),
        "{logged}"
    );
    assert!(!logged.contains(PASSWORD), "{logged}");

    // Without TLS, the server refuses the role, and the CLI says why.
    assert_refused(
        &cli(
            &url(&stack, "127.0.0.1", "sslmode=disable"),
            &["status", &goal_id],
        ),
        1,
        &[
            "postgresql://app:***@127.0.0.1:",
            "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\"",
            "no encryption",
            "set sslmode=verify-full",
        ],
    );

    // A CA file that is not there is a configuration error.
    let missing = url(
        &stack,
        "127.0.0.1",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    assert_refused(
        &cli(&missing, &["status", &goal_id]),
        64,
        &["cannot read sslrootcert /nonexistent/ca.pem"],
    );
}
