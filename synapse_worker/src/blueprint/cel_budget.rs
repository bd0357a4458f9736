//! Every CEL evaluation has a budget of work and memory (SPEC §4): the
//! comprehensions (`map`, `filter`, `all`, `exists`, `exists_one`) are the
//! only loops CEL has, and each of their iterations is metered. A compiled
//! expression has a call to a metering function wrapped around what each
//! iteration evaluates: the element `map` appends, the guard of `filter`,
//! the predicate of `all` and `exists`, else the whole step (keeping the
//! shapes the `cel` crate evaluates in place). An evaluation that goes over
//! its budget fails naming it; between iterations, a probe the host installs
//! (a Postgres backend: a pending cancel or `statement_timeout`) stops it too.
use std::cell::Cell;

use cel::common::ast::{operators, CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr};
use cel::Value as CelValue;

/// The metering function's name: no CEL source can call it (`@` starts no
/// identifier a user can write).
pub const METER: &str = "@meter";
/// Iterations of comprehensions in one evaluation.
pub const MAX_STEPS: u64 = 250_000;
/// Bytes the metered values weigh in one evaluation (strings, lists and maps
/// an iteration makes).
pub const MAX_BYTES: u64 = 64 << 20;
/// How the error of an evaluation over its budget starts.
pub const EXCEEDED: &str = "evaluation over its budget";
/// How the error of an evaluation stopped by the host's probe starts.
pub const INTERRUPTED: &str = "evaluation interrupted";

thread_local! {
    static SPENT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    static PROBE: Cell<Option<fn() -> bool>> = const { Cell::new(None) };
}

/// Lets `probe` stop evaluations on this thread between iterations: it
/// answers whether the host wants the work stopped.
pub fn set_interrupt_probe(probe: fn() -> bool) {
    PROBE.set(Some(probe));
}

/// Starts an evaluation's budget afresh.
pub(crate) fn start() {
    SPENT.set((0, 0));
}

/// Meters one iteration that made `value`.
pub(crate) fn spend(value: &CelValue) -> Result<(), String> {
    let (steps, bytes) = SPENT.get();
    let (steps, bytes) = (steps + 1, bytes.saturating_add(weigh(value)));
    SPENT.set((steps, bytes));
    if steps > MAX_STEPS {
        return Err(format!(
            "{EXCEEDED}: more than {MAX_STEPS} iterations of map, filter, all or exists"
        ));
    }
    if bytes > MAX_BYTES {
        return Err(format!(
            "{EXCEEDED}: its iterations made more than {} MiB",
            MAX_BYTES >> 20
        ));
    }
    if steps.is_multiple_of(1024) && PROBE.get().is_some_and(|probe| probe()) {
        return Err(INTERRUPTED.to_owned());
    }
    Ok(())
}

/// What a value an iteration made weighs, roughly and cheaply: its own
/// size, not its members' (they were metered when they were made, or came
/// from the variables).
fn weigh(value: &CelValue) -> u64 {
    let size = match value {
        CelValue::String(text) => text.len(),
        CelValue::Bytes(bytes) => bytes.len(),
        CelValue::List(list) => list.len() * 16,
        CelValue::Map(map) => map.map.len() * 32,
        _ => 0,
    };
    8 + size as u64
}

/// `expr` with every comprehension metered.
pub(crate) fn metered(mut expr: IdedExpr) -> IdedExpr {
    let mut next_id = max_id(&expr) + 1;
    meter(&mut expr, &mut next_id);
    expr
}

fn max_id(expr: &IdedExpr) -> u64 {
    let mut max = expr.id;
    children(expr, &mut |child| max = max.max(max_id(child)));
    max
}

