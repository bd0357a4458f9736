//! Statements run again and again (by `submit_plan` for every goal, by the
//! forwarder at every wake-up), parsed, analysed and planned once per
//! process instead of once per call. Postgres re-plans a
//! kept plan by itself when a table it reads changes (a dropped and
//! re-created extension included).
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    static KEPT: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// `sql` with arguments of the types `args`, prepared on its first use in
/// this backend and kept.
pub fn prepared(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[PgOid],
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(kept) = KEPT.with(|kept| kept.borrow().get(sql).cloned()) {
        return Ok(kept);
    }
    let statement = Rc::new(client.prepare(sql, args)?.keep());
    KEPT.with(|kept| kept.borrow_mut().insert(sql.to_owned(), statement.clone()));
    Ok(statement)
}

/// The type of an argument.
pub fn oid(builtin: PgBuiltInOids) -> PgOid {
    PgOid::BuiltIn(builtin)
}
