//! Which statements an `sql` step may run.
//!
//! A step runs exactly one statement, inside a transaction the worker opens and
//! ends, on a connection other steps reuse. Statements that control that
//! transaction (`BEGIN`, `COMMIT`, `SAVEPOINT`, …) or change the session for
//! whoever comes next (`SET`, `RESET`, `LISTEN`, `PREPARE`, cursors, …) are
//! refused before anything is sent. The check reads the statement the way
//! Postgres's lexer does: comments (nested `/* */` and `--`), string literals
//! (`'…'`, `E'…'`, dollar quotes) and quoted identifiers never count as
//! keywords or statement separators.
//!
//! This is the clear error, not the guarantee: a function can change settings
//! too (`set_config(…, false)`), so the session is also reset after every step.

/// A statement a step may run: its text without leading or trailing comments,
/// blanks and semicolons.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Statement<'a> {
    pub(crate) text: &'a str,
}

/// Why a query was refused; the message says what to do instead.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Nothing but blanks and comments.
    Empty,
    /// More than one statement.
    Several(usize),
    /// A transaction-control statement (`BEGIN`, …): the step's transaction is the worker's.
    Transaction(String),
    /// A statement that changes the session (`SET`, …).
    Session(String),
}

impl Refusal {
    /// The error message for the step.
    pub(crate) fn message(&self) -> String {
        match self {
            Refusal::Empty => "params.query: query must not be empty".to_owned(),
            Refusal::Several(n) => format!(
                "sql: params.query holds {n} statements; a step runs exactly one (use one step per statement)"
            ),
            Refusal::Transaction(command) => format!(
                "sql: {command} is refused: a step cannot control transactions; each step runs in \
                 a transaction of its own, committed when its statement succeeds"
            ),
            Refusal::Session(command) => format!(
                "sql: {command} is refused: a step cannot change its database session, which later \
                 steps reuse (to change a setting for this statement only, call \
                 set_config(name, value, true) in it)"
            ),
        }
    }
}

/// Statements that control transactions.
const TRANSACTION: &[&str] = &[
    "BEGIN",
    "START",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT",
    "RELEASE",
];

/// Statements that change the session: settings, roles, notifications,
/// prepared statements, cursors, loaded libraries.
const SESSION: &[&str] = &[
    "SET",
    "RESET",
    "DISCARD",
    "LISTEN",
    "UNLISTEN",
    "LOAD",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "DECLARE",
    "CLOSE",
    "FETCH",
    "MOVE",
];

/// The one statement of `query`, or why it may not run.
pub(crate) fn single(query: &str) -> Result<Statement<'_>, Refusal> {
    let statements = split(query);
    let statement = match statements.as_slice() {
        [] => return Err(Refusal::Empty),
        [one] => *one,
        several => return Err(Refusal::Several(several.len())),
    };
    let words = leading_keywords(statement);
    let Some(first) = words.first() else {
        return Ok(Statement { text: statement });
    };
    let second = words.get(1).map(String::as_str);
    if first == "PREPARE" && second == Some("TRANSACTION") {
        return Err(Refusal::Transaction("PREPARE TRANSACTION".to_owned()));
    }
    let shown = match (first.as_str(), second) {
        ("START", Some("TRANSACTION")) => "START TRANSACTION".to_owned(),
        _ => first.clone(),
    };
    if TRANSACTION.contains(&first.as_str()) {
        return Err(Refusal::Transaction(shown));
    }
    if SESSION.contains(&first.as_str()) {
        return Err(Refusal::Session(shown));
    }
    Ok(Statement { text: statement })
}

/// The statements of `query`: each the text from its first token to its last,
/// empty ones (`;;`, comments only) left out.
fn split(query: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let mut span: Option<(usize, usize)> = None;
    for token in Lexer::new(query) {
        match token.kind {
            Kind::Semicolon => {
                if let Some((start, end)) = span.take() {
                    statements.push(&query[start..end]);
                }
            }
            _ => {
                span = Some(match span {
                    None => (token.start, token.end),
                    Some((start, _)) => (start, token.end),
                });
            }
        }
    }
    if let Some((start, end)) = span {
        statements.push(&query[start..end]);
    }
    statements
}

