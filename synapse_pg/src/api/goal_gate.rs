//! The gate in front of a goal's row, for those who must have the goal to
//! themselves (`cancel_goal`, `signal`, `retry_goal`) while the engine runs of
//! the goal share its row (`FOR KEY SHARE`).
//!
//! A row lock taken `FOR KEY SHARE` does not queue behind a waiting `FOR
//! UPDATE`: it conflicts only with the lockers holding the row, so engine runs
//! arriving one after another would keep a cancel waiting for as long as they
//! come. The gate is a heavyweight lock on the goal, which the lock manager
//! does queue: an engine run passes it shared (`_share_goals`) before it
//! locks its rows and holds it to its commit; whoever needs the goal alone
//! closes it (`_hold_goal`) before its `FOR UPDATE`. A run arriving after that
//! waits behind the closer; the runs already past it end first.
//!
//! The lock is Postgres's lock on an object, named by the `synapse.goals`
//! table and the goal's id: `pg_locks` shows it as an `object` lock whose
//! `classid` is `synapse.goals` and whose `objid` is the goal (its low 32 bits;
//! the next 16 are `objsubid`). No SQL function takes such a lock, so no user
//! of the database shares it by chance (as an advisory lock key would be).
use pgrx::prelude::*;

use crate::error::{Error, Result};

/// Lets the engine run of the calling transaction past the gates of
/// `goal_ids`, in id order, holding them shared until it ends.
#[pg_extern(name = "_share_goals", strict, volatile, parallel_unsafe)]
fn share_goals(goal_ids: Array<i64>) -> std::result::Result<(), pgrx::pg_sys::panic::ErrorReport> {
    let mut ids: Vec<i64> = goal_ids.iter().flatten().collect();
    ids.sort_unstable();
    ids.dedup();
    let goals = goals_table()?;
    for id in ids {
        acquire(goals, id, pg_sys::ShareLock);
    }
    Ok(())
}

/// Closes the gate of goal `goal_id` until the calling transaction ends:
/// engine runs still to come wait; those past it go on, and the caller's
/// `FOR UPDATE` of the goal's row waits for them.
#[pg_extern(name = "_hold_goal", strict, volatile, parallel_unsafe)]
fn hold_goal(goal_id: i64) -> std::result::Result<(), pgrx::pg_sys::panic::ErrorReport> {
    acquire(goals_table()?, goal_id, pg_sys::ExclusiveLock);
    Ok(())
}

/// The `synapse.goals` table's oid: the class the gates' locks name.
fn goals_table() -> Result<pg_sys::Oid> {
    // SAFETY: catalogue lookups by name, inside a transaction.
    let table = unsafe {
        let schema = pg_sys::get_namespace_oid(c"synapse".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(c"goals".as_ptr(), schema)
        }
    };
    if table == pg_sys::InvalidOid {
        return Err(Error::InvalidParameter(
            "the table synapse.goals does not exist".into(),
        ));
    }
    Ok(table)
}

/// Takes the gate lock of goal `id` in `mode`, held to the end of the
/// transaction (a wait for it can be cancelled, and times out with
/// `lock_timeout`, like any lock's).
fn acquire(goals: pg_sys::Oid, id: i64, mode: u32) {
    let bits = id as u64;
    let tag = pg_sys::LOCKTAG {
        // SAFETY: the backend's database, set once it connected.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: goals.to_u32(),
        locktag_field3: bits as u32,
        locktag_field4: (bits >> 32) as u16,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    // SAFETY: a lock on a tag built above, in a transaction; its wait and
    // its errors are Postgres's (pgrx turns an error into a Rust unwind).
    unsafe {
        pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, false);
    }
}
