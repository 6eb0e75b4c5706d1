//! From decoded pgoutput messages to events (pure: no I/O).
//!
//! - Channel: `pgpipe:<table>`, or `pgpipe:<schema>.<table>` outside `public` (the
//!   original pgpipe's naming); transaction markers go to `pgpipe:_txn`.
//! - Payload: `{op, schema, table, row, old}` with typed values (see [`super::value`]),
//!   the same as the extension's capture. `row` is the new row (the old one for DELETE);
//!   `old` is the previous row for UPDATE with REPLICA IDENTITY FULL, else only its key
//!   columns (null for tables without a key). A DELETE without REPLICA IDENTITY FULL
//!   carries only the key columns in `row`. TRUNCATE gives one event per table with
//!   `row` and `old` null.
//! - Unchanged TOASTed values (not sent by Postgres for an UPDATE that did not touch
//!   them) are taken from the old row when it was sent (REPLICA IDENTITY FULL); otherwise
//!   they are left out of `row` and named in `payload.unchanged_toast`.
//! - Key: the table's primary-key columns of `row` (the old row for DELETE), as the
//!   extension's capture gives them; null for a table without a primary key, for
//!   TRUNCATE and when `row` lacks a key column (an unchanged TOASTed key value, or a
//!   DELETE under REPLICA IDENTITY USING INDEX of another index). The primary key comes
//!   from the catalog: the Relation message's key flags are the replica identity, which
//!   may be FULL.
//! - Ids: UUIDv7 derived from the commit (time, LSN) and the change's ordinal within its
//!   transaction, so a change delivered again after a restart carries the same id.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::pgoutput::{Datum, Message, OldKind, Relation, Tuple};
use super::value::{self, Kind};
use crate::event::{Event, Transaction};

/// The `source` of events from this detector.
pub const SOURCE: &str = "wal_replication";

/// Channel of BEGIN/COMMIT marker events.
pub const TX_CHANNEL: &str = "pgpipe:_txn";

/// Microseconds between the Unix epoch and Postgres' (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// What the builder adds to events.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Add `transaction {xid, commit_time, seq}` to every event.
    pub tx_metadata: bool,
    /// Emit BEGIN/COMMIT marker events.
    pub tx_markers: bool,
    /// Only these channels (empty: all).
    pub channels: Vec<String>,
}

struct Tx {
    commit_lsn: u64,
    commit_time: DateTime<Utc>,
    xid: u64,
    /// Changes seen so far (filtered ones included, so ids do not depend on the filter).
    ordinal: u32,
    /// Events emitted so far.
    emitted: u64,
}

/// A table's shape, how each column converts, and its primary-key column names.
struct Table {
    relation: Relation,
    kinds: Vec<Kind>,
    primary_key: Vec<String>,
}

/// Turns a transaction's messages into events.
pub struct ChangeBuilder {
    options: Options,
    tables: HashMap<u32, Table>,
    tx: Option<Tx>,
}

