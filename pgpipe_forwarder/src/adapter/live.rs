//! The fan-out to live HTTP clients shared by the sse and ws adapters: a [`Hub`] holds the
//! connected clients, each with a bounded buffer of its own.
//!
//! Publishing never waits: a client whose buffer is full (it stopped reading, or reads
//! slower than events arrive) loses the event, counted in
//! `pgpipe_events_dropped_total{adapter}`; the pipeline and the other clients carry on.
//!
//! Each event is serialised once, whatever the number of clients ([`LiveEvent`]); clients
//! share its bytes. A client that disconnects (or is disconnected for being too slow)
//! with events still in its buffer lost them too: they are counted as dropped when its
//! buffer goes away.
//!
//! The hub also remembers the last `history` events it published, in delivery order, so an
//! SSE client reconnecting with `Last-Event-ID` gets exactly what it missed: registering a
//! client and copying the history after its last id happen under one lock, so every event
//! is either in the copy or in the client's buffer, never both, never neither.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
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
    history: VecDeque<Arc<LiveEvent>>,
    closed: bool,
}

#[derive(Debug)]
struct Client {
    channel: Option<String>,
    tx: mpsc::Sender<Arc<LiveEvent>>,
}

/// How many kinds of frame a [`LiveEvent`] caches (SSE with and without `event:`).
const FRAME_KINDS: usize = 2;

/// An event as live clients get it: its JSON serialised once, and the frames built from it
/// once per kind, shared by every client.
#[derive(Debug)]
pub struct LiveEvent {
    /// The event.
    pub event: Arc<Event>,
    json: Bytes,
    frames: [OnceLock<Bytes>; FRAME_KINDS],
}

impl LiveEvent {
    /// Serialises `event` for live clients.
    pub fn new(event: Arc<Event>) -> Arc<LiveEvent> {
        let json = Bytes::from(event.to_json_line());
        Arc::new(LiveEvent {
            event,
            json,
            frames: Default::default(),
        })
    }

    /// The event as one line of JSON.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// Frame kind `kind` (below [`FRAME_KINDS`]) of this event, built by `build` on first
    /// use and shared by every later caller.
    pub fn frame(&self, kind: usize, build: impl FnOnce(&LiveEvent) -> Bytes) -> Bytes {
        match self.frames.get(kind) {
            Some(slot) => slot.get_or_init(|| build(self)).clone(),
            None => build(self),
        }
    }
}

/// A client's buffer of live events. Events still in it when it is dropped (the client
/// went away, or was disconnected for reading too slowly) are counted as dropped.
#[derive(Debug)]
pub struct ClientEvents {
    adapter: &'static str,
    rx: mpsc::Receiver<Arc<LiveEvent>>,
}

impl ClientEvents {
    /// The next event; `None` once the adapter stopped.
    pub async fn recv(&mut self) -> Option<Arc<LiveEvent>> {
        self.rx.recv().await
    }

    /// The next event if one is buffered.
    pub fn try_recv(&mut self) -> Option<Arc<LiveEvent>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for ClientEvents {
    fn drop(&mut self) {
        let lost = self.rx.len();
        if lost > 0 {
            metrics::dropped(self.adapter, lost as u64);
            tracing::debug!(component = "adapter", adapter = self.adapter, events = lost,
                "client gone with events in its buffer: dropped");
        }
    }
}

/// What a new client has missed since the event id it named.
#[derive(Debug)]
pub enum Missed {
    /// It named no event.
    Nothing,
    /// The events published after the one it named (possibly none), in order.
    Events(Vec<Arc<LiveEvent>>),
    /// The named event is not in the hub's history (too old, or published by an earlier
    /// run of the forwarder): the caller has to look in the queue.
    Unknown,
}

/// A registered client: live events arrive on `events`.
#[derive(Debug)]
pub struct Subscription {
    /// Live events for this client, in publishing order. Closes when the adapter stops.
    pub events: ClientEvents,
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
            Some(id) => match inner.history.iter().rposition(|e| e.event.id == id) {
                None => Missed::Unknown,
                Some(at) => Missed::Events(
                    inner
                        .history
                        .iter()
                        .skip(at + 1)
                        .filter(|e| {
                            channel
                                .as_deref()
                                .is_none_or(|c| c == e.event.channel)
                        })
                        .cloned()
                        .collect(),
                ),
            },
        };
        if !inner.closed {
            inner.clients.push(Client { channel, tx });
        }
        Subscription {
            events: ClientEvents {
                adapter: self.adapter,
                rx: events,
            },
            missed,
        }
    }

    /// Hands `event` to every client of its channel without waiting.
    pub fn publish(&self, event: &Arc<Event>) {
        let live = LiveEvent::new(event.clone());
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
            match client.tx.try_send(live.clone()) {
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
            inner.history.push_back(live);
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
    /// `sse.client_buffer` (`websocket.client_buffer`) events; sse keeps
    /// `sse.replay_buffer` events for replay.
    pub fn new(config: &crate::config::Config) -> Hubs {
        Hubs {
            sse: config.has_adapter("sse").then(|| {
                Hub::new(
                    "sse",
                    config.sse.client_buffer,
                    config.sse.replay_buffer,
                )
            }),
            ws: config
                .has_adapter("ws")
                .then(|| Hub::new("ws", config.websocket.client_buffer, 0)),
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
            assert_eq!(fast.events.recv().await.unwrap().event.id, e.id);
        }
        hub.publish(&event("b"));
        assert_eq!(slow.events.recv().await.unwrap().event.id, events[0].id);
        assert_eq!(slow.events.recv().await.unwrap().event.id, events[1].id);
        assert!(slow.events.try_recv().is_none(), "the rest was dropped");
        assert!(fast.events.try_recv().is_none(), "other channel filtered");
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
            missed.iter().map(|e| e.event.id).collect::<Vec<_>>(),
            [events[2].id, events[3].id]
        );
        let next = event("a");
        hub.publish(&next);
        assert_eq!(sub.events.recv().await.unwrap().event.id, next.id);
        assert!(matches!(
            hub.subscribe(None, Some(events[0].id)).missed,
            Missed::Unknown
        ));
        hub.close();
        assert!(sub.events.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_client_gone_with_a_full_buffer_counts_its_events_as_dropped() {
        let hub = Hub::new("ws", 3, 0);
        let gone = hub.subscribe(None, None);
        for _ in 0..2 {
            hub.publish(&event("a"));
        }
        let before = metrics::dropped_count("ws");
        drop(gone);
        assert_eq!(metrics::dropped_count("ws") - before, 2);
    }

    #[test]
    fn an_event_is_serialised_once_for_every_client() {
        let live = LiveEvent::new(event("a"));
        let a = live.frame(0, |e| Bytes::from(format!("data: {}", std::str::from_utf8(e.json()).unwrap())));
        let b = live.frame(0, |_| Bytes::from_static(b"built again"));
        assert_eq!(a, b);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes, shared");
    }
}
