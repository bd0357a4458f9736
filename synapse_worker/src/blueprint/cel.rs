//! CEL (Common Expression Language) for blueprints: compiling and evaluating `when`,
//! `input`, `output`, `transform` and `sql` args expressions over JSON values.
//!
//! This code also runs inside Postgres backends, where a panic that escapes takes the
//! server down; every call into the `cel` crate is therefore wrapped in `catch_unwind`
//! and turned into an ordinary error.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use cel::common::ast::{operators, EntryExpr, Expr, LiteralValue};
use cel::common::value::Val;
use cel::objects::{Key, Map as CelMap, ValueType};
use cel::IdedExpr;

use super::cel_budget;
use cel::{Context, Env, Program, Value as CelValue};
use serde_json::{Map, Number, Value};

thread_local! {
    // Building the standard environment costs ~17 µs, an inner scope ~1.7 µs (SETUP.md),
    // so each thread keeps one root context and evaluates in fresh child scopes.
    // The `cel` types are not `Sync`, hence per thread rather than a global.
    static ROOT: RefCell<Option<(Arc<Env>, Context<'static, 'static>)>> = const { RefCell::new(None) };
    // Every task of a blueprint evaluates the same few expressions, and parsing one
    // cost a seventh of a chain step's worker CPU: each thread keeps what it compiled.
    static COMPILED: RefCell<Compiled> = RefCell::new(Compiled::default());
    // How many variables this thread's runs converted (tests count them).
    #[cfg(test)]
    static CONVERTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Expressions compiled on this thread, by source, within a budget of source bytes;
/// when it is spent, the cache starts afresh (the expressions in use come back at once).
#[derive(Default)]
struct Compiled {
    by_source: HashMap<String, Expression>,
    source_bytes: usize,
}

impl Compiled {
    /// Sources kept at most, in bytes.
    const BUDGET: usize = 256 * 1024;

    fn get(&self, source: &str) -> Option<Expression> {
        self.by_source.get(source).cloned()
    }

    fn keep(&mut self, expression: &Expression) {
        let size = expression.source.len();
        if size > Self::BUDGET {
            return;
        }
        if self.source_bytes + size > Self::BUDGET {
            self.by_source.clear();
            self.source_bytes = 0;
        }
        self.source_bytes += size;
        self.by_source
            .insert(expression.source.clone(), expression.clone());
    }
}

/// Runs `f` with this thread's shared standard environment and root context.
fn with_root<R>(f: impl FnOnce(&Arc<Env>, &Context<'static, 'static>) -> R) -> R {
    ROOT.with(|cell| {
        if cell.borrow().is_none() {
            let env = Arc::new(Env::stdlib());
            let mut root = Context::with_env(Arc::clone(&env));
            // The meter of every comprehension's iterations (cel_budget).
            root.add_function(cel_budget::METER, |value: CelValue| {
                cel_budget::spend(&value)
                    .map(|()| value)
                    .map_err(|error| cel::ExecutionError::function_error(cel_budget::METER, error))
            })
            .expect("a name no standard function has");
            *cell.borrow_mut() = Some((env, root));
        }
        let guard = cell.borrow();
        let (env, root) = guard.as_ref().expect("initialised just above");
        f(env, root)
    })
}

/// Runs `f`, turning a panic inside the `cel` crate into an error message.
fn guarded<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        format!("internal error while {what} the CEL expression: {detail}")
    })
}

