//! The `exec` built-in: runs an allowed program with the step input as JSON on
//! stdin and takes its JSON stdout as the result.

use std::io::ErrorKind;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::limit::ResultLimit;
use super::simple::{expected, param};
use super::{Action, ActionContext, ActionError, ActionFuture};

/// How much of a failed program's stderr goes into the error message.
const STDERR_TAIL_BYTES: usize = 500;

/// How much of unparseable stdout is quoted in the error message.
const STDOUT_QUOTE_CHARS: usize = 200;

/// The only variables of the worker's environment a program gets. The rest
/// (database and Redis URLs, cloud credentials, tokens) is none of its
/// business, and a script that echoes its environment would leak it into step
/// results and logs.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];

/// `exec`: runs `params.argv` (a non-empty array of strings, no shell involved).
///
/// The step input is written to the program's stdin as one line of JSON; on exit
/// status 0 its stdout, parsed as JSON, is the result (empty stdout gives `null`).
/// A non-zero exit is retryable and reports the exit code and the end of stderr;
/// output that is not JSON is a permanent error, since the same program would
/// print it again. The program's environment is clean: the worker's `PATH`,
/// `HOME`, `LANG`, `LC_ALL`, `LC_CTYPE`, `TZ` and `TMPDIR`, plus
/// `SYNAPSE_GOAL_ID`, `SYNAPSE_TASK_ID`, `SYNAPSE_STEP` and `SYNAPSE_ATTEMPT`, so
/// it can make its side effects idempotent across retries.
///
/// Only programs in the allow-list may run. `argv[0]` is compared with each entry
/// exactly as written, without resolving `PATH` or symlinks, so `--allow-exec`
/// must name a program exactly as blueprints write it (`jq` allows `["jq", …]`
/// but not `["/usr/bin/jq", …]`). A bare name is then looked up in the worker's
/// `PATH` when the program starts.
///
/// The program runs in a process group of its own. When the attempt is
/// cancelled (timeout, goal cancelled, lease lost), the whole group is killed,
/// processes the program started included; when the program exits, whatever
/// it left running in its group is killed too. stdout is read no further than
/// the result limit (1 MiB unless [`Exec::with_result_limit`] says otherwise):
/// a program printing more is killed, with its group, and the attempt fails
/// permanently. Of stderr only the end is kept.
pub struct Exec {
    allowed: Vec<String>,
    limit: ResultLimit,
}

impl Exec {
    /// An `exec` action that runs only `allowed_programs` (the worker's
    /// `--allow-exec` list); an empty list allows nothing.
    pub fn new(allowed_programs: Vec<String>) -> Self {
        Self {
            allowed: allowed_programs,
            limit: ResultLimit::default(),
        }
    }

    /// The same action with stdout bounded by `limit` instead of 1 MiB.
    pub fn with_result_limit(mut self, limit: ResultLimit) -> Self {
        self.limit = limit;
        self
    }

    /// The programs this action may run, as given to [`Exec::new`].
    pub fn allowed_programs(&self) -> &[String] {
        &self.allowed
    }

