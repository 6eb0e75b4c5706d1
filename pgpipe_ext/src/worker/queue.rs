//! Writing WAL events into the queue in batches: the changes of a read are converted one
//! by one (as their table's owner, see [`convert`](super::convert)) and every
//! [`FLUSH_ROWS`] events are inserted, as the worker, straight into the queue partition
//! ([`crate::queue`], as the capture trigger writes it: no SQL, no SPI), their heap
//! tuples [`INSERT_ROWS`] at a time by one multi-row insert.
//!
//! Each event is what trigger mode queues: ids minted by the worker in commit order, the
//! envelope `{"op", "schema", "table", "row", "old"}` (plus `unchanged_toast`, a JSON
//! array of column names, when the WAL left values out; see
//! [`envelope`](crate::queue::envelope)), source `wal`, the change's LSN in `lsn`, and as
//! `key` the primary-key fields of `row` (what `to_jsonb` of those columns gives, taken
//! out of the converted row, see [`Writer::write`]), NULL when the table has none, for
//! TRUNCATE, or when the image lacks a key column. Events sent by `pgpipe.emit()` keep the message's `payload` (JSON null
//! when it has none) and its `key` when that is an object; those of schema changes
//! (sql/ddl.sql, `"source": "ddl"` in the message) get source `ddl`, the others `emit`.
//! Building and inserting the rows calls only built-in code (text and jsonb), as the
//! worker: user code never runs with its rights.

use std::collections::{HashMap, HashSet};

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgMemoryContexts;

use super::convert::{Converter, Restricted};
use super::pgoutput::{Datum as Value, Relation};
use crate::jsonb;
use crate::queue::{envelope, Event, Queue, Source};