/// A compiled CEL expression together with its source text.
///
/// Cheap to clone: the compiled program is shared.
#[derive(Clone)]
pub struct Expression {
    program: Arc<Program>,
    /// The program's tree with its comprehensions metered: what runs.
    metered: Arc<IdedExpr>,
    source: String,
    /// The variables it reads (its free variables), the only ones a run
    /// converts: a large `goal` costs nothing to a condition on `result`.
    /// None when its tree could not be read: a run then converts them all.
    reads: Option<Arc<[String]>>,
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The largest [`complexity`] accepted by [`compile`].
///
/// The `cel` parser, its tree visitor, the evaluator and the drop of the syntax tree all
/// recurse, and a stack overflow aborts the process (a whole Postgres server, for a
/// backend) instead of unwinding. Measured in a debug build on a 2 MiB thread stack, the
/// smallest budget this crate runs under (test threads, tokio workers), the first
/// overflow came at 11 nested brackets or a chain of 53 binary operators; this limit
/// keeps a wide margin below both. Release builds and 8 MiB stacks have far more room.
pub const MAX_COMPLEXITY: usize = 40;

/// Extra cost of nesting one bracket level deeper: in the measurements above one level
/// took about as much stack as four chained operators.
const LEVEL_COST: usize = 4;

/// A conservative estimate of how deeply compiling and evaluating `expr` recurses, in
/// units of one chained operator (see [`MAX_COMPLEXITY`]).
///
/// Scans tokens without parsing: each operator, member access, call or index adds one to
/// the current run of operators; `,`, `&&`, `||`, `?` and `:` start a new run, since they
/// separate subtrees (`cel` builds `&&`/`||` chains as balanced trees), and each `?` or `:`
/// of a conditional chain adds one level. A bracketed part costs its own estimate plus
/// [`LEVEL_COST`]. Counting a whole run rather than one path through it only
/// overestimates, which is the safe side.
pub fn complexity(expr: &str) -> usize {
    #[derive(Default)]
    struct Group {
        /// Largest cost of a finished run in this group.
        best: usize,
        /// Depth the current run starts at: each `?` or `:` of a conditional chain nests
        /// what follows one level deeper; `,` starts a sibling at depth 0.
        base: usize,
        /// Operators in the current run.
        ops: usize,
        /// Most expensive bracketed part in the current run.
        child: usize,
    }
    impl Group {
        fn cost(&self) -> usize {
            self.best.max(self.base + self.ops + self.child)
        }
        /// `&&` and `||`: a new operand at the same depth.
        fn next_operand(&mut self) {
            self.best = self.cost();
            self.ops = 0;
            self.child = 0;
        }
        /// `?` and `:`: the next part of a conditional, one level deeper.
        fn deeper(&mut self) {
            self.next_operand();
            self.base += 1;
        }
        /// `,`: a sibling element or argument.
        fn sibling(&mut self) {
            self.next_operand();
            self.base = 0;
        }
    }
    fn close(stack: &mut Vec<Group>) {
        if stack.len() > 1 {
            let inner = stack.pop().map(|g| g.cost()).unwrap_or(0);
            if let Some(outer) = stack.last_mut() {
                outer.child = outer.child.max(LEVEL_COST + inner);
            }
        }
    }

    let b = expr.as_bytes();
    let mut stack = vec![Group::default()];
    let mut i = 0;
    // The previous significant byte: `?` right after `.`, `[` or `{` is optional-field
    // syntax, not a conditional, and must not start a new run.
    let mut prev = 0u8;
    while i < b.len() {
        let c = b[i];
        let top = stack.len() - 1;
        if let Some((quote_at, raw)) = string_prefix(b, i) {
            i = skip_string(b, quote_at, raw);
            prev = b'\'';
            continue;
        }
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\'' | b'"' => i = skip_string(b, i, false),
            b'`' => {
                i += 1;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if &b[start..i] == b"in" {
                    stack[top].ops += 1;
                }
            }
            c if c.is_ascii_digit() => {
                // Numbers: digits, hex, `u`, a decimal point and an exponent.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                stack[top].ops += 1;
                stack.push(Group::default());
                i += 1;
            }
            b')' | b']' | b'}' => {
                close(&mut stack);
                i += 1;
            }
            b'?' if matches!(prev, b'.' | b'[' | b'{') => i += 1,
            b',' => {
                stack[top].sibling();
                i += 1;
            }
            b'?' | b':' => {
                stack[top].deeper();
                i += 1;
            }
            b'&' | b'|' if b.get(i + 1) == Some(&c) => {
                stack[top].next_operand();
                i += 2;
            }
            b'=' | b'!' | b'<' | b'>' if b.get(i + 1) == Some(&b'=') => {
                stack[top].ops += 1;
                i += 2;
            }
            _ => {
                stack[top].ops += 1;
                i += 1;
            }
        }
        prev = c;
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    stack[0].cost()
}

/// If a string literal starts at `i` with an `r`/`b` prefix (`r'..'`, `b"..."`, `rb'..'`),
/// where its quote is and whether it is raw.
fn string_prefix(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let is_prefix = |c: u8| matches!(c, b'r' | b'R' | b'b' | b'B');
    if !is_prefix(b[i]) {
        return None;
    }
    // A prefix is not the tail of an identifier such as `attr'`.
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i;
    let mut raw = false;
    while j < b.len() && j < i + 2 && is_prefix(b[j]) {
        raw |= matches!(b[j], b'r' | b'R');
        j += 1;
    }
    matches!(b.get(j), Some(b'\'' | b'"')).then_some((j, raw))
}

/// The index just past the string literal whose opening quote is at `i` (the end of the
/// input if it is unterminated; the parser then reports it).
fn skip_string(b: &[u8], i: usize, raw: bool) -> usize {
    let quote = b[i];
    let triple = b.len() >= i + 3 && b[i + 1] == quote && b[i + 2] == quote;
    let mut j = if triple { i + 3 } else { i + 1 };
    while j < b.len() {
        if b[j] == b'\\' && !raw {
            j += 2;
        } else if triple {
            if b.len() >= j + 3 && b[j] == quote && b[j + 1] == quote && b[j + 2] == quote {
                return j + 3;
            }
            j += 1;
        } else if b[j] == quote {
            return j + 1;
        } else {
            j += 1;
        }
    }
    b.len()
}

/// Whether `variable` is one of `source`'s free variables; if it does not
/// compile, as if it were (its evaluation reports the error).
pub fn reads(source: &str, variable: &str) -> bool {
    compile(source).map_or(true, |expression| expression.reads(variable))
}

/// Compiles a CEL expression.
///
/// Never panics: a parser panic is caught and reported as an error, and an expression
/// whose [`complexity`] exceeds [`MAX_COMPLEXITY`] is refused before the parser sees it,
/// since the overflow of a deep recursion cannot be caught. The error is one line
/// (`1:15: Syntax error: ...`), several parse errors joined with `; `, so it fits in a
/// validation problem or a Postgres error message.
pub fn compile(expr: &str) -> Result<Expression, String> {
    if let Some(expression) = COMPILED.with(|compiled| compiled.borrow().get(expr)) {
        return Ok(expression);
    }
    let expression = compile_anew(expr)?;
    COMPILED.with(|compiled| compiled.borrow_mut().keep(&expression));
    Ok(expression)
}

fn compile_anew(expr: &str) -> Result<Expression, String> {
    if expr.trim().is_empty() {
        return Err("empty expression".to_owned());
    }
    let cost = complexity(expr);
    if cost > MAX_COMPLEXITY {
        return Err(format!(
            "expression too complex: brackets nest or operators chain too deeply \
             (complexity {cost}, limit {MAX_COMPLEXITY}); split it into smaller expressions"
        ));
    }
    let compiled = guarded("compiling", || with_root(|env, _| env.compile(expr)))?;
    match compiled {
        Ok(program) => {
            let mut expression = Expression {
                metered: Arc::new(cel_budget::metered(program.expression().clone())),
                program: Arc::new(program),
                source: expr.to_owned(),
                reads: None,
            };
            expression.reads = expression
                .read_references()
                .map(|refs| refs.variables.into());
            Ok(expression)
        }
        Err(errors) => {
            let messages: Vec<String> = errors
                .errors
                .iter()
                .map(|e| {
                    // The crate's own Display adds a multi-line caret snippet; keep one line.
                    let msg = e.msg.split_whitespace().collect::<Vec<_>>().join(" ");
                    format!("{}:{}: {msg}", e.pos.0, e.pos.1)
                })
                .collect();
            if messages.is_empty() {
                Err("syntax error".to_owned())
            } else {
                Err(messages.join("; "))
            }
        }
    }
}

impl Expression {
    /// The text the expression was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression with `vars` as its top-level variables and converts the
    /// result to JSON.
    ///
    /// Evaluation errors (a missing key, a type mismatch, a result JSON cannot hold)
    /// and panics come back as a readable message.
    pub fn evaluate(&self, vars: &Map<String, Value>) -> Result<Value, String> {
        let value = self.run(vars)?;
        // Built only when the result holds a double: most results hold none.
        let mut exact: Option<HashMap<u64, Option<Number>>> = None;
        let mut restore = |f: f64| {
            exact
                .get_or_insert_with(|| exact_numbers(vars))
                .get(&f.to_bits())
                .cloned()
                .flatten()
        };
        to_json(&value, &mut restore).map_err(|e| explain(e, &self.references(), vars))
    }

