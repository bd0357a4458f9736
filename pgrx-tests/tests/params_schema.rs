//! A registered action's `params_schema` is enforced: `validate_blueprint`
//! lists each violation with its path, `submit_plan` refuses the blueprint
//! (22023, nothing written), and the CLI's `validate` checks the same, from a
//! catalogue file or from the database.
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use synapse_e2e::{worker_binary, Stack};

const SCHEMA: &str = r#"{"type": "object", "required": ["url"],
    "properties": {"url": {"type": "string", "format": "uri"}, "tries": {"type": "integer"}}}"#;

fn blueprint(params: Value) -> String {
    json!({"steps": [
        {"id": "first", "action": "noop"},
        {"id": "fetch", "action": "acme.fetch", "params": params}
    ]})
    .to_string()
}

fn problems(client: &mut postgres::Client, blueprint: &str) -> Value {
    let problems: postgres::types::Json<Value> = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)",
            &[&blueprint],
        )
        .expect("validate_blueprint")
        .get(0);
    problems.0
}

fn goals(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM synapse.goals", &[])
        .expect("counting goals")
        .get(0)
}

fn cli(dir: &PathBuf, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(worker_binary());
    command
        .args(args)
        .current_dir(dir)
        .env_remove("SYNAPSE_DATABASE_URL")
        .env_remove("SYNAPSE_REDIS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running synapse-worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn params_are_checked_against_the_registered_schema() {
    let stack = Stack::start("params_schema", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "INSERT INTO synapse.actions (name, description, params_schema, builtin, registered_by)
             VALUES ('acme.fetch', 'Fetches params.url.', $1::text::jsonb, false, 'acme-worker'),
                    ('acme.broken', 'Has a bad schema.', '{\"type\": \"strnig\"}', false, 'acme-worker')",
            &[&SCHEMA],
        )
        .expect("registering actions");

    // Each violation, with its path.
    let bad = blueprint(json!({"url": "x", "tries": "three"}));
    let mut found = problems(&mut client, &bad)
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            format!(
                "{}: {}",
                p["path"].as_str().unwrap(),
                p["message"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>();
    found.sort();
    assert_eq!(
        found,
        [
            r#"$.steps[1].params.tries: "three" is not of type "integer""#,
            r#"$.steps[1].params.url: "x" is not a "uri""#,
        ]
    );
    let missing = blueprint(json!({}));
    assert_eq!(
        problems(&mut client, &missing),
        json!([{"path": "$.steps[1].params", "message": "\"url\" is a required property"}])
    );

    // submit_plan refuses it, and nothing is written.
    let before = goals(&mut client);
    let error = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&bad])
        .expect_err("an invalid plan is refused");
    let db_error = error.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "22023");
    assert!(
        db_error
            .message()
            .starts_with("invalid blueprint: $.steps[1].params."),
        "{}",
        db_error.message()
    );
    assert_eq!(goals(&mut client), before);

    // A blueprint that fits the schema is accepted.
    let good = blueprint(json!({"url": "https://example.com/a", "tries": 2}));
    assert_eq!(problems(&mut client, &good), json!([]));
    let id: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&good])
        .expect("a valid plan is accepted")
        .get(0);
    assert!(id > 0);
    assert_eq!(goals(&mut client), before + 1);

    // A schema that is not valid JSON Schema is a problem, not a crash.
    let uses_broken = json!({"steps": [{"id": "a", "action": "acme.broken"}]}).to_string();
    let found = problems(&mut client, &uses_broken);
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found[0]["path"], "$.steps[0].params");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("the params_schema of action \"acme.broken\" is not a valid JSON Schema"),
        "{found}"
    );

    // The CLI: from a catalogue file, offline...
    let dir = std::env::temp_dir().join(format!("synapse-params-schema-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.json"), &bad).unwrap();
    std::fs::write(dir.join("good.json"), &good).unwrap();
    std::fs::write(
        dir.join("catalogue.json"),
        format!(r#"[{{"name": "acme.fetch", "params_schema": {SCHEMA}}}]"#),
    )
    .unwrap();
    std::fs::write(
        dir.join("broken.json"),
        r#"[{"name": "acme.fetch", "params_schema": {"type": 7}}]"#,
    )
    .unwrap();
    let offline = cli(
        &dir,
        &[],
        &["validate", "bad.json", "--actions", "catalogue.json"],
    );
    assert_eq!(offline.status.code(), Some(1), "{}", text(&offline.stderr));
    let out = text(&offline.stdout);
    assert!(
        out.contains(r#"$.steps[1].params.url: "x" is not a "uri""#),
        "{out}"
    );
    assert!(
        out.contains(r#"$.steps[1].params.tries: "three" is not of type "integer""#),
        "{out}"
    );
    let fine = cli(
        &dir,
        &[],
        &["validate", "good.json", "--actions", "catalogue.json"],
    );
    assert_eq!(fine.status.code(), Some(0), "{}", text(&fine.stdout));
    // ...a catalogue whose schema is not JSON Schema is refused as configuration...
    let refused = cli(
        &dir,
        &[],
        &["validate", "good.json", "--actions", "broken.json"],
    );
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stdout));
    assert!(
        text(&refused.stderr)
            .contains("params_schema of \"acme.fetch\" is not a valid JSON Schema"),
        "{}",
        text(&refused.stderr)
    );
    // ...and from the database.
    let url = stack.database_url();
    let registered = cli(
        &dir,
        &[("SYNAPSE_DATABASE_URL", &url)],
        &["validate", "bad.json"],
    );
    assert_eq!(
        registered.status.code(),
        Some(1),
        "{}",
        text(&registered.stderr)
    );
    assert!(
        text(&registered.stdout).contains(r#"$.steps[1].params.url: "x" is not a "uri""#),
        "{}",
        text(&registered.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
