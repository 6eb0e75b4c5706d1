//! Writing queue rows without SQL: route them to the partition of `pgpipe.events` that
//! holds the writing transaction's id, insert the heap tuples and their index entries.
//! Both capture paths write the queue this way: the capture trigger one row per call
//! ([`insert_event`]), the WAL worker a chunk of rows per [`Queue::insert_batch`].
//!
//! This is what `INSERT INTO pgpipe.events` does minus the parts capture does not need:
//! no parse/plan/executor start-up, no privilege or row-security check (writers have no
//! right on the queue; capture writes it on their behalf), no per-row partition-routing
//! set-up. The rows are part of the writer's (sub)transaction like any heap insert: they
//! commit or abort with it.
//!
//! Locks are those of an INSERT through the parent: RowExclusiveLock on `pgpipe.events`
//! (so `pgpipe.rotate()` cannot add or drop a partition under us), on the partition and
//! on its indexes, all held to the end of the transaction.

pub mod envelope;

use std::cell::Cell;
use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::capture::raise;

/// Most indexes a queue partition may have (it has two).
const MAX_INDEXES: usize = 8;
/// Most columns (live or dropped) a queue partition may have (it has nine).
const MAX_COLUMNS: usize = 64;

/// The index set of the partition written last, kept across transactions: building an
/// `IndexInfo` per row costs more than the insert into the index. Relations themselves
/// are opened (and locked) again every time; only their descriptions are cached.
#[derive(Clone, Copy)]
struct IndexCache {
    /// The partition (InvalidOid: nothing cached).
    partition: pg_sys::Oid,
    count: usize,
    oids: [pg_sys::Oid; MAX_INDEXES],
    /// In [`CACHE_CONTEXT`].
    infos: [*mut pg_sys::IndexInfo; MAX_INDEXES],
}

const EMPTY_CACHE: IndexCache = IndexCache {
    partition: pg_sys::InvalidOid,
    count: 0,
    oids: [pg_sys::InvalidOid; MAX_INDEXES],
    infos: [std::ptr::null_mut(); MAX_INDEXES],
};

thread_local! {
    /// OID of `pgpipe.events`, looked up by schema and name (never via search_path);
    /// reset by a relcache invalidation of it (e.g. DROP EXTENSION).
    static EVENTS_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static INDEX_CACHE: Cell<IndexCache> = const { Cell::new(EMPTY_CACHE) };
    /// Memory of the cached `IndexInfo`s, reset when the cache is rebuilt.
    static CACHE_CONTEXT: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
}

/// Forgets what an invalidation may have changed: the queue's OID, the cached partition's
/// index set (the partition's entry changes when an index is added or dropped, an index's
/// own when it changes).
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || relid == EVENTS_OID.get() {
        EVENTS_OID.set(pg_sys::InvalidOid);
    }
    let cache = INDEX_CACHE.get();
    if relid == pg_sys::InvalidOid
        || relid == cache.partition
        || cache.oids[..cache.count].contains(&relid)
    {
        INDEX_CACHE.set(EMPTY_CACHE);
    }
}

/// Opens `pgpipe.events` with RowExclusiveLock.
///
/// # Safety
/// Inside a transaction.
unsafe fn open_events() -> pg_sys::Relation {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: a static callback without argument, registered once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.set(true);
    }
    for _ in 0..2 {
        let mut oid = EVENTS_OID.get();
        if oid == pg_sys::InvalidOid {
            // SAFETY: catalog lookups by name in a transaction; missing_ok namespace.
            oid = unsafe {
                let nsp = pg_sys::get_namespace_oid(c"pgpipe".as_ptr(), true);
                if nsp == pg_sys::InvalidOid {
                    pg_sys::InvalidOid
                } else {
                    pg_sys::get_relname_relid(c"events".as_ptr(), nsp)
                }
            };
            if oid == pg_sys::InvalidOid {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    "pgpipe's queue table pgpipe.events does not exist".into(),
                );
            }
            EVENTS_OID.set(oid);
        }
        // SAFETY: try_table_open returns NULL when the relation is gone (the cached OID
        // may be stale until the invalidation arrives with the lock).
        let rel = unsafe { pg_sys::try_table_open(oid, pg_sys::RowExclusiveLock as i32) };
        if !rel.is_null() {
            return rel;
        }
        EVENTS_OID.set(pg_sys::InvalidOid);
    }
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
        "pgpipe's queue table pgpipe.events does not exist".into(),
    )
}

