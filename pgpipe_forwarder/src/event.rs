//! The event envelope, the same for every detector and capture mode (DESIGN.md, "The event").

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

mod payload;
pub use payload::Payload;

/// One change or message, as delivered to every adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// UUIDv7 minted where the change was captured; the idempotency key everywhere.
    pub id: Uuid,
    /// Channel the event belongs to.
    pub channel: String,
    /// INSERT, UPDATE, DELETE, TRUNCATE, READ (a snapshot's rows), DDL (a schema change),
    /// EMIT (or the emitter's own), NOTIFY.
    pub operation: String,
    /// The change (`{op, schema, table, row, old}`) or the emitted/notified payload, as
    /// JSON text ([`Payload::value`] parses it where structure is needed).
    pub payload: Payload,
    /// The ordering key: the row's primary-key columns as a JSON object; null for tables
    /// without one, for emits that give none and for notifications.
    #[serde(default)]
    pub key: Option<serde_json::Value>,
    /// `trigger`, `wal`, `emit`, `snapshot` (READ events), `ddl` (schema changes),
    /// `listen_notify` or `wal_replication`.
    pub source: String,
    /// When the event was captured (UTC).
    #[serde(serialize_with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// The transaction that produced the event, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<Transaction>,
}

/// Transaction metadata of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// Transaction id (64-bit, epoch-extended).
    pub xid: u64,
    /// Commit time, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<DateTime<Utc>>,
    /// 1-based position of the event within its transaction, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// An event on its way through the bus: `seq` orders it in the forwarder's acknowledgement
/// window, the event itself is shared by every adapter.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Position in the detector's in-flight window.
    pub seq: u64,
    /// The event.
    pub event: Arc<Event>,
}

impl Event {
    /// The event as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("an Event always serializes")
    }
}

fn rfc3339_micros<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keys_come_in_the_original_order() {
        let event = Event {
            id: Uuid::nil(),
            channel: "orders".into(),
            operation: "INSERT".into(),
            payload: serde_json::json!({"op": "INSERT"}).into(),
            key: Some(serde_json::json!({"id": 1})),
            source: "trigger".into(),
            created_at: DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap(),
            transaction: None,
        };
        let line = event.to_json_line();
        assert_eq!(
            line,
            r#"{"id":"00000000-0000-0000-0000-000000000000","channel":"orders","operation":"INSERT","payload":{"op":"INSERT"},"key":{"id":1},"source":"trigger","created_at":"2027-01-15T08:00:00.123456Z"}"#
        );
    }
}
