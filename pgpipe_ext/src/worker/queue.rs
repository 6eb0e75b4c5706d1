//! Writing WAL events into the queue in batches: the changes of a read are converted one
//! by one (as their table's owner, see [`convert`](super::convert)) and inserted with
//! one multi-row INSERT (arrays unnested) per [`FLUSH_ROWS`] events, as the worker.

use std::collections::{HashMap, HashSet};

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{datum::DatumWithOid, PgMemoryContexts, PgOid};

use super::convert::{Converter, Restricted};
use super::pgoutput::{Datum as Value, Relation};

/// Events per INSERT statement.
pub const FLUSH_ROWS: usize = 500;

/// The batch INSERT. Ids are minted by the worker in commit order; the envelope is the
/// one trigger mode builds, plus `unchanged_toast` when the WAL left values out; the
/// change's LSN goes into `lsn`. Events sent by `pgpipe.emit()` (`msg`) keep their payload
/// and key; those of schema changes (sql/ddl.sql, `"source": "ddl"` in the message) get
/// source `ddl`. A change's key (`key`, converted with the row, see [`Writer::write`]) is
/// `to_jsonb` of the primary-key columns of `row` — what trigger mode gets — and NULL when
/// the table has none, for TRUNCATE, or when the image lacks a key column.
/// Everything it calls is built in and schema-qualified: it runs with the worker's
/// rights, user code never.
const INSERT_SQL: &str = "\
INSERT INTO pgpipe.events (id, channel, operation, payload, source, lsn, key)
SELECT u.id, u.channel, u.op,
       CASE WHEN u.msg IS NOT NULL
            THEN coalesce(
                     (u.msg::pg_catalog.jsonb) OPERATOR(pg_catalog.->) 'payload'::pg_catalog.text,
                     'null'::pg_catalog.jsonb)
            WHEN u.toast IS NULL
            THEN pg_catalog.jsonb_build_object('op', u.op, 'schema', u.sch, 'table', u.tbl,
                     'row', u.rw, 'old', u.old)
            ELSE pg_catalog.jsonb_build_object('op', u.op, 'schema', u.sch, 'table', u.tbl,
                     'row', u.rw, 'old', u.old, 'unchanged_toast', u.toast::pg_catalog.jsonb)
       END,
       CASE WHEN u.msg IS NULL THEN 'wal'
            WHEN ((u.msg::pg_catalog.jsonb) OPERATOR(pg_catalog.->>) 'source'::pg_catalog.text) = 'ddl'
            THEN 'ddl'
            ELSE 'emit' END,
       u.lsn::pg_catalog.pg_lsn,
       CASE WHEN u.msg IS NOT NULL
            THEN CASE WHEN pg_catalog.jsonb_typeof((u.msg::pg_catalog.jsonb) OPERATOR(pg_catalog.->) 'key'::pg_catalog.text)
                           OPERATOR(pg_catalog.=) 'object'::pg_catalog.text
                      THEN (u.msg::pg_catalog.jsonb) OPERATOR(pg_catalog.->) 'key'::pg_catalog.text END
            ELSE u.key
       END
FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.text[]),
               pg_catalog.unnest($3::pg_catalog.text[]), pg_catalog.unnest($4::pg_catalog.text[]),
               pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.jsonb[]),
               pg_catalog.unnest($7::pg_catalog.jsonb[]), pg_catalog.unnest($8::pg_catalog.text[]),
               pg_catalog.unnest($9::pg_catalog.text[]), pg_catalog.unnest($10::pg_catalog.text[]),
               pg_catalog.unnest($11::pg_catalog.jsonb[]))
     AS u(id, channel, op, sch, tbl, rw, old, toast, msg, lsn, key)";

/// A subscription as the worker needs it.
pub struct Target {
    pub channel: String,
    /// Empty: every operation.
    pub operations: Vec<String>,
    /// The table's owner; None when the table is gone.
    pub owner: Option<pg_sys::Oid>,
    /// Its primary-key column names; None without a primary key.
    pub key_columns: Option<Vec<String>>,
    /// The captured columns by name; None: every column.
    pub columns: Option<HashSet<String>>,
}

