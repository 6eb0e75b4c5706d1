//! Fan-out of events to adapters: one bounded channel per adapter; publishing never blocks.
//!
//! Durable adapters get a channel as large as the detector's in-flight window, so with the
//! detector's flow control their channel cannot fill. Live adapters (stdout, sse, ws) get
//! `bus.buffer_size` and lose events when they fall behind; the loss is counted. (sse and
//! ws then buffer per client: `sse.client_buffer`, `websocket.client_buffer`.)
//!
//! Each output has a [`Route`]: an event outside it is not sent there, and the detector's
//! in-flight window counts it as finished by that adapter ([`Bus::routed_durables`]).

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::error::Error;
use crate::event::{Delivery, Event};
use crate::route::Route;

/// One adapter's end of the bus.
#[derive(Debug)]
struct Output {
    name: String,
    durable: bool,
    route: Route,
    tx: mpsc::Sender<Delivery>,
}

/// The fan-out. It owns every adapter channel; dropping it closes them.
#[derive(Debug, Default)]
pub struct Bus {
    outputs: Vec<Output>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Adds an adapter's channel, which gets the events of `route`, and returns its
    /// receiving half. Durable adapters are numbered in the order they are added.
    pub fn add_output(
        &mut self,
        name: &str,
        durable: bool,
        capacity: usize,
        route: Route,
    ) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.outputs.push(Output {
            name: name.to_string(),
            durable,
            route,
            tx,
        });
        rx
    }

    /// Per durable adapter, in their numbering: whether it has a route (gets only some
    /// events).
    pub fn routed_durables(&self) -> Vec<bool> {
        self.durables().map(|o| !o.route.is_all()).collect()
    }

    /// Whether durable adapter number `index` gets `event`.
    pub fn durable_gets(&self, index: usize, event: &Event) -> bool {
        self.durables()
            .nth(index)
            .is_some_and(|o| o.route.matches(event))
    }

    fn durables(&self) -> impl Iterator<Item = &Output> {
        self.outputs.iter().filter(|o| o.durable)
    }

    /// Hands one event to every adapter without waiting.
    ///
    /// A durable adapter whose channel is full or closed is an error (flow control was
    /// violated or the adapter died): the event stays unacknowledged and is read again.
    pub fn publish(&self, delivery: &Delivery) -> Result<(), Error> {
        crate::metrics::received(1);
        for output in &self.outputs {
            if !output.route.matches(&delivery.event) {
                continue;
            }
            match output.tx.try_send(delivery.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) if !output.durable => {
                    crate::metrics::dropped(&output.name, 1);
                    tracing::debug!(component = "bus", adapter = %output.name, "live adapter behind: event dropped");
                }
                Err(TrySendError::Closed(_)) if !output.durable => {}
                Err(TrySendError::Full(_)) => {
                    return Err(Error::Adapter {
                        adapter: output.name.clone(),
                        reason: "channel full: in-flight window larger than the channel".into(),
                    })
                }
                Err(TrySendError::Closed(_)) => return Err(Error::BusClosed),
            }
        }
        Ok(())
    }
}
