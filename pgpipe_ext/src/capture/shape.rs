//! Records of some of a table's columns: the row's primary key (the event's `key`), the
//! captured columns of a subscription with a column choice, or all of them. Each is a
//! blessed record descriptor of those columns (name, type and typmod as in the table), so
//! `to_jsonb` converts them exactly as it converts the whole row, and, when every column
//! has one, the [`Conversion`] of each (see [`super::json`]).
//!
//! Descriptors are cached per relation and purpose for the backend's life and checked
//! again after a relcache invalidation of the relation (ALTER TABLE, a new trigger, ...).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;

use super::json::{self, Conversion};

/// Which columns a shape holds.
#[derive(Clone, Copy)]
pub enum Columns<'a> {
    /// The primary-key columns (the event's key).
    PrimaryKey,
    /// These columns (a subscription's choice), by attribute number.
    These(&'a [i32]),
    /// These columns as the key: a partition's columns of its subscribed table's primary
    /// key (see [`super::origin`]).
    Key(&'a [i32]),
    /// Every column (a subscription of the whole row).
    All,
}

impl Columns<'_> {
    fn purpose(self) -> u8 {
        match self {
            Columns::PrimaryKey => 0,
            Columns::These(_) => 1,
            Columns::Key(_) => 2,
            Columns::All => 3,
        }
    }
}

/// Columns (1-based attribute numbers) and the record descriptor of just those.
#[derive(Clone)]
pub struct Shape {
    pub attnums: Rc<[i32]>,
    pub desc: pg_sys::TupleDesc,
    /// Each column's conversion to JSON, in `attnums` order; None when a column has
    /// none (`to_jsonb` converts such rows).
    pub json: Option<Rc<[Conversion]>>,
}

/// A relation's cache entry for one kind of [`Columns`].
struct Entry {
    /// The attribute numbers asked for (`Columns::These`).
    requested: Vec<i32>,
    /// None: no such columns (a table without a primary key).
    shape: Option<Shape>,
    /// False once an invalidation may have changed the relation.
    fresh: bool,
}

thread_local! {
    static SHAPES: RefCell<HashMap<(pg_sys::Oid, u8), Entry>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the shapes of an invalidated relation stale (all of them on a global
/// invalidation). Descriptors are never freed: a caller up the stack may be using one (an
/// invalidation can arrive while a record is converted); [`shape`] reuses an equal one,
/// so only real changes of a table leave a descriptor behind.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SHAPES.with_borrow_mut(|shapes| {
        for ((id, _), entry) in shapes.iter_mut() {
            if relid == pg_sys::InvalidOid || *id == relid {
                entry.fresh = false;
            }
        }
    });
}

/// The shape of `columns` of `rel` (None: a table without a primary key), from the
/// cache while no invalidation of `rel` came in between.
///
/// # Safety
/// `rel` is an open relation, inside a transaction.
pub unsafe fn shape(rel: pg_sys::Relation, columns: Columns<'_>) -> Option<Shape> {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: a static callback without argument, registered once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.set(true);
    }
    // SAFETY: rel is open.
    let relid = unsafe { (*rel).rd_id };
    let cache_key = (relid, columns.purpose());
    let requested: &[i32] = match columns {
        Columns::PrimaryKey | Columns::All => &[],
        Columns::These(these) | Columns::Key(these) => these,
    };
    let cached = SHAPES.with_borrow(|shapes| {
        shapes
            .get(&cache_key)
            .filter(|entry| entry.fresh && entry.requested == requested)
            .map(|entry| entry.shape.clone())
    });
    if let Some(found) = cached {
        return found;
    }
    let attnums = match columns {
        // SAFETY: rel is open.
        Columns::PrimaryKey => unsafe { primary_key(rel) },
        // SAFETY: rel is open.
        Columns::All => Some((1..=unsafe { (*(*rel).rd_att).natts }).collect()),
        Columns::These(these) | Columns::Key(these) => Some(these.to_vec()),
    };
    let previous = SHAPES
        .with_borrow_mut(|shapes| shapes.remove(&cache_key))
        .and_then(|entry| entry.shape);
    // SAFETY: see the function's contract.
    let shape = attnums.map(|attnums| unsafe { describe(rel, attnums, previous) });
    SHAPES.with_borrow_mut(|shapes| {
        shapes.insert(
            cache_key,
            Entry {
                requested: requested.to_vec(),
                shape: shape.clone(),
                fresh: true,
            },
        )
    });
    shape
}

/// The primary-key attribute numbers of `rel` (None without a primary key).
///
/// # Safety
/// `rel` is an open relation, inside a transaction.
unsafe fn primary_key(rel: pg_sys::Relation) -> Option<Vec<i32>> {
    // SAFETY: relcache reads of an open relation.
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
        (!attnums.is_empty()).then_some(attnums)
    }
}

/// A descriptor of `attnums` (dropped and system columns left out: possibly none);
/// `previous` when equal.
///
/// # Safety
/// `rel` is an open relation, inside a transaction.
unsafe fn describe(rel: pg_sys::Relation, attnums: Vec<i32>, previous: Option<Shape>) -> Shape {
    // SAFETY: reads of the open relation's descriptor; the new descriptor is made in
    // CacheMemoryContext (it lives as long as the backend, see relcache_callback).
    unsafe {
        let table_desc = (*rel).rd_att;
        let natts = (*table_desc).natts;
        let live = |attnum: i32| {
            attnum > 0
                && attnum <= natts
                && !(*(*table_desc).attrs.as_ptr().add(attnum as usize - 1)).attisdropped
        };
        let attnums: Vec<i32> = attnums.into_iter().filter(|&a| live(a)).collect();
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
        if let Some(old) = previous
            .filter(|old| *old.attnums == *attnums && pg_sys::equalTupleDescs(old.desc, desc))
        {
            pg_sys::FreeTupleDesc(desc);
            return old;
        }
        let types = attnums
            .iter()
            .map(|&a| (*(*table_desc).attrs.as_ptr().add(a as usize - 1)).atttypid);
        Shape {
            json: json::plan(types).map(Rc::from),
            attnums: Rc::from(attnums),
            desc: pg_sys::BlessTupleDesc(desc),
        }
    }
}

/// The record of `shape`'s columns of `tuple` (a row of `rel`), as a composite datum
/// without external TOAST pointers (as the whole row is), in the current memory context.
///
/// # Safety
/// `rel` is open; `tuple` is one of its rows; `shape` was made for `rel`.
pub unsafe fn record(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    shape: &Shape,
) -> pg_sys::Datum {
    let mut values = Vec::with_capacity(shape.attnums.len());
    let mut nulls = Vec::with_capacity(shape.attnums.len());
    // SAFETY: the attnums are live columns of rel's descriptor.
    unsafe {
        let table_desc = (*rel).rd_att;
        for &attnum in shape.attnums.iter() {
            let mut isnull = false;
            values.push(pg_sys::heap_getattr(tuple, attnum, table_desc, &mut isnull));
            nulls.push(isnull);
        }
        let formed = pg_sys::heap_form_tuple(shape.desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::heap_copy_tuple_as_datum(formed, shape.desc)
    }
}
