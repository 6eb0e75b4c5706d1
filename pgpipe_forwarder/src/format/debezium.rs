//! The value of a Debezium PostgreSQL change event (as the JSON converter writes it with
//! `schemas.enable=false`): `before`, `after`, `source {...}`, `op`, `ts_ms`.
//!
//! - `op`: `c` INSERT, `u` UPDATE, `d` DELETE, `r` READ (snapshot), `t` TRUNCATE; any other
//!   event (an emit, a notification) is a message, `m`, with `message.prefix` = the
//!   channel and `message.content` = the payload as JSON (Debezium sends the bytes of a
//!   logical decoding message base64-encoded; pgpipe's payloads are JSON already).
//! - `before` is the previous row for UPDATE (as complete as the capture gives it) and
//!   the deleted row for DELETE; `after` the new row for INSERT, UPDATE and READ.
//! - `source`: Debezium's fields where pgpipe knows them (`connector` = `postgresql`,
//!   `name` and `db` = the database, `ts_ms` = when the change was captured, `snapshot`,
//!   `schema`, `table`, `txId`), `lsn` null, plus `pgpipe_id` (the event id, the
//!   idempotency key) and `pgpipe_channel`.

use serde_json::{json, Value};

use super::{table_of, Origin};
use crate::event::Event;

/// Debezium's `op` for a pgpipe operation (`m` for anything that is not a row change).
fn op(operation: &str) -> &'static str {
    match operation {
        "INSERT" => "c",
        "UPDATE" => "u",
        "DELETE" => "d",
        "READ" => "r",
        "TRUNCATE" => "t",
        _ => "m",
    }
}

/// The Debezium value of `event`.
pub(super) fn value(event: &Event, origin: &Origin) -> Value {
    let op = op(&event.operation);
    let table = table_of(event);
    let field = |name: &str| {
        event
            .payload
            .value()
            .get(name)
            .cloned()
            .filter(|_| table.is_some())
            .unwrap_or(Value::Null)
    };
    let (before, after) = match op {
        "c" | "r" => (Value::Null, field("row")),
        "u" => (field("old"), field("row")),
        "d" => (field("row"), Value::Null),
        _ => (Value::Null, Value::Null),
    };
    let (schema, table_name) = table.map_or((Value::Null, Value::Null), |(s, t)| {
        (Value::String(s), Value::String(t))
    });
    let source = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connector": "postgresql",
        "name": origin.database,
        "ts_ms": event.created_at.timestamp_millis(),
        "snapshot": if op == "r" { "true" } else { "false" },
        "db": origin.database,
        "schema": schema,
        "table": table_name,
        "txId": event.transaction.as_ref().map(|t| t.xid),
        "lsn": Value::Null,
        "pgpipe_id": event.id.to_string(),
        "pgpipe_channel": event.channel,
    });
    let ts_ms = chrono::Utc::now().timestamp_millis();
    if op == "m" {
        return json!({
            "op": "m",
            "ts_ms": ts_ms,
            "source": source,
            "message": {"prefix": event.channel, "content": event.payload.value()},
        });
    }
    json!({
        "before": before,
        "after": after,
        "source": source,
        "op": op,
        "ts_ms": ts_ms,
        "transaction": Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Transaction;
    use chrono::Utc;

    fn event(operation: &str, payload: Value) -> Event {
        Event {
            id: uuid::Uuid::nil(),
            channel: "orders".into(),
            operation: operation.into(),
            payload: payload.into(),
            key: None,
            source: "trigger".into(),
            created_at: Utc::now(),
            transaction: Some(Transaction {
                xid: 42,
                commit_time: None,
                seq: None,
            }),
        }
    }

    fn origin() -> Origin {
        Origin::from_database_url("postgres://db/shop")
    }

    #[test]
    fn row_changes_become_before_and_after() {
        let row = json!({"id": 1, "total": 5});
        let old = json!({"id": 1, "total": 4});
        let change = |op: &str, row: &Value, old: &Value| json!({"op": op, "schema": "public", "table": "orders", "row": row, "old": old});
        let v = value(
            &event("INSERT", change("INSERT", &row, &Value::Null)),
            &origin(),
        );
        assert_eq!(
            (v["op"].as_str(), &v["before"], &v["after"]),
            (Some("c"), &Value::Null, &row)
        );
        assert_eq!(v["source"]["table"], "orders");
        assert_eq!(v["source"]["txId"], 42);
        assert_eq!(v["source"]["snapshot"], "false");
        let v = value(&event("UPDATE", change("UPDATE", &row, &old)), &origin());
        assert_eq!(
            (v["op"].as_str(), &v["before"], &v["after"]),
            (Some("u"), &old, &row)
        );
        let v = value(
            &event("DELETE", change("DELETE", &old, &Value::Null)),
            &origin(),
        );
        assert_eq!(
            (v["op"].as_str(), &v["before"], &v["after"]),
            (Some("d"), &old, &Value::Null)
        );
        let v = value(
            &event("READ", change("READ", &row, &Value::Null)),
            &origin(),
        );
        assert_eq!(
            (v["op"].as_str(), &v["source"]["snapshot"]),
            (Some("r"), &json!("true"))
        );
    }

    #[test]
    fn other_events_are_messages() {
        let v = value(&event("EMIT", json!({"hello": "world"})), &origin());
        assert_eq!(v["op"], "m");
        assert_eq!(v["message"]["prefix"], "orders");
        assert_eq!(v["message"]["content"]["hello"], "world");
        assert!(v.get("after").is_none());
    }
}
