//! Fan-out of events to adapters: one bounded channel per adapter; publishing never blocks.
//!
//! Durable adapters get a channel as large as the detector's in-flight window, so with the
//! detector's flow control their channel cannot fill. Live adapters (sse, ws) get
//! `bus.buffer_size` and lose events when they fall behind; the loss is counted.

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::error::Error;
use crate::event::Delivery;

/// One adapter's end of the bus.
#[derive(Debug)]
struct Output {
    name: String,
    durable: bool,
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

    /// Adds an adapter's channel and returns its receiving half.
    pub fn add_output(
        &mut self,
        name: &str,
        durable: bool,
        capacity: usize,
    ) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.outputs.push(Output {
            name: name.to_string(),
            durable,
            tx,
        });
        rx
    }

    /// Hands one event to every adapter without waiting.
    ///
    /// A durable adapter whose channel is full or closed is an error (flow control was
    /// violated or the adapter died): the event stays unacknowledged and is read again.
    pub fn publish(&self, delivery: &Delivery) -> Result<(), Error> {
        crate::metrics::received(1);
        for output in &self.outputs {
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