/// The first two tokens of `statement` in upper case, if they are bare words.
fn leading_keywords(statement: &str) -> Vec<String> {
    Lexer::new(statement)
        .take(2)
        .map_while(|token| {
            (token.kind == Kind::Word)
                .then(|| statement[token.start..token.end].to_ascii_uppercase())
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A bare word: keyword or unquoted identifier.
    Word,
    /// `;` outside any literal or comment.
    Semicolon,
    /// Anything else: literals, quoted identifiers, operators, parameters.
    Other,
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Splits SQL text into tokens, skipping blanks and comments. Unterminated
/// literals and comments run to the end of the text (Postgres then refuses the
/// statement itself).
struct Lexer<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            at: 0,
        }
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.text.get(self.at + offset).copied()
    }

    /// Skips blanks and comments.
    fn skip_trivia(&mut self) {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(c), _) if c.is_ascii_whitespace() => self.at += 1,
                (Some(b'-'), Some(b'-')) => {
                    while let Some(c) = self.peek(0) {
                        self.at += 1;
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    self.at += 2;
                    let mut depth = 1;
                    while depth > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => return,
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.at += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.at += 2;
                            }
                            _ => self.at += 1,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Past a quoted run that started at `self.at` with `quote`; a doubled
    /// quote stands for itself, and with `backslashes` a backslash escapes the
    /// next byte (`E'…'` strings).
    fn skip_quoted(&mut self, quote: u8, backslashes: bool) {
        self.at += 1;
        while let Some(c) = self.peek(0) {
            self.at += 1;
            if backslashes && c == b'\\' {
                self.at += 1;
            } else if c == quote {
                if self.peek(0) == Some(quote) {
                    self.at += 1;
                } else {
                    return;
                }
            }
        }
        self.at = self.at.min(self.text.len());
    }

    /// The tag of a dollar quote starting at `self.at` (`$$` or `$tag$`), if one does.
    fn dollar_tag(&self) -> Option<usize> {
        let mut length = 1;
        while let Some(c) = self.peek(length) {
            if c == b'$' {
                return Some(length + 1);
            }
            let allowed = if length == 1 {
                is_word_start(c)
            } else {
                is_word_part(c)
            };
            if !allowed {
                return None;
            }
            length += 1;
        }
        None
    }

    /// Past a dollar-quoted string whose opening tag is `tag` bytes long.
    fn skip_dollar_quoted(&mut self, tag: usize) {
        let opening = &self.text[self.at..self.at + tag];
        let body = self.at + tag;
        self.at = match self.text[body..]
            .windows(tag)
            .position(|window| window == opening)
        {
            Some(offset) => body + offset + tag,
            None => self.text.len(),
        };
    }
}

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_word_part(c: u8) -> bool {
    is_word_start(c) || c.is_ascii_digit() || c == b'$'
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.skip_trivia();
        let start = self.at;
        let c = self.peek(0)?;
        let kind = match c {
            b';' => {
                self.at += 1;
                Kind::Semicolon
            }
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Kind::Other
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                Kind::Other
            }
            b'$' => {
                match self.dollar_tag() {
                    Some(tag) => self.skip_dollar_quoted(tag),
                    // A parameter (`$1`) or a lone `$`.
                    None => {
                        self.at += 1;
                        while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                            self.at += 1;
                        }
                    }
                }
                Kind::Other
            }
            c if is_word_start(c) => {
                // E'…' (backslash escapes), and B'…', X'…', N'…', U&'…' (plain quoting).
                match (c.to_ascii_uppercase(), self.peek(1), self.peek(2)) {
                    (b'E', Some(b'\''), _) => {
                        self.at += 1;
                        self.skip_quoted(b'\'', true);
                        return Some(self.token(Kind::Other, start));
                    }
                    (b'B' | b'X' | b'N', Some(b'\''), _) => {
                        self.at += 1;
                        self.skip_quoted(b'\'', false);
                        return Some(self.token(Kind::Other, start));
                    }
                    (b'U', Some(b'&'), Some(quote @ (b'\'' | b'"'))) => {
                        self.at += 2;
                        self.skip_quoted(quote, false);
                        return Some(self.token(Kind::Other, start));
                    }
                    _ => {}
                }
                while self.peek(0).is_some_and(is_word_part) {
                    self.at += 1;
                }
                Kind::Word
            }
            _ => {
                // Digits, operators, punctuation: one byte per token is enough to
                // find keywords and separators, and a comment opener inside an
                // operator (`1--2`) is then seen by `skip_trivia`, as Postgres sees it.
                self.at += 1;
                Kind::Other
            }
        };
        Some(self.token(kind, start))
    }
}