/// A message the builder could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ChangeBuilder {
    /// A builder with no known relations.
    pub fn new(options: Options) -> Self {
        ChangeBuilder {
            options,
            tables: HashMap::new(),
            tx: None,
        }
    }

    /// Records a relation's shape with the conversion of each of its columns and its
    /// primary key (empty: none).
    pub fn relation(&mut self, relation: Relation, kinds: Vec<Kind>, primary_key: Vec<String>) {
        self.tables.insert(
            relation.id,
            Table {
                relation,
                kinds,
                primary_key,
            },
        );
    }

    /// Whether a transaction is open (between BEGIN and COMMIT).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Starts a transaction; returns the BEGIN marker when markers are on.
    pub fn begin(&mut self, commit_lsn: u64, commit_time_pg: i64, xid: u64) -> Option<Event> {
        let commit_time = pg_time(commit_time_pg);
        self.tx = Some(Tx {
            commit_lsn,
            commit_time,
            xid,
            ordinal: 0,
            emitted: 0,
        });
        self.options.tx_markers.then(|| {
            let mut payload = Map::new();
            payload.insert("xid".into(), Value::from(xid));
            payload.insert("commit_time".into(), Value::String(rfc3339(commit_time)));
            self.marker("BEGIN", 0, payload)
        })
    }

    /// Ends the transaction; returns the COMMIT marker when markers are on.
    pub fn commit(&mut self) -> Option<Event> {
        let tx = self.tx.as_ref()?;
        let event = self.options.tx_markers.then(|| {
            let mut payload = Map::new();
            payload.insert("xid".into(), Value::from(tx.xid));
            payload.insert("commit_time".into(), Value::String(rfc3339(tx.commit_time)));
            payload.insert("event_count".into(), Value::from(tx.emitted));
            self.marker("COMMIT", tx.ordinal.saturating_add(1), payload)
        });
        self.tx = None;
        event
    }

    /// The events of one change message (Insert, Update, Delete, Truncate); other
    /// messages give none.
    pub fn change(&mut self, message: &Message) -> Result<Vec<Event>, BuildError> {
        let changes: Vec<(u32, &'static str, Value, Value, Vec<String>)> = match message {
            Message::Insert { relation, new } => {
                let table = self.table(*relation)?;
                let (row, toast) = table.row(new, false, None);
                vec![(*relation, "INSERT", Value::Object(row), Value::Null, toast)]
            }
            Message::Update { relation, old, new } => {
                let table = self.table(*relation)?;
                let (old_row, mut toast) = match old {
                    Some((kind, tuple)) => {
                        let (map, toast) = table.row(tuple, *kind == OldKind::Key, None);
                        (Some((*kind, map)), toast)
                    }
                    None => (None, Vec::new()),
                };
                // Old values of columns the new tuple did not resend are only usable
                // from a full old row.
                let fill = match &old_row {
                    Some((OldKind::Full, map)) => Some(map),
                    _ => None,
                };
                let (row, new_toast) = table.row(new, false, fill);
                toast.extend(new_toast);
                let old = match old_row {
                    Some((_, map)) => Value::Object(map),
                    None => table.key_of(&row),
                };
                vec![(*relation, "UPDATE", Value::Object(row), old, toast)]
            }
            Message::Delete { relation, old } => {
                let table = self.table(*relation)?;
                let (row, toast) = table.row(&old.1, old.0 == OldKind::Key, None);
                vec![(*relation, "DELETE", Value::Object(row), Value::Null, toast)]
            }
            Message::Truncate { relations, .. } => relations
                .iter()
                .map(|r| {
                    self.table(*r)?;
                    Ok((*r, "TRUNCATE", Value::Null, Value::Null, Vec::new()))
                })
                .collect::<Result<_, BuildError>>()?,
            _ => return Ok(Vec::new()),
        };
        let mut events = Vec::with_capacity(changes.len());
        for (relation, op, row, old, toast) in changes {
            let key = self.tables[&relation].primary_key_of(&row);
            let tx = self
                .tx
                .as_mut()
                .ok_or_else(|| BuildError(format!("{op} outside a transaction")))?;
            tx.ordinal = tx.ordinal.saturating_add(1);
            let table = &self.tables[&relation].relation;
            let channel = channel_of(&table.namespace, &table.name);
            if !self.options.channels.is_empty() && !self.options.channels.contains(&channel) {
                continue;
            }
            tx.emitted += 1;
            let mut payload = Map::new();
            payload.insert("op".into(), Value::from(op));
            payload.insert("schema".into(), Value::from(table.namespace.clone()));
            payload.insert("table".into(), Value::from(table.name.clone()));
            payload.insert("row".into(), row);
            payload.insert("old".into(), old);
            if !toast.is_empty() {
                payload.insert(
                    "unchanged_toast".into(),
                    Value::Array(toast.into_iter().map(Value::String).collect()),
                );
            }
            events.push(Event {
                id: event_id(tx.commit_time, tx.commit_lsn, tx.ordinal),
                channel,
                operation: op.into(),
                payload: Value::Object(payload),
                key,
                source: SOURCE.into(),
                created_at: tx.commit_time,
                transaction: self.options.tx_metadata.then_some(Transaction {
                    xid: tx.xid,
                    commit_time: Some(tx.commit_time),
                    seq: Some(u64::from(tx.ordinal)),
                }),
            });
        }
        Ok(events)
    }

    fn table(&self, relation: u32) -> Result<&Table, BuildError> {
        self.tables.get(&relation).ok_or_else(|| {
            BuildError(format!(
                "change for relation {relation} before its Relation message"
            ))
        })
    }

    fn marker(&self, op: &str, ordinal: u32, payload: Map<String, Value>) -> Event {
        let tx = self.tx.as_ref().expect("markers only inside a transaction");
        Event {
            id: event_id(tx.commit_time, tx.commit_lsn, ordinal),
            channel: TX_CHANNEL.into(),
            operation: op.into(),
            payload: Value::Object(payload),
            key: None,
            source: SOURCE.into(),
            created_at: tx.commit_time,
            transaction: Some(Transaction {
                xid: tx.xid,
                commit_time: Some(tx.commit_time),
                seq: None,
            }),
        }
    }
}

