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
//! Flow control: NOTIFY cannot be paused at the source. While `max_in_flight` events wait
//! for durable adapters, the detector stops taking notifications off the connection's
//! buffer, which is bounded (`max_in_flight` notifications): when it is full the
//! forwarder stops reading the connection and Postgres keeps the rest in its own
//! notification queue. Memory stays bounded and nothing is dropped while connected.
//!
//! Anyone who can NOTIFY can forge events here: Postgres lets every role notify every
//! channel and does not say who sent a notification (README).

use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use tokio_postgres::Notification;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Detector, DetectorIo, Reconnect};
use crate::ack::InFlight;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::Config;
use crate::db;
use crate::error::Error;
use crate::event::Event;
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
                        window.publish(bus, (), event_from(&n))?;
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
        payload: payload.into(),
        key: None,
        source: SOURCE.into(),
        created_at: Utc::now(),
        transaction: None,
    }
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
    fn channels_are_quoted() {
        assert_eq!(quote_ident("pgpipe:Orders"), "\"pgpipe:Orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
