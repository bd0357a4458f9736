//! `#[pg_test]`s: the SQL API, triggers and timers inside a real Postgres.
//! Each test runs in a transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::spi::quote_literal;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    const EXAMPLE: &str = r#"{
      "name": "triage",
      "steps": [
        {"id": "fetch", "action": "sql", "params": {"query": "select 5 as priority"}, "retries": 2},
        {"id": "classify", "action": "transform",
         "params": {"expr": "{'severity': input.rows[0].priority > 3 ? 'high' : 'low'}"},
         "input": "steps.fetch.result"},
        {"id": "page", "action": "http", "params": {"method": "POST", "url": "http://127.0.0.1:9/page"}},
        {"id": "backlog", "action": "noop"},
        {"id": "close", "action": "noop", "join": "any"}
      ],
      "edges": [
        {"from": "fetch", "to": "classify"},
        {"from": "classify", "to": "page", "when": "result.severity == 'high'"},
        {"from": "classify", "to": "backlog", "when": "result.severity != 'high'"},
        {"from": "page", "to": "close"}, {"from": "backlog", "to": "close"}
      ],
      "output": "{'closed': steps.close.status == 'succeeded'}"
    }"#;

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or_else(|| panic!("{sql}: NULL"))
    }

    fn json_of(sql: &str) -> Value {
        one::<JsonB>(sql).0
    }

    fn count(sql_from: &str) -> i64 {
        one::<i64>(&format!("SELECT count(*) FROM {sql_from}"))
    }

    /// Runs `sql` in a subtransaction and checks it fails with `sqlstate` and a
    /// message containing `fragment`.
    fn expect_error(sql: &str, sqlstate: &str, fragment: &str) {
        Spi::run(&format!(
            "DO $do$
             DECLARE state text; message text;
             BEGIN
                 BEGIN
                     EXECUTE {sql};
                 EXCEPTION WHEN OTHERS THEN
                     GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
                 END;
                 IF state IS DISTINCT FROM {state} OR position({fragment} in coalesce(message, '')) = 0 THEN
                     RAISE EXCEPTION 'expected SQLSTATE % containing %, got % %', {state}, {fragment}, state, message;
                 END IF;
             END $do$",
            sql = quote_literal(sql),
            state = quote_literal(sqlstate),
            fragment = quote_literal(fragment),
        ))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn submit_example() -> i64 {
        one::<i64>(&format!(
            "SELECT synapse.submit_plan({}::jsonb, '{{\"x\": 1}}')",
            quote_literal(EXAMPLE)
        ))
    }

    /// Every event in the outbox, in order: a row may carry several.
    fn payloads() -> Vec<String> {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT p FROM synapse.outbox,
                            unnest(string_to_array(payload, E'\\n')) WITH ORDINALITY AS e(p, n)
                      ORDER BY id, n",
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    #[pg_test]
    fn submit_goal_records_the_goal_and_one_event_for_the_planner() {
        let id =
            one::<i64>("SELECT synapse.submit_goal('triage incident 42', '{\"urgent\": true}')");
        assert_eq!(
            one::<String>(&format!("SELECT status FROM synapse.goals WHERE id = {id}")),
            "submitted"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT planner FROM synapse.goals WHERE id = {id}"
            )),
            "template"
        );
        assert_eq!(
            payloads(),
            [format!(
                r#"{{"v":1,"event":"goal.submitted","goal_id":{id}}}"#
            )]
        );
        assert_eq!(
            one::<String>("SELECT dispatch FROM synapse.outbox"),
            "planner"
        );
    }

    #[pg_test]
    fn submit_goal_with_the_same_idempotency_key_returns_the_same_goal() {
        let first = one::<i64>("SELECT synapse.submit_goal('a', '{}', 'template', 'key-1')");
        let second = one::<i64>("SELECT synapse.submit_goal('a', '{}', 'template', 'key-1')");
        let other = one::<i64>("SELECT synapse.submit_goal('a', '{}', 'template', 'key-2')");
        assert_eq!(first, second);
        assert_ne!(first, other);
        assert_eq!(count("synapse.goals"), 2);
        assert_eq!(count("synapse.outbox"), 2);
    }

    #[pg_test]
    fn submit_goal_rejects_bad_input_and_writes_nothing() {
        expect_error(
            "SELECT synapse.submit_goal('  ')",
            "22023",
            "goal must be a non-empty text",
        );
        expect_error(
            "SELECT synapse.submit_goal(NULL)",
            "22023",
            "goal must be a non-empty text",
        );
        expect_error(
            "SELECT synapse.submit_goal('g', NULL)",
            "22023",
            "input must be JSON",
        );
        expect_error(
            "SELECT synapse.submit_goal('g', '{}', 'No Such')",
            "22023",
            "planner must be",
        );
        expect_error(
            "SELECT synapse.submit_goal('g', '{bad')",
            "22P02",
            "invalid input syntax for type json",
        );
        expect_error(
            "SELECT synapse.submit_goal('g', (repeat('[', 200) || repeat(']', 200))::jsonb)",
            "54000",
            "input is nested 200 levels deep; the limit is 64",
        );
        expect_error(
            "SELECT synapse.submit_goal('g', jsonb_build_object('pad', repeat('x', 1048576)))",
            "54000",
            "input is more than 1 MiB of JSON text",
        );
        assert_eq!(count("synapse.goals"), 0);
        assert_eq!(count("synapse.outbox"), 0);
    }

    #[pg_test]
    fn check_json_measures_the_jsonb_value_without_parsing_it() {
        // Exactly at the limits: 64 levels, and 1 MiB of compact text, escapes,
        // separators and numbers counted as JSON writes them.
        Spi::run("SELECT synapse._check_json((repeat('[', 64) || repeat(']', 64))::jsonb, 'v')")
            .unwrap();
        let fill = 1_048_576 - r#"{"a":[1.50,true,null,"\n"],"b":""}"#.len();
        Spi::run(&format!(
            r#"SELECT synapse._check_json(jsonb_build_object('a', '[1.50, true, null, "\n"]'::jsonb, 'b', repeat('x', {fill})), 'v')"#
        ))
        .unwrap();
        expect_error(
            &format!(
                r#"SELECT synapse._check_json(jsonb_build_object('a', '[1.50, true, null, "\n"]'::jsonb, 'b', repeat('x', {})), 'v')"#,
                fill + 1
            ),
            "54000",
            "v is more than 1 MiB",
        );
        expect_error(
            r#"SELECT synapse._check_json(('{"k": ' || repeat('[', 64) || repeat(']', 64) || '}')::jsonb, 'the field')"#,
            "54000",
            "the field is nested 65 levels deep; the limit is 64",
        );
        for scalar in ["'5'", "'\"s\"'", "'null'", "NULL"] {
            Spi::run(&format!("SELECT synapse._check_json({scalar}::jsonb, 'v')")).unwrap();
        }
    }

    #[pg_test]
    fn submit_plan_installs_tasks_and_edges_and_queues_the_roots() {
        let id = submit_example();
        assert_eq!(
            one::<String>(&format!("SELECT status FROM synapse.goals WHERE id = {id}")),
            "running"
        );
        let tasks = json_of(&format!(
            "SELECT jsonb_agg(jsonb_build_object('step', step, 'status', status, 'input', input,
                    'max_attempts', max_attempts, 'join', join_mode, 'timeout_ms', timeout_ms) ORDER BY id)
               FROM synapse.tasks WHERE goal_id = {id}"
        ));
        assert_eq!(
            tasks,
            json!([
                {"step": "fetch", "status": "queued", "input": {"x": 1}, "max_attempts": 3, "join": "any", "timeout_ms": 300000},
                {"step": "classify", "status": "pending", "input": null, "max_attempts": 1, "join": "any", "timeout_ms": 300000},
                {"step": "page", "status": "pending", "input": null, "max_attempts": 1, "join": "any", "timeout_ms": 300000},
                {"step": "backlog", "status": "pending", "input": null, "max_attempts": 1, "join": "any", "timeout_ms": 300000},
                {"step": "close", "status": "pending", "input": null, "max_attempts": 1, "join": "any", "timeout_ms": 300000},
            ])
        );
        assert_eq!(
            count(&format!(
                "synapse.edges WHERE goal_id = {id} AND state = 'pending'"
            )),
            5
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT when_expr FROM synapse.edges WHERE goal_id = {id} AND to_step = 'page'"
            )),
            "result.severity == 'high'"
        );
        let fetch = one::<i64>(&format!(
            "SELECT id FROM synapse.tasks WHERE goal_id = {id} AND step = 'fetch'"
        ));
        assert_eq!(
            payloads(),
            [
                format!(r#"{{"v":1,"event":"goal.running","goal_id":{id}}}"#),
                format!(
                    r#"{{"v":1,"event":"task.queued","goal_id":{id},"task_id":{fetch},"step":"fetch","queue":"default","attempt":1}}"#
                ),
            ]
        );
        assert_eq!(
            one::<String>("SELECT dispatch FROM synapse.outbox WHERE task_id IS NOT NULL"),
            "queue:default"
        );
    }

    #[pg_test]
    fn a_root_input_expression_is_evaluated_at_submit() {
        let id = one::<i64>(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop","input":"{''n'': goal.input.x + 1, ''id'': goal.id}"}]}', '{"x": 41}')"#,
        );
        assert_eq!(
            json_of("SELECT input FROM synapse.tasks"),
            json!({"n": 42, "id": id})
        );
    }

    #[pg_test]
    fn a_blueprint_submitted_again_is_checked_against_the_actions_as_they_are_now() {
        Spi::run(
            r#"INSERT INTO synapse.actions (name, params_schema)
               VALUES ('acme.resize', '{"properties": {"width": {"type": "integer"}}}')"#,
        )
        .expect("registering an action");
        let blueprint = r#"'{"steps":[{"id":"r","action":"acme.resize","params":{"width":3}}]}'"#;
        let submit = format!("SELECT synapse.submit_plan({blueprint})");
        let first = one::<i64>(&submit);
        // The same blueprint in one statement: a goal and a task each.
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(DISTINCT synapse.submit_plan({blueprint})) FROM generate_series(1, 3)"
            )),
            3
        );
        assert_eq!(count(&format!("synapse.tasks WHERE goal_id >= {first}")), 4);

        Spi::run(
            r#"UPDATE synapse.actions SET params_schema = '{"properties": {"width": {"type": "string"}}}'
                WHERE name = 'acme.resize'"#,
        )
        .expect("changing its schema");
        expect_error(&submit, "22023", "3 is not of type \"string\"");
        Spi::run("DELETE FROM synapse.actions WHERE name = 'acme.resize'").expect("removing it");
        expect_error(&submit, "22023", "acme.resize");
        assert_eq!(count("synapse.goals"), 4);
    }

    #[pg_test]
    fn submit_plan_rejects_an_invalid_blueprint_naming_every_problem_and_writes_nothing() {
        expect_error(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"nope"},{"id":"a","action":"noop"}]}')"#,
            "22023",
            r#"invalid blueprint: $.steps[0].action: unknown action "nope""#,
        );
        expect_error(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"}],
                 "edges":[{"from":"a","to":"b"},{"from":"b","to":"a"}]}')"#,
            "22023",
            "cycle",
        );
        expect_error(
            r#"SELECT synapse.submit_plan('{"steps":[]}')"#,
            "22023",
            "$.steps",
        );
        expect_error(
            "SELECT synapse.submit_plan(NULL)",
            "22023",
            "blueprint must not be NULL",
        );
        expect_error(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop","input":"goal.input.missing"}]}')"#,
            "22023",
            "$.steps[0].input: cannot evaluate the input of root step \"a\"",
        );
        expect_error(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop"}]}', NULL)"#,
            "22023",
            "input",
        );
        assert_eq!(count("synapse.goals"), 0);
        assert_eq!(count("synapse.tasks"), 0);
        assert_eq!(count("synapse.edges"), 0);
        assert_eq!(count("synapse.outbox"), 0);
    }

    #[pg_test]
    fn submit_plans_records_one_goal_per_input_in_order_each_with_its_own_input() {
        let ids = one::<Vec<i64>>(
            r#"SELECT synapse.submit_plans(
                 '{"steps":[{"id":"a","action":"noop","input":"{''n'': goal.input.n, ''id'': goal.id}"},
                            {"id":"b","action":"noop"},
                            {"id":"c","action":"noop"}],
                   "edges":[{"from":"a","to":"c"},{"from":"b","to":"c"}]}',
                 ARRAY['{"n": 1}', '{"n": 2}', '{"n": 3}']::jsonb[])"#,
        );
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        for (place, id) in ids.iter().enumerate() {
            let n = place + 1;
            assert_eq!(
                json_of(&format!("SELECT input FROM synapse.goals WHERE id = {id}")),
                json!({"n": n})
            );
            assert_eq!(
                json_of(&format!(
                    "SELECT jsonb_agg(jsonb_build_array(step, status, input, pending_inbound) ORDER BY step)
                       FROM synapse.tasks WHERE goal_id = {id}"
                )),
                json!([
                    ["a", "queued", {"n": n, "id": id}, 0],
                    // A root with no input expression starts with its goal's input.
                    ["b", "queued", {"n": n}, 0],
                    ["c", "pending", null, 2]
                ])
            );
            assert_eq!(
                count(&format!(
                    "synapse.edges WHERE goal_id = {id} AND state = 'pending'"
                )),
                2
            );
        }
        // Every goal's events, as submit_plan writes them one by one.
        let events = |name: &str| {
            payloads()
                .iter()
                .filter(|payload| payload.contains(&format!(r#""event":"{name}""#)))
                .count()
        };
        assert_eq!(events("goal.running"), 3);
        assert_eq!(events("task.queued"), 6);
        assert_eq!(
            one::<Vec<i64>>(
                r#"SELECT synapse.submit_plans('{"steps":[{"id":"a","action":"noop"}]}', '{}'::jsonb[])"#
            ),
            Vec::<i64>::new()
        );
        assert_eq!(count("synapse.goals"), 3);
    }

    #[pg_test]
    fn submit_plans_submits_a_key_once_and_answers_a_known_key_with_its_goal() {
        let noop = r#"'{"steps":[{"id":"a","action":"noop"}]}'"#;
        let known = one::<i64>(&format!("SELECT synapse.submit_plan({noop}, '{{}}', 'k1')"));
        let ids = one::<Vec<i64>>(&format!(
            "SELECT synapse.submit_plans({noop}, ARRAY['{{}}', '{{\"first\": true}}', '{{}}', '{{}}']::jsonb[],
                                         ARRAY['k1', 'k2', NULL, 'k2'])"
        ));
        assert_eq!(ids[0], known);
        assert_eq!(ids[1], ids[3]);
        assert!(ids[2] != ids[1] && ids[2] != known);
        assert_eq!(count("synapse.goals"), 3);
        assert_eq!(count("synapse.tasks"), 3);
        // A key given twice is the goal of its first place.
        assert_eq!(
            json_of(&format!(
                "SELECT input FROM synapse.goals WHERE id = {}",
                ids[1]
            )),
            json!({"first": true})
        );
        // Again: nothing new, the same ids.
        assert_eq!(
            one::<Vec<i64>>(&format!(
                "SELECT synapse.submit_plans({noop}, ARRAY['{{}}', '{{}}']::jsonb[], ARRAY['k2', 'k1'])"
            )),
            vec![ids[1], known]
        );
        assert_eq!(count("synapse.goals"), 3);
    }

    #[pg_test]
    fn submit_plans_refuses_bad_input_naming_it_and_writes_nothing() {
        let noop = r#"'{"steps":[{"id":"a","action":"noop"}]}'"#;
        expect_error(
            &format!("SELECT synapse.submit_plans({noop}, NULL)"),
            "22023",
            "inputs must be an array of JSON values, not NULL",
        );
        expect_error(
            &format!("SELECT synapse.submit_plans({noop}, ARRAY['{{}}', NULL]::jsonb[])"),
            "22023",
            "inputs[2] must be JSON, not NULL",
        );
        expect_error(
            &format!(
                "SELECT synapse.submit_plans({noop}, ARRAY['{{}}', '{{}}']::jsonb[], ARRAY['k'])"
            ),
            "22023",
            "idempotency_keys has 1 elements and inputs 2",
        );
        expect_error(
            r#"SELECT synapse.submit_plans('{"steps":[{"id":"a","action":"nope"}]}', ARRAY['{}']::jsonb[])"#,
            "22023",
            r#"$.steps[0].action: unknown action "nope""#,
        );
        // The second goal's root input cannot be evaluated: the first goal,
        // written already, goes too.
        expect_error(
            r#"SELECT synapse.submit_plans('{"steps":[{"id":"a","action":"noop","input":"goal.input.x"}]}',
                                           ARRAY['{"x": 1}', '{}']::jsonb[])"#,
            "22023",
            "$.steps[0].input: cannot evaluate the input of root step \"a\"",
        );
        expect_error(
            r#"SELECT synapse.submit_plans('{"steps":[{"id":"a","action":"noop","input":"goal.input.x"}]}',
                                           ARRAY['{"x": 1}', '{}']::jsonb[])"#,
            "22023",
            "(for inputs[2])",
        );
        expect_error(
            &format!(
                "SELECT synapse.submit_plans({noop}, ARRAY['{{}}', ('{{\"k\": ' || repeat('[', 70) || repeat(']', 70) || '}}')::jsonb])"
            ),
            "54000",
            "inputs[2] is nested",
        );
        assert_eq!(count("synapse.goals"), 0);
        assert_eq!(count("synapse.tasks"), 0);
        assert_eq!(count("synapse.outbox"), 0);
    }

    #[pg_test]
    fn submit_plan_is_idempotent_by_key() {
        let sql =
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop"}]}', '{}', 'k')"#;
        assert_eq!(one::<i64>(sql), one::<i64>(sql));
        assert_eq!(count("synapse.goals"), 1);
        assert_eq!(count("synapse.tasks"), 1);
    }

    #[pg_test]
    fn actions_registered_in_the_catalogue_become_valid() {
        let plan = r#"'{"steps":[{"id":"a","action":"resize_image"}]}'"#;
        assert_eq!(
            json_of(&format!("SELECT synapse.validate_blueprint({plan})"))[0]["path"],
            "$.steps[0].action"
        );
        Spi::run("INSERT INTO synapse.actions (name, description) VALUES ('resize_image', 'test')")
            .unwrap();
        assert_eq!(
            json_of(&format!("SELECT synapse.validate_blueprint({plan})")),
            json!([])
        );
    }

    /// The step id domain, the last word on every task row, and the
    /// blueprint's check accept exactly the same ids.
    #[pg_test]
    fn the_step_id_domain_accepts_exactly_the_ids_a_blueprint_may_use() {
        Spi::run(
            "CREATE FUNCTION pg_temp.a_step_id(id text) RETURNS bool LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM id::synapse.step_id;
                 RETURN true;
             EXCEPTION WHEN check_violation THEN
                 RETURN false;
             END $$",
        )
        .unwrap();
        let longest = "a".repeat(63);
        let too_long = "a".repeat(64);
        for id in [
            "a", "a_1", "fetch", &longest, &too_long, "", "A", "aB", "1a", "_a", "a-b", "a.b",
            "a b", "é", "aé", "a\n", "\na",
        ] {
            let blueprint = json!({"steps": [{"id": id, "action": "noop"}]}).to_string();
            let plan_accepts = json_of(&format!(
                "SELECT synapse.validate_blueprint({})",
                quote_literal(&blueprint)
            )) == json!([]);
            let domain_accepts =
                one::<bool>(&format!("SELECT pg_temp.a_step_id({})", quote_literal(id)));
            assert_eq!(domain_accepts, plan_accepts, "step id {id:?}");
            assert_eq!(
                domain_accepts,
                id == "a" || id == "a_1" || id == "fetch" || id == longest,
                "step id {id:?}"
            );
        }
    }

    #[pg_test]
    fn validate_blueprint_lists_problems_as_json() {
        assert_eq!(
            json_of(&format!(
                "SELECT synapse.validate_blueprint({})",
                quote_literal(EXAMPLE)
            )),
            json!([])
        );
        let problems = json_of(
            r#"SELECT synapse.validate_blueprint('{"steps":[{"id":"Bad","action":"noop","retires":1}],"edges":[{"from":"x","to":"Bad","when":"result >"}]}')"#,
        );
        let paths: Vec<&str> = problems
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"$.steps[0].id"), "{problems}");
        assert!(paths.contains(&"$.steps[0].retires"), "{problems}");
        assert!(paths.contains(&"$.edges[0].from"), "{problems}");
        assert!(paths.contains(&"$.edges[0].when"), "{problems}");
        assert_eq!(
            json_of("SELECT synapse.validate_blueprint(NULL)")[0]["message"],
            "blueprint must not be NULL"
        );
    }

    #[pg_test]
    fn add_template_upserts_and_rejects_bad_patterns_and_blueprints() {
        let blueprint = r#"'{"steps":[{"id":"a","action":"noop"}]}'"#;
        Spi::run(&format!(
            "SELECT synapse.add_template('triage', 'triage (?P<id>\\d+)', {blueprint}, 'first')"
        ))
        .unwrap();
        Spi::run(&format!("SELECT synapse.add_template('triage', 'incident (?P<id>\\d+)', {blueprint}, 'second', 5)"))
            .unwrap();
        assert_eq!(count("synapse.templates"), 1);
        assert_eq!(
            one::<String>("SELECT pattern FROM synapse.templates"),
            "incident (?P<id>\\d+)"
        );
        assert_eq!(one::<i32>("SELECT priority FROM synapse.templates"), 5);
        expect_error(
            &format!("SELECT synapse.add_template('bad', 'triage (', {blueprint})"),
            "2201B",
            "invalid pattern for template \"bad\"",
        );
        expect_error(
            r#"SELECT synapse.add_template('bad', 'x', '{"steps":[{"id":"a","action":"nope"}]}')"#,
            "22023",
            "$.steps[0].action",
        );
        expect_error(
            &format!("SELECT synapse.add_template('', 'x', {blueprint})"),
            "22023",
            "name must be",
        );
        assert_eq!(count("synapse.templates WHERE name = 'bad'"), 0);
    }

    #[pg_test]
    fn goal_status_shows_the_goal_its_tasks_and_its_edges() {
        let id = submit_example();
        let status = json_of(&format!("SELECT synapse.goal_status({id})"));
        assert_eq!(status["id"], id);
        assert_eq!(status["status"], "running");
        assert_eq!(status["tasks"].as_array().unwrap().len(), 5);
        assert_eq!(status["tasks"][0]["step"], "fetch");
        assert_eq!(status["tasks"][0]["status"], "queued");
        assert_eq!(status["tasks"][0]["attempts"], 0);
        assert_eq!(
            status["edges"][1],
            json!({"from": "classify", "to": "page", "when": "result.severity == 'high'", "on": "success",
                   "state": "pending", "error": null})
        );
        expect_error(
            "SELECT synapse.goal_status(-1)",
            "P0002",
            "goal -1 does not exist",
        );
    }

    #[pg_test]
    fn goal_graph_draws_mermaid_and_dot() {
        let id = submit_example();
        let mermaid = one::<String>(&format!("SELECT synapse.goal_graph({id})"));
        assert!(mermaid.contains("flowchart TD"), "{mermaid}");
        assert!(
            mermaid.contains("fetch[\"<b>fetch</b><br/>sql · queued\"]:::queued"),
            "{mermaid}"
        );
        assert!(
            mermaid.contains("classify -->|\"result.severity == 'high'\"| page"),
            "{mermaid}"
        );
        let dot = one::<String>(&format!("SELECT synapse.goal_graph({id}, 'dot')"));
        assert!(dot.starts_with("digraph synapse {"), "{dot}");
        assert!(dot.contains("\"page\" -> \"close\""), "{dot}");
        expect_error(
            &format!("SELECT synapse.goal_graph({id}, 'svg')"),
            "22023",
            "unknown graph format \"svg\"",
        );
        expect_error(
            "SELECT synapse.goal_graph(-1)",
            "P0002",
            "goal -1 does not exist",
        );
    }

    #[pg_test]
    fn cancel_goal_cancels_what_has_not_finished() {
        let id = submit_example();
        Spi::run("DELETE FROM synapse.outbox").unwrap();
        assert!(one::<bool>(&format!("SELECT synapse.cancel_goal({id})")));
        assert_eq!(
            one::<String>(&format!("SELECT status FROM synapse.goals WHERE id = {id}")),
            "cancelled"
        );
        assert_eq!(
            count(&format!(
                "synapse.tasks WHERE goal_id = {id} AND status = 'cancelled'"
            )),
            5
        );
        let events: Vec<String> = payloads();
        assert_eq!(
            events
                .iter()
                .filter(|p| p.contains("\"task.cancelled\""))
                .count(),
            5
        );
        assert!(events.last().unwrap().contains("\"goal.cancelled\""));
        // Events only observers read share a row per name, one payload a line.
        assert_eq!(
            json_of(
                "SELECT jsonb_agg(jsonb_build_array(event, events, goal_id, task_id) ORDER BY id)
                   FROM synapse.outbox"
            ),
            json!([
                ["task.cancelled", 5, id, null],
                ["goal.cancelled", 1, id, null]
            ])
        );
        assert!(!one::<bool>(&format!("SELECT synapse.cancel_goal({id})")));
        expect_error(
            "SELECT synapse.cancel_goal(-1)",
            "P0002",
            "goal -1 does not exist",
        );
    }

    #[pg_test]
    fn the_state_machines_refuse_impossible_transitions() {
        let id = submit_example();
        expect_error(
            &format!("UPDATE synapse.tasks SET status = 'succeeded' WHERE goal_id = {id} AND step = 'close'"),
            "55000",
            "status cannot change from pending to succeeded",
        );
        expect_error(
            &format!("UPDATE synapse.tasks SET status = 'waiting' WHERE goal_id = {id} AND step = 'close'"),
            "55000",
            "status cannot change from pending to waiting",
        );
        expect_error(
            &format!("UPDATE synapse.goals SET status = 'submitted' WHERE id = {id}"),
            "55000",
            "status cannot change from running to submitted",
        );
        expect_error(
            &format!("UPDATE synapse.tasks SET status = 'retrying' WHERE goal_id = {id} AND step = 'fetch'"),
            "55000",
            "from queued to retrying",
        );
    }

    #[pg_test]
    fn a_step_queued_and_claimed_in_one_write_keeps_both_events() {
        // Local continuation: a worker claims a step it decided to run, for
        // its own free slot, in the write that queues it.
        let id = submit_example();
        let close = format!("goal_id = {id} AND step = 'close'");
        Spi::run("DELETE FROM synapse.outbox").unwrap();
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'running', attempts = 1, input = '{{}}',
                    lease_expires_at = now() + interval '1 minute', leased_by = 'w' WHERE {close}"
        ))
        .unwrap();
        // Observers see it queued, then running; nothing is dispatched: it runs.
        assert_eq!(
            json_of(
                "SELECT jsonb_agg(jsonb_build_array(payload::jsonb ->> 'event', payload::jsonb -> 'attempt', dispatch)
                                  ORDER BY id) FROM synapse.outbox"
            ),
            json!([["task.queued", 1, null], ["task.running", 1, null]])
        );
        assert!(one::<bool>(&format!(
            "SELECT queued_at = started_at AND run_at IS NULL FROM synapse.tasks WHERE {close}"
        )));
    }

    #[pg_test]
    fn every_row_keeps_the_columns_its_status_needs() {
        // Checked by the row triggers, also when only such a column changes.
        let id = submit_example();
        let fetch = format!("goal_id = {id} AND step = 'fetch'");
        let close = format!("goal_id = {id} AND step = 'close'");
        expect_error(
            &format!("UPDATE synapse.tasks SET queued_at = NULL WHERE {fetch}"),
            "23514",
            "(step fetch, queued): a queued task needs queued_at",
        );
        expect_error(
            &format!("UPDATE synapse.tasks SET finished_at = now() WHERE {close}"),
            "23514",
            "only an ended task has finished_at",
        );
        expect_error(
            &format!("UPDATE synapse.tasks SET status = 'running', attempts = 1 WHERE {fetch}"),
            "23514",
            "a running task needs lease_expires_at",
        );
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'running', attempts = 1,
                    lease_expires_at = now() + interval '1 minute' WHERE {fetch}"
        ))
        .unwrap();
        expect_error(
            &format!("UPDATE synapse.tasks SET lease_expires_at = NULL WHERE {fetch}"),
            "23514",
            "a running task needs lease_expires_at",
        );
        expect_error(
            &format!("UPDATE synapse.tasks SET status = 'retrying' WHERE {fetch}"),
            "23514",
            "a retrying task needs run_at",
        );
        expect_error(
            &format!("UPDATE synapse.goals SET blueprint = NULL WHERE id = {id}"),
            "23514",
            &format!("goal {id} (running): a running goal needs its blueprint"),
        );
        expect_error(
            &format!("UPDATE synapse.goals SET status = 'failed' WHERE id = {id}"),
            "23514",
            "a failed goal needs its error",
        );
        expect_error(
            &format!("UPDATE synapse.goals SET parent_task_id = 1 WHERE id = {id}"),
            "23514",
            "parent_goal_id and parent_task_id are set together",
        );
        expect_error(
            "INSERT INTO synapse.goals (goal, status) VALUES ('x', 'running')",
            "23514",
            "a running goal needs its blueprint",
        );
        // What the state machine writes itself holds: an ended task its
        // finished_at, a failed goal (with its error) too.
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'succeeded' WHERE {fetch};
             UPDATE synapse.goals SET status = 'failed', error = 'stopped' WHERE id = {id};"
        ))
        .unwrap();
        assert_eq!(
            count(&format!(
                "synapse.tasks WHERE {fetch} AND finished_at IS NOT NULL"
            )),
            1
        );
    }

    /// A step's life, as a worker drives it: claimed with a lease, ended,
    /// its successor queued. Returns the goal.
    fn run_a_chain_step() -> i64 {
        let id = one::<i64>(
            r#"SELECT synapse.submit_plan('{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"}],
                                            "edges":[{"from":"a","to":"b"}]}')"#,
        );
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'running', attempts = attempts + 1,
                    lease_expires_at = now() + interval '1 minute', leased_by = 'w'
              WHERE goal_id = {id} AND step = 'a';
             UPDATE synapse.tasks SET status = 'succeeded' WHERE goal_id = {id} AND step = 'a';
             UPDATE synapse.tasks SET status = 'queued' WHERE goal_id = {id} AND step = 'b';"
        ))
        .unwrap();
        id
    }

    #[pg_test]
    fn the_state_machines_and_events_run_no_plpgsql() {
        // A session's first change compiled every plpgsql trigger, and each
        // statement ran one per row and one for the events.
        Spi::run("SET LOCAL track_functions = 'all'").unwrap();
        let id = run_a_chain_step();
        assert_eq!(
            count(&format!("synapse.outbox WHERE goal_id = {id}")),
            5,
            "goal.running, a queued, running, succeeded, b queued"
        );
        let plpgsql = Spi::get_one::<String>(
            "SELECT string_agg(f.funcname, ', ' ORDER BY f.funcname)
               FROM pg_stat_xact_user_functions AS f
               JOIN pg_proc AS p ON p.oid = f.funcid
               JOIN pg_language AS l ON l.oid = p.prolang
              WHERE f.schemaname = 'synapse' AND l.lanname IN ('plpgsql', 'sql')",
        )
        .unwrap();
        assert_eq!(plpgsql, None);
        let rust = one::<i64>(
            "SELECT count(*) FROM pg_stat_xact_user_functions
              WHERE schemaname = 'synapse' AND funcname IN ('_task_changed', '_tasks_written')",
        );
        assert_eq!(rust, 2, "the Rust triggers ran, and were counted");
    }

    #[pg_test]
    fn the_triggers_write_events_whatever_the_search_path_of_the_session() {
        // They write as the tables' owner: a function the session puts
        // before pg_catalog must not be what they call.
        run_a_chain_step();
        Spi::run(
            "CREATE SCHEMA hijack;
             CREATE FUNCTION hijack.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
             CREATE FUNCTION hijack.unnest(anyarray, anyarray, anyarray, anyarray, anyarray, anyarray)
                 RETURNS SETOF record LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
             SET LOCAL search_path = hijack, pg_catalog",
        )
        .unwrap();
        let id = run_a_chain_step();
        assert_eq!(count(&format!("synapse.outbox WHERE goal_id = {id}")), 5);
    }

    /// Runs the timers (no retention): rows changed, seconds to the next deadline.
    fn run_timers() -> (i64, Option<f64>) {
        let (changed, next) = Spi::get_two::<i64, f64>(
            "SELECT changed, extract(epoch FROM next_due - clock_timestamp())::float8
               FROM synapse._run_timers(0)",
        )
        .unwrap();
        (changed.unwrap(), next)
    }

    #[pg_test]
    fn the_timers_queue_due_retries_and_expired_leases_and_report_the_next_deadline() {
        assert_eq!(run_timers(), (0, None));
        let id = submit_example();
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'running', attempts = 1, lease_expires_at = now() - interval '1 s',
                    leased_by = 'w1' WHERE goal_id = {id} AND step = 'fetch'"
        ))
        .unwrap();
        Spi::run("DELETE FROM synapse.outbox").unwrap();
        // Attempts are left: queued again. Nothing else waits for a timer.
        assert_eq!(run_timers(), (1, None));
        let fetch = json_of(&format!(
            "SELECT to_jsonb(t) FROM synapse.tasks t WHERE goal_id = {id} AND step = 'fetch'"
        ));
        assert_eq!(fetch["status"], "queued");
        assert_eq!(
            fetch["error"],
            "lease of attempt 1 expired: worker w1 stopped responding; whatever the step did may or may not have happened; it runs again"
        );
        assert_eq!(payloads().len(), 1);
        assert!(
            payloads()[0].contains(r#""event":"task.queued""#)
                && payloads()[0].contains(r#""attempt":2"#)
        );

        // A running attempt's lease is the next deadline.
        Spi::run(&format!(
            "UPDATE synapse.tasks SET status = 'running', attempts = 3, lease_expires_at = now() + interval '1 h',
                    leased_by = 'w2' WHERE goal_id = {id} AND step = 'fetch'"
        ))
        .unwrap();
        let (changed, next) = run_timers();
        assert_eq!(changed, 0);
        assert!(
            next.is_some_and(|seconds| seconds > 3500.0 && seconds <= 3600.0),
            "{next:?}"
        );

        // The last attempt's lease lapses: failed, attempts unchanged, and a
        // worker is asked to carry the goal on.
        Spi::run(&format!(
            "UPDATE synapse.tasks SET lease_expires_at = now() - interval '1 s'
              WHERE goal_id = {id} AND step = 'fetch'"
        ))
        .unwrap();
        Spi::run("DELETE FROM synapse.outbox").unwrap();
        assert_eq!(run_timers(), (1, None));
        let fetch = json_of(&format!(
            "SELECT to_jsonb(t) FROM synapse.tasks t WHERE goal_id = {id} AND step = 'fetch'"
        ));
        assert_eq!(fetch["status"], "failed");
        assert_eq!(fetch["attempts"], 3);
        assert_eq!(
            fetch["error"],
            "lease of attempt 3 expired: worker w2 stopped responding; whatever the step did may or may not have happened; no attempt left"
        );
        assert_eq!(
            one::<String>("SELECT dispatch FROM synapse.outbox WHERE event = 'task.failed'"),
            "queue:default"
        );
    }

    #[pg_test]
    fn retention_deletes_finished_goals_with_their_tasks_and_edges() {
        let finished = submit_example();
        let running = submit_example();
        Spi::run(&format!("SELECT synapse.cancel_goal({finished})")).unwrap();
        Spi::run(&format!(
            "UPDATE synapse.goals SET finished_at = now() - interval '2 h' WHERE id = {finished}"
        ))
        .unwrap();
        let (changed, _) =
            Spi::get_two::<i64, f64>("SELECT changed, 0::float8 FROM synapse._run_timers(3600)")
                .unwrap();
        assert_eq!(changed, Some(1));
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM synapse.tasks WHERE goal_id = {finished}"
            )),
            0
        );
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM synapse.edges WHERE goal_id = {finished}"
            )),
            0
        );
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM synapse.goals WHERE id = {running}"
            )),
            1
        );
    }

    #[pg_test]
    fn a_goals_tasks_and_edges_go_with_it_and_never_move_to_another_goal() {
        let deleted = submit_example();
        let kept = submit_example();
        Spi::run(&format!(
            "INSERT INTO synapse.attempts (task_id, attempt, error)
             SELECT id, 1, 'lost' FROM synapse.tasks WHERE goal_id = {deleted} AND step = 'fetch'"
        ))
        .unwrap();
        for table in ["tasks", "edges"] {
            expect_error(
                &format!("UPDATE synapse.{table} SET goal_id = {kept} WHERE goal_id = {deleted}"),
                "55000",
                &format!("belongs to goal {deleted} and cannot move to goal {kept}"),
            );
        }
        Spi::run(&format!("DELETE FROM synapse.goals WHERE id = {deleted}")).unwrap();
        let of = |table: &str, goal: i64| count(&format!("synapse.{table} WHERE goal_id = {goal}"));
        assert_eq!((of("tasks", deleted), of("edges", deleted)), (0, 0));
        assert_eq!(count("synapse.attempts"), 0);
        assert_eq!((of("tasks", kept), of("edges", kept)), (5, 5));
        Spi::run("TRUNCATE synapse.goals CASCADE").unwrap();
        assert_eq!((count("synapse.tasks"), count("synapse.edges")), (0, 0));
    }

    #[pg_test]
    fn forwarder_status_reports_pending_events() {
        Spi::run("SELECT synapse.submit_goal('x')").unwrap();
        let status = json_of("SELECT synapse.forwarder_status()");
        for key in [
            "running",
            "redis_connected",
            "pending",
            "forwarded_total",
            "last_error",
            "last_forward_at",
        ] {
            assert!(status.get(key).is_some(), "{key} missing from {status}");
        }
        // Uncommitted events are visible to this transaction only.
        assert_eq!(status["pending"], 1);
    }

    #[pg_test]
    fn install_plan_plans_a_submitted_goal_or_fails_it_listing_every_problem() {
        let good = one::<i64>("SELECT synapse.submit_goal('resize 3 images')");
        let problems = json_of(&format!(
            r#"SELECT synapse._install_plan({good}, '{{"steps":[{{"id":"a","action":"noop","input":"goal.params"}}]}}', 'resize', '{{"n": "3"}}')"#
        ));
        assert_eq!(problems, json!([]));
        assert_eq!(
            one::<String>(&format!(
                "SELECT status FROM synapse.goals WHERE id = {good}"
            )),
            "running"
        );
        assert_eq!(
            json_of("SELECT input FROM synapse.tasks"),
            json!({"n": "3"})
        );

        let bad = one::<i64>("SELECT synapse.submit_goal('resize 3 images')");
        let problems = json_of(&format!(
            r#"SELECT synapse._install_plan({bad}, '{{"steps":[{{"id":"a","action":"nope"}}]}}', 'resize')"#
        ));
        assert_eq!(problems[0]["path"], "$.steps[0].action");
        let goal = json_of(&format!(
            "SELECT to_jsonb(g) FROM synapse.goals g WHERE id = {bad}"
        ));
        assert_eq!(goal["status"], "failed");
        assert!(
            goal["error"]
                .as_str()
                .unwrap()
                .contains("$.steps[0].action: unknown action"),
            "{goal}"
        );
        assert_eq!(count(&format!("synapse.tasks WHERE goal_id = {bad}")), 0);
        expect_error(
            &format!(
                r#"SELECT synapse._install_plan({good}, '{{"steps":[{{"id":"a","action":"noop"}}]}}', 't')"#
            ),
            "22023",
            "is not waiting for a plan",
        );
    }

    const REFUND_PATTERN: &str = r"refund order (?P<id>\d+) because (?P<reason>.+)";

    fn add_refund_template() {
        Spi::run(&format!(
            r#"SELECT synapse.add_template('refund', {}, '{{"steps":[{{"id":"refund","action":"noop","input":"goal.params"}}]}}')"#,
            quote_literal(REFUND_PATTERN)
        ))
        .unwrap();
    }

    fn rows_written() -> [i64; 3] {
        [
            count("synapse.goals"),
            count("synapse.tasks"),
            count("synapse.outbox"),
        ]
    }

    #[pg_test]
    fn plan_preview_shows_the_template_params_and_blueprint_writing_nothing() {
        add_refund_template();
        let before = rows_written();
        let preview =
            json_of("SELECT synapse.plan_preview('Refund order 1001 because it arrived damaged')");
        assert_eq!(preview["template"], "refund");
        assert_eq!(
            preview["params"],
            json!({"id": "1001", "reason": "it arrived damaged"})
        );
        assert_eq!(preview["blueprint"]["steps"][0]["id"], "refund");
        assert_eq!(preview["problems"], json!([]));
        assert_eq!(rows_written(), before);
    }

    #[pg_test]
    fn plan_preview_needs_the_whole_goal_to_match_and_names_the_closest() {
        add_refund_template();
        Spi::run(
            r#"SELECT synapse.add_template('greet', '^greet (?P<name>\w+)$', '{"steps":[{"id":"a","action":"noop"}]}')"#,
        )
        .unwrap();
        let before = rows_written();
        let preview =
            json_of("SELECT synapse.plan_preview('do NOT refund order 1001 because it is fraud')");
        assert_eq!(preview["template"], Value::Null);
        assert_eq!(preview["params"], Value::Null);
        assert_eq!(preview["blueprint"], Value::Null);
        assert_eq!(preview["problems"][0]["path"], "goal");
        let message = preview["problems"][0]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                r#"no template matches goal "do NOT refund order 1001 because it is fraud"; closest: "refund" (refund order"#
            ),
            "{message}"
        );
        assert!(!message.contains("greet"), "{message}");
        assert_eq!(rows_written(), before);
    }

    #[pg_test]
    fn plan_preview_lists_the_problems_of_an_invalid_blueprint() {
        // Written around add_template, which would refuse it.
        Spi::run(
            r#"INSERT INTO synapse.templates (name, pattern, blueprint)
               VALUES ('broken', 'broken plan', '{"steps":[{"id":"a","action":"nope"}]}')"#,
        )
        .unwrap();
        let preview = json_of("SELECT synapse.plan_preview('broken plan')");
        assert_eq!(preview["template"], "broken");
        assert_eq!(preview["params"], json!({}));
        assert_eq!(preview["problems"][0]["path"], "$.steps[0].action");
        let invalid = json_of(
            r#"SELECT synapse.validate_blueprint('{"steps":[{"id":"a","action":"nope"}]}')"#,
        );
        assert_eq!(preview["problems"], invalid);
    }

    #[pg_test]
    fn plan_preview_of_another_planner_says_it_runs_only_in_workers() {
        let preview = json_of("SELECT synapse.plan_preview('anything', '{}', 'oracle')");
        assert_eq!(preview["template"], Value::Null);
        assert_eq!(preview["problems"][0]["path"], "planner");
        assert!(
            preview["problems"][0]["message"]
                .as_str()
                .unwrap()
                .contains(r#"planner "oracle" runs only in workers"#),
            "{preview}"
        );
    }

    #[pg_test]
    fn plan_preview_refuses_bad_arguments() {
        expect_error("SELECT synapse.plan_preview(NULL)", "22023", "non-empty");
        expect_error("SELECT synapse.plan_preview('  ')", "22023", "non-empty");
        expect_error(
            "SELECT synapse.plan_preview(repeat('x', 10001))",
            "22023",
            "the limit is 10000",
        );
        expect_error(
            "SELECT synapse.plan_preview('x', NULL)",
            "22023",
            "input must be JSON",
        );
        expect_error(
            "SELECT synapse.plan_preview('x', (repeat('[', 65) || repeat(']', 65))::jsonb)",
            "54000",
            "input",
        );
        expect_error(
            "SELECT synapse.plan_preview('x', '{}', 'Bad Name')",
            "22023",
            "planner must be a planner name",
        );
        expect_error(
            "SELECT synapse.plan_preview('x', '{}', NULL)",
            "22023",
            "got NULL",
        );
    }

    #[pg_test]
    fn add_template_accepts_a_loose_pattern_with_a_notice() {
        // The NOTICE itself is checked end to end; the template is still stored.
        Spi::run(
            r#"SELECT synapse.add_template('loose', '.*refund.*', '{"steps":[{"id":"a","action":"noop"}]}')"#,
        )
        .unwrap();
        assert_eq!(count("synapse.templates WHERE name = 'loose'"), 1);
        let preview = json_of("SELECT synapse.plan_preview('do NOT refund anything')");
        assert_eq!(preview["template"], "loose");
    }

    #[pg_test]
    fn edges_resolve_in_place_even_all_at_once() {
        // A fan-out's root resolves all its edges in one statement: each new
        // version must fit on its edge's page (a HOT update, no index
        // entries), which a full page cannot give it.
        let mut steps = vec![json!({"id": "r", "action": "noop"})];
        let mut edges = Vec::new();
        for i in 0..500 {
            steps.push(json!({"id": format!("l{i}"), "action": "noop"}));
            edges.push(json!({"from": "r", "to": format!("l{i}")}));
        }
        let blueprint = json!({"steps": steps, "edges": edges});
        let id = one::<i64>(&format!(
            "SELECT synapse.submit_plan({}::jsonb)",
            quote_literal(blueprint.to_string())
        ));
        let counts = "SELECT array[pg_stat_get_xact_tuples_updated('synapse.edges'::regclass),
                                   pg_stat_get_xact_tuples_hot_updated('synapse.edges'::regclass)]";
        let before = one::<Vec<i64>>(counts);
        Spi::run(&format!(
            "UPDATE synapse.edges SET state = 'taken', resolved_at = statement_timestamp()
              WHERE goal_id = {id} AND state = 'pending'"
        ))
        .unwrap();
        let after = one::<Vec<i64>>(counts);
        let (updated, in_place) = (after[0] - before[0], after[1] - before[1]);
        assert_eq!(updated, 500);
        assert_eq!(in_place, updated, "edges resolved off their pages");
    }

    #[pg_test]
    fn a_commit_whose_events_only_observers_read_wakes_the_forwarder_soon_not_at_once() {
        use crate::events::wake::wake_at_commit_is;
        assert_eq!(wake_at_commit_is(), (false, false));
        // goal.running dispatches nothing.
        Spi::run(
            r#"INSERT INTO synapse.goals (goal, blueprint, status)
               VALUES ('observed', '{"steps": []}', 'running')"#,
        )
        .unwrap();
        assert_eq!(count("synapse.outbox WHERE event = 'goal.running'"), 1);
        assert_eq!(wake_at_commit_is(), (true, false));
        // goal.submitted goes to the planners: the commit wakes it at once.
        one::<i64>("SELECT synapse.submit_goal('dispatched')");
        assert_eq!(wake_at_commit_is(), (true, true));
    }
}
