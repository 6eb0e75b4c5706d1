//! The ordering key of a captured row: its primary-key columns as a JSON object, made by
//! the same `to_jsonb` as the row (so `key` equals those fields of `row`).

use pgrx::pg_sys;

use super::shape::{self, Columns};

/// The key of `tuple` (a row of `rel`) as jsonb: the `key` columns (the primary key, or
/// those of a partition's subscribed table); None when there is no primary key, or
/// when a key column is not among the `captured` columns (a left-out column never
/// reaches the queue, not even through the key). Runs the key columns' output functions
/// (user code, as the writer) through `to_jsonb`.
///
/// # Safety
/// `rel` is open; `tuple` is one of its rows; `to_jsonb` is `to_jsonb(record)`; inside a
/// transaction.
pub unsafe fn key_jsonb(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    key: Columns<'_>,
    captured: Option<&[i32]>,
    to_jsonb: *mut pg_sys::FmgrInfo,
) -> Option<pg_sys::Datum> {
    // SAFETY: see the function's contract.
    unsafe {
        let key = shape::shape(rel, key)?;
        if captured.is_some_and(|columns| key.attnums.iter().any(|a| !columns.contains(a))) {
            return None;
        }
        let record = shape::record(rel, tuple, &key);
        Some(pg_sys::FunctionCall1Coll(
            to_jsonb,
            pg_sys::InvalidOid,
            record,
        ))
    }
}