    /// Whether it reads the variable `name` (one of its free variables): the
    /// only variables a run converts. True when its tree cannot be read.
    pub fn reads(&self, name: &str) -> bool {
        self.reads
            .as_ref()
            .is_none_or(|reads| reads.iter().any(|read| read == name))
    }

    /// The variables and steps the expression refers to.
    pub fn references(&self) -> References {
        self.read_references().unwrap_or_default()
    }

    /// What it refers to, or None if its tree cannot be read.
    fn read_references(&self) -> Option<References> {
        let mut refs = References::default();
        // The tree is as shallow as `compile` allows (MAX_COMPLEXITY), so recursing is safe.
        guarded("reading", || {
            walk(self.program.expression(), &mut Vec::new(), &mut refs);
        })
        .ok()?;
        Some(refs)
    }

    /// Evaluates a condition: the result must be a CEL `bool`.
    pub fn evaluate_bool(&self, vars: &Map<String, Value>) -> Result<bool, String> {
        match self.run(vars)? {
            CelValue::Bool(b) => Ok(b),
            other => Err(explain(
                format!("condition must be a boolean, got {}", other.type_of()),
                &self.references(),
                vars,
            )),
        }
    }

    /// Evaluates to a raw CEL value in a fresh child scope of this thread's root context.
    fn run(&self, vars: &Map<String, Value>) -> Result<CelValue, String> {
        let outcome = guarded("evaluating", || {
            with_root(|_, root| {
                let mut scope = root.new_inner_scope();
                for (name, value) in vars.iter().filter(|(name, _)| self.reads(name)) {
                    #[cfg(test)]
                    CONVERTED.with(|converted| converted.set(converted.get() + 1));
                    let val: Box<dyn Val> = Box::<dyn Val>::try_from(json_to_cel(value))
                        .map_err(|e| format!("variable {name}: {e}"))?;
                    scope.add_variable_as_val(name.as_str(), val);
                }
                cel_budget::start();
                CelValue::resolve(&self.metered, &scope).map_err(|e| e.to_string())
            })
        })?;
        outcome.map_err(|e| explain(e, &self.references(), vars))
    }
}

/// What an expression refers to, found in its syntax tree: what validation checks against
/// the expression's context and what a run-time error is explained with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Free variables (not bound by a macro such as `exists` or `map`), in order of first use.
    pub variables: Vec<String>,
    /// Steps named as `steps.<id>` or `steps['<id>']`, in order of first use; a presence
    /// test (`has(steps.x)`) is not a use.
    pub steps: Vec<String>,
    /// The steps whose `result` is read (`steps.<id>.result`).
    pub results: Vec<String>,
}