impl Table {
    /// The JSON object of a tuple, and the names of unchanged TOAST columns left out.
    fn row(
        &self,
        tuple: &Tuple,
        keys_only: bool,
        fill: Option<&Map<String, Value>>,
    ) -> (Map<String, Value>, Vec<String>) {
        let mut row = Map::new();
        let mut toast = Vec::new();
        for ((column, kind), datum) in self.relation.columns.iter().zip(&self.kinds).zip(tuple) {
            if keys_only && !column.key {
                continue;
            }
            let value = match datum {
                Datum::Null => Value::Null,
                Datum::Text(text) => value::to_json(kind, text),
                Datum::Binary(bytes) => Value::String(format!("\\x{}", hex(bytes))),
                Datum::UnchangedToast => match fill.and_then(|f| f.get(&column.name)) {
                    Some(v) => v.clone(),
                    None => {
                        toast.push(column.name.clone());
                        continue;
                    }
                },
            };
            row.insert(column.name.clone(), value);
        }
        (row, toast)
    }

    /// The event's key: the primary-key columns of `row`; None without a primary key or
    /// when `row` (null for TRUNCATE) lacks one of them.
    fn primary_key_of(&self, row: &Value) -> Option<Value> {
        if self.primary_key.is_empty() {
            return None;
        }
        let key: Option<Map<String, Value>> = self
            .primary_key
            .iter()
            .map(|c| row.get(c).map(|v| (c.clone(), v.clone())))
            .collect();
        key.map(Value::Object)
    }

    /// The key columns of `row`, or null when the table has no replica identity key.
    fn key_of(&self, row: &Map<String, Value>) -> Value {
        let key: Map<String, Value> = self
            .relation
            .columns
            .iter()
            .filter(|c| c.key)
            .filter_map(|c| row.get(&c.name).map(|v| (c.name.clone(), v.clone())))
            .collect();
        if key.is_empty() {
            Value::Null
        } else {
            Value::Object(key)
        }
    }
}

/// `pgpipe:<table>`, or `pgpipe:<schema>.<table>` outside `public`.
pub fn channel_of(schema: &str, table: &str) -> String {
    if schema.is_empty() || schema == "public" {
        format!("pgpipe:{table}")
    } else {
        format!("pgpipe:{schema}.{table}")
    }
}

/// A UUIDv7 that is a pure function of the commit and the change's ordinal: the commit
/// time in the 48-bit millisecond field and (as RFC 9562's sub-millisecond fraction) the
/// 12-bit `rand_a`; the low 30 bits of the commit LSN and the 32-bit ordinal in `rand_b`.
/// Two commits in the same 250 ns have different LSNs, so ids never collide, and ids of
/// one transaction sort in change order.
pub fn event_id(commit_time: DateTime<Utc>, commit_lsn: u64, ordinal: u32) -> Uuid {
    let micros = commit_time.timestamp_micros().max(0) as u128;
    let millis = (micros / 1000) & ((1 << 48) - 1);
    let fraction = ((micros % 1000) * 4096 / 1000) & 0xfff;
    let rand_b = (u128::from(commit_lsn & 0x3fff_ffff) << 32) | u128::from(ordinal);
    Uuid::from_u128((millis << 80) | (0x7 << 76) | (fraction << 64) | (0b10 << 62) | rand_b)
}

/// Postgres time (microseconds since 2000-01-01) as UTC.
pub fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or_default()
}

