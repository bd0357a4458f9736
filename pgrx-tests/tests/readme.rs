//! The README cannot rot: every ```sql block runs, in order, against a real
//! stack (a `-- ERROR:  message` comment after a statement means it must fail
//! with exactly that message), and every ```json block parses, blueprints
//! validating without a problem.
use synapse_e2e::Stack;

/// The fenced blocks of `language` in the README, in order.
fn blocks(readme: &str, language: &str) -> Vec<String> {
    let fence = format!("```{language}\n");
    let mut found = Vec::new();
    let mut rest = readme;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("a closed code block");
        found.push(body[..end].to_owned());
        rest = &body[end..];
    }
    found
}

/// Statements of a SQL block, each with the error it must raise, if any.
fn statements(block: &str) -> Vec<(String, Option<String>)> {
    let mut statements: Vec<(String, Option<String>)> = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        if let Some(message) = line.strip_prefix("-- ERROR:  ") {
            let last = statements
                .last_mut()
                .expect("an ERROR comment follows a statement");
            last.1 = Some(message.to_owned());
            continue;
        }
        if line.starts_with("--") {
            continue;
        }
        // A comment after the statement (e.g. `-- → 1`) is documentation, not SQL.
        let code = match line.find(';') {
            Some(end) if line[end + 1..].trim_start().starts_with("--") => &line[..=end],
            _ => line,
        };
        current.push_str(code);
        current.push('\n');
        if code.trim_end().ends_with(';') {
            statements.push((std::mem::take(&mut current), None));
        }
    }
    assert!(
        current.trim().is_empty(),
        "unterminated statement: {current}"
    );
    statements
}

#[test]
fn every_readme_example_runs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let stack = Stack::start("readme", &[]);
    let mut client = stack.pg();

    let sql = blocks(&readme, "sql");
    assert!(sql.len() >= 3, "the README shows SQL");
    for block in &sql {
        for (statement, expected) in statements(block) {
            let outcome = client.batch_execute(&statement);
            match (outcome, expected) {
                (Ok(()), None) => {}
                (Err(error), Some(message)) => {
                    let actual = error
                        .as_db_error()
                        .map(|db| db.message().to_owned())
                        .unwrap_or_default();
                    assert_eq!(actual, message, "in {statement}");
                }
                (Ok(()), Some(message)) => panic!("expected `{message}` from {statement}"),
                (Err(error), None) => panic!("{statement} failed: {error:?}"),
            }
        }
    }

    let json = blocks(&readme, "json");
    assert!(!json.is_empty(), "the README shows JSON");
    for block in json {
        // A block of one-line events, or one whole document.
        let documents: Vec<&str> = if block.starts_with("{\"v\"") {
            block.lines().collect()
        } else {
            vec![block.as_str()]
        };
        for document in documents {
            let value: serde_json::Value = serde_json::from_str(document)
                .unwrap_or_else(|error| panic!("{error}: {document}"));
            if value.get("steps").is_some() {
                let problems: String = client
                    .query_one(
                        "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
                        &[&document],
                    )
                    .unwrap()
                    .get(0);
                assert_eq!(problems, "[]", "{document}");
            }
        }
    }
}