/// The leaf partition of `pgpipe.events` whose range holds `xid` (else the default one),
/// as `PARTITION BY RANGE (xid)` routes an INSERT.
///
/// # Safety
/// `parent` is open and locked.
unsafe fn route(parent: pg_sys::Relation, xid: u64) -> pg_sys::Oid {
    // SAFETY: the partition descriptor lives in the parent's relcache entry, stable while
    // we hold the lock; the bound arrays have ndatums (+1 for indexes) entries.
    unsafe {
        let partdesc = pg_sys::RelationGetPartitionDesc(parent, true);
        let bounds = if partdesc.is_null() {
            std::ptr::null_mut()
        } else {
            (*partdesc).boundinfo
        };
        let mut index = -1;
        if !bounds.is_null() && (*bounds).strategy as u8 == pg_sys::PARTITION_STRATEGY_RANGE {
            let b = &*bounds;
            let n = b.ndatums as usize;
            // Sign of (bound i - xid): MINVALUE/MAXVALUE sort below/above every value.
            let cmp = |i: usize| -> std::cmp::Ordering {
                let kind = *(*b.kind.add(i));
                match kind {
                    pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MINVALUE => {
                        std::cmp::Ordering::Less
                    }
                    pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MAXVALUE => {
                        std::cmp::Ordering::Greater
                    }
                    _ => (*(*b.datums.add(i))).value().cmp(&(xid as usize)),
                }
            };
            // The last bound <= xid; the partition starting there (indexes[i + 1]).
            let (mut lo, mut hi) = (0usize, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if cmp(mid) == std::cmp::Ordering::Greater {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            // lo = number of bounds <= xid, so indexes[lo] covers xid.
            index = *b.indexes.add(lo);
            if index < 0 {
                index = b.default_index;
            }
        } else if !bounds.is_null() {
            index = (*bounds).default_index;
        }
        if index < 0 || partdesc.is_null() || index >= (*partdesc).nparts {
            raise(
                PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
                format!("no partition of pgpipe.events holds transaction id {xid}"),
            );
        }
        if !*(*partdesc).is_leaf.add(index as usize) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "a partition of pgpipe.events is itself partitioned".into(),
            );
        }
        *(*partdesc).oids.add(index as usize)
    }
}

/// Where a queue row comes from (its `source` column).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    Trigger,
    Wal,
    Emit,
    Ddl,
}

impl Source {
    fn name(self) -> &'static [u8] {
        match self {
            Source::Trigger => b"trigger",
            Source::Wal => b"wal",
            Source::Emit => b"emit",
            Source::Ddl => b"ddl",
        }
    }
}

/// One queue row. `created_at` (the clock when it is written) and `xid` (the top-level
/// transaction's full id) are the table's defaults, filled in here.
pub struct Event<'a> {
    pub id: pgrx::Uuid,
    pub channel: &'a [u8],
    pub operation: &'a [u8],
    /// jsonb.
    pub payload: pg_sys::Datum,
    pub source: Source,
    /// The change's LSN (WAL events only).
    pub lsn: Option<u64>,
    /// The ordering key (jsonb); None for no key.
    pub key: Option<pg_sys::Datum>,
}

/// What a queue column gets.
#[derive(Clone, Copy)]
enum Column {
    Id,
    Channel,
    Operation,
    Payload,
    Source,
    CreatedAt,
    Xid,
    Lsn,
    Key,
    /// Any column capture does not know (and dropped ones): NULL.
    Null,
}

fn column(name: &CStr) -> Column {
    match name.to_bytes() {
        b"id" => Column::Id,
        b"channel" => Column::Channel,
        b"operation" => Column::Operation,
        b"payload" => Column::Payload,
        b"source" => Column::Source,
        b"created_at" => Column::CreatedAt,
        b"xid" => Column::Xid,
        b"lsn" => Column::Lsn,
        b"key" => Column::Key,
        _ => Column::Null,
    }
}

