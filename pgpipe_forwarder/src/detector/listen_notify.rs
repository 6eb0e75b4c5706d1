//! The `listen_notify` detector: `LISTEN` on the configured channels of any Postgres, no
//! extension needed (the original pgpipe's mode).
//!
//! Delivery is **at most once**, by nature of NOTIFY: a notification sent while the
//! forwarder is disconnected (restart, network cut, `pg_terminate_backend`) is gone, and
//! nothing is acknowledged back to Postgres. Use the `queue` or `wal` detector when every
//! change must arrive.
//!
//! Payload rule (the original's): a payload that is a JSON object with a non-empty string
//! `op` gives the event's operation; any other JSON object gives `NOTIFY`; anything else
//! (plain text, arrays, numbers, an empty payload) is carried as a JSON string with
//! operation `NOTIFY`. Ids are UUIDv7 minted by the forwarder on receipt.
//!
//! Key: a payload that is a table change (`op` INSERT, UPDATE or DELETE, a string
//! `table`, optionally `schema`, and a `row` object, as `pgpipe init --detector
//! listen_notify`'s trigger sends) gets the table's primary-key columns of `row` as its
//! `key`. The primary key is looked up once per table on a second connection (the
//! LISTEN connection's notification buffer may hold a query's answer back) and cached
//! for the session; everything else — no such table, no primary key, a key column
//! missing from `row` (a payload cut to the key for NOTIFY's size limit keeps it) — has
//! a null key.
//!
//! Flow control: NOTIFY cannot be paused at the source. While `max_in_flight` events wait
//! for durable adapters, the detector stops taking notifications off the connection's
//! buffer, which is bounded (`max_in_flight` notifications): when it is full the
//! forwarder stops reading the connection and Postgres keeps the rest in its own
//! notification queue. Memory stays bounded and nothing is dropped while connected.
//!
//! Anyone who can NOTIFY can forge events here: Postgres lets every role notify every
//! channel and does not say who sent a notification (README).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use tokio_postgres::{Client, Notification};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Detector, DetectorIo, Reconnect};
use crate::ack::InFlight;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::Config;
use crate::db;
use crate::error::Error;
use crate::event::{Delivery, Event};
use crate::health::Component;

/// The `source` of events from this detector.
pub const SOURCE: &str = "listen_notify";

/// Operation of a notification whose payload names none.
pub const DEFAULT_OPERATION: &str = "NOTIFY";

/// LISTENs on channels; see the module documentation.
pub struct ListenNotifyDetector {
    url: String,
    channels: Vec<String>,
    max_in_flight: usize,
    stall_warning: Duration,
    backoff: Backoff,
    /// How often an idle connection is probed (a silently dead one would lose
    /// notifications unnoticed).
    probe_interval: Duration,
}

impl ListenNotifyDetector {
    /// A detector for `config.channels`.
    pub fn new(config: &Config) -> Self {
        let d = &config.detector;
        ListenNotifyDetector {
            url: config.database_url.clone(),
            channels: config.channels.clone(),
            max_in_flight: d.max_in_flight,
            stall_warning: d.ack_stall_warning,
            backoff: Backoff::new(d.backoff_base, d.backoff_cap),
            probe_interval: d.status_interval,
        }
    }