impl Lexer<'_> {
    fn token(&self, kind: Kind, start: usize) -> Token {
        Token {
            kind,
            start,
            end: self.at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(query: &str) -> &str {
        single(query)
            .unwrap_or_else(|refusal| panic!("{query:?} refused: {refusal:?}"))
            .text
    }

    #[test]
    fn one_statement_comes_back_without_comments_blanks_and_semicolons() {
        assert_eq!(text("select 1"), "select 1");
        assert_eq!(text("  select 1 ;\n ; "), "select 1");
        assert_eq!(text("-- lead\nselect 1 -- trail\n;"), "select 1");
        assert_eq!(
            text("/* a /* nested */ b */ select 1 /* end */"),
            "select 1"
        );
        assert_eq!(text("select ';' as s"), "select ';' as s");
        assert_eq!(text("select 'it''s; ok'"), "select 'it''s; ok'");
        assert_eq!(text(r"select E'\'; still'"), r"select E'\'; still'");
        assert_eq!(text("select $$; begin; $$"), "select $$; begin; $$");
        assert_eq!(
            text("select $fn$ a $$ ; $ b $fn$, $1, a$b"),
            "select $fn$ a $$ ; $ b $fn$, $1, a$b"
        );
        assert_eq!(text(r#"select 1 as ";""#), r#"select 1 as ";""#);
        assert_eq!(text("select U&'\\0041;'"), "select U&'\\0041;'");
        assert_eq!(
            text("insert into t values ($1) returning id"),
            "insert into t values ($1) returning id"
        );
        assert_eq!(text("(select 1)"), "(select 1)");
        assert_eq!(text("select 1 - -2"), "select 1 - -2");
        assert_eq!(
            text("select set_config('statement_timeout', '1ms', false)"),
            "select set_config('statement_timeout', '1ms', false)"
        );
        // Words that merely start like refused ones.
        assert_eq!(text("settle"), "settle");
        assert_eq!(text("select * from begin_log"), "select * from begin_log");
        assert_eq!(
            text("with begin as (select 1) select * from begin"),
            "with begin as (select 1) select * from begin"
        );
        assert_eq!(text("call p()"), "call p()");
        assert_eq!(
            text("do $$ begin perform 1; end $$"),
            "do $$ begin perform 1; end $$"
        );
    }

    #[test]
    fn empty_and_several_statements_are_refused() {
        for query in ["", "  ", ";", " ; ;", "-- nothing", "/* nothing */ ;"] {
            assert_eq!(single(query), Err(Refusal::Empty), "{query:?}");
        }
        assert_eq!(single("select 1; select 2"), Err(Refusal::Several(2)));
        assert_eq!(single("select 1; set x = 1;"), Err(Refusal::Several(2)));
        assert_eq!(
            single("select 1 /* ; */; commit; begin"),
            Err(Refusal::Several(3))
        );
        assert_eq!(
            Refusal::Several(2).message(),
            "sql: params.query holds 2 statements; a step runs exactly one (use one step per statement)"
        );
    }

    #[test]
    fn transaction_control_is_refused_however_it_is_written() {
        for (query, command) in [
            ("BEGIN", "BEGIN"),
            ("begin;", "BEGIN"),
            ("Begin Isolation Level Serializable", "BEGIN"),
            ("  /* c */ -- c\n begin", "BEGIN"),
            ("/* nested /* */ */begin", "BEGIN"),
            ("start transaction", "START TRANSACTION"),
            ("commit", "COMMIT"),
            ("COMMIT PREPARED 'x'", "COMMIT"),
            ("end", "END"),
            ("rollback to savepoint a", "ROLLBACK"),
            ("abort", "ABORT"),
            ("savepoint a", "SAVEPOINT"),
            ("release a", "RELEASE"),
            ("prepare transaction 'x'", "PREPARE TRANSACTION"),
        ] {
            assert_eq!(
                single(query),
                Err(Refusal::Transaction(command.to_owned())),
                "{query:?}"
            );
        }
        assert_eq!(
            Refusal::Transaction("BEGIN".to_owned()).message(),
            "sql: BEGIN is refused: a step cannot control transactions; each step runs in a \
             transaction of its own, committed when its statement succeeds"
        );
    }

    #[test]
    fn session_changes_are_refused() {
        for (query, command) in [
            ("SET statement_timeout = '1ms'", "SET"),
            ("set local x = 1", "SET"),
            ("SET SESSION AUTHORIZATION nobody", "SET"),
            ("set role nobody", "SET"),
            ("\n\tset\tsearch_path = evil", "SET"),
            ("reset all", "RESET"),
            ("discard all", "DISCARD"),
            ("listen x", "LISTEN"),
            ("unlisten *", "UNLISTEN"),
            ("load 'auto_explain'", "LOAD"),
            ("prepare p as select 1", "PREPARE"),
            ("execute p", "EXECUTE"),
            ("deallocate all", "DEALLOCATE"),
            ("declare c cursor with hold for select 1", "DECLARE"),
            ("close c", "CLOSE"),
            ("fetch c", "FETCH"),
            ("move c", "MOVE"),
        ] {
            assert_eq!(
                single(query),
                Err(Refusal::Session(command.to_owned())),
                "{query:?}"
            );
        }
        assert!(Refusal::Session("SET".to_owned())
            .message()
            .starts_with("sql: SET is refused: a step cannot change its database session"));
    }

    #[test]
    fn unterminated_literals_and_comments_do_not_panic() {
        for query in [
            "select 'open",
            "select \"open",
            "select $tag$ open",
            "select /* open",
            "select E'\\",
            "select $",
            "select U&",
            "$",
            "é",
            "select 'é'; sélect",
        ] {
            let _ = single(query);
        }
        assert_eq!(text("select /* open"), "select");
        assert_eq!(
            single("select 'a; begin"),
            Ok(Statement {
                text: "select 'a; begin"
            })
        );
    }
}