/// One change to queue.
pub struct Change<'a> {
    pub lsn: &'a str,
    pub operation: &'static str,
    pub relation: &'a Relation,
    pub row: Option<Vec<(usize, &'a Value)>>,
    pub old: Option<Vec<(usize, &'a Value)>>,
    pub unchanged_toast: Vec<String>,
}

/// The events converted but not inserted yet, column by column.
#[derive(Default)]
struct Pending {
    ids: Vec<pgrx::Uuid>,
    channels: Vec<String>,
    operations: Vec<String>,
    schemas: Vec<Option<String>>,
    tables: Vec<Option<String>>,
    rows: Vec<Option<pg_sys::Datum>>,
    olds: Vec<Option<pg_sys::Datum>>,
    toast: Vec<Option<String>>,
    messages: Vec<Option<String>>,
    lsns: Vec<String>,
    keys: Vec<Option<pg_sys::Datum>>,
}

impl Pending {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Queues events; keeps its caches across reads.
#[derive(Default)]
pub struct Writer {
    converter: Converter,
    insert: Option<OwnedPreparedStatement>,
    /// Holds the converted datums until their INSERT (child of TopMemoryContext, reset
    /// after each INSERT and at the start of each read).
    cx: Option<PgMemoryContexts>,
    pending: Pending,
    /// Converting as a table's owner right now.
    restricted: Option<Restricted>,
    /// Relations already warned about (owner unknown).
    warned: HashSet<u32>,
}

impl Writer {
    /// Starts a read (a new transaction): nothing is pending, and the worker is itself
    /// (an error in an earlier read aborted its transaction, which restored the user
    /// and the GUCs: the old state is only forgotten, not undone again).
    pub fn begin(&mut self) {
        self.restricted = None;
        self.pending.clear();
        self.reset_cx();
    }

    /// A Relation message arrived (its types may differ from before).
    pub fn relation_changed(&mut self, relid: u32) {
        self.converter.forget_relation(relid);
    }

    /// Forgets the cached conversions (after a failed cycle).
    pub fn reset_caches(&mut self) {
        self.converter.reset();
    }

    /// Back to the worker's own rights (before any SPI call of the worker's own).
    pub fn unrestrict(&mut self) {
        if let Some(r) = self.restricted.take() {
            r.leave();
        }
    }

    /// Converts a change (unless its subscription leaves its operation out) and queues
    /// it; inserts when [`FLUSH_ROWS`] are pending. Returns the events queued (0 or 1).
    pub fn write(
        &mut self,
        client: &mut SpiClient<'_>,
        targets: &mut HashMap<u32, Target>,
        change: Change<'_>,
    ) -> u64 {
        let rel = change.relation;
        let target = targets.entry(rel.id).or_insert_with(|| {
            // Looked up as the worker (the owner may not read pgpipe's tables).
            if let Some(r) = self.restricted.take() {
                r.leave();
            }
            lookup_target(client, rel)
        });
        if !target.operations.is_empty()
            && !target.operations.iter().any(|op| op == change.operation)
        {
            return 0;
        }
        match target.owner {
            Some(owner) => {
                if self.restricted.as_ref().map(Restricted::role) != Some(owner) {
                    self.unrestrict();
                    self.restricted = Some(Restricted::enter(owner));
                }
            }
            None => {
                self.unrestrict();
                if self.warned.insert(rel.id) {
                    warning!(
                        "pgpipe worker: table \"{}\".\"{}\" (oid {}) no longer exists; its \
                         remaining WAL changes are queued with every value as text",
                        rel.namespace,
                        rel.name,
                        rel.id
                    );
                }
            }
        }
        let owned = target.owner.is_some();
        let channel = target.channel.clone();
        // A column choice: the others are dropped here, before any conversion.
        let mut change = change;
        if let Some(columns) = &target.columns {
            let captured = |&(i, _): &(usize, &Value)| columns.contains(&rel.columns[i].name);
            if let Some(row) = change.row.as_mut() {
                row.retain(captured);
            }
            if let Some(old) = change.old.as_mut() {
                old.retain(captured);
            }
            change.unchanged_toast.retain(|name| columns.contains(name));
        }
        // The key: the primary-key columns of the row (after the column choice), all of
        // them or none.
        let key_image: Option<Vec<(usize, &Value)>> = match (&target.key_columns, &change.row) {
            (Some(names), Some(row)) if !names.is_empty() => names
                .iter()
                .map(|name| {
                    row.iter()
                        .copied()
                        .find(|&(i, _)| rel.columns[i].name == *name)
                })
                .collect(),
            _ => None,
        };
        let converter = &mut self.converter;
        let convert = |converter: &mut Converter, image: Option<&[(usize, &Value)]>| {
            image.map(|image| {
                if owned {
                    converter.image_jsonb(rel, image)
                } else {
                    converter.text_image_jsonb(rel, image)
                }
            })
        };
        let cx = self.cx.get_or_insert_with(new_cx);
        // SAFETY: the datums are allocated in `cx`, which is reset only after their INSERT.
        let (row, old, key) = unsafe {
            cx.switch_to(|_| {
                (
                    convert(converter, change.row.as_deref()),
                    convert(converter, change.old.as_deref()),
                    convert(converter, key_image.as_deref()),
                )
            })
        };
        let namespace = if rel.namespace.is_empty() {
            "pg_catalog"
        } else {
            rel.namespace.as_str()
        };
        let toast = (!change.unchanged_toast.is_empty())
            .then(|| serde_json::Value::from(change.unchanged_toast).to_string());
        let p = &mut self.pending;
        p.ids.push(crate::uuid7::uuid_generate_v7());
        p.channels.push(channel);
        p.operations.push(change.operation.to_string());
        p.schemas.push(Some(namespace.to_string()));
        p.tables.push(Some(rel.name.clone()));
        p.rows.push(row);
        p.olds.push(old);
        p.toast.push(toast);
        p.messages.push(None);
        p.lsns.push(change.lsn.to_string());
        p.keys.push(key);
        if self.pending.len() >= FLUSH_ROWS {
            self.flush(client);
        }
        1
    }

    /// Queues an event `pgpipe.emit()` sent as a logical decoding message (already
    /// checked: `channel` and `operation` are the message's).
    pub fn write_emitted(
        &mut self,
        client: &mut SpiClient<'_>,
        lsn: &str,
        channel: String,
        operation: String,
        message: String,
    ) -> u64 {
        let p = &mut self.pending;
        p.ids.push(crate::uuid7::uuid_generate_v7());
        p.channels.push(channel);
        p.operations.push(operation);
        p.schemas.push(None);
        p.tables.push(None);
        p.rows.push(None);
        p.olds.push(None);
        p.toast.push(None);
        p.messages.push(Some(message));
        p.lsns.push(lsn.to_string());
        p.keys.push(None);
        if self.pending.len() >= FLUSH_ROWS {
            self.flush(client);
        }
        1
    }

    /// Inserts the pending events (as the worker).
    pub fn flush(&mut self, client: &mut SpiClient<'_>) {
        self.unrestrict();
        if self.pending.len() == 0 {
            return;
        }
        if self.insert.is_none() {
            let text_array = PgOid::from(pg_sys::TEXTARRAYOID);
            let jsonb_array = PgOid::from(pg_sys::JSONBARRAYOID);
            let types = [
                PgOid::from(pg_sys::UUIDARRAYOID),
                text_array,
                text_array,
                text_array,
                text_array,
                jsonb_array,
                jsonb_array,
                text_array,
                text_array,
                text_array,
                jsonb_array,
            ];
            let plan = client
                .prepare_mut(INSERT_SQL, &types)
                .unwrap_or_else(|e| error!("pgpipe worker: prepare the event insert: {e}"))
                .keep();
            self.insert = Some(plan);
        }
        let pending = std::mem::take(&mut self.pending);
        let cx = self.cx.get_or_insert_with(new_cx);
        // SAFETY: the arrays are built in `cx` from datums that live there too; both stay
        // until the reset after the INSERT.
        let (rows, olds, keys) = unsafe {
            cx.switch_to(|_| {
                (
                    jsonb_array(&pending.rows),
                    jsonb_array(&pending.olds),
                    jsonb_array(&pending.keys),
                )
            })
        };
        let args: Vec<DatumWithOid<'_>> = vec![
            pending.ids.into(),
            pending.channels.into(),
            pending.operations.into(),
            pending.schemas.into(),
            pending.tables.into(),
            // SAFETY: jsonb[] datums built above.
            unsafe { DatumWithOid::new(rows, pg_sys::JSONBARRAYOID) },
            unsafe { DatumWithOid::new(olds, pg_sys::JSONBARRAYOID) },
            pending.toast.into(),
            pending.messages.into(),
            pending.lsns.into(),
            // SAFETY: a jsonb[] datum built above.
            unsafe { DatumWithOid::new(keys, pg_sys::JSONBARRAYOID) },
        ];
        let plan = self.insert.as_ref().expect("prepared above");
        client
            .update(plan, None, &args)
            .unwrap_or_else(|e| error!("pgpipe worker: insert events: {e}"));
        drop(args);
        self.reset_cx();
    }

    fn reset_cx(&mut self) {
        if let Some(cx) = self.cx.as_mut() {
            // SAFETY: nothing refers to the converted datums any more.
            unsafe { cx.reset() };
        }
    }
}

fn new_cx() -> PgMemoryContexts {
    // SAFETY: TopMemoryContext lives as long as the process.
    unsafe {
        PgMemoryContexts::TopMemoryContext.switch_to(|_| PgMemoryContexts::new("pgpipe wal batch"))
    }
}

/// A one-dimensional jsonb[] of the datums (None = NULL), in the current memory context.
fn jsonb_array(values: &[Option<pg_sys::Datum>]) -> pg_sys::Datum {
    let mut datums: Vec<pg_sys::Datum> = values
        .iter()
        .map(|v| v.unwrap_or(pg_sys::Datum::from(0usize)))
        .collect();
    let mut nulls: Vec<bool> = values.iter().map(Option::is_none).collect();
    let mut dims = [i32::try_from(values.len()).unwrap_or(i32::MAX)];
    let mut lbs = [1i32];
    // SAFETY: datums, nulls and the dimension agree; jsonb is a varlena aligned on int.
    unsafe {
        let array = pg_sys::construct_md_array(
            datums.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        pg_sys::Datum::from(array)
    }
}

/// The relation's subscription (channel, operations), owner and primary key (from the
/// catalog, not the Relation message: its key flags are the replica identity, which may
/// be FULL or another index; trigger mode uses the primary key). A table dropped since the
/// change keeps its change on the channel it carried its changes on (channel_sources); one
/// in the publication but no longer subscribed (unsubscribed after the change) on the
/// default channel.
fn lookup_target(client: &SpiClient<'_>, rel: &Relation) -> Target {
    let table = client
        .select(
            "SELECT coalesce(s.channel, CASE WHEN c.oid IS NULL THEN \
                        (SELECT pg_catalog.min(cs.channel) FROM pgpipe.channel_sources cs \
                         WHERE cs.relid OPERATOR(pg_catalog.=) r.relid) END), \
                    s.operations, c.relowner, \
                    (SELECT pg_catalog.to_jsonb(pg_catalog.array_agg(a.attname::pg_catalog.text \
                                                ORDER BY a.attnum))::pg_catalog.text \
                     FROM pg_catalog.pg_index i \
                     JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid \
                      AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey::pg_catalog.int2[]) \
                     WHERE i.indrelid OPERATOR(pg_catalog.=) r.relid AND i.indisprimary), \
                    CASE WHEN s.column_attnums IS NOT NULL THEN coalesce( \
                        (SELECT pg_catalog.array_agg(a.attname::pg_catalog.text) FROM pg_catalog.pg_attribute a \
                         WHERE a.attrelid OPERATOR(pg_catalog.=) r.relid AND NOT a.attisdropped \
                           AND a.attnum OPERATOR(pg_catalog.=) ANY (s.column_attnums)), '{}') END \
             FROM (SELECT $1::pg_catalog.oid AS relid) r \
             LEFT JOIN pgpipe.subscription s ON s.relid OPERATOR(pg_catalog.=) r.relid \
             LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.relid",
            None,
            &[pg_sys::Oid::from(rel.id).into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: look up the subscription: {e}"));
    let first = table.first();
    let (channel, operations, owner) = first
        .get_three::<String, Vec<String>, pg_sys::Oid>()
        .unwrap_or_else(|e| error!("pgpipe worker: read the subscription: {e}"));
    let key_columns = first
        .get::<String>(4)
        .unwrap_or_else(|e| error!("pgpipe worker: read the primary key: {e}"))
        .map(|names| {
            serde_json::from_str::<Vec<String>>(&names)
                .unwrap_or_else(|e| error!("pgpipe worker: read the primary key: {e}"))
        });
    let columns = first
        .get::<Vec<String>>(5)
        .unwrap_or_else(|e| error!("pgpipe worker: read the captured columns: {e}"))
        .map(|names| names.into_iter().collect());
    Target {
        channel: channel.unwrap_or_else(|| default_channel(rel)),
        operations: operations.unwrap_or_default(),
        owner,
        key_columns,
        columns,
    }
}

/// The channel `pgpipe.subscribe` picks by default.
pub fn default_channel(rel: &Relation) -> String {
    if rel.namespace == "public" {
        rel.name.clone()
    } else {
        format!("{}.{}", rel.namespace, rel.name)
    }
}