/// Calls `f` on each direct sub-expression.
fn children<'e>(expr: &'e IdedExpr, f: &mut impl FnMut(&'e IdedExpr)) {
    match &expr.expr {
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                f(target);
            }
            call.args.iter().for_each(f);
        }
        Expr::List(list) => list.elements.iter().for_each(f),
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        f(&entry.key);
                        f(&entry.value);
                    }
                    EntryExpr::StructField(field) => f(&field.value),
                }
            }
        }
        Expr::Struct(strct) => {
            for entry in &strct.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        f(&entry.key);
                        f(&entry.value);
                    }
                    EntryExpr::StructField(field) => f(&field.value),
                }
            }
        }
        Expr::Select(select) => f(&select.operand),
        Expr::Comprehension(comprehension) => {
            f(&comprehension.iter_range);
            f(&comprehension.accu_init);
            f(&comprehension.loop_cond);
            f(&comprehension.loop_step);
            f(&comprehension.result);
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn meter(expr: &mut IdedExpr, next_id: &mut u64) {
    match &mut expr.expr {
        Expr::Call(call) => {
            if let Some(target) = &mut call.target {
                meter(target, next_id);
            }
            for arg in &mut call.args {
                meter(arg, next_id);
            }
        }
        Expr::List(list) => {
            for element in &mut list.elements {
                meter(element, next_id);
            }
        }
        Expr::Map(map) => {
            for entry in &mut map.entries {
                match &mut entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        meter(&mut entry.key, next_id);
                        meter(&mut entry.value, next_id);
                    }
                    EntryExpr::StructField(field) => meter(&mut field.value, next_id),
                }
            }
        }
        Expr::Struct(strct) => {
            for entry in &mut strct.entries {
                match &mut entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        meter(&mut entry.key, next_id);
                        meter(&mut entry.value, next_id);
                    }
                    EntryExpr::StructField(field) => meter(&mut field.value, next_id),
                }
            }
        }
        Expr::Select(select) => meter(&mut select.operand, next_id),
        Expr::Comprehension(comprehension) => {
            meter(&mut comprehension.iter_range, next_id);
            meter(&mut comprehension.accu_init, next_id);
            meter(&mut comprehension.loop_cond, next_id);
            meter(&mut comprehension.loop_step, next_id);
            meter(&mut comprehension.result, next_id);
            meter_iterations(comprehension, next_id);
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Wraps what each iteration of `comprehension` evaluates, keeping the
/// shapes the `cel` crate recognises: `@result + [e]` (map) and its guarded
/// form `g ? @result + [e] : @result` (filter, and map with a filter), and
/// `@result && p` / `@result || p` (all, exists, whose errors it defers).
fn meter_iterations(comprehension: &mut ComprehensionExpr, next_id: &mut u64) {
    let accu = comprehension.accu_var.clone();
    let step = &mut comprehension.loop_step;
    if meter_append(step, &accu, next_id) {
        return;
    }
    if let Expr::Call(call) = &mut step.expr {
        let on_accu =
            call.target.is_none() && call.args.first().is_some_and(|arg| is_ident(arg, &accu));
        match call.func_name.as_str() {
            operators::CONDITIONAL if call.target.is_none() && call.args.len() == 3 => {
                let [guard, then, _] = call.args.as_mut_slice() else {
                    unreachable!("three arguments")
                };
                wrap(guard, next_id);
                meter_append(then, &accu, next_id);
                return;
            }
            operators::LOGICAL_AND | operators::LOGICAL_OR if on_accu && call.args.len() == 2 => {
                wrap(&mut call.args[1], next_id);
                return;
            }
            _ => {}
        }
    }
    wrap(step, next_id);
}

/// Meters the elements `@result + [e…]` appends; whether `step` is that.
fn meter_append(step: &mut IdedExpr, accu: &str, next_id: &mut u64) -> bool {
    let Expr::Call(call) = &mut step.expr else {
        return false;
    };
    if call.func_name != operators::ADD || call.target.is_some() {
        return false;
    }
    let [left, right] = call.args.as_mut_slice() else {
        return false;
    };
    let Expr::List(list) = &mut right.expr else {
        return false;
    };
    if !is_ident(left, accu) {
        return false;
    }
    for element in &mut list.elements {
        wrap(element, next_id);
    }
    true
}

fn is_ident(expr: &IdedExpr, name: &str) -> bool {
    matches!(&expr.expr, Expr::Ident(ident) if ident == name)
}

/// `e` becomes `@meter(e)`.
fn wrap(expr: &mut IdedExpr, next_id: &mut u64) {
    let inner = std::mem::replace(
        expr,
        IdedExpr {
            id: *next_id,
            expr: Expr::Unspecified,
        },
    );
    *next_id += 1;
    expr.expr = Expr::Call(CallExpr {
        func_name: METER.to_owned(),
        target: None,
        args: vec![inner],
    });
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::blueprint::cel::compile;

    fn evaluate(source: &str, input: Value) -> Result<Value, String> {
        let mut vars = Map::new();
        vars.insert("input".into(), input);
        compile(source).and_then(|expression| expression.evaluate(&vars))
    }

    /// `[0, 1, …, n-1]` as CEL.
    fn range(n: usize) -> String {
        let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        format!("[{}]", items.join(", "))
    }

    #[test]
    fn comprehensions_work_as_before() {
        assert_eq!(
            evaluate("[1, 2, 3].map(x, x * 2)", json!({})),
            Ok(json!([2, 4, 6]))
        );
        assert_eq!(
            evaluate("[1, 2, 3].filter(x, x > 1)", json!({})),
            Ok(json!([2, 3]))
        );
        assert_eq!(
            evaluate("[1, 2, 3].map(x, x > 1, x * 10)", json!({})),
            Ok(json!([20, 30]))
        );
        assert_eq!(
            evaluate("[1, 2, 3].all(x, x > 0)", json!({})),
            Ok(json!(true))
        );
        assert_eq!(
            evaluate("[1, 2, 3].exists(x, x == 2)", json!({})),
            Ok(json!(true))
        );
        assert_eq!(
            evaluate("[1, 2, 3].exists_one(x, x > 2)", json!({})),
            Ok(json!(true))
        );
        assert_eq!(
            evaluate("{'a': 1, 'b': 2}.all(k, k != 'c')", json!({})),
            Ok(json!(true))
        );
        // An error beside a deciding element is absorbed, as CEL says.
        assert_eq!(
            evaluate(
                "input.xs.exists(x, x.v == 1)",
                json!({"xs": [{"w": 0}, {"v": 1}]})
            ),
            Ok(json!(true))
        );
    }

    #[test]
    fn nested_loops_stop_at_the_step_budget() {
        let hundred = range(100);
        let bomb = format!(
            "{hundred}.map(a, {hundred}.map(b, {hundred}.map(c, {hundred}.exists(d, false))))"
        );
        let started = std::time::Instant::now();
        let error = evaluate(&bomb, json!({})).unwrap_err();
        assert!(
            error.contains(EXCEEDED) && error.contains("iterations"),
            "{error}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // A filter that keeps nothing still pays for each look.
        let thousand = range(1000);
        let quiet = format!("{thousand}.all(a, {thousand}.filter(b, false).size() == 0)");
        let error = evaluate(&quiet, json!({})).unwrap_err();
        assert!(error.contains(EXCEEDED), "{error}");
        // Within the budget, the same shapes run.
        let fine = format!("{hundred}.all(a, {hundred}.filter(b, b > a).size() < 100)");
        assert_eq!(evaluate(&fine, json!({})), Ok(json!(true)));
    }

    #[test]
    fn growing_values_stop_at_the_memory_budget() {
        let big = "x".repeat(100_000);
        let error = evaluate(
            &format!("{}.map(i, input.big + input.big)", range(1000)),
            json!({"big": big}),
        )
        .unwrap_err();
        assert!(error.contains(EXCEEDED) && error.contains("MiB"), "{error}");
    }

    #[test]
    fn the_hosts_probe_stops_a_long_evaluation() {
        fn always() -> bool {
            true
        }
        // A thread of its own: the probe is per thread.
        let error = std::thread::spawn(|| {
            set_interrupt_probe(always);
            evaluate(&format!("{}.all(a, a >= 0)", range(5000)), json!({})).unwrap_err()
        })
        .join()
        .unwrap();
        assert!(error.contains(INTERRUPTED), "{error}");
    }
}