/// Events per insert batch.
pub const FLUSH_ROWS: usize = 500;
/// Events per heap multi-insert: a queue page or two, so that what they allocate
/// stays small (and in cache) between the resets of the rows' memory.
const INSERT_ROWS: usize = 32;

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
    pub lsn: u64,
    pub operation: &'static str,
    pub relation: &'a Relation,
    pub row: Option<Vec<(usize, &'a Value)>>,
    pub old: Option<Vec<(usize, &'a Value)>>,
    pub unchanged_toast: Vec<String>,
}

impl<'a> Change<'a> {
    /// A change with one row image or none and no old one: an INSERT (the new row), a
    /// DELETE (the old row) or a TRUNCATE (none).
    pub fn of_row(
        lsn: u64,
        operation: &'static str,
        relation: &'a Relation,
        row: Option<Vec<(usize, &'a Value)>>,
    ) -> Self {
        Change {
            lsn,
            operation,
            relation,
            row,
            old: None,
            unchanged_toast: Vec::new(),
        }
    }
}

/// An event converted but not inserted yet.
struct Pending {
    id: pgrx::Uuid,
    channel: String,
    operation: String,
    lsn: u64,
    body: Body,
}

enum Body {
    /// A row change; the datums (jsonb) live in the writer's batch context.
    Change {
        schema: String,
        table: String,
        row: Option<pg_sys::Datum>,
        old: Option<pg_sys::Datum>,
        /// `unchanged_toast` as JSON text.
        toast: Option<String>,
        key: Option<pg_sys::Datum>,
    },
    /// The text of a message `pgpipe.emit()` sent (a JSON object).
    Emitted(String),
}

/// Queues events; keeps its caches across reads.
#[derive(Default)]
pub struct Writer {
    converter: Converter,
    /// Holds the converted datums until they are inserted (child of TopMemoryContext,
    /// reset after each batch and at the start of each read).
    cx: Option<PgMemoryContexts>,
    /// What one queue row's insert allocates (child of TopMemoryContext, reset per row).
    row_cx: Option<PgMemoryContexts>,
    pending: Vec<Pending>,
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
            self.unrestrict();
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
        let cx = self.cx.get_or_insert_with(|| new_cx("pgpipe wal batch"));
        // SAFETY: the datums are allocated in `cx`, which is reset only after their
        // insert; `row` is a jsonb datum just built.
        let (row, old, key) = unsafe {
            cx.switch_to(|_| {
                let row = convert(converter, change.row.as_deref());
                let old = convert(converter, change.old.as_deref());
                // The key: the primary-key fields of the row (after the column choice),
                // all of them or none.
                let key = match (&target.key_columns, row) {
                    (Some(names), Some(row)) if !names.is_empty() => {
                        super::convert::object_fields(row, names)
                    }
                    _ => None,
                };
                (row, old, key)
            })
        };
        let namespace = if rel.namespace.is_empty() {
            "pg_catalog"
        } else {
            rel.namespace.as_str()
        };
        let toast = (!change.unchanged_toast.is_empty())
            .then(|| serde_json::Value::from(change.unchanged_toast).to_string());
        self.pending.push(Pending {
            id: crate::uuid7::uuid_generate_v7(),
            channel,
            operation: change.operation.to_string(),
            lsn: change.lsn,
            body: Body::Change {
                schema: namespace.to_string(),
                table: rel.name.clone(),
                row,
                old,
                toast,
                key,
            },
        });
        if self.pending.len() >= FLUSH_ROWS {
            self.flush();
        }
        1
    }

    /// Queues an event `pgpipe.emit()` sent as a logical decoding message (already
    /// checked: `channel` and `operation` are the message's).
    pub fn write_emitted(
        &mut self,
        lsn: u64,
        channel: String,
        operation: String,
        message: String,
    ) -> u64 {
        self.pending.push(Pending {
            id: crate::uuid7::uuid_generate_v7(),
            channel,
            operation,
            lsn,
            body: Body::Emitted(message),
        });
        if self.pending.len() >= FLUSH_ROWS {
            self.flush();
        }
        1
    }

    /// Inserts the pending events (as the worker), in the order they were queued.
    pub fn flush(&mut self) {
        self.unrestrict();
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let converter = &mut self.converter;
        let row_cx = self.row_cx.get_or_insert_with(|| new_cx("pgpipe wal row"));
        // SAFETY: inside the read's transaction, which may write; the pending datums live
        // in the batch context until the reset below; the rows' payloads and what their
        // insert allocates go into `row_cx`, reset after each chunk.
        unsafe {
            let mut queue = Queue::open();
            for chunk in pending.chunks(INSERT_ROWS) {
                row_cx.switch_to(|_| {
                    let events: Vec<Event<'_>> =
                        chunk.iter().map(|p| queue_event(converter, p)).collect();
                    queue.insert_batch(&events);
                });
                row_cx.reset();
            }
            queue.close();
        }
        pending.clear();
        self.pending = pending;
        self.reset_cx();
    }

    fn reset_cx(&mut self) {
        if let Some(cx) = self.cx.as_mut() {
            // SAFETY: nothing refers to the converted datums any more.
            unsafe { cx.reset() };
        }
    }
}

fn new_cx(name: &str) -> PgMemoryContexts {
    // SAFETY: TopMemoryContext lives as long as the process.
    unsafe { PgMemoryContexts::TopMemoryContext.switch_to(|_| PgMemoryContexts::new(name)) }
}

/// A pending event's queue row (its payload and key allocated in the current context).
fn queue_event<'a>(converter: &mut Converter, event: &'a Pending) -> Event<'a> {
    let (payload, source, key) = match &event.body {
        Body::Change {
            schema,
            table,
            row,
            old,
            toast,
            key,
        } => {
            let toast = toast.as_deref().map(|text| converter.jsonb(text));
            let change = envelope::Change {
                op: event.operation.as_bytes(),
                schema: schema.as_bytes(),
                table: table.as_bytes(),
                row: *row,
                old: *old,
            };
            // SAFETY: row/old/toast are jsonb datums built in memory.
            let payload = unsafe { envelope::jsonb_payload(&change, toast) };
            (payload, Source::Wal, *key)
        }
        Body::Emitted(message) => {
            let message = converter.jsonb(message);
            // SAFETY: a jsonb datum just built (not toasted).
            unsafe { emitted(message) }
        }
    };
    Event {
        id: event.id,
        channel: event.channel.as_bytes(),
        operation: event.operation.as_bytes(),
        payload,
        source,
        lsn: Some(event.lsn),
        key,
    }
}

/// The payload, source and key of an emitted event, from its message (a jsonb object):
/// `message -> 'payload'` (JSON null when absent), `ddl` when `message ->> 'source'` is
/// `ddl` (else `emit`), and `message -> 'key'` when it is an object.
///
/// # Safety
/// `message` is an untoasted jsonb datum.
pub(crate) unsafe fn emitted(
    message: pg_sys::Datum,
) -> (pg_sys::Datum, Source, Option<pg_sys::Datum>) {
    // SAFETY: the found values point into the message and are copied into new jsonb
    // datums (in the current memory context).
    unsafe {
        let payload = match jsonb::field(message, b"payload") {
            Some(mut value) => jsonb::datum(&mut value),
            None => jsonb::datum(&mut jsonb::embedded(None)),
        };
        let source = match jsonb::field(message, b"source") {
            Some(value)
                if value.type_ == pg_sys::jbvType::jbvString
                    && std::slice::from_raw_parts(
                        value.val.string.val.cast::<u8>(),
                        value.val.string.len as usize,
                    ) == b"ddl" =>
            {
                Source::Ddl
            }
            _ => Source::Emit,
        };
        let key = match jsonb::field(message, b"key") {
            Some(mut value)
                if value.type_ == pg_sys::jbvType::jbvBinary
                    && (*value.val.binary.data).header & pg_sys::JB_FOBJECT != 0 =>
            {
                Some(jsonb::datum(&mut value))
            }
            _ => None,
        };
        (payload, source, key)
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