/// `s` as a new text datum (in the current memory context).
pub(crate) fn text_datum(s: &[u8]) -> pg_sys::Datum {
    // SAFETY: copies len bytes into a new palloc'd text.
    pg_sys::Datum::from(unsafe {
        pg_sys::cstring_to_text_with_len(s.as_ptr() as *const c_char, s.len() as i32)
    })
}

/// Inserts one event into the queue, in the current transaction.
///
/// # Safety
/// Inside a transaction that may write (a trigger's).
pub unsafe fn insert_event(event: &Event<'_>) {
    // SAFETY: see the contract.
    unsafe {
        let mut queue = Queue::open();
        queue.insert(event);
        queue.close();
    }
}

/// The queue partition of the current transaction, open for inserts: the parent, the
/// partition and its indexes stay open (and locked) until [`Queue::close`].
pub struct Queue {
    parent: pg_sys::Relation,
    part: pg_sys::Relation,
    xid: u64,
    cid: pg_sys::CommandId,
    natts: usize,
    columns: [Column; MAX_COLUMNS],
    not_null: [bool; MAX_COLUMNS],
    /// The partition's indexes that get entries, and their descriptions (in
    /// [`CACHE_CONTEXT`], which is reset only when [`partition_indexes`] rebuilds it,
    /// never while a `Queue` is open).
    nindexes: usize,
    indexes: [(pg_sys::Relation, *mut pg_sys::IndexInfo); MAX_INDEXES],
}

