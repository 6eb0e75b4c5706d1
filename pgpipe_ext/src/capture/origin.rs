//! Partitions: the subscribed table a cloned trigger comes from.
//!
//! A row trigger created on a partitioned table is cloned onto each of its partitions
//! (also onto partitions attached later, at every level), and fires there with the
//! partition as its relation. WAL mode publishes through the partition root
//! (`publish_via_partition_root`), so its events name the subscribed table; trigger mode
//! names it too. The subscribed table is the relation of the trigger the clone comes
//! from: follow `pg_trigger.tgparentid` up to a trigger that is no clone.
//!
//! The clone carries the subscribed table's arguments, so its column choice is in the
//! subscribed table's attribute numbers, and the key is the subscribed table's primary
//! key (as in WAL mode). A partition's columns may be numbered differently (another
//! column order, a dropped column), so both are mapped to the partition's numbers by
//! name. Everything is read from the catalog caches: the partition is locked by the write,
//! which keeps it attached (DETACH and every ALTER that recurses to it wait), and no lock
//! is taken on the subscribed table (a writer of the partition locking its parent could
//! deadlock with a DETACH, which locks the parent first).
//!
//! Cached per trigger for the backend's life; an invalidation of the partition or of the
//! subscribed table (rename, new primary key, ATTACH/DETACH) drops the entry.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::raise;

/// Where a partition's events come from, in the partition's attribute numbers.
pub struct Origin {
    /// The partition the trigger fires on.
    partition: pg_sys::Oid,
    /// The subscribed table.
    table: pg_sys::Oid,
    pub schema_name: CString,
    pub table_name: CString,
    /// The captured columns (the trigger's second argument, mapped); None: all.
    pub columns: Option<Vec<i32>>,
    /// The subscribed table's primary key, mapped; None without one.
    pub key: Option<Vec<i32>>,
}

thread_local! {
    static ORIGINS: RefCell<HashMap<pg_sys::Oid, Rc<Origin>>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    ORIGINS.with_borrow_mut(|origins| {
        origins
            .retain(|_, o| relid != pg_sys::InvalidOid && o.partition != relid && o.table != relid)
    });
}

/// The origin of `trigger` firing on `rel`, when the trigger is a clone (`rel` is a
/// partition of the subscribed table); `columns` are the trigger's column argument.
///
/// # Safety
/// `rel` is the open relation of the trigger call, `trigger` its trigger; in a
/// transaction.
pub unsafe fn origin(
    rel: pg_sys::Relation,
    trigger: &pg_sys::Trigger,
    columns: Option<&[i32]>,
) -> Option<Rc<Origin>> {
    if !trigger.tgisclone {
        return None;
    }
    if let Some(found) = ORIGINS.with_borrow(|origins| origins.get(&trigger.tgoid).cloned()) {
        return Some(found);
    }
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: a static callback without argument, registered once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.set(true);
    }
    // SAFETY: rel is open; catalog reads inside a transaction.
    let found = Rc::new(unsafe {
        let partition = (*rel).rd_id;
        let table = root_trigger_relation(trigger.tgoid);
        let map = |attnum: i32| map_attnum(table, partition, attnum);
        let name = pg_sys::get_rel_name(table);
        let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(table));
        if name.is_null() || schema.is_null() {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("pgpipe capture: the partitioned table (oid {table:?}) of this partition does not exist"),
            );
        }
        Origin {
            partition,
            table,
            schema_name: CStr::from_ptr(schema).to_owned(),
            table_name: CStr::from_ptr(name).to_owned(),
            columns: columns.map(|columns| columns.iter().filter_map(|&a| map(a)).collect()),
            key: primary_key(table).map(|key| key.into_iter().filter_map(map).collect()),
        }
    });
    ORIGINS.with_borrow_mut(|origins| origins.insert(trigger.tgoid, found.clone()));
    Some(found)
}

/// The relation of the trigger `tgoid` was cloned from, at the top of its chain.
///
/// # Safety
/// In a transaction.
unsafe fn root_trigger_relation(mut tgoid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: an index scan of pg_trigger by oid, as Postgres' own trigger code does.
    unsafe {
        let triggers = pg_sys::table_open(
            pg_sys::TriggerRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        // A chain longer than this is a cycle (a corrupt catalog), not a hierarchy.
        for _ in 0..1000 {
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut key,
                pg_sys::Anum_pg_trigger_oid as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::RegProcedure::from(pg_sys::F_OIDEQ),
                pg_sys::Datum::from(tgoid),
            );
            let scan = pg_sys::systable_beginscan(
                triggers,
                pg_sys::TriggerOidIndexId.into(),
                true,
                std::ptr::null_mut(),
                1,
                &mut key,
            );
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                pg_sys::systable_endscan(scan);
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    format!("pgpipe capture: trigger {tgoid:?} is not in pg_trigger"),
                );
            }
            // GETSTRUCT: the fixed-size part of the row follows the tuple header.
            let header = (*tuple).t_data;
            let form = &*((header as *const u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_trigger);
            let (parent, relid) = (form.tgparentid, form.tgrelid);
            pg_sys::systable_endscan(scan);
            if parent == pg_sys::InvalidOid {
                pg_sys::table_close(triggers, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                return relid;
            }
            tgoid = parent;
        }
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            "pgpipe capture: pg_trigger.tgparentid forms a cycle".into(),
        )
    }
}

/// The attribute of `partition` with the name `attnum` has in `table` (None: none).
///
/// # Safety
/// In a transaction.
unsafe fn map_attnum(table: pg_sys::Oid, partition: pg_sys::Oid, attnum: i32) -> Option<i32> {
    // SAFETY: syscache lookups.
    unsafe {
        let name = pg_sys::get_attname(table, attnum as pg_sys::AttrNumber, true);
        if name.is_null() {
            return None;
        }
        let mapped = pg_sys::get_attnum(partition, name) as i32;
        (mapped > 0).then_some(mapped)
    }
}

/// The primary-key attribute numbers of `table` (None without a primary key).
///
/// # Safety
/// In a transaction.
unsafe fn primary_key(table: pg_sys::Oid) -> Option<Vec<i32>> {
    // SAFETY: relcache entries pinned and released again (no lock: see the module doc);
    // RelationGetIndexList sets rd_pkindex (the primary key, deferrable too, as the
    // worker's indisprimary).
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(table);
        if rel.is_null() {
            return None;
        }
        pg_sys::list_free(pg_sys::RelationGetIndexList(rel));
        let pk = (*rel).rd_pkindex;
        pg_sys::RelationClose(rel);
        if pk == pg_sys::InvalidOid {
            return None;
        }
        let index = pg_sys::RelationIdGetRelation(pk);
        if index.is_null() {
            return None;
        }
        let form = &*(*index).rd_index;
        let attnums: Vec<i32> = form
            .indkey
            .values
            .as_slice(form.indnkeyatts as usize)
            .iter()
            .map(|&a| a as i32)
            .filter(|&a| a > 0)
            .collect();
        pg_sys::RelationClose(index);
        (!attnums.is_empty()).then_some(attnums)
    }
}