impl References {
    fn note(list: &mut Vec<String>, name: &str) {
        if !list.iter().any(|n| n == name) {
            list.push(name.to_owned());
        }
    }
}

/// Walks the tree; `bound` holds the variables of the macros around the node.
fn walk<'e>(node: &'e IdedExpr, bound: &mut Vec<&'e str>, refs: &mut References) {
    let steps_ident = |e: &IdedExpr, bound: &[&str]| {
        matches!(&e.expr, Expr::Ident(name) if name == "steps") && !bound.contains(&"steps")
    };
    match &node.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            // Macro accumulators are named `@...`; the user cannot spell them.
            if !name.starts_with('@') && !bound.contains(&name.as_str()) {
                References::note(&mut refs.variables, name);
            }
        }
        Expr::Select(select) => {
            if steps_ident(&select.operand, bound) {
                References::note(&mut refs.variables, "steps");
                if !select.test {
                    References::note(&mut refs.steps, &select.field);
                }
                return;
            }
            if select.field == "result" && !select.test {
                if let Expr::Select(inner) = &select.operand.expr {
                    if !inner.test && steps_ident(&inner.operand, bound) {
                        References::note(&mut refs.results, &inner.field);
                    }
                }
            }
            walk(&select.operand, bound, refs);
        }
        Expr::Call(call) => {
            if call.func_name == operators::INDEX && call.args.len() == 2 {
                if let (true, Expr::Literal(LiteralValue::String(id))) =
                    (steps_ident(&call.args[0], bound), &call.args[1].expr)
                {
                    References::note(&mut refs.variables, "steps");
                    References::note(&mut refs.steps, id.inner());
                    return;
                }
            }
            if let Some(target) = &call.target {
                walk(target, bound, refs);
            }
            for arg in &call.args {
                walk(arg, bound, refs);
            }
        }
        Expr::Comprehension(comp) => {
            walk(&comp.iter_range, bound, refs);
            walk(&comp.accu_init, bound, refs);
            let depth = bound.len();
            bound.push(&comp.iter_var);
            if let Some(second) = &comp.iter_var2 {
                bound.push(second);
            }
            bound.push(&comp.accu_var);
            walk(&comp.loop_cond, bound, refs);
            walk(&comp.loop_step, bound, refs);
            walk(&comp.result, bound, refs);
            bound.truncate(depth);
        }
        Expr::List(list) => {
            for element in &list.elements {
                walk(element, bound, refs);
            }
        }
        Expr::Map(map) => entries(map.entries.iter().map(|e| &e.expr), bound, refs),
        Expr::Struct(object) => entries(object.entries.iter().map(|e| &e.expr), bound, refs),
    }
}

fn entries<'e>(
    list: impl Iterator<Item = &'e EntryExpr>,
    bound: &mut Vec<&'e str>,
    refs: &mut References,
) {
    for entry in list {
        match entry {
            EntryExpr::StructField(field) => walk(&field.value, bound, refs),
            EntryExpr::MapEntry(pair) => {
                walk(&pair.key, bound, refs);
                walk(&pair.value, bound, refs);
            }
        }
    }
}

/// Rewrites an evaluation error caused by reading the result of a step that was skipped
/// (its result is null) so that it names that step; other errors are left as they are.
fn explain(error: String, refs: &References, vars: &Map<String, Value>) -> String {
    let Some(Value::Object(steps)) = vars.get("steps") else {
        return error;
    };
    let skipped: Vec<&str> = refs
        .results
        .iter()
        .filter(|id| {
            steps
                .get(id.as_str())
                .and_then(|s| s.get("status"))
                .and_then(Value::as_str)
                == Some("skipped")
        })
        .map(String::as_str)
        .collect();
    match skipped.as_slice() {
        [] => error,
        [one] => format!("steps.{one} was skipped: it has no result ({error})"),
        many => format!(
            "steps {} were skipped: they have no result ({error})",
            many.join(", ")
        ),
    }
}

