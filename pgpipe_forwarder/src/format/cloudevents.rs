//! CloudEvents 1.0 (https://github.com/cloudevents/spec): the event's attributes from the
//! envelope, `data` = the payload.
//!
//! - `id` = the event id (the idempotency key), `source` = `postgres://host:port/db`,
//!   `type` = `dev.pgpipe.<operation, lower case>` (`dev.pgpipe.insert`),
//!   `subject` = `schema.table` for table changes, else the channel, `time` = when the
//!   change was captured, `datacontenttype` = `application/json`.
//! - Extensions: `pgpipechannel` (the channel) and `partitionkey` (the Partitioning
//!   extension: the ordering key as compact JSON, absent for events without a key).

use chrono::SecondsFormat;
use serde_json::{Map, Value};

use super::{table_of, Origin};
use crate::event::Event;

/// The attributes of `event` (without `data`), in the order the spec lists them.
fn attributes(event: &Event, origin: &Origin) -> Vec<(&'static str, String)> {
    let subject = match table_of(event) {
        Some((schema, table)) => format!("{schema}.{table}"),
        None => event.channel.clone(),
    };
    let mut attributes = vec![
        ("specversion", "1.0".to_string()),
        ("id", event.id.to_string()),
        ("source", origin.source.clone()),
        (
            "type",
            format!("dev.pgpipe.{}", event.operation.to_lowercase()),
        ),
        ("subject", subject),
        (
            "time",
            event
                .created_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
        ("pgpipechannel", event.channel.clone()),
    ];
    if let Some(key) = event.key.as_ref().filter(|k| !k.is_null()) {
        attributes.push(("partitionkey", key.to_string()));
    }
    attributes
}

/// Structured mode: the whole event as one JSON object, the payload's text copied in as
/// `data` without being parsed.
pub(super) fn structured(event: &Event, origin: &Origin) -> Vec<u8> {
    let mut attributes: Map<String, Value> = attributes(event, origin)
        .into_iter()
        .map(|(name, value)| (name.to_string(), Value::String(value)))
        .collect();
    attributes.insert("datacontenttype".into(), "application/json".into());
    let mut out = serde_json::to_vec(&attributes).expect("JSON values serialize");
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(event.payload.get().as_bytes());
    out.push(b'}');
    out
}

/// Binary mode's body: the payload.
pub(super) fn binary_body(event: &Event) -> Vec<u8> {
    event.payload.get().as_bytes().to_vec()
}

/// Binary mode's headers: `ce-<attribute>`, values percent-encoded as the HTTP binding
/// asks (space, `"`, `%` and everything outside printable ASCII). The content type
/// travels in the transport's own `Content-Type`.
pub(super) fn binary_headers(event: &Event, origin: &Origin) -> Vec<(String, String)> {
    attributes(event, origin)
        .into_iter()
        .map(|(name, value)| (format!("ce-{name}"), percent_encode(&value)))
        .collect()
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'!'..=b'~' if byte != b'"' && byte != b'%' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn event() -> Event {
        Event {
            id: "0193f1c2-7b1a-7c3e-9f00-1a2b3c4d5e6f".parse().unwrap(),
            channel: "orders".into(),
            operation: "UPDATE".into(),
            payload: serde_json::json!({"op": "UPDATE", "schema": "shop", "table": "orders",
                "row": {"id": 1, "note": "ä b"}, "old": {"id": 1, "note": null}})
            .into(),
            key: Some(serde_json::json!({"id": 1})),
            source: "trigger".into(),
            created_at: DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap(),
            transaction: None,
        }
    }

    fn origin() -> Origin {
        Origin::from_database_url("postgres://u:p@db:5432/shop")
    }

    #[test]
    fn structured_mode_carries_the_envelope_as_attributes_and_the_payload_as_data() {
        let ce: Value = serde_json::from_slice(&structured(&event(), &origin())).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "0193f1c2-7b1a-7c3e-9f00-1a2b3c4d5e6f");
        assert_eq!(ce["source"], "postgres://db:5432/shop");
        assert_eq!(ce["type"], "dev.pgpipe.update");
        assert_eq!(ce["subject"], "shop.orders");
        assert_eq!(ce["time"], "2027-01-15T08:00:00.123456Z");
        assert_eq!(ce["partitionkey"], r#"{"id":1}"#);
        assert_eq!(ce["data"]["row"]["note"], "ä b");
    }

    #[test]
    fn binary_mode_percent_encodes_header_values() {
        let headers = binary_headers(&event(), &origin());
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get("ce-type").as_deref(), Some("dev.pgpipe.update"));
        assert_eq!(get("ce-partitionkey").as_deref(), Some("{%22id%22:1}"));
        assert_eq!(percent_encode("a b%ä"), "a%20b%25%C3%A4");
        let mut keyless = event();
        keyless.key = None;
        assert!(binary_headers(&keyless, &origin())
            .iter()
            .all(|(k, _)| k != "ce-partitionkey"));
    }
}