impl Queue {
    /// Opens the partition that holds the current top-level transaction's id.
    ///
    /// # Safety
    /// Inside a transaction that may write; close it before the transaction ends.
    pub unsafe fn open() -> Self {
        // SAFETY: inside a transaction; the relations stay locked until it ends.
        unsafe {
            // The default of pgpipe.events.xid: pg_current_xact_id() (assigns one).
            let xid = pg_sys::GetTopFullTransactionId().value;
            let parent = open_events();
            let part_oid = route(parent, xid);
            let part = pg_sys::table_open(part_oid, pg_sys::RowExclusiveLock as i32);
            let form = &*(*part).rd_rel;
            if form.relkind as u8 != pg_sys::RELKIND_RELATION
                || form.relam != pg_sys::HEAP_TABLE_AM_OID
            {
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "pgpipe's capture writes heap partitions of pgpipe.events only".into(),
                );
            }
            let desc = (*part).rd_att;
            let natts = (*desc).natts as usize;
            if natts > MAX_COLUMNS {
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!(
                        "pgpipe's capture writes at most {MAX_COLUMNS} columns of pgpipe.events"
                    ),
                );
            }
            let mut columns = [Column::Null; MAX_COLUMNS];
            let mut not_null = [false; MAX_COLUMNS];
            for i in 0..natts {
                let att = &*(*desc).attrs.as_ptr().add(i);
                if !att.attisdropped {
                    columns[i] = column(CStr::from_ptr(att.attname.data.as_ptr()));
                    not_null[i] = att.attnotnull;
                }
            }
            let cache = partition_indexes(part);
            let mut indexes = [(std::ptr::null_mut(), std::ptr::null_mut()); MAX_INDEXES];
            let mut nindexes = 0;
            for k in 0..cache.count {
                let index = pg_sys::index_open(cache.oids[k], pg_sys::RowExclusiveLock as i32);
                // An index still being built concurrently gets its entries later.
                if (*index).rd_index.is_null() || !(*(*index).rd_index).indisready {
                    pg_sys::index_close(index, pg_sys::NoLock as i32);
                    continue;
                }
                indexes[nindexes] = (index, cache.infos[k]);
                nindexes += 1;
            }
            Queue {
                parent,
                part,
                xid,
                cid: pg_sys::GetCurrentCommandId(true),
                natts,
                columns,
                not_null,
                nindexes,
                indexes,
            }
        }
    }

    /// The partition's columns for an event.
    fn row(&self, event: &Event<'_>) -> ([pg_sys::Datum; MAX_COLUMNS], [bool; MAX_COLUMNS]) {
        let id = pgrx::IntoDatum::into_datum(event.id).expect("a uuid datum is never NULL");
        // SAFETY: a plain clock read; the default of created_at is clock_timestamp().
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        // On the stack: no allocation per row.
        let mut values = [pg_sys::Datum::from(0); MAX_COLUMNS];
        let mut nulls = [true; MAX_COLUMNS];
        for i in 0..self.natts {
            let value = match self.columns[i] {
                Column::Id => Some(id),
                Column::Channel => Some(text_datum(event.channel)),
                Column::Operation => Some(text_datum(event.operation)),
                Column::Payload => Some(event.payload),
                Column::Source => Some(text_datum(event.source.name())),
                Column::CreatedAt => Some(pg_sys::Datum::from(now)),
                Column::Xid => Some(pg_sys::Datum::from(self.xid)),
                Column::Lsn => event.lsn.map(pg_sys::Datum::from),
                Column::Key => event.key,
                Column::Null => None,
            };
            match value {
                Some(v) => {
                    values[i] = v;
                    nulls[i] = false;
                }
                // SAFETY: the partition is open; i < natts.
                None if self.not_null[i] => unsafe {
                    let att = &*(*(*self.part).rd_att).attrs.as_ptr().add(i);
                    raise(
                        PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                        format!(
                            "pgpipe's capture has no value for column {} of pgpipe.events",
                            CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy()
                        ),
                    )
                },
                None => {}
            }
        }
        (values, nulls)
    }

    /// Inserts one event (allocating in the current memory context).
    ///
    /// # Safety
    /// The transaction that opened the queue, which is still open; the datums are valid.
    pub unsafe fn insert(&mut self, event: &Event<'_>) {
        let (mut values, mut nulls) = self.row(event);
        // SAFETY: values/nulls match the partition's descriptor; the relations are open.
        unsafe {
            let tuple = pg_sys::heap_form_tuple(
                (*self.part).rd_att,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            pg_sys::heap_insert(self.part, tuple, self.cid, 0, std::ptr::null_mut());
            self.insert_index_entries(
                &raw mut (*tuple).t_self,
                &values[..self.natts],
                &nulls[..self.natts],
            );
        }
    }

    /// Inserts events as one batch: their heap tuples with `heap_multi_insert`, which
    /// fills a page per WAL record instead of logging each row on its own (what COPY
    /// does), then their index entries (allocating in the current memory context).
    ///
    /// # Safety
    /// As [`Queue::insert`].
    pub unsafe fn insert_batch(&mut self, events: &[Event<'_>]) {
        if events.is_empty() {
            return;
        }
        let natts = self.natts;
        let mut values = Vec::with_capacity(events.len() * natts);
        let mut nulls = Vec::with_capacity(events.len() * natts);
        let mut slots = Vec::with_capacity(events.len());
        // SAFETY: values/nulls match the partition's descriptor; each slot owns its tuple
        // (freed when the slot is dropped) and pins the descriptor until then.
        unsafe {
            let desc = (*self.part).rd_att;
            for event in events {
                let (mut row_values, mut row_nulls) = self.row(event);
                let tuple =
                    pg_sys::heap_form_tuple(desc, row_values.as_mut_ptr(), row_nulls.as_mut_ptr());
                let slot =
                    pg_sys::MakeSingleTupleTableSlot(desc, &raw const pg_sys::TTSOpsHeapTuple);
                pg_sys::ExecStoreHeapTuple(tuple, slot, true);
                slots.push(slot);
                values.extend_from_slice(&row_values[..natts]);
                nulls.extend_from_slice(&row_nulls[..natts]);
            }
            pg_sys::heap_multi_insert(
                self.part,
                slots.as_mut_ptr(),
                slots.len() as i32,
                self.cid,
                0,
                std::ptr::null_mut(),
            );
            // heap_multi_insert left each row's place in its slot.
            for (i, &slot) in slots.iter().enumerate() {
                let row = i * natts..(i + 1) * natts;
                self.insert_index_entries(
                    &raw mut (*slot).tts_tid,
                    &values[row.clone()],
                    &nulls[row],
                );
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
        }
    }

    /// Closes the relations (the locks stay until the transaction ends).
    ///
    /// # Safety
    /// In the transaction that opened the queue.
    pub unsafe fn close(self) {
        // SAFETY: opened in `open`.
        unsafe {
            for &(index, _) in &self.indexes[..self.nindexes] {
                pg_sys::index_close(index, pg_sys::NoLock as i32);
            }
            pg_sys::table_close(self.part, pg_sys::NoLock as i32);
            pg_sys::table_close(self.parent, pg_sys::NoLock as i32);
        }
    }

    /// Adds the index entries of a freshly inserted heap tuple, as `ExecInsertIndexTuples`
    /// does for plain column indexes (the queue's: its primary key and the xid index).
    ///
    /// # Safety
    /// `tid` is that of a tuple just inserted into the partition; `values`/`nulls` are its
    /// columns.
    unsafe fn insert_index_entries(
        &self,
        tid: pg_sys::ItemPointer,
        values: &[pg_sys::Datum],
        nulls: &[bool],
    ) {
        // SAFETY: see the contract; the descriptions match the locked partition.
        unsafe {
            for &(index, info) in &self.indexes[..self.nindexes] {
                let natts = (*info).ii_NumIndexAttrs as usize;
                let mut ivalues = [pg_sys::Datum::from(0); pg_sys::INDEX_MAX_KEYS as usize];
                let mut inulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
                for a in 0..natts {
                    let attnum = (*info).ii_IndexAttrNumbers[a] as usize;
                    ivalues[a] = values[attnum - 1];
                    inulls[a] = nulls[attnum - 1];
                }
                let check = if (*info).ii_Unique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                pg_sys::index_insert(
                    index,
                    ivalues.as_mut_ptr(),
                    inulls.as_mut_ptr(),
                    tid,
                    self.part,
                    check,
                    false,
                    info,
                );
            }
        }
    }
}

/// The partition's indexes, from the cache or described afresh.
///
/// # Safety
/// `part` is open and locked (so its index set is current and cannot change under us).
unsafe fn partition_indexes(part: pg_sys::Relation) -> IndexCache {
    // SAFETY: reads of an open relation.
    let part_oid = unsafe { (*part).rd_id };
    let cached = INDEX_CACHE.get();
    if cached.partition == part_oid {
        return cached;
    }
    INDEX_CACHE.set(EMPTY_CACHE);
    // SAFETY: a long-lived context under CacheMemoryContext, created once, reset on each
    // rebuild; the relations are opened and locked as the executor does.
    unsafe {
        let mut cxt = CACHE_CONTEXT.get();
        if cxt.is_null() {
            cxt = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CacheMemoryContext,
                c"pgpipe capture indexes".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            );
            CACHE_CONTEXT.set(cxt);
        } else {
            pg_sys::MemoryContextReset(cxt);
        }
        let mut cache = EMPTY_CACHE;
        cache.partition = part_oid;
        let list = pg_sys::RelationGetIndexList(part);
        let n = if list.is_null() {
            0
        } else {
            (*list).length as usize
        };
        if n > MAX_INDEXES {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("pgpipe's capture maintains at most {MAX_INDEXES} indexes on a partition of pgpipe.events"),
            );
        }
        for k in 0..n {
            let index_oid = (*(*list).elements.add(k)).oid_value;
            let index = pg_sys::index_open(index_oid, pg_sys::RowExclusiveLock as i32);
            let old_cxt = pg_sys::MemoryContextSwitchTo(cxt);
            let info = pg_sys::BuildIndexInfo(index);
            pg_sys::MemoryContextSwitchTo(old_cxt);
            if !(*info).ii_Expressions.is_null()
                || !(*info).ii_Predicate.is_null()
                || !(*info).ii_ExclusionOps.is_null()
                || ((*info).ii_Unique && !(*(*index).rd_index).indimmediate)
                || (0..(*info).ii_NumIndexAttrs as usize)
                    .any(|a| (*info).ii_IndexAttrNumbers[a] <= 0)
            {
                let name = CStr::from_ptr((*(*index).rd_rel).relname.data.as_ptr());
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!(
                        "index {} of pgpipe.events is not a plain column index, which the capture trigger does not maintain",
                        name.to_string_lossy()
                    ),
                );
            }
            pg_sys::index_close(index, pg_sys::NoLock as i32);
            cache.oids[k] = index_oid;
            cache.infos[k] = info;
            cache.count = k + 1;
        }
        INDEX_CACHE.set(cache);
        cache
    }
}
