//! Helpers shared by the durable adapters (webhook, file, exec, pg_table): waiting between
//! retries without delaying shutdown, and stepping aside once shutdown started.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Delivery;

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
