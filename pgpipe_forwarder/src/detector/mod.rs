//! Detectors read changes from Postgres and hand them to the bus, keeping at most
//! `max_in_flight` events unacknowledged (the flow control of the whole pipeline).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::InFlight;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::{Config, DetectorKind};
use crate::error::{Error, Fate};
use crate::health::Component;

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

impl DetectorIo {
    /// Splits the io into the bus, the health handle and an in-flight window of at most
    /// `max` events that warns after `stall_warning` full without acknowledgements.
    pub fn split<P>(
        self,
        detector: &'static str,
        max: usize,
        stall_warning: Duration,
    ) -> (Arc<Bus>, Component, InFlight<P>) {
        let window = InFlight::new(
            detector,
            self.acks,
            self.durable_adapters,
            max,
            stall_warning,
        )
        .with_routes(&self.bus.routed_durables());
        (self.bus, self.health, window)
    }
}

/// Reconnecting with backoff, the same for every detector: what a failed connection
/// means is decided by [`Error::fate`]; a detector that never reached its database fails
/// at once (a wrong URL should exit, and the supervisor restarts), later losses are
/// retried, and a resource held by another forwarder makes this one a standby.
#[derive(Debug)]
pub struct Reconnect {
    detector: &'static str,
    backoff: Backoff,
    /// What another forwarder holds when we stand by, e.g. `slot pgpipe_orders`.
    held: String,
    /// Logged (with the error) when a connection is lost.
    lost: &'static str,
    reached: bool,
    standing_by: bool,
}

impl Reconnect {
    /// Reconnects of `detector` with `backoff`; `lost` is the log line for a lost
    /// connection, `held` names what a standby waits for.
    pub fn new(
        detector: &'static str,
        backoff: Backoff,
        lost: &'static str,
        held: impl Into<String>,
    ) -> Self {
        Reconnect {
            detector,
            backoff,
            held: held.into(),
            lost,
            reached: false,
            standing_by: false,
        }
    }

    /// The database answered: from now on failures are retried.
    pub fn reached(&mut self) {
        self.reached = true;
    }

    /// The detector is connected and reading: the next loss retries fast again.
    pub fn connected(&mut self) {
        self.reached = true;
        self.standing_by = false;
        self.backoff.reset();
    }

    /// The shortest wait (how often a standby looks again).
    pub fn first_delay(&self) -> Duration {
        self.backoff.ceiling(0)
    }

    /// A session ended with `ended`: whether to connect again. A clean end (shutdown)
    /// is `false`; a failure is [`Reconnect::after`].
    pub async fn again<P>(
        &mut self,
        ended: Result<(), Error>,
        health: &Component,
        window: &mut InFlight<P>,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        match ended {
            Ok(()) => Ok(false),
            Err(e) => self.after(e, health, window, cancel).await,
        }
    }

    /// A session failed with `error`: returns the error when it is fatal, else waits the
    /// backoff (taking acknowledgements meanwhile) and returns whether to go on (`false`
    /// when shutdown started; in-flight events then stay unacknowledged and are read
    /// again next time).
    pub async fn after<P>(
        &mut self,
        error: Error,
        health: &Component,
        window: &mut InFlight<P>,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let fate = error.fate();
        if fate == Fate::Fatal || !self.reached {
            return Err(error);
        }
        let delay = if fate == Fate::Standby {
            if !self.standing_by {
                tracing::info!(component = "detector", detector = self.detector, held = %self.held,
                    "another forwarder holds this {}; standing by", self.held);
            }
            self.standing_by = true;
            health.standby(format!("{} is in use by another forwarder", self.held));
            self.first_delay()
        } else {
            self.standing_by = false;
            health.down(format!("disconnected: {error}"));
            let delay = self.backoff.next_delay();
            tracing::error!(component = "detector", detector = self.detector, error = %error,
                retry_in = ?delay, "{}; reconnecting", self.lost);
            delay
        };
        Ok(wait(delay, window, cancel).await)
    }
}

/// Waits `delay` while taking acknowledgements; `false` when shutdown came first.
async fn wait<P>(delay: Duration, window: &mut InFlight<P>, cancel: &CancellationToken) -> bool {
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = &mut deadline => return true,
            acked = window.acked() => {
                if acked.is_err() {
                    // No adapter reports any more: just wait out the delay.
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = &mut deadline => return true,
                    }
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one (a `select!` arm that is off).
pub async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
    let kind = match config.detector.kind {
        // A consumer group lives in the extension: without it the queue detector says so.
        DetectorKind::Auto if !config.detector.group.is_empty() => DetectorKind::Queue,
        DetectorKind::Auto => {
            let kind = if queue::extension_installed(&config.database_url).await? {
                DetectorKind::Queue
            } else {
                DetectorKind::ListenNotify
            };
            tracing::info!(
                component = "detector",
                detector = kind.as_str(),
                "detector chosen automatically"
            );
            kind
        }
        kind => kind,
    };
    Ok(match kind {
        DetectorKind::Queue | DetectorKind::Auto => Box::new(queue::QueueDetector::new(config)),
        DetectorKind::ListenNotify => Box::new(listen_notify::ListenNotifyDetector::new(config)),
        DetectorKind::Wal => Box::new(wal::WalDetector::new(config)?),
    })
}
