//! The fan-out to live HTTP clients shared by the sse and ws adapters: a [`Hub`] holds the
//! connected clients, each with a bounded buffer of its own.
//!
//! Publishing never waits: a client whose buffer is full (it stopped reading, or reads
//! slower than events arrive) loses the event, counted in
//! `pgpipe_events_dropped_total{adapter}`; the pipeline and the other clients carry on.
//!
//! The hub also remembers the last `history` events it published, in delivery order, so an
//! SSE client reconnecting with `Last-Event-ID` gets exactly what it missed: registering a
//! client and copying the history after its last id happen under one lock, so every event
//! is either in the copy or in the client's buffer, never both, never neither.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::registry::{self, Build, Kind};
use super::Adapter;
use crate::ack::Acker;
use crate::error::Error;
use crate::event::{Delivery, Event};
use crate::metrics;

/// Connected clients of one live adapter.
#[derive(Debug)]
pub struct Hub {
    adapter: &'static str,
    client_buffer: usize,
    history_size: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    clients: Vec<Client>,
    history: VecDeque<Arc<Event>>,
    closed: bool,
}

#[derive(Debug)]
struct Client {
    channel: Option<String>,
    tx: mpsc::Sender<Arc<Event>>,
}

/// What a new client has missed since the event id it named.
#[derive(Debug)]
pub enum Missed {
    /// It named no event.
    Nothing,
    /// The events published after the one it named (possibly none), in order.
    Events(Vec<Arc<Event>>),
    /// The named event is not in the hub's history (too old, or published by an earlier
    /// run of the forwarder): the caller has to look in the queue.
    Unknown,
}

/// A registered client: live events arrive on `events`.
#[derive(Debug)]
pub struct Subscription {
    /// Live events for this client, in publishing order. Closes when the adapter stops.
    pub events: mpsc::Receiver<Arc<Event>>,
    /// What it missed before registering.
    pub missed: Missed,
}