    async fn run_loop(self, io: DetectorIo, cancel: CancellationToken) -> Result<(), Error> {
        // Positions are meaningless for NOTIFY: the window only counts in-flight events.
        let (bus, health, mut window) =
            io.split::<()>(SOURCE, self.max_in_flight, self.stall_warning);
        let mut reconnect = Reconnect::new(
            SOURCE,
            self.backoff.clone(),
            "LISTEN connection lost: notifications sent until it is back are lost \
             (NOTIFY is at-most-once)",
            "connection",
        );
        loop {
            let ended = self
                .session(&bus, &health, &mut window, &mut reconnect, &cancel)
                .await;
            if !reconnect
                .again(ended, &health, &mut window, &cancel)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// One connection's life: Ok after shutdown, Err when the connection failed.
    async fn session(
        &self,
        bus: &Bus,
        health: &Component,
        window: &mut InFlight<()>,
        reconnect: &mut Reconnect,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let buffer = usize::try_from(window.capacity()).unwrap_or(usize::MAX);
        let (client, mut notifications) =
            db::connect_with(&self.url, db::Notifications::Bounded(buffer)).await?;
        reconnect.reached();
        let listen: String = self
            .channels
            .iter()
            .map(|c| format!("LISTEN {};", quote_ident(c)))
            .collect();
        client
            .batch_execute(&listen)
            .await
            .map_err(Error::pg(format!("listen on {}", self.channels.join(", "))))?;
        health.up();
        reconnect.connected();
        tracing::info!(component = "detector", detector = SOURCE, channels = ?self.channels,
            "listening (at-most-once: notifications sent while disconnected are lost)");

        let mut probe = tokio::time::interval(self.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        // The probe runs beside the receiving, never instead of it: the connection's
        // notification buffer is bounded, and a full one holds the probe's answer back.
        let mut probing: Option<BoxFuture<'_, bool>> = None;
        let mut keys = KeyLookup::new(&self.url);
        loop {
            let room = window.room() > 0;
            tokio::select! {
                _ = probe.tick(), if probing.is_none() && room => {
                    let timeout = self.probe_interval;
                    let client = &client;
                    probing = Some(Box::pin(async move {
                        matches!(tokio::time::timeout(timeout, client.simple_query("SELECT 1")).await, Ok(Ok(_)))
                    }));
                }
                alive = async { probing.as_mut().expect("guarded").await }, if probing.is_some() => {
                    probing = None;
                    // While the window is full the buffer may hold the answer back:
                    // no verdict then.
                    if !alive && window.room() > 0 {
                        return Err(disconnected("the connection stopped answering"));
                    }
                }
                _ = cancel.cancelled() => {
                    tracing::info!(component = "detector", detector = SOURCE, "stopping");
                    return Ok(());
                }
                acked = window.acked() => {
                    acked?;
                    // Nothing to release: this only forgets finished events.
                    window.take_releasable();
                }
                n = notifications.recv(), if room => match n {
                    Some(n) => {
                        let mut event = event_from(&n);
                        event.key = keys.key_of(&event.payload).await?;
                        let seq = window.push_event(());
                        bus.publish(&Delivery { seq, event: Arc::new(event) })?;
                        window.take_releasable();
                    }
                    None => return Err(disconnected("connection closed")),
                },
            }
            if client.is_closed() {
                return Err(disconnected("connection closed"));
            }
        }
    }
}

fn disconnected(reason: &str) -> Error {
    Error::DetectorDisconnected {
        detector: SOURCE.into(),
        reason: reason.into(),
    }
}

impl Detector for ListenNotifyDetector {
    fn name(&self) -> &str {
        SOURCE
    }

    fn reports_health(&self) -> bool {
        true
    }

    fn run(
        self: Box<Self>,
        io: DetectorIo,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin((*self).run_loop(io, cancel))
    }
}

/// The event for one notification, with a freshly minted UUIDv7.
pub fn event_from(n: &Notification) -> Event {
    let (operation, payload) = parse_payload(n.payload());
    Event {
        id: Uuid::now_v7(),
        channel: n.channel().to_string(),
        operation,
        payload,
        key: None,
        source: SOURCE.into(),
        created_at: Utc::now(),
        transaction: None,
    }
}

/// Primary keys of the tables whose changes arrive, looked up on a connection of its own
/// (opened on first need) and cached per `(schema, table)`.
struct KeyLookup<'a> {
    url: &'a str,
    client: Option<Client>,
    /// None: the table has no primary key (or does not exist).
    tables: HashMap<(Option<String>, String), Option<Vec<String>>>,
}

impl<'a> KeyLookup<'a> {
    fn new(url: &'a str) -> Self {
        KeyLookup {
            url,
            client: None,
            tables: HashMap::new(),
        }
    }

    /// The key of a change payload (see the module documentation).
    async fn key_of(
        &mut self,
        payload: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, Error> {
        let Some((schema, table)) = changed_table(payload) else {
            return Ok(None);
        };
        let name = (schema.map(str::to_string), table.to_string());
        if !self.tables.contains_key(&name) {
            let columns = self.primary_key(schema, table).await?;
            self.tables.insert(name.clone(), columns);
        }
        Ok(self.tables[&name]
            .as_deref()
            .and_then(|columns| key_from_row(&payload["row"], columns)))
    }

    async fn primary_key(
        &mut self,
        schema: Option<&str>,
        table: &str,
    ) -> Result<Option<Vec<String>>, Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, _) = db::connect(self.url).await?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        // A schema-less payload resolves the table as an unqualified name would.
        let row = client
            .query_one(
                "SELECT (SELECT array_agg(a.attname::text ORDER BY a.attnum)
                         FROM pg_catalog.pg_index i
                         JOIN pg_catalog.pg_attribute a
                           ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
                         WHERE i.indisprimary
                           AND i.indrelid = pg_catalog.to_regclass(
                                 CASE WHEN $1::text IS NULL THEN pg_catalog.quote_ident($2)
                                      ELSE pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2) END))",
                &[&schema, &table],
            )
            .await
            .map_err(Error::pg(format!("look up the primary key of table {table}")))?;
        Ok(row.get(0))
    }
}