    async fn execute(&self, context: &ActionContext) -> Result<Value, ActionError> {
        let argv = argv(context)?;
        let program = argv[0];
        if !self.allowed.iter().any(|allowed| allowed == program) {
            return Err(ActionError::Permanent(format!(
                "program \"{program}\" is not allowed (start the worker with --allow-exec {program})"
            )));
        }

        let mut command = Command::new(program);
        command
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .env_clear()
            .env("SYNAPSE_GOAL_ID", context.goal_id.to_string())
            .env("SYNAPSE_TASK_ID", context.task_id.to_string())
            .env("SYNAPSE_STEP", &context.step)
            .env("SYNAPSE_ATTEMPT", context.attempt.to_string());
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let mut child = command.spawn().map_err(|e| match e.kind() {
            // This worker cannot run it however often it tries.
            ErrorKind::NotFound | ErrorKind::PermissionDenied => {
                ActionError::Permanent(format!("program \"{program}\" cannot be started: {e}"))
            }
            // Out of processes or file descriptors: may pass.
            _ => ActionError::Retryable(format!("program \"{program}\" could not start: {e}")),
        })?;
        // Ends the program's whole group when the attempt ends, however it ends.
        let group = ProcessGroup::of(&child);

        let mut payload = serde_json::to_vec(&context.input).map_err(|e| {
            ActionError::Permanent(format!("cannot serialize the input as JSON: {e}"))
        })?;
        payload.push(b'\n');
        let stdin = child.stdin.take();
        // Feed stdin while collecting the output: a program that writes before it
        // has read all its input would otherwise deadlock on full pipes.
        let feed = async move {
            let Some(mut stdin) = stdin else {
                return Ok(());
            };
            stdin.write_all(&payload).await?;
            // Dropping stdin closes it, so the program sees end of input.
            stdin.shutdown().await
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let stdout = async {
            let read = read_capped(stdout, self.limit.bytes()).await;
            if matches!(read, Ok(None)) {
                // Too much: stop it now rather than wait for it to end.
                group.kill();
            }
            read
        };
        let stderr = read_tail(stderr, STDERR_TAIL_BYTES);
        let exited = async {
            let status = child.wait().await;
            // What it left running would keep the pipes open: end it.
            group.kill();
            status
        };
        let (fed, stdout, stderr, status) = tokio::join!(feed, stdout, stderr, exited);
        let output = match (stdout, stderr, status) {
            (Ok(Some(stdout)), Ok(stderr), Ok(status)) => std::process::Output {
                status,
                stdout,
                stderr,
            },
            (Ok(None), _, _) => {
                return Err(self.limit.exceeded(&format!("program \"{program}\"")));
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return Err(ActionError::Retryable(format!(
                    "program \"{program}\" could not be waited for: {e}"
                )));
            }
        };
        if let Err(e) = fed {
            // A program that exits without reading its input breaks the pipe; its
            // exit status, not the write, says whether it worked.
            if e.kind() != ErrorKind::BrokenPipe {
                return Err(ActionError::Retryable(format!(
                    "program \"{program}\": writing the input to its stdin failed: {e}"
                )));
            }
        }

        if !output.status.success() {
            let how = match (output.status.code(), output.status.signal()) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                (None, None) => "failed".to_owned(),
            };
            let stderr = stderr_tail(&output.stderr);
            return Err(ActionError::Retryable(if stderr.is_empty() {
                format!("program \"{program}\" {how}")
            } else {
                format!("program \"{program}\" {how}: {stderr}")
            }));
        }
        parse_stdout(program, &output.stdout)
    }
}

impl Action for Exec {
    fn name(&self) -> &str {
        "exec"
    }

    fn description(&self) -> &str {
        "Runs an allowed program (params.argv) with the input as JSON on stdin; the result is its JSON stdout."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "required": ["argv"],
            "properties": {
                "argv": {"type": "array", "minItems": 1, "items": {"type": "string"}}
            }
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(self.execute(context))
    }
}

/// `params.argv`, checked as validation checks it.
fn argv(context: &ActionContext) -> Result<Vec<&str>, ActionError> {
    let items = match param(context, "argv")? {
        None => {
            return Err(ActionError::Permanent(
                "params.argv: \"argv\" is required".to_owned(),
            ))
        }
        Some(Value::Array(items)) => items,
        Some(other) => return Err(expected("argv", "an array of strings", other)),
    };
    if items.is_empty() {
        return Err(ActionError::Permanent(
            "params.argv: argv must not be empty".to_owned(),
        ));
    }
    let mut argv = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if i == 0 && s.is_empty() => {
                return Err(ActionError::Permanent(
                    "params.argv[0]: the program name must not be empty".to_owned(),
                ))
            }
            Value::String(s) => argv.push(s.as_str()),
            other => return Err(expected(&format!("argv[{i}]"), "a string", other)),
        }
    }
    Ok(argv)
}

/// The process group a program runs in (it leads it: the group id is its pid).
///
/// Killed once: when the attempt overflows, when the program has exited (what
/// it left behind), or when this is dropped with the attempt.
struct ProcessGroup {
    leader: Option<rustix::process::Pid>,
    killed: std::sync::atomic::AtomicBool,
}

