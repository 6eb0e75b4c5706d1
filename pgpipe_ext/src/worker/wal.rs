//! WAL capture: the worker decodes its logical replication slot (pgoutput, through a
//! decoding context it keeps, see [`decoder`](super::decoder)) and turns the changes of
//! tables in pgpipe's publication into events.
//!
//! Exactly once into the queue, in commit order:
//! 1. In one transaction, decode whole source transactions in commit order (nothing is
//!    consumed yet), insert their events and record the end LSN of the last source
//!    transaction in `pgpipe.wal_progress`. Source transactions whose commit lies before
//!    that recorded LSN were written by an earlier attempt and are skipped. The progress
//!    row is updated compare-and-set, so two writers can never both commit the same
//!    changes. (A unique key on the events' LSN cannot do it: `pgpipe.events` is
//!    partitioned by the xid of the inserting transaction, which differs between attempts.)
//! 2. After that commit, confirm the slot up to where the read got. A crash between 1 and
//!    2 only means that the next decoding returns transactions that step 1 then skips.
//!
//! Column values arrive as text; [`convert`](super::convert) turns them into JSON as the
//! table's owner, and [`queue`](super::queue) inserts the events in batches.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::pgoutput::{
    self, format_lsn, parse_lsn, Datum as Value, Message, OldKind, Relation, Tuple,
};

/// A log sequence number.
type Lsn = u64;
/// The old image of an UPDATE or DELETE: key columns only, or the full row.
type OldTuple = (OldKind, Tuple);
use super::decoder::{self, Decoder};
use super::queue::{Change, Target, Writer};
use super::raise;
use crate::guc;

/// Prefix of the logical decoding messages `pgpipe.emit()` sends under
/// `pgpipe.emit_mode = 'wal'`: `pgpipe:` and the key in `pgpipe.wal_message_key`, which
/// only the extension's owner can read. Any role may call `pg_logical_emit_message()`;
/// only messages with the key become events.
const EMIT_PREFIX: &str = "pgpipe";

/// The version of this library, which is the extension version whose SQL objects it
/// expects (`pgpipe.control`'s `default_version`).
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a read cycle found.
pub enum ReadOutcome {
    /// `CREATE EXTENSION pgpipe` has not run in this database; `Some(slot)` when pgpipe's
    /// slot is still there (left over by DROP EXTENSION) and holds WAL.
    NoExtension(Option<String>),
    /// The extension is at this version, not the library's ([`LIBRARY_VERSION`]).
    OtherVersion(String),
    /// No slot and no record of one: nothing is subscribed with `mode => 'wal'`.
    NoSlot,
    /// pgpipe created a slot (there is progress for it) but it is gone.
    SlotMissing,
    /// The slot exists but was invalidated.
    SlotInvalidated,
    /// The slot was read.
    Read(Batch),
}

/// The result of reading the slot once.
pub struct Batch {
    /// Events inserted.
    pub events: u64,
    /// The read stopped at the batch size: more may be waiting.
    pub more: bool,
    /// The slot's confirmed LSN before this read.
    pub confirmed: Lsn,
    /// Where to advance the slot once the events are committed.
    pub advance_to: Option<Lsn>,
    /// End LSN of the last source transaction written.
    pub last_commit: Option<Lsn>,
    /// Where this read started decoding (the slot's restart LSN for a new context).
    pub decoded_from: Lsn,
    /// Time spent decoding and converting + inserting.
    pub decode_time: std::time::Duration,
    pub write_time: std::time::Duration,
}

/// The worker's WAL capture state, kept across cycles.
#[derive(Default)]
pub struct WalCapture {
    relations: HashMap<u32, Relation>,
    /// The whole prefix of pgpipe's own messages (`pgpipe:<key>`), read once per
    /// connection to the extension; None until read (or when there is no key).
    message_prefix: Option<Option<String>>,
    writer: Writer,
    /// The decoding context, kept across reads.
    decoder: Option<Decoder>,
}

/// The source transaction being read.
struct SourceXact {
    /// Already written by an earlier attempt (its commit precedes the recorded progress).
    skip: bool,
}

impl WalCapture {
    /// Forgets cached conversions after a failed read.
    pub fn reset(&mut self) {
        self.writer.reset_caches();
        self.message_prefix = None;
        // The context may be anywhere: a new one decodes again from the slot.
        decoder::release_slot();
        self.decoder = None;
    }

