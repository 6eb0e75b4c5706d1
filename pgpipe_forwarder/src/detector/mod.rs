//! Detectors read changes from Postgres and hand them to the bus, keeping at most
//! `max_in_flight` events unacknowledged (the flow control of the whole pipeline).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::Config;
use crate::error::Error;

pub mod listen_notify;
pub mod queue;
pub mod wal;

/// What a detector works with: the bus to publish on and the acknowledgements of the
/// durable adapters (`(adapter index, finished through seq)`).
pub struct DetectorIo {
    /// Publish-only use: the pipeline owns the bus and closes it after the detector returns.
    pub bus: Arc<Bus>,
    /// Progress reports of the durable adapters.
    pub acks: mpsc::UnboundedReceiver<(usize, u64)>,
    /// How many durable adapters report progress.
    pub durable_adapters: usize,
    /// The detector's health: `up()` once connected and reading, `down(reason)` while
    /// disconnected (`/healthz` answers 503 then).
    pub health: crate::health::Component,
}

/// A source of events.
pub trait Detector: Send {
    /// Name used in logs and health.
    fn name(&self) -> &str;

    /// Reads until `cancel` fires, then waits (within the shutdown timeout) for in-flight
    /// events to be acknowledged, records the final position and returns.
    fn run(
        self: Box<Self>,
        io: DetectorIo,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>>;

    /// Whether the detector reports its health through [`DetectorIo::health`]. Those
    /// that do not are shown up while their task runs.
    fn reports_health(&self) -> bool {
        false
    }
}

/// Builds the configured detector; with no `detector.type` it picks `queue` when the
/// pgpipe extension is installed in the database.
pub async fn build(config: &Config) -> Result<Box<dyn Detector>, Error> {
    let kind = match config.detector.kind.as_str() {
        "" => {
            let kind = if queue::extension_installed(&config.database_url).await? {
                "queue"
            } else {
                "listen_notify"
            };
            tracing::info!(
                component = "detector",
                detector = kind,
                "detector chosen automatically"
            );
            kind
        }
        kind => kind,
    };
    match kind {
        "queue" => Ok(Box::new(queue::QueueDetector::new(config))),
        "listen_notify" => Ok(Box::new(listen_notify::ListenNotifyDetector::new(config))),
        "wal" => Ok(Box::new(wal::WalDetector::new(config)?)),
        other => Err(Error::Config(format!(
            "unknown detector {other:?} (available: queue, listen_notify, wal)"
        ))),
    }
}
