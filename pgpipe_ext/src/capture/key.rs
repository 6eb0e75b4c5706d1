//! The ordering key of a captured row: its primary-key columns as a JSON object, made by
//! the same conversion as the row (so `key` equals those fields of `row`).

use pgrx::pg_sys;

use super::shape::{self, Shape};

/// The key of `tuple` (a row of `rel`) as jsonb: the columns of `key` (the primary key,
/// or those of a partition's subscribed table); None when a key column is not among the
/// `captured` columns (a left-out column never reaches the queue, not even through the
/// key). Runs the key columns' output functions (user code, as the writer) through
/// `to_jsonb`.
///
/// # Safety
/// `rel` is open; `tuple` is one of its rows; `key` was made for `rel`; `to_jsonb` is
/// `to_jsonb(record)`; inside a transaction.
pub unsafe fn key_jsonb(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    key: &Shape,
    captured: Option<&[i32]>,
    to_jsonb: *mut pg_sys::FmgrInfo,
) -> Option<pg_sys::Datum> {
    if captured.is_some_and(|columns| key.attnums.iter().any(|a| !columns.contains(a))) {
        return None;
    }
    // SAFETY: see the function's contract.
    unsafe {
        let record = shape::record(rel, tuple, key);
        Some(pg_sys::FunctionCall1Coll(
            to_jsonb,
            pg_sys::InvalidOid,
            record,
        ))
    }
}

/// The key as jsonb from the row's converted `fields` (in `row`'s column order); None
/// when a key column is not among them.
///
/// # Safety
/// The fields' names and values are valid; inside a transaction.
pub unsafe fn key_of_fields(
    key: &Shape,
    row: &Shape,
    fields: &[(&[u8], pg_sys::JsonbValue)],
) -> Option<pg_sys::Datum> {
    let mut object = crate::jsonb::Object::new();
    for attnum in key.attnums.iter() {
        let i = row.attnums.iter().position(|a| a == attnum)?;
        let (name, mut value) = fields[i];
        // SAFETY: see the contract.
        unsafe { object.push(name, &mut value) };
    }
    // SAFETY: see the contract.
    Some(unsafe { object.finish() })
}