    /// Confirms the slot up to `lsn` after the read's transaction committed; a new
    /// decoding context starts next time if the slot moved meanwhile.
    pub fn confirm(&mut self, lsn: Lsn) {
        if let Some(decoder) = self.decoder.as_mut() {
            if !decoder.confirm(lsn) {
                self.decoder = None;
            }
        }
    }

    /// Drops the decoding context: the next read decodes from the slot's position again
    /// (after a read that is not confirmed, `pgpipe.debug_no_advance`).
    pub fn forget_decoder(&mut self) {
        self.decoder = None;
    }

    /// Reads the slot once and writes the events, inside the caller's transaction.
    pub fn read(&mut self) -> ReadOutcome {
        Spi::connect_mut(|client| self.read_with(client))
    }

    fn read_with(&mut self, client: &mut SpiClient<'_>) -> ReadOutcome {
        let version = client
            .select(
                "SELECT (SELECT extversion::text FROM pg_catalog.pg_extension \
                 WHERE extname = 'pgpipe')",
                None,
                &[],
            )
            .and_then(|t| t.first().get::<String>(1))
            .unwrap_or_else(|e| error!("pgpipe worker: look up the extension: {e}"));
        let slot = guc::slot_name();
        let Some(version) = version else {
            let leftover = client
                .select(
                    "SELECT 1 FROM pg_catalog.pg_replication_slots \
                     WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                    None,
                    &[slot.as_str().into()],
                )
                .map(|t| !t.is_empty())
                .unwrap_or(false);
            // A new extension brings a new key.
            self.message_prefix = None;
            return ReadOutcome::NoExtension(leftover.then_some(slot));
        };
        if version != LIBRARY_VERSION {
            // An older schema lacks what this library reads and writes (0.1.0 has no
            // message key, for one): the slot waits, its changes are read after the update.
            self.message_prefix = None;
            return ReadOutcome::OtherVersion(version);
        }
        let publication = guc::publication();

        let (slot_row, progress) = slot_and_progress(client, &slot);
        let Some(slot_row) = slot_row else {
            return if progress.is_some() {
                ReadOutcome::SlotMissing
            } else {
                ReadOutcome::NoSlot
            };
        };
        if slot_row.lost {
            return ReadOutcome::SlotInvalidated;
        }
        if !slot_row.usable {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("replication slot \"{slot}\" is not a pgoutput slot of this database"),
                Some("Set pgpipe.slot_name to a name no other slot uses."),
            );
        }
        let confirmed = slot_row.confirmed;
        let progress = match progress {
            Some(lsn) => lsn,
            None => {
                client
                    .update(
                        "INSERT INTO pgpipe.wal_progress (slot_name, lsn) \
                         VALUES ($1, $2::pg_catalog.pg_lsn) ON CONFLICT DO NOTHING",
                        None,
                        &[slot.as_str().into(), format_lsn(confirmed).into()],
                    )
                    .unwrap_or_else(|e| error!("pgpipe worker: record progress: {e}"));
                confirmed
            }
        };

        let batch = usize::try_from(guc::batch_size()).unwrap_or(usize::MAX);
        // The decoding context of the last read, if the slot is where it left it.
        if !self.decoder.as_mut().is_some_and(Decoder::reacquire) {
            self.decoder = None;
            self.decoder = Some(Decoder::start(&slot, &publication));
        }
        let decoder = self.decoder.as_mut().expect("made above");
        let decode_started = std::time::Instant::now();
        let decoded = decoder.read(batch);
        // Not held while the queue is written (see decoder).
        decoder.release();
        let decode_time = decode_started.elapsed();

