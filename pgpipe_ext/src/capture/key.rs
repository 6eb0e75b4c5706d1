//! The ordering key of a captured row: its primary-key columns as a JSON object, made by
//! the same `to_jsonb` as the row (so `key` equals those fields of `row`).
//!
//! Which columns form the key is cached per relation for the backend's life and
//! forgotten on a relcache invalidation of that relation (ALTER TABLE ... PRIMARY KEY,
//! DROP, ...), as the queue writer caches its partition's indexes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;

/// The primary-key columns of a relation and a blessed record descriptor of just those
/// columns (name, type and typmod as in the table).
struct KeyShape {
    attnums: Vec<i32>,
    desc: pg_sys::TupleDesc,
}

/// A relation's cache entry.
struct Entry {
    /// None: the table has no primary key.
    shape: Option<KeyShape>,
    /// False once an invalidation may have changed the key.
    fresh: bool,
}

thread_local! {
    static SHAPES: RefCell<HashMap<pg_sys::Oid, Entry>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the shape of an invalidated relation stale (every shape on a global
/// invalidation). Its descriptor is not freed: a caller up the stack may be using it (an
/// invalidation can arrive while a key is converted); [`describe`] reuses it when the
/// key did not change, so only real key changes leave a descriptor behind.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SHAPES.with_borrow_mut(|shapes| {
        for (id, entry) in shapes.iter_mut() {
            if relid == pg_sys::InvalidOid || *id == relid {
                entry.fresh = false;
            }
        }
    });
}

/// The key shape of `rel`, read from the relcache; `previous` (the stale one) when equal.
///
/// # Safety
/// `rel` is an open relation, inside a transaction.
unsafe fn describe(rel: pg_sys::Relation, previous: Option<KeyShape>) -> Option<KeyShape> {
    // SAFETY: relcache reads of an open relation; the descriptor is made in
    // CacheMemoryContext, which outlives the cache entry (freed on invalidation).
    unsafe {
        let bitmap = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY,
        );
        let mut attnums = Vec::new();
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member(bitmap, member);
            if member < 0 {
                break;
            }
            attnums.push(member + pg_sys::FirstLowInvalidHeapAttributeNumber);
        }
        pg_sys::bms_free(bitmap);
        if attnums.is_empty() || attnums.iter().any(|&a| a <= 0) {
            return None;
        }
        let table_desc = (*rel).rd_att;
        let old_cxt = pg_sys::MemoryContextSwitchTo(pg_sys::CacheMemoryContext);
        let desc = pg_sys::CreateTemplateTupleDesc(attnums.len() as i32);
        for (i, &attnum) in attnums.iter().enumerate() {
            let att = &*(*table_desc).attrs.as_ptr().add(attnum as usize - 1);
            pg_sys::TupleDescInitEntry(
                desc,
                (i + 1) as pg_sys::AttrNumber,
                att.attname.data.as_ptr(),
                att.atttypid,
                att.atttypmod,
                att.attndims,
            );
        }
        pg_sys::MemoryContextSwitchTo(old_cxt);
        if let Some(old) =
            previous.filter(|old| old.attnums == attnums && pg_sys::equalTupleDescs(old.desc, desc))
        {
            pg_sys::FreeTupleDesc(desc);
            return Some(old);
        }
        Some(KeyShape {
            attnums,
            desc: pg_sys::BlessTupleDesc(desc),
        })
    }
}

/// The key of `tuple` (a row of `rel`) as jsonb, or None when `rel` has no primary key.
/// Runs the key columns' output functions (user code, as the writer) through `to_jsonb`.
///
/// # Safety
/// `rel` is open; `tuple` is one of its rows; `to_jsonb` is `to_jsonb(record)`; inside a
/// transaction.
pub unsafe fn key_jsonb(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    to_jsonb: *mut pg_sys::FmgrInfo,
) -> Option<pg_sys::Datum> {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: a static callback without argument, registered once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.set(true);
    }
    // SAFETY: rel is open.
    let relid = unsafe { (*rel).rd_id };
    let cached = SHAPES.with_borrow(|shapes| {
        shapes
            .get(&relid)
            .filter(|entry| entry.fresh)
            .map(|entry| entry.shape.as_ref().map(|s| (s.desc, s.attnums.clone())))
    });
    let (desc, attnums) = match cached {
        Some(found) => found?,
        None => {
            let previous = SHAPES
                .with_borrow_mut(|shapes| shapes.remove(&relid))
                .and_then(|entry| entry.shape);
            // SAFETY: see the function's contract.
            let shape = unsafe { describe(rel, previous) };
            let found = shape.as_ref().map(|s| (s.desc, s.attnums.clone()));
            SHAPES.with_borrow_mut(|shapes| shapes.insert(relid, Entry { shape, fresh: true }));
            found?
        }
    };
    let mut values = Vec::with_capacity(attnums.len());
    let mut nulls = Vec::with_capacity(attnums.len());
    // SAFETY: the attnums are columns of rel's descriptor; the key tuple is formed in the
    // trigger's memory context and flattened (no external TOAST pointers) into a
    // composite datum, as the row is.
    unsafe {
        let table_desc = (*rel).rd_att;
        for &attnum in &attnums {
            let mut isnull = false;
            values.push(pg_sys::heap_getattr(tuple, attnum, table_desc, &mut isnull));
            nulls.push(isnull);
        }
        let key = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let record = pg_sys::heap_copy_tuple_as_datum(key, desc);
        Some(pg_sys::FunctionCall1Coll(
            to_jsonb,
            pg_sys::InvalidOid,
            record,
        ))
    }
}