/// The 64-bit (epoch-extended) form of a 32-bit xid, given a recent 64-bit xid of the
/// same cluster (any within 2^31 of it).
pub fn full_xid(xid: u32, reference: u64) -> u64 {
    let delta = i64::from(xid.wrapping_sub(reference as u32) as i32);
    (reference as i64).saturating_add(delta).max(0) as u64
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::Column;
    use super::*;
    use serde_json::json;

    fn orders() -> (Relation, Vec<Kind>) {
        let col = |name: &str, type_oid: u32, key: bool| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            key,
        };
        let rel = Relation {
            id: 1,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", 23, true),
                col("total", 1700, false),
                col("doc", 25, false),
                col("meta", 3802, false),
            ],
        };
        let kinds = rel
            .columns
            .iter()
            .map(|c| value::builtin_kind(c.type_oid).unwrap())
            .collect();
        (rel, kinds)
    }

    fn t(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    fn builder(options: Options) -> ChangeBuilder {
        let mut b = ChangeBuilder::new(options);
        let (rel, kinds) = orders();
        b.relation(rel, kinds, vec!["id".into()]);
        b
    }

    #[test]
    fn insert_update_delete_truncate() {
        let mut b = builder(Options::default());
        assert!(b.begin(0x100, 0, 700).is_none());
        let ins = b
            .change(&Message::Insert {
                relation: 1,
                new: vec![t("1"), t("10.50"), t("big"), t(r#"{"k": "v"}"#)],
            })
            .unwrap();
        assert_eq!(ins.len(), 1);
        assert_eq!(ins[0].channel, "pgpipe:orders");
        assert_eq!(ins[0].source, "wal_replication");
        assert_eq!(
            serde_json::to_string(&ins[0].payload).unwrap(),
            r#"{"op":"INSERT","schema":"public","table":"orders","row":{"id":1,"total":10.50,"doc":"big","meta":{"k":"v"}},"old":null}"#
        );
        assert!(ins[0].transaction.is_none());
        assert_eq!(ins[0].key, Some(json!({"id": 1})));

        // Default identity, key unchanged: no old tuple; old = the key; TOAST omitted.
        let upd = b
            .change(&Message::Update {
                relation: 1,
                old: None,
                new: vec![t("1"), t("11"), Datum::UnchangedToast, Datum::Null],
            })
            .unwrap();
        assert_eq!(
            upd[0].payload,
            json!({"op": "UPDATE", "schema": "public", "table": "orders",
                   "row": {"id": 1, "total": 11, "meta": null}, "old": {"id": 1},
                   "unchanged_toast": ["doc"]})
        );

        // REPLICA IDENTITY FULL: the TOAST value comes from the old row.
        let upd = b
            .change(&Message::Update {
                relation: 1,
                old: Some((OldKind::Full, vec![t("1"), t("11"), t("big"), Datum::Null])),
                new: vec![t("1"), t("12"), Datum::UnchangedToast, Datum::Null],
            })
            .unwrap();
        assert_eq!(
            upd[0].payload["row"],
            json!({"id": 1, "total": 12, "doc": "big", "meta": null})
        );
        assert_eq!(
            upd[0].payload["old"],
            json!({"id": 1, "total": 11, "doc": "big", "meta": null})
        );
        assert!(upd[0].payload.get("unchanged_toast").is_none());
        assert_eq!(upd[0].key, Some(json!({"id": 1})));

        let del = b
            .change(&Message::Delete {
                relation: 1,
                old: (
                    OldKind::Key,
                    vec![t("1"), Datum::Null, Datum::Null, Datum::Null],
                ),
            })
            .unwrap();
        assert_eq!(del[0].operation, "DELETE");
        assert_eq!(del[0].payload["row"], json!({"id": 1}));
        assert_eq!(del[0].payload["old"], Value::Null);
        assert_eq!(
            del[0].key,
            Some(json!({"id": 1})),
            "DELETE: the old row's key"
        );

        let tr = b
            .change(&Message::Truncate {
                options: 0,
                relations: vec![1],
            })
            .unwrap();
        assert_eq!(
            tr[0].payload,
            json!({"op": "TRUNCATE", "schema": "public", "table": "orders", "row": null, "old": null})
        );
        assert_eq!(tr[0].key, None, "TRUNCATE has no key");
        assert!(b.commit().is_none());
        assert!(!b.in_transaction());
        let ids: Vec<Uuid> = [&ins, &upd, &del, &tr].iter().map(|e| e[0].id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ids of one transaction sort in change order");
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
    }

    #[test]
    fn keys_follow_the_primary_key_not_the_replica_identity() {
        // REPLICA IDENTITY FULL flags every column as key; the primary key is (id, doc).
        let (mut rel, kinds) = orders();
        rel.columns.iter_mut().for_each(|c| c.key = true);
        let mut b = ChangeBuilder::new(Options::default());
        b.relation(rel.clone(), kinds.clone(), vec!["id".into(), "doc".into()]);
        b.begin(0x100, 0, 700);
        let ins = b
            .change(&Message::Insert {
                relation: 1,
                new: vec![t("1"), t("2"), t("d"), Datum::Null],
            })
            .unwrap();
        assert_eq!(ins[0].key, Some(json!({"id": 1, "doc": "d"})));
        // A key column left out of the row (unchanged TOAST): no key rather than a wrong one.
        let upd = b
            .change(&Message::Update {
                relation: 1,
                old: None,
                new: vec![t("1"), t("3"), Datum::UnchangedToast, Datum::Null],
            })
            .unwrap();
        assert_eq!(upd[0].key, None);
        // Without a primary key: null.
        let mut b = ChangeBuilder::new(Options::default());
        b.relation(rel, kinds, Vec::new());
        b.begin(0x100, 0, 700);
        let ins = b
            .change(&Message::Insert {
                relation: 1,
                new: vec![t("1"), t("2"), t("d"), Datum::Null],
            })
            .unwrap();
        assert_eq!(ins[0].key, None);
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let run = || {
            let mut b = builder(Options {
                tx_metadata: true,
                ..Options::default()
            });
            b.begin(0x2000, 800_000_000_000_000, 42);
            let e = b
                .change(&Message::Insert {
                    relation: 1,
                    new: vec![t("1"), Datum::Null, Datum::Null, Datum::Null],
                })
                .unwrap();
            b.commit();
            e[0].clone()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b, "a redelivered change is the same event");
        assert_eq!(
            a.transaction,
            Some(Transaction {
                xid: 42,
                commit_time: Some(pg_time(800_000_000_000_000)),
                seq: Some(1)
            })
        );
        let t = pg_time(800_000_000_000_000);
        assert_ne!(event_id(t, 0x2000, 1), event_id(t, 0x2100, 1));
        assert_ne!(event_id(t, 0x2000, 1), event_id(t, 0x2000, 2));
        assert_eq!(
            event_id(t, 0x2000, 1).get_timestamp().unwrap().to_unix().0 as i64,
            t.timestamp()
        );
    }

    #[test]
    fn markers_and_channel_filter() {
        let mut b = builder(Options {
            tx_metadata: false,
            tx_markers: true,
            channels: vec!["pgpipe:other".into()],
        });
        let begin = b.begin(0x300, 0, 9).unwrap();
        assert_eq!(begin.operation, "BEGIN");
        assert_eq!(begin.channel, TX_CHANNEL);
        assert_eq!(begin.payload["xid"], json!(9));
        let e = b
            .change(&Message::Insert {
                relation: 1,
                new: vec![t("1"), Datum::Null, Datum::Null, Datum::Null],
            })
            .unwrap();
        assert!(e.is_empty(), "filtered by channel");
        let commit = b.commit().unwrap();
        assert_eq!(commit.operation, "COMMIT");
        assert_eq!(commit.payload["event_count"], json!(0));
        assert!(begin.id < commit.id);
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let mut b = builder(Options::default());
        b.begin(1, 0, 1);
        assert!(b
            .change(&Message::Insert {
                relation: 99,
                new: vec![]
            })
            .is_err());
    }

    #[test]
    fn helpers() {
        assert_eq!(channel_of("public", "orders"), "pgpipe:orders");
        assert_eq!(channel_of("shop", "orders"), "pgpipe:shop.orders");
        assert_eq!(full_xid(5, (3 << 32) + 10), (3 << 32) + 5);
        assert_eq!(
            full_xid(u32::MAX - 1, (3 << 32) + 10),
            (3 << 32) - 2,
            "previous epoch"
        );
        assert_eq!(full_xid(20, 10), 20);
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
    }
}