impl Hub {
    /// A hub for `adapter` (`sse` or `ws`): each client buffers at most `client_buffer`
    /// events; the last `history` events are kept for replay (0: no replay).
    pub fn new(adapter: &'static str, client_buffer: usize, history: usize) -> Arc<Hub> {
        metrics::register_adapter(adapter);
        Arc::new(Hub {
            adapter,
            client_buffer: client_buffer.max(1),
            history_size: history,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a client for `channel` (None: every channel). With `after`, also returns
    /// the events of that channel published after the event with that id.
    pub fn subscribe(&self, channel: Option<String>, after: Option<Uuid>) -> Subscription {
        let (tx, events) = mpsc::channel(self.client_buffer);
        let mut inner = self.lock();
        let missed = match after {
            None => Missed::Nothing,
            Some(id) => match inner.history.iter().rposition(|e| e.id == id) {
                None => Missed::Unknown,
                Some(at) => Missed::Events(
                    inner
                        .history
                        .iter()
                        .skip(at + 1)
                        .filter(|e| channel.as_deref().is_none_or(|c| c == e.channel))
                        .cloned()
                        .collect(),
                ),
            },
        };
        if !inner.closed {
            inner.clients.push(Client { channel, tx });
        }
        Subscription { events, missed }
    }

    /// Hands `event` to every client of its channel without waiting.
    pub fn publish(&self, event: &Arc<Event>) {
        let mut inner = self.lock();
        let (mut delivered, mut dropped) = (0, 0);
        inner.clients.retain(|client| {
            if client
                .channel
                .as_deref()
                .is_some_and(|c| c != event.channel)
            {
                return !client.tx.is_closed();
            }
            match client.tx.try_send(event.clone()) {
                Ok(()) => {
                    delivered += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if self.history_size > 0 {
            if inner.history.len() == self.history_size {
                inner.history.pop_front();
            }
            inner.history.push_back(event.clone());
        }
        drop(inner);
        if delivered > 0 {
            metrics::delivered(self.adapter, delivered);
            metrics::end_to_end(event.created_at);
        }
        if dropped > 0 {
            metrics::dropped(self.adapter, dropped);
            tracing::debug!(component = "adapter", adapter = self.adapter, clients = dropped,
                event = %event.id, "client behind: event dropped");
        }
    }

    /// Disconnects every client (their streams end) and refuses new ones.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.clients.clear();
    }
}

/// The hubs of the configured live adapters, shared by the adapters and the HTTP server.
#[derive(Debug, Clone, Default)]
pub struct Hubs {
    /// Clients of `/events`, when the sse adapter is on.
    pub sse: Option<Arc<Hub>>,
    /// Clients of `/ws`, when the ws adapter is on.
    pub ws: Option<Arc<Hub>>,
}

impl Hubs {
    /// Hubs for the live adapters in `config.adapters`. Each client buffers up to
    /// `bus.buffer_size` events; sse keeps `sse.replay_buffer` events for replay.
    pub fn new(config: &crate::config::Config) -> Hubs {
        let buffer = config.bus.buffer_size;
        Hubs {
            sse: config
                .has_adapter("sse")
                .then(|| Hub::new("sse", buffer, config.sse.replay_buffer)),
            ws: config.has_adapter("ws").then(|| Hub::new("ws", buffer, 0)),
        }
    }

    /// The hub of adapter `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Hub>> {
        match name {
            "sse" => self.sse.clone(),
            "ws" => self.ws.clone(),
            _ => None,
        }
    }
}

/// The sse kind: its settings are the HTTP server's (`sse.*`, checked with the config).
pub const SSE: Kind = Kind {
    name: "sse",
    list: None,
    entries: registry::no_entries,
    validate: registry::nothing_to_check,
    redact: registry::no_secrets,
    build: build_live,
    route: registry::every_event,
    init: None,
};

/// The ws kind: its settings are the HTTP server's (`websocket.*`).
pub const WS: Kind = Kind {
    name: "ws",
    list: None,
    entries: registry::no_entries,
    validate: registry::nothing_to_check,
    redact: registry::no_secrets,
    build: build_live,
    route: registry::every_event,
    init: None,
};

/// A live adapter feeds the hub the HTTP server reads, so it exists only beside it.
fn build_live(b: &Build<'_>, name: &str, _: Option<&str>) -> Result<Box<dyn Adapter>, Error> {
    match b.hubs.and_then(|hubs| hubs.get(name)) {
        Some(hub) => Ok(Box::new(LiveAdapter::new(hub))),
        None => Err(Error::Config(format!(
            "adapter {name:?} serves HTTP clients and runs only in `pgpipe listen`"
        ))),
    }
}

/// The sse or ws adapter: publishes what the bus hands it to its hub's clients.
pub struct LiveAdapter {
    hub: Arc<Hub>,
}

impl LiveAdapter {
    /// An adapter feeding `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        LiveAdapter { hub }
    }
}

impl Adapter for LiveAdapter {
    fn name(&self) -> &str {
        self.hub.adapter
    }

    fn durable(&self) -> bool {
        false
    }

    fn run(
        self: Box<Self>,
        mut input: mpsc::Receiver<Delivery>,
        _acker: Acker,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            while let Some(delivery) = input.recv().await {
                self.hub.publish(&delivery.event);
            }
            self.hub.close();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(channel: &str) -> Arc<Event> {
        Arc::new(Event {
            id: Uuid::now_v7(),
            channel: channel.into(),
            operation: "INSERT".into(),
            payload: serde_json::json!({}).into(),
            key: None,
            source: "trigger".into(),
            created_at: Utc::now(),
            transaction: None,
        })
    }

    #[tokio::test]
    async fn a_full_client_loses_events_and_the_others_do_not() {
        let hub = Hub::new("sse", 2, 10);
        let mut slow = hub.subscribe(None, None);
        let mut fast = hub.subscribe(Some("a".into()), None);
        let events: Vec<_> = (0..4).map(|_| event("a")).collect();
        for e in &events {
            hub.publish(e);
            assert_eq!(fast.events.recv().await.unwrap().id, e.id);
        }
        hub.publish(&event("b"));
        assert_eq!(slow.events.recv().await.unwrap().id, events[0].id);
        assert_eq!(slow.events.recv().await.unwrap().id, events[1].id);
        assert!(slow.events.try_recv().is_err(), "the rest was dropped");
        assert!(fast.events.try_recv().is_err(), "other channel filtered");
    }

    #[tokio::test]
    async fn replay_and_live_meet_without_gap_or_duplicate() {
        let hub = Hub::new("sse", 10, 3);
        let events: Vec<_> = (0..4).map(|_| event("a")).collect();
        for e in &events {
            hub.publish(e);
        }
        let mut sub = hub.subscribe(None, Some(events[1].id));
        let Missed::Events(missed) = &sub.missed else {
            panic!("{:?}", sub.missed)
        };
        assert_eq!(
            missed.iter().map(|e| e.id).collect::<Vec<_>>(),
            [events[2].id, events[3].id]
        );
        let next = event("a");
        hub.publish(&next);
        assert_eq!(sub.events.recv().await.unwrap().id, next.id);
        assert!(matches!(
            hub.subscribe(None, Some(events[0].id)).missed,
            Missed::Unknown
        ));
        hub.close();
        assert!(sub.events.recv().await.is_none());
    }
}