        if self.message_prefix.is_none() {
            self.message_prefix = Some(read_message_prefix(client));
        }
        let WalCapture {
            relations,
            writer,
            message_prefix,
            ..
        } = self;
        let message_prefix = message_prefix.as_ref().and_then(Option::as_deref);
        let mut events: u64 = 0;
        let mut xact: Option<SourceXact> = None;
        let mut last_commit: Option<Lsn> = None;
        let mut targets: HashMap<u32, Target> = HashMap::new();
        writer.begin();
        let started = std::time::Instant::now();
        for &(at, ref data) in &decoded.messages {
            let decoded = pgoutput::decode(data).unwrap_or_else(|e| {
                raise(
                    PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                    format!("pgpipe worker: at LSN {}: {e}", format_lsn(at)),
                    None,
                )
            });
            // Message kinds protocol version 1 never sends.
            let Some(message) = decoded else {
                continue;
            };
            match message {
                Message::Begin { final_lsn, .. } => {
                    xact = Some(SourceXact {
                        skip: final_lsn < progress,
                    });
                }
                Message::Commit { end_lsn, .. } => {
                    if xact.take().is_some_and(|x| !x.skip) {
                        last_commit = Some(end_lsn);
                    }
                }
                Message::Relation(relation) => {
                    targets.remove(&relation.id);
                    if relations.get(&relation.id) != Some(&relation) {
                        writer.relation_changed(relation.id);
                        relations.insert(relation.id, relation);
                    }
                }
                Message::Insert { relation, ref new } => {
                    let Some(rel) = next_change(relations, &xact, relation) else {
                        continue;
                    };
                    let change =
                        Change::of_row(at, "INSERT", rel, Some(new.iter().enumerate().collect()));
                    events += writer.write(client, &mut targets, change);
                }
                Message::Update {
                    relation,
                    ref old,
                    ref new,
                } => {
                    let Some(rel) = next_change(relations, &xact, relation) else {
                        continue;
                    };
                    let change = update_change(at, rel, old.as_ref(), new);
                    events += writer.write(client, &mut targets, change);
                }
                Message::Delete { relation, ref old } => {
                    let Some(rel) = next_change(relations, &xact, relation) else {
                        continue;
                    };
                    let change = Change::of_row(at, "DELETE", rel, Some(old_image(rel, old)));
                    events += writer.write(client, &mut targets, change);
                }
                Message::Truncate {
                    relations: ref truncated,
                    ..
                } => {
                    for &relation in truncated {
                        let Some(rel) = next_change(relations, &xact, relation) else {
                            continue;
                        };
                        let change = Change::of_row(at, "TRUNCATE", rel, None);
                        events += writer.write(client, &mut targets, change);
                    }
                }
                Message::Message {
                    transactional,
                    ref prefix,
                    ref content,
                    ..
                } if prefix.starts_with(EMIT_PREFIX) => {
                    if Some(prefix.as_str()) != message_prefix || !transactional {
                        // Never log the prefix: it may be close to the key.
                        warning!(
                            "pgpipe worker: skipped a logical decoding message at LSN {} \
                             whose prefix starts with \"{EMIT_PREFIX}\" but is not the one \
                             pgpipe.emit_wal() uses{}; only pgpipe.emit() under \
                             pgpipe.emit_mode = 'wal' queues events through the WAL",
                            format_lsn(at),
                            if transactional {
                                ""
                            } else {
                                " (or is not transactional)"
                            }
                        );
                        continue;
                    }
                    // Transactional messages come inside their transaction.
                    if xact.as_ref().is_some_and(|x| !x.skip) {
                        if let Some((channel, operation, text)) = emitted_event(at, content) {
                            events += writer.write_emitted(at, channel, operation, text);
                        }
                    }
                }
                Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => {}
            }
        }
        writer.flush();

        if let Some(end) = last_commit {
            record_progress(client, &slot, progress, end);
        }
        if events > 0 {
            client
                .update(
                    "SELECT pg_catalog.pg_notify('pgpipe_wakeup', '')",
                    None,
                    &[],
                )
                .unwrap_or_else(|e| error!("pgpipe worker: notify: {e}"));
        }
        ReadOutcome::Read(Batch {
            events,
            more: decoded.more,
            confirmed,
            // Every transaction that committed before `reached` is now in the queue.
            advance_to: Some(decoded.reached).filter(|&t| t > confirmed),
            last_commit,
            decoded_from: decoded.from,
            decode_time,
            write_time: started.elapsed(),
        })
    }
}

/// The relation of the next change, or None when its transaction was already written.
fn next_change<'r>(
    relations: &'r HashMap<u32, Relation>,
    xact: &Option<SourceXact>,
    relation: u32,
) -> Option<&'r Relation> {
    let Some(x) = xact.as_ref() else {
        error!("pgpipe worker: change outside of a transaction in the slot's output");
    };
    if x.skip {
        return None;
    }
    let rel = relations.get(&relation).unwrap_or_else(|| {
        error!("pgpipe worker: change for relation {relation} before its description")
    });
    Some(rel)
}