/// `(schema, table)` of a payload that is a table change with a row, else None.
fn changed_table(payload: &serde_json::Value) -> Option<(Option<&str>, &str)> {
    let op = payload.get("op")?.as_str()?;
    if !matches!(op, "INSERT" | "UPDATE" | "DELETE") || !payload.get("row")?.is_object() {
        return None;
    }
    let table = payload.get("table")?.as_str()?;
    let schema = payload.get("schema").and_then(serde_json::Value::as_str);
    Some((schema, table))
}

/// The object of `columns` taken from `row`; None when one is missing.
fn key_from_row(row: &serde_json::Value, columns: &[String]) -> Option<serde_json::Value> {
    let key: Option<serde_json::Map<String, serde_json::Value>> = columns
        .iter()
        .map(|c| row.get(c).map(|v| (c.clone(), v.clone())))
        .collect();
    key.map(serde_json::Value::Object)
}

/// The payload rule: `(operation, payload)` for a NOTIFY payload text.
pub fn parse_payload(text: &str) -> (String, serde_json::Value) {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            let operation = match map.get("op") {
                Some(serde_json::Value::String(op)) if !op.is_empty() => op.clone(),
                _ => DEFAULT_OPERATION.to_string(),
            };
            (operation, serde_json::Value::Object(map))
        }
        _ => (
            DEFAULT_OPERATION.to_string(),
            serde_json::Value::String(text.to_string()),
        ),
    }
}

/// A double-quoted SQL identifier (channel names are case- and punctuation-preserving).
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_object_with_an_op_names_the_operation() {
        let (op, payload) = parse_payload(r#"{"op":"INSERT","table":"t","row":{"id":1}}"#);
        assert_eq!(op, "INSERT");
        assert_eq!(
            payload,
            json!({"op": "INSERT", "table": "t", "row": {"id": 1}})
        );
    }

    #[test]
    fn other_objects_are_notify() {
        for text in [
            r#"{"a":1}"#,
            r#"{"op":""}"#,
            r#"{"op":5}"#,
            r#"{"op":null}"#,
            "{}",
        ] {
            let (op, payload) = parse_payload(text);
            assert_eq!(op, "NOTIFY", "{text}");
            assert!(payload.is_object(), "{text}");
        }
    }

    #[test]
    fn everything_else_is_a_json_string() {
        for text in [
            "hello",
            "",
            "[1,2]",
            "42",
            "\"quoted\"",
            "null",
            "{broken",
            " ",
        ] {
            let (op, payload) = parse_payload(text);
            assert_eq!(op, "NOTIFY", "{text}");
            assert_eq!(payload, json!(text), "{text}");
        }
    }

    #[test]
    fn numbers_keep_their_text() {
        let (_, payload) = parse_payload(r#"{"total":10.50,"big":12345678901234567890123}"#);
        assert_eq!(
            serde_json::to_string(&payload).unwrap(),
            r#"{"total":10.50,"big":12345678901234567890123}"#
        );
    }

    #[test]
    fn keys_come_from_the_row_of_table_changes() {
        let change = json!({"op": "UPDATE", "schema": "s", "table": "t", "row": {"id": 1, "b": 2, "x": null}});
        assert_eq!(changed_table(&change), Some((Some("s"), "t")));
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            key_from_row(&change["row"], &cols(&["id", "b"])),
            Some(json!({"id": 1, "b": 2}))
        );
        assert_eq!(
            key_from_row(&change["row"], &cols(&["x"])),
            Some(json!({"x": null}))
        );
        assert_eq!(key_from_row(&change["row"], &cols(&["id", "gone"])), None);
        assert_eq!(
            changed_table(&json!({"op": "DELETE", "table": "t", "row": {}})),
            Some((None, "t"))
        );
        for other in [
            json!({"op": "TRUNCATE", "table": "t", "row": null}),
            json!({"op": "INSERT", "table": "t", "row": null, "truncated": true}),
            json!({"op": "INSERT", "row": {"id": 1}}),
            json!({"op": "NOTIFY", "table": "t", "row": {"id": 1}}),
            json!("text"),
        ] {
            assert_eq!(changed_table(&other), None, "{other}");
        }
    }

    #[test]
    fn channels_are_quoted() {
        assert_eq!(quote_ident("pgpipe:Orders"), "\"pgpipe:Orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