/// Converts JSON to a CEL value: objects become maps with string keys, integers `int`
/// (or `uint` when only `u64` holds them), other numbers `double` (the nearest one:
/// JSON numbers keep all their digits, CEL has no decimal type; a number beyond
/// `f64`'s range is an infinite double).
pub fn json_to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(as_double(n))
            }
        }
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(fields) => {
            let map: HashMap<Key, CelValue> = fields
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), json_to_cel(v)))
                .collect();
            CelValue::Map(CelMap { map: Arc::new(map) })
        }
    }
}

/// The double nearest to a JSON number (infinite beyond `f64`'s range; a JSON
/// number's text always reads as an `f64`).
fn as_double(n: &Number) -> f64 {
    n.as_f64()
        .or_else(|| n.to_string().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The numbers in `vars` that CEL sees as doubles, by the bits of that double:
/// the JSON number to write back for it, `None` when numbers that differ in
/// their text (`1250.0`, `1250.00`) read as the same double.
fn exact_numbers(vars: &Map<String, Value>) -> HashMap<u64, Option<Number>> {
    let mut found = HashMap::new();
    let mut pending: Vec<&Value> = vars.values().collect();
    while let Some(value) = pending.pop() {
        match value {
            Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => {
                found
                    .entry(as_double(n).to_bits())
                    .and_modify(|known: &mut Option<Number>| {
                        if known.as_ref() != Some(n) {
                            *known = None;
                        }
                    })
                    .or_insert_with(|| Some(n.clone()));
            }
            Value::Array(items) => pending.extend(items),
            Value::Object(fields) => pending.extend(fields.values()),
            _ => {}
        }
    }
    found
}

/// Converts a CEL value back to JSON.
///
/// Maps become objects; their `int`, `uint` and `bool` keys are written as strings since
/// JSON keys are strings (two keys that collide that way are an error). Bytes become
/// base64 strings, timestamps and durations their CEL `string()` form. Non-finite
/// doubles and functions have no JSON form and are errors.
pub fn cel_to_json(value: &CelValue) -> Result<Value, String> {
    to_json(value, &mut |_| None)
}

/// [`cel_to_json`], writing a double as the JSON number `restore` gives for it, if
/// any. [`Expression::evaluate`] restores the variables' numbers: a double that is
/// what exactly one of them reads as is written as that number, so a number CEL
/// passed through unchanged comes back as written, and any double is written as
/// a number that reads back as that double.
fn to_json(
    value: &CelValue,
    restore: &mut impl FnMut(f64) -> Option<Number>,
) -> Result<Value, String> {
    match value {
        CelValue::Null => Ok(Value::Null),
        CelValue::Bool(b) => Ok(Value::Bool(*b)),
        CelValue::Int(i) => Ok(Value::from(*i)),
        CelValue::UInt(u) => Ok(Value::from(*u)),
        CelValue::Float(f) => restore(*f)
            .or_else(|| Number::from_f64(*f))
            .map(Value::Number)
            .ok_or_else(|| format!("the result {f} cannot be represented in JSON")),
        CelValue::String(s) => Ok(Value::String(s.to_string())),
        CelValue::List(items) => items
            .iter()
            .map(|item| to_json(item, restore))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        CelValue::Map(map) => {
            let mut object = Map::with_capacity(map.map.len());
            for (key, v) in map.map.iter() {
                let name = key.to_string();
                if object.contains_key(&name) {
                    return Err(format!(
                        "map key {name} appears both as a string and as another type; \
                         JSON object keys must be distinct strings"
                    ));
                }
                object.insert(name, to_json(v, restore)?);
            }
            Ok(Value::Object(object))
        }
        // The variants below depend on the `cel` crate's optional features, so they are
        // recognised by type rather than matched by name.
        other => match other.type_of() {
            ValueType::Timestamp | ValueType::Duration => stringify(other),
            ValueType::Bytes | ValueType::Opaque => other
                .json()
                .map_err(|e| format!("cannot convert the result to JSON: {e}")),
            kind => Err(format!("a {kind} value cannot be converted to JSON")),
        },
    }
}

/// The CEL `string()` conversion of a value, used for timestamps and durations.
fn stringify(value: &CelValue) -> Result<Value, String> {
    let converted = guarded("converting", || {
        with_root(|env, root| {
            let program = env.compile("string(v)").map_err(|e| e.to_string())?;
            let mut scope = root.new_inner_scope();
            let val: Box<dyn Val> =
                Box::<dyn Val>::try_from(value.clone()).map_err(|e| e.to_string())?;
            scope.add_variable_as_val("v", val);
            program.execute(&scope).map_err(|e| e.to_string())
        })
    })??;
    match converted {
        CelValue::String(s) => Ok(Value::String(s.to_string())),
        other => Err(format!(
            "a {} value cannot be converted to JSON",
            other.type_of()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test vars must be an object, got {other}"),
        }
    }

    #[test]
    fn an_expression_is_parsed_once_per_thread_and_evaluates_the_same() {
        let first = compile("input.a + 1").unwrap();
        let again = compile("input.a + 1").unwrap();
        assert!(Arc::ptr_eq(&first.program, &again.program));
        let vars = vars(json!({"input": {"a": 41}}));
        assert_eq!(again.evaluate(&vars).unwrap(), json!(42));
        // A bad expression is refused every time, never kept.
        assert!(compile("input.a +").is_err());
        assert!(compile("input.a +").is_err());
    }

    #[test]
    fn the_compiled_expressions_stay_within_their_budget() {
        let mut compiled = Compiled::default();
        let filler = format!("'{}'", "x".repeat(Compiled::BUDGET / 2));
        for source in [filler.clone(), format!("{filler} + 'y'"), "1".to_owned()] {
            compiled.keep(&compile_anew(&source).unwrap());
            assert!(compiled.source_bytes <= Compiled::BUDGET);
        }
        // The second filler did not fit beside the first: the cache started afresh.
        assert!(compiled.get(&filler).is_none());
        assert!(compiled.get("1").is_some());
        // One source over the whole budget is compiled, not kept.
        let huge = format!("'{}'", "x".repeat(Compiled::BUDGET));
        compiled.keep(&compile_anew(&huge).unwrap());
        assert!(compiled.get(&huge).is_none());
    }

    #[test]
    fn ternary_over_nested_input() {
        let expr = compile("input.rows[0].priority > 3 ? 'high' : 'low'").unwrap();
        let high = vars(json!({"input": {"rows": [{"priority": 5}]}}));
        let low = vars(json!({"input": {"rows": [{"priority": 1}]}}));
        assert_eq!(expr.evaluate(&high), Ok(json!("high")));
        assert_eq!(expr.evaluate(&low), Ok(json!("low")));
    }

    #[test]
    fn map_literal_round_trips_to_an_object() {
        let expr =
            compile("{'severity': input.rows[0].priority > 3 ? 'high' : 'low', 'n': 1}").unwrap();
        let input = vars(json!({"input": {"rows": [{"priority": 4}]}}));
        assert_eq!(
            expr.evaluate(&input),
            Ok(json!({"severity": "high", "n": 1}))
        );
    }

    #[test]
    fn json_values_round_trip() {
        let value = json!({
            "s": "x", "i": -3, "big": u64::MAX, "f": 1.5, "b": true, "n": null,
            "list": [1, "two", [3]], "nested": {"k": {"deep": []}}
        });
        let expr = compile("v").unwrap();
        assert_eq!(
            expr.evaluate(&vars(json!({ "v": value.clone() }))),
            Ok(value)
        );
    }

    #[test]
    fn integers_are_ints_and_huge_ones_uints() {
        let expr = compile("type(small) == int && type(big) == uint").unwrap();
        let v = vars(json!({"small": 7, "big": u64::MAX}));
        assert_eq!(expr.evaluate_bool(&v), Ok(true));
        // Arithmetic with ints works because JSON integers are CEL ints.
        let sum = compile("small + 1").unwrap();
        assert_eq!(sum.evaluate(&v), Ok(json!(8)));
    }

    #[test]
    fn numbers_passed_through_stay_exact() {
        let long = format!("-{}.5", "9".repeat(10_000));
        let input: Value = serde_json::from_str(&format!(
            r#"{{"big": 12345678901234567.89, "price": 1250.00, "huge": 1e400, "tiny": -1e-400,
                "long": {long}, "count": 3}}"#
        ))
        .unwrap();
        let v = vars(json!({ "input": input }));
        let text = |v: &Map<String, Value>, expr: &str| {
            compile(expr).unwrap().evaluate(v).map(|r| r.to_string())
        };
        assert_eq!(
            text(&v, "[input.big, input.price, input.count]"),
            Ok("[12345678901234567.89,1250.00,3]".to_owned())
        );
        assert_eq!(
            text(&v, "{'p': input.price, 'h': input.huge, 't': input.tiny}"),
            Ok(r#"{"h":1e+400,"p":1250.00,"t":-1e-400}"#.to_owned())
        );
        assert_eq!(text(&v, "input.long"), Ok(long.clone()));
        assert_eq!(text(&v, "input"), Ok(input.to_string()));
        // CEL computes with doubles.
        assert_eq!(text(&v, "input.price * 2.0"), Ok("2500.0".to_owned()));
        assert_eq!(
            text(&v, "input.big > 1e16 && type(input.price) == double"),
            Ok("true".to_owned())
        );
        assert_eq!(text(&v, "type(input.count) == int"), Ok("true".to_owned()));
        // A double that is no variable's number and has no JSON form is an error.
        let err = text(&v, "input.huge * 0.0").unwrap_err();
        assert!(err.contains("cannot be represented"), "{err}");
        // Numbers that read as one double: neither is picked.
        let same: Value = serde_json::from_str(r#"[0.10, 0.1, 1e400, 2e400]"#).unwrap();
        let v = vars(json!({ "same": same }));
        assert_eq!(text(&v, "same[0]"), Ok("0.1".to_owned()));
        assert!(text(&v, "same[2]").is_err());
    }

    #[test]
    fn has_tests_for_a_key() {
        let expr = compile("has(result.score)").unwrap();
        assert_eq!(
            expr.evaluate_bool(&vars(json!({"result": {"score": 1}}))),
            Ok(true)
        );
        assert_eq!(expr.evaluate_bool(&vars(json!({"result": {}}))), Ok(false));
    }

    #[test]
    fn missing_key_is_an_error() {
        let expr = compile("result.score > 3").unwrap();
        let err = expr.evaluate(&vars(json!({"result": {}}))).unwrap_err();
        assert!(err.contains("No such key: score"), "{err}");
    }

    #[test]
    fn undeclared_variable_is_an_error() {
        let expr = compile("nothing == 1").unwrap();
        let err = expr.evaluate(&Map::new()).unwrap_err();
        assert!(err.contains("nothing"), "{err}");
    }

    #[test]
    fn syntax_error_is_a_one_line_compile_error() {
        let err = compile("result.score >").unwrap_err();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.starts_with("1:"), "{err}");
        let err = compile("(((").unwrap_err();
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn empty_expression_is_a_compile_error() {
        assert_eq!(compile("  ").unwrap_err(), "empty expression");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        for deep in [
            format!("{}1{}", "(".repeat(5000), ")".repeat(5000)),
            format!("1{}", " + 1".repeat(100_000)),
            format!("a{}", ".b".repeat(100_000)),
            format!("{}1", "true ? 1 : ".repeat(1000)),
            "[".repeat(100_000),
        ] {
            let err = compile(&deep).unwrap_err();
            assert!(err.contains("too complex"), "{err}");
        }
    }

    #[test]
    fn complexity_of_ordinary_expressions_is_small() {
        for (expr, max) in [
            ("true", 0),
            ("result.severity == 'high'", 3),
            (
                "{'severity': input.rows[0].priority > 3 ? 'high' : 'low'}",
                16,
            ),
            ("{'closed': steps.close.status == 'succeeded'}", 10),
            ("a && b && c && d && e && f && g && h", 0),
            ("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]", 5),
        ] {
            let cost = complexity(expr);
            assert!(cost <= max, "{expr}: {cost} > {max}");
        }
    }

    #[test]
    fn complexity_ignores_literals_and_comments() {
        assert_eq!(complexity("'((((+++'"), 0);
        assert_eq!(complexity(r#""a\"(((""#), 0);
        assert_eq!(complexity("'''(('(('''"), 0);
        assert_eq!(complexity(r"r'\'"), 0);
        assert_eq!(complexity("b'(((('"), 0);
        assert_eq!(complexity("`a.b-c`"), 0);
        assert_eq!(complexity("1.5e3"), 0);
        assert_eq!(complexity("1 // ((((((\n"), 0);
        assert_eq!(complexity("a.b"), 1);
        assert_eq!(complexity("a == b"), 1);
        assert_eq!(complexity("x in [1]"), 2 + LEVEL_COST);
    }

    #[test]
    fn optional_syntax_does_not_hide_a_chain() {
        let chain = format!("x{}", ".?a.size()".repeat(40));
        assert!(complexity(&chain) > MAX_COMPLEXITY);
    }

    /// For each shape of deep expression, the deepest one accepted compiles and evaluates
    /// on this test thread (2 MiB of stack, debug build) without overflowing, and the next
    /// one is refused.
    #[test]
    fn the_deepest_accepted_expressions_do_not_overflow_the_stack() {
        type Shape = fn(usize) -> String;
        let shapes: &[(&str, Shape)] = &[
            ("paren", |n| format!("{}1{}", "(".repeat(n), ")".repeat(n))),
            ("list", |n| format!("{}1{}", "[".repeat(n), "]".repeat(n))),
            ("map", |n| {
                format!("{}1{}", "{'a': ".repeat(n), "}".repeat(n))
            }),
            ("call", |n| {
                format!("{}'a'{}", "string(".repeat(n), ")".repeat(n))
            }),
            ("map macro", |n| {
                format!("{}[1]{}", "[1].map(x, ".repeat(n), ")".repeat(n))
            }),
            ("plus", |n| format!("1{}", " + 1".repeat(n))),
            ("compare", |n| format!("1{}", " == 1".repeat(n))),
            ("index", |n| format!("deep{}", "[0]".repeat(n))),
            ("member", |n| format!("obj{}", ".a".repeat(n))),
            ("method", |n| format!("'a'{}", ".size()".repeat(n))),
            ("ternary", |n| format!("{}1", "true ? 1 : ".repeat(n))),
            ("paren chain", |n| {
                format!("{}1{}", "(1 + 1 + 1 + ".repeat(n), ")".repeat(n))
            }),
            ("ternary in parens", |n| {
                format!("{}1{}", "(true ? 1 : ".repeat(n), ")".repeat(n))
            }),
            ("and of chains", |n| {
                format!("1{} == 1 && 1{} == 1", " + 1".repeat(n), " + 1".repeat(n))
            }),
        ];
        let mut deep = json!(1);
        let mut obj = json!(1);
        for _ in 0..100 {
            deep = json!([deep]);
            obj = json!({ "a": obj });
        }
        let vars = vars(json!({"deep": deep, "obj": obj}));
        for (name, shape) in shapes {
            let mut n = 1;
            while complexity(&shape(n + 1)) <= MAX_COMPLEXITY {
                n += 1;
            }
            let accepted = shape(n);
            let expr = compile(&accepted)
                .unwrap_or_else(|e| panic!("{name} at depth {n} should compile: {e}"));
            // Only the absence of a crash matters; some shapes are type errors.
            let _ = expr.evaluate(&vars);
            let err = compile(&shape(n + 1)).unwrap_err();
            assert!(err.contains("too complex"), "{name}: {err}");
        }
    }

    #[test]
    fn condition_must_be_boolean() {
        let expr = compile("1 + 1").unwrap();
        assert_eq!(
            expr.evaluate_bool(&Map::new()),
            Err("condition must be a boolean, got int".to_owned())
        );
        let expr = compile("'yes'").unwrap();
        assert_eq!(
            expr.evaluate_bool(&Map::new()),
            Err("condition must be a boolean, got string".to_owned())
        );
    }

    #[test]
    fn bytes_become_base64() {
        let expr = compile("b'hi'").unwrap();
        assert_eq!(expr.evaluate(&Map::new()), Ok(json!("aGk=")));
    }

    #[test]
    fn non_string_map_keys_become_strings() {
        let expr = compile("{1: 'a', true: 'b'}").unwrap();
        assert_eq!(
            expr.evaluate(&Map::new()),
            Ok(json!({"1": "a", "true": "b"}))
        );
        let clash = compile("{1: 'a', '1': 'b'}").unwrap();
        assert!(clash.evaluate(&Map::new()).is_err());
    }

    #[test]
    fn non_finite_double_is_an_error() {
        let expr = compile("1.0 / 0.0").unwrap();
        let err = expr.evaluate(&Map::new()).unwrap_err();
        assert!(err.contains("cannot be represented in JSON"), "{err}");
    }

    #[test]
    fn division_by_zero_is_an_error() {
        let expr = compile("1 / 0").unwrap();
        assert!(expr.evaluate(&Map::new()).is_err());
    }

    #[test]
    fn macros_and_string_functions_work() {
        let expr = compile("items.filter(x, x > 1).map(x, x * 10)").unwrap();
        assert_eq!(
            expr.evaluate(&vars(json!({"items": [1, 2, 3]}))),
            Ok(json!([20, 30]))
        );
        let expr = compile("name.startsWith('ab') && name.matches('^a.c$')").unwrap();
        assert_eq!(expr.evaluate_bool(&vars(json!({"name": "abc"}))), Ok(true));
    }

    #[test]
    fn expression_keeps_its_source_and_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Expression>();
        let expr = compile("a == 1").unwrap();
        assert_eq!(expr.source(), "a == 1");
        assert_eq!(expr.to_string(), "a == 1");
        let copy = expr.clone();
        assert_eq!(copy.evaluate_bool(&vars(json!({"a": 1}))), Ok(true));
    }

    #[test]
    fn evaluates_from_another_thread() {
        let expr = compile("a * 2").unwrap();
        let handle = std::thread::spawn(move || expr.evaluate(&vars(json!({"a": 21}))));
        assert_eq!(handle.join().unwrap(), Ok(json!(42)));
    }

    #[test]
    fn a_run_converts_only_the_variables_its_expression_reads() {
        let vars = json!({
            "goal": {"input": {"doc": "x".repeat(1000)}},
            "result": {"ok": true},
            "steps": {},
        });
        let vars = vars.as_object().unwrap();
        let converted = || CONVERTED.with(std::cell::Cell::get);
        let before = converted();
        assert_eq!(compile("result.ok").unwrap().evaluate_bool(vars), Ok(true));
        assert_eq!(converted() - before, 1, "only `result`");
        let before = converted();
        let expression = compile("[1, 2].exists(result, result == 2) && goal.input.doc != ''");
        assert_eq!(expression.unwrap().evaluate_bool(vars), Ok(true));
        assert_eq!(
            converted() - before,
            1,
            "a macro's own `result` reads no variable"
        );
    }
}