/// The slot as `pg_replication_slots` shows it.
struct SlotRow {
    lost: bool,
    usable: bool,
    confirmed: Lsn,
}

fn slot_and_progress(client: &SpiClient<'_>, slot: &str) -> (Option<SlotRow>, Option<Lsn>) {
    let slot_row = client
        .select(
            "SELECT coalesce(wal_status = 'lost', false), \
                    plugin = 'pgoutput' AND database = pg_catalog.current_database() \
                        AND slot_type = 'logical', \
                    coalesce(confirmed_flush_lsn, '0/0')::text \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            None,
            &[slot.into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: look up the slot: {e}"));
    let slot_row = if slot_row.is_empty() {
        None
    } else {
        let row = slot_row.first();
        let read = |n| {
            row.get::<String>(n)
                .unwrap_or_else(|e| error!("pgpipe worker: read the slot: {e}"))
        };
        let lost = row.get::<bool>(1).ok().flatten();
        let usable = row.get::<bool>(2).ok().flatten();
        let confirmed = read(3);
        Some(SlotRow {
            lost: lost.unwrap_or(false),
            usable: usable.unwrap_or(false),
            confirmed: confirmed.as_deref().and_then(parse_lsn).unwrap_or(0),
        })
    };
    let progress = client
        .select(
            "SELECT lsn::text FROM pgpipe.wal_progress WHERE slot_name = $1",
            None,
            &[slot.into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: read pgpipe.wal_progress: {e}"));
    let progress = if progress.is_empty() {
        None
    } else {
        progress
            .first()
            .get_one::<String>()
            .ok()
            .flatten()
            .and_then(|s| parse_lsn(&s))
    };
    (slot_row, progress)
}

fn record_progress(client: &mut SpiClient<'_>, slot: &str, previous: Lsn, lsn: Lsn) {
    // Compare-and-set: if anything else moved the progress since this transaction read
    // it, fail (and roll the events back) rather than write them twice.
    let updated = client
        .update(
            "UPDATE pgpipe.wal_progress SET lsn = $2::pg_catalog.pg_lsn, updated_at = now() \
             WHERE slot_name = $1 AND lsn = $3::pg_catalog.pg_lsn",
            None,
            &[
                slot.into(),
                format_lsn(lsn).into(),
                format_lsn(previous).into(),
            ],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: record progress: {e}"))
        .len();
    if updated != 1 {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("pgpipe worker: progress of slot \"{slot}\" changed concurrently; retrying"),
            None,
        );
    }
}

/// The channel, operation and text of a message `pgpipe.emit()` sent, or None (logged)
/// for a message with our prefix that is not one (someone else's): skipped rather than
/// stopping capture.
fn emitted_event(lsn: Lsn, content: &[u8]) -> Option<(String, String, String)> {
    let parsed = std::str::from_utf8(content).ok().and_then(|text| {
        let message = serde_json::from_str::<serde_json::Value>(text).ok()?;
        let channel = message["channel"].as_str()?.to_string();
        let operation = message["operation"].as_str()?.to_string();
        Some((channel, operation, text.to_string()))
    });
    match parsed {
        Some((channel, ..)) if !valid_channel(&channel) => {
            warning!(
                "pgpipe worker: skipped a logical decoding message at LSN {}: invalid channel \
                 name (1 to 63 letters, digits, '_', '.', ':' or '-')",
                format_lsn(lsn)
            );
            None
        }
        Some(event) => Some(event),
        None => {
            warning!(
                "pgpipe worker: skipped a logical decoding message at LSN {}: not an object \
                 with a string channel and operation",
                format_lsn(lsn)
            );
            None
        }
    }
}

/// `pgpipe:` and the key of pgpipe's own messages; None without a key (then no message
/// becomes an event).
fn read_message_prefix(client: &SpiClient<'_>) -> Option<String> {
    let exists = client
        .select(
            "SELECT pg_catalog.to_regclass('pgpipe.wal_message_key') IS NOT NULL",
            None,
            &[],
        )
        .ok()
        .and_then(|t| t.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false);
    let key = exists
        .then(|| {
            client
                .select(
                    "SELECT k.key FROM pgpipe.wal_message_key k LIMIT 1",
                    None,
                    &[],
                )
                .ok()
                .and_then(|t| t.first().get_one::<String>().ok().flatten())
        })
        .flatten()
        .filter(|key| !key.is_empty());
    if key.is_none() {
        warning!(
            "pgpipe worker: pgpipe.wal_message_key holds no key: events emitted through the \
             WAL (pgpipe.emit_mode = 'wal') are not queued"
        );
    }
    key.map(|key| format!("{EMIT_PREFIX}:{key}"))
}

/// The rule of `pgpipe.check_channel`: `^[A-Za-z0-9_.:-]{1,63}$`.
fn valid_channel(channel: &str) -> bool {
    (1..=63).contains(&channel.len())
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// Column values of an old image: every column of a full image, the key columns of a key
/// image (the others are NULL in it, which would be a lie).
fn old_image<'a>(rel: &Relation, old: &'a OldTuple) -> Vec<(usize, &'a Value)> {
    match old {
        (OldKind::Full, t) => t
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != Value::UnchangedToast)
            .collect(),
        (OldKind::Key, t) => t
            .iter()
            .enumerate()
            .filter(|(i, _)| rel.columns.get(*i).is_some_and(|c| c.key))
            .collect(),
    }
}

fn update_change<'a>(
    lsn: Lsn,
    rel: &'a Relation,
    old: Option<&'a OldTuple>,
    new: &'a [Value],
) -> Change<'a> {
    let full_old = match old {
        Some((OldKind::Full, t)) => Some(t),
        _ => None,
    };
    let mut unchanged_toast = Vec::new();
    let mut row = Vec::with_capacity(new.len());
    for (i, value) in new.iter().enumerate() {
        if *value == Value::UnchangedToast {
            match full_old.and_then(|t| t.get(i)) {
                Some(v) if *v != Value::UnchangedToast => row.push((i, v)),
                _ => {
                    if let Some(column) = rel.columns.get(i) {
                        unchanged_toast.push(column.name.clone());
                    }
                }
            }
        } else {
            row.push((i, value));
        }
    }
    let old = match old {
        Some(old) => Some(old_image(rel, old)),
        // The key did not change: the old key is in the new row.
        None => {
            let key: Vec<(usize, &Value)> = row
                .iter()
                .copied()
                .filter(|(i, _)| rel.columns.get(*i).is_some_and(|c| c.key))
                .collect();
            (!key.is_empty()).then_some(key)
        }
    };
    Change {
        lsn,
        operation: "UPDATE",
        relation: rel,
        row: Some(row),
        old,
        unchanged_toast,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::pgoutput::Column;
    use crate::worker::queue::default_channel;

    fn rel() -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: ["id", "doc", "note"]
                .iter()
                .enumerate()
                .map(|(i, name)| Column {
                    key: i == 0,
                    name: (*name).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn update_without_old_image_lists_unchanged_toast_and_keeps_the_key() {
        let rel = rel();
        let new = vec![
            Value::Text("1".into()),
            Value::UnchangedToast,
            Value::Text("x".into()),
        ];
        let change = update_change(1, &rel, None, &new);
        assert_eq!(change.unchanged_toast, vec!["doc".to_string()]);
        let row: Vec<usize> = change.row.unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(row, vec![0, 2]);
        let old: Vec<usize> = change.old.unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(old, vec![0]);
    }

    #[test]
    fn update_with_full_old_image_fills_unchanged_toast() {
        let rel = rel();
        let old = (
            OldKind::Full,
            vec![
                Value::Text("1".into()),
                Value::Text("big".into()),
                Value::Null,
            ],
        );
        let new = vec![
            Value::Text("1".into()),
            Value::UnchangedToast,
            Value::Text("x".into()),
        ];
        let change = update_change(1, &rel, Some(&old), &new);
        assert!(change.unchanged_toast.is_empty());
        let row = change.row.unwrap();
        assert_eq!(row[1], (1, &Value::Text("big".into())));
        assert_eq!(change.old.unwrap().len(), 3);
    }

    #[test]
    fn key_image_keeps_only_key_columns() {
        let rel = rel();
        let old = (
            OldKind::Key,
            vec![Value::Text("7".into()), Value::Null, Value::Null],
        );
        let image = old_image(&rel, &old);
        assert_eq!(image, vec![(0, &Value::Text("7".into()))]);
    }

    #[test]
    fn default_channel_follows_subscribe() {
        let mut r = rel();
        assert_eq!(default_channel(&r), "t");
        r.namespace = "shop".into();
        assert_eq!(default_channel(&r), "shop.t");
    }
}
