//! Templates that cannot surprise: a pattern matches the whole goal text,
//! `plan_preview` shows the plan without writing anything, and a goal no
//! template matches names the closest ones.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{task, wait_for_goal, Stack};

const WAIT: Duration = Duration::from_secs(60);

const REFUND_PATTERN: &str = r"refund order (?P<id>\d+) because (?P<reason>.+)";

/// The refund template of the newcomer's review: a `sql` step that writes a refund.
fn add_refund_template(client: &mut postgres::Client) {
    client
        .batch_execute(
            "CREATE TABLE public.refunds (order_id bigint NOT NULL, reason text NOT NULL)",
        )
        .unwrap();
    let blueprint = json!({
        "steps": [
            {"id": "refund", "action": "sql", "input": "goal.params",
             "params": {"query": "insert into refunds values ($1::text::bigint, $2) returning order_id",
                        "args": "[input.id, input.reason]"}}
        ],
        "output": "{'order': steps.refund.result.rows[0].order_id}"
    });
    client
        .execute(
            "SELECT synapse.add_template('refund', $1, $2::text::jsonb)",
            &[&REFUND_PATTERN, &blueprint.to_string()],
        )
        .unwrap();
    client
        .execute(
            r#"SELECT synapse.add_template('greet', '^greet (?P<name>\w+)$', '{"steps":[{"id":"a","action":"noop"}]}')"#,
            &[],
        )
        .unwrap();
}

fn submit(client: &mut postgres::Client, goal: &str) -> i64 {
    client
        .query_one("SELECT synapse.submit_goal($1)", &[&goal])
        .unwrap()
        .get(0)
}

fn json_of(client: &mut postgres::Client, sql: &str, goal: &str) -> Value {
    let text: String = client.query_one(sql, &[&goal]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

fn refunds(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM public.refunds", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_goal_that_only_contains_a_pattern_is_not_planned_from_it() {
    let stack = Stack::start("templates-anchored", &[]);
    let mut client = stack.pg();
    add_refund_template(&mut client);
    let _worker = stack.start_worker("w", &[]);

    let refused = submit(&mut client, "do NOT refund order 1001 because it is fraud");
    let status = wait_for_goal(&stack, refused, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            r#"no template matches goal "do NOT refund order 1001 because it is fraud"; closest: "refund" ({REFUND_PATTERN})"#
        )),
        "{error}"
    );
    assert!(!error.contains("greet"), "{error}");
    assert_eq!(status["tasks"], json!([]), "no step ran: {status}");
    assert_eq!(refunds(&mut client), 0);

    let planned = submit(&mut client, "Refund order 1001 because damaged");
    let status = wait_for_goal(&stack, planned, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["template"], "refund");
    assert_eq!(status["params"], json!({"id": "1001", "reason": "damaged"}));
    assert_eq!(task(&status, "refund")["status"], "succeeded");
    assert_eq!(status["result"], json!({"order": 1001}));
    assert_eq!(refunds(&mut client), 1);
}

fn rows(client: &mut postgres::Client) -> Vec<i64> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM synapse.goals), (SELECT count(*) FROM synapse.tasks),
                    (SELECT count(*) FROM synapse.edges), (SELECT count(*) FROM synapse.outbox)",
            &[],
        )
        .unwrap();
    (0..4).map(|i| row.get(i)).collect()
}

#[test]
fn plan_preview_shows_the_plan_and_its_problems_writing_nothing() {
    let stack = Stack::start("templates-preview", &[]);
    let mut client = stack.pg();
    add_refund_template(&mut client);
    // Written around add_template (which would refuse it), as a superuser can.
    client
        .batch_execute(
            r#"INSERT INTO synapse.templates (name, pattern, blueprint)
               VALUES ('broken', 'broken plan', '{"steps":[{"id":"a","action":"nope"},{"id":"a","action":"noop"}]}')"#,
        )
        .unwrap();
    let before = rows(&mut client);
    let preview = "SELECT synapse.plan_preview($1)::text";

    let matched = json_of(&mut client, preview, "Refund order 1001 because damaged");
    assert_eq!(matched["template"], "refund");
    assert_eq!(
        matched["params"],
        json!({"id": "1001", "reason": "damaged"})
    );
    assert_eq!(matched["blueprint"]["steps"][0]["id"], "refund");
    assert_eq!(matched["problems"], json!([]));
    let keys: Vec<&str> = matched
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["blueprint", "params", "problems", "template"]);

    let broken = json_of(&mut client, preview, "broken plan");
    assert_eq!(broken["template"], "broken");
    let listed = json_of(
        &mut client,
        "SELECT synapse.validate_blueprint(blueprint)::text FROM synapse.templates WHERE name = $1",
        "broken",
    );
    assert_eq!(broken["problems"], listed);
    assert_eq!(broken["problems"].as_array().unwrap().len(), 2, "{broken}");

    let unmatched = json_of(
        &mut client,
        preview,
        "do NOT refund order 1001 because it is fraud",
    );
    assert_eq!(unmatched["template"], Value::Null);
    assert_eq!(unmatched["blueprint"], Value::Null);
    let message = unmatched["problems"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            r#"no template matches goal "do NOT refund order 1001 because it is fraud"; closest: "refund""#
        ),
        "{message}"
    );
    let typo = json_of(&mut client, preview, "refund ordr 1003 because typo");
    let message = typo["problems"][0]["message"].as_str().unwrap();
    assert!(message.contains(r#"closest: "refund""#), "{message}");

    let other = json_of(
        &mut client,
        "SELECT synapse.plan_preview($1, '{}', 'oracle')::text",
        "anything",
    );
    assert!(
        other["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("runs only in workers"),
        "{other}"
    );

    let error = client
        .query_one("SELECT synapse.plan_preview('')", &[])
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22023");
    assert_eq!(rows(&mut client), before, "plan_preview wrote nothing");
}

#[test]
fn add_template_warns_about_a_pattern_that_only_matches_thanks_to_dot_star() {
    let stack = Stack::start("templates-notice", &[]);
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&notices);
    let mut client = stack
        .database_url()
        .parse::<postgres::Config>()
        .unwrap()
        .notice_callback(move |notice| {
            seen.lock()
                .unwrap()
                .push(format!("{}: {}", notice.code().code(), notice.message()))
        })
        .connect(postgres::NoTls)
        .unwrap();
    let blueprint = r#"{"steps":[{"id":"a","action":"noop"}]}"#;
    let add = "SELECT synapse.add_template($1, $2, $3::text::jsonb)";

    client
        .execute(add, &[&"loose", &".*refund.*", &blueprint])
        .unwrap();
    let warned = notices.lock().unwrap().clone();
    assert_eq!(warned.len(), 1, "{warned:?}");
    let notice = &warned[0];
    assert!(
        notice.starts_with(
            r#"01000: template "loose": pattern ".*refund.*" only matches because of its leading and trailing ".*""#
        ),
        "{notice}"
    );
    assert!(
        notice.contains("patterns match the whole goal text"),
        "{notice}"
    );
    assert!(notice.contains(r#"rather than ".*refund.*""#), "{notice}");

    notices.lock().unwrap().clear();
    client
        .execute(add, &[&"strict", &REFUND_PATTERN, &blueprint])
        .unwrap();
    client
        .execute(add, &[&"rest", &r"refund (?P<rest>.*)", &blueprint])
        .unwrap();
    assert_eq!(*notices.lock().unwrap(), Vec::<String>::new());
}
