//! Test stacks run side by side: one never adopts, nor stops, a server another
//! started, even when both were handed the same port.
use std::path::Path;
use std::process::{Command, Output};

use synapse_e2e::{free_port, redis, workspace_root, Stack};

/// `scripts/stack.sh` for a stack in `dir` on the given ports.
fn stack_script(dir: &Path, pg_port: u16, redis_port: u16, action: &str) -> Output {
    Command::new(workspace_root().join("scripts/stack.sh"))
        .arg(action)
        .env("SYNAPSE_STACK_DIR", dir)
        .env("SYNAPSE_PGPORT", pg_port.to_string())
        .env("SYNAPSE_REDIS_PORT", redis_port.to_string())
        .output()
        .expect("running scripts/stack.sh")
}

#[test]
fn a_stack_given_a_taken_redis_port_fails_to_start_and_stops_nothing_of_the_owner() {
    let owner = Stack::start("stacks-owner", &[]);
    let dir = workspace_root().join(format!("target/e2e/stacks-intruder-{}", std::process::id()));
    let pg_port = free_port();

    let up = stack_script(&dir, pg_port, owner.redis_port, "up");
    let down = stack_script(&dir, pg_port, owner.redis_port, "down");
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        !up.status.success(),
        "a stack started on a port another stack's Redis holds: {}",
        String::from_utf8_lossy(&up.stdout)
    );
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        stderr.contains(&format!("redis did not start on port {}", owner.redis_port)),
        "the failure names the port: {stderr}"
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let pong: String = redis::cmd("PING")
        .query(&mut owner.redis())
        .expect("the owner's Redis still answers after the other stack's down");
    assert_eq!(pong, "PONG");
}