impl ProcessGroup {
    fn of(child: &tokio::process::Child) -> Self {
        let leader = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        Self {
            leader,
            killed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends SIGKILL to every process of the group, the first time only.
    fn kill(&self) {
        if self.killed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(leader) = self.leader {
            // ESRCH (nobody left in the group) is the usual, fine answer.
            let _ = rustix::process::kill_process_group(leader, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `pipe` to its end, unless it holds more than `cap` bytes: then `None`.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    cap: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut read = Vec::new();
    let Some(pipe) = pipe else {
        return Ok(Some(read));
    };
    // One byte past the cap tells "exactly the cap" from "more".
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    pipe.take(limit).read_to_end(&mut read).await?;
    Ok((read.len() <= cap).then_some(read))
}

/// Reads `pipe` to its end, keeping only its last `keep` bytes (where programs
/// say why they failed), so a chatty program cannot fill the worker's memory.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, keep: usize) -> std::io::Result<Vec<u8>> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else {
        return Ok(tail);
    };
    let mut buffer = [0u8; 8192];
    loop {
        let n = pipe.read(&mut buffer).await?;
        if n == 0 {
            return Ok(tail);
        }
        tail.extend_from_slice(&buffer[..n]);
        if tail.len() > keep {
            tail.drain(..tail.len() - keep);
        }
    }
}

/// The last [`STDERR_TAIL_BYTES`] of stderr as text, trimmed: the end is where
/// programs usually say why they failed.
fn stderr_tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
    // A cut inside a UTF-8 sequence shows as a replacement character, which is fine.
    String::from_utf8_lossy(&stderr[start..]).trim().to_owned()
}

/// The result of a successful run: stdout as JSON, `null` when it is blank.
fn parse_stdout(program: &str, stdout: &[u8]) -> Result<Value, ActionError> {
    let text = String::from_utf8_lossy(stdout);
    let text = text.trim();
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| {
        let quoted: String = text.chars().take(STDOUT_QUOTE_CHARS).collect();
        ActionError::Permanent(format!(
            "program \"{program}\" printed output that is not JSON ({e}): {quoted}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::simple::tests::context;
    use super::*;

    fn exec(allowed: &[&str]) -> Exec {
        Exec::new(allowed.iter().map(|s| (*s).to_owned()).collect())
    }

    async fn run(allowed: &[&str], argv: Value, input: Value) -> Result<Value, ActionError> {
        exec(allowed)
            .run(&context(json!({ "argv": argv }), input))
            .await
    }

    #[tokio::test]
    async fn cat_echoes_the_input_back() {
        let input = json!({"rows": [1, "two", {"three": null}], "ok": true});
        assert_eq!(
            run(&["/bin/cat"], json!(["/bin/cat"]), input.clone()).await,
            Ok(input)
        );
    }

    #[tokio::test]
    async fn arguments_are_passed_without_a_shell() {
        let result = run(
            &["/bin/sh"],
            json!([
                "/bin/sh",
                "-c",
                "printf '[\"%s\",\"%s\"]' \"$0\" \"$SYNAPSE_STEP\"",
                "a b"
            ]),
            json!(null),
        )
        .await;
        assert_eq!(result, Ok(json!(["a b", "s"])));
    }

    #[tokio::test]
    async fn empty_stdout_is_null() {
        assert_eq!(
            run(
                &["/bin/true"],
                json!(["/bin/true"]),
                json!({"big": "x".repeat(1 << 20)})
            )
            .await,
            Ok(Value::Null)
        );
    }

    #[tokio::test]
    async fn non_zero_exit_is_retryable_with_code_and_stderr() {
        let err = run(&["/bin/false"], json!(["/bin/false"]), json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Retryable("program \"/bin/false\" exited with code 1".to_owned())
        );

        let script = "head -c 2000 /dev/zero | tr '\\0' x >&2; echo ' the end' >&2; exit 3";
        let err = run(&["/bin/sh"], json!(["/bin/sh", "-c", script]), json!({}))
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        let message = err.message();
        assert!(
            message.starts_with("program \"/bin/sh\" exited with code 3: xxx"),
            "{message}"
        );
        assert!(message.ends_with("x the end"), "{message}");
        let tail = message.split(": ").nth(1).unwrap();
        assert!(tail.len() <= STDERR_TAIL_BYTES, "{}", tail.len());
    }

    #[tokio::test]
    async fn killed_program_is_retryable() {
        let err = run(
            &["/bin/sh"],
            json!(["/bin/sh", "-c", "kill -9 $$"]),
            json!({}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err,
            ActionError::Retryable("program \"/bin/sh\" was killed by signal 9".to_owned())
        );
    }

    #[tokio::test]
    async fn program_not_allowed_is_permanent() {
        let err = run(&["/bin/cat"], json!(["cat"]), json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(
                "program \"cat\" is not allowed (start the worker with --allow-exec cat)"
                    .to_owned()
            )
        );
        let err = run(&[], json!(["/bin/cat"]), json!({})).await.unwrap_err();
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn non_json_output_is_permanent() {
        let err = run(&["/bin/echo"], json!(["/bin/echo", "hello"]), json!({}))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message()
                .starts_with("program \"/bin/echo\" printed output that is not JSON ("),
            "{err:?}"
        );
        assert!(err.message().ends_with("): hello"), "{err:?}");
    }

    #[tokio::test]
    async fn missing_program_is_permanent() {
        let missing = "/nonexistent/synapse-test-program";
        let err = run(&[missing], json!([missing]), json!({}))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.message().contains("cannot be started"), "{err:?}");
    }

    #[tokio::test]
    async fn credentials_are_not_passed_on() {
        // Only the child's environment is inspected; the test sets nothing globally.
        let result = run(
            &["/bin/sh"],
            json!([
                "/bin/sh",
                "-c",
                "printf '\"%s\"' \"${SYNAPSE_DATABASE_URL-unset}\""
            ]),
            json!({}),
        )
        .await;
        assert_eq!(result, Ok(json!("unset")));
    }

    #[tokio::test]
    async fn the_environment_is_clean() {
        // `cargo test` gives this process CARGO_* variables; the program gets none.
        assert!(std::env::vars().any(|(name, _)| name.starts_with("CARGO")));
        let names = run(
            &["/bin/sh"],
            json!([
                "/bin/sh",
                "-c",
                "printf '\"%s\"' \"$(env | cut -d= -f1 | sort | tr '\\n' ' ')\""
            ]),
            json!({}),
        )
        .await
        .unwrap();
        let names: Vec<&str> = names.as_str().unwrap().split_whitespace().collect();
        assert!(names.contains(&"SYNAPSE_STEP"), "{names:?}");
        for name in names {
            // A shell adds a few of its own.
            let expected = PASSED_ENV.contains(&name)
                || name.starts_with("SYNAPSE_")
                || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&name);
            assert!(expected, "{name} reached the program");
            assert!(!matches!(
                name,
                "SYNAPSE_DATABASE_URL" | "SYNAPSE_REDIS_URL"
            ));
        }
    }

    #[tokio::test]
    async fn bad_argv_is_permanent() {
        for (argv, message) in [
            (json!([]), "params.argv: argv must not be empty"),
            (
                json!("ls -l"),
                "params.argv: expected an array of strings, got a string",
            ),
            (
                json!(["ls", 1]),
                "params.argv[1]: expected a string, got a number",
            ),
            (
                json!([""]),
                "params.argv[0]: the program name must not be empty",
            ),
        ] {
            assert_eq!(
                run(&["ls"], argv, json!({})).await,
                Err(ActionError::Permanent(message.to_owned()))
            );
        }
        let err = exec(&["ls"])
            .run(&context(json!({}), json!({})))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent("params.argv: \"argv\" is required".to_owned())
        );
    }

    #[tokio::test]
    async fn dropping_the_attempt_kills_the_program() {
        let pid_file =
            std::env::temp_dir().join(format!("synapse-exec-test-{}.pid", std::process::id()));
        let _ = std::fs::remove_file(&pid_file);
        let action = exec(&["/bin/sh"]);
        let script = "echo $$ > \"$0\"; exec /bin/sleep 30";
        let ctx = context(
            json!({"argv": ["/bin/sh", "-c", script, pid_file.to_str().unwrap()]}),
            json!({}),
        );
        let outcome = tokio::time::timeout(Duration::from_millis(500), action.run(&ctx)).await;
        assert!(outcome.is_err(), "the sleep should have been cut short");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        let stat = format!("/proc/{}/stat", pid.trim());
        // Killed processes linger as zombies until reaped; either way they are gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::read_to_string(&stat) {
                Err(_) => break,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
                {
                    break
                }
                Ok(s) => assert!(std::time::Instant::now() < deadline, "still running: {s}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
