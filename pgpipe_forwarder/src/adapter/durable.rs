//! Helpers shared by the durable adapters (webhook, file, exec, pg_table): waiting between
//! retries without delaying shutdown, and stepping aside once shutdown started.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Delivery;
use crate::health::Component;
use crate::metrics;

/// Waits `delay`, unless shutdown starts first. Returns `false` on shutdown.
pub async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Consumes `input` until the bus closes it, acknowledging nothing.
///
/// A durable adapter that is still failing when shutdown starts calls this instead of
/// retrying on: the events it holds stay unacknowledged, so the next run reads them again,
/// and the pipeline is not kept waiting for a delivery that cannot happen now.
pub async fn park(input: &mut mpsc::Receiver<Delivery>) {
    while input.recv().await.is_some() {}
}

/// Takes the next batch: waits for one event, then adds what is already queued, up to
/// `max` events in all. `None` when the input is closed and empty.
pub async fn next_batch(input: &mut mpsc::Receiver<Delivery>, max: usize) -> Option<Vec<Delivery>> {
    let first = input.recv().await?;
    let mut batch = Vec::with_capacity(max.clamp(1, 64));
    batch.push(first);
    while batch.len() < max {
        match input.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Metrics and health reporting of one durable adapter.
#[derive(Debug, Clone)]
pub struct Report {
    adapter: String,
    health: Option<Component>,
}

impl Report {
    /// Reporting for adapter `adapter`; its metric series appear at once.
    pub fn new(adapter: &str) -> Report {
        metrics::register_adapter(adapter);
        Report {
            adapter: adapter.to_string(),
            health: None,
        }
    }

    /// Reports health to `health` from now on.
    pub fn set_health(&mut self, health: Component) {
        self.health = Some(health);
    }

    /// `batch` was delivered; delivery started at `started`.
    pub fn delivered(&self, batch: &[Delivery], started: Instant) {
        metrics::delivered(&self.adapter, batch.len() as u64);
        metrics::delivery_duration(&self.adapter, started.elapsed());
        for d in batch {
            metrics::end_to_end(d.event.created_at);
        }
        if let Some(h) = &self.health {
            h.up();
        }
    }

    /// `n` events were delivered (when the events themselves are no longer at hand).
    pub fn delivered_count(&self, n: usize, started: Instant) {
        metrics::delivered(&self.adapter, n as u64);
        metrics::delivery_duration(&self.adapter, started.elapsed());
        if let Some(h) = &self.health {
            h.up();
        }
    }

    /// A delivery attempt failed for `reason` (the adapter is down until one succeeds).
    pub fn failed(&self, reason: &str) {
        metrics::delivery_error(&self.adapter);
        if let Some(h) = &self.health {
            h.down(reason.to_string());
        }
    }
}
