//! The `queue` detector: reads `pgpipe.events` through the extension's consumer API
//! (`pgpipe.read` / `pgpipe.ack`), so delivery is ordered, gap-free and at-least-once.
//!
//! One dedicated connection reads and acknowledges. It holds the consumer's lease
//! (`pgpipe.try_claim_consumer`), so a second forwarder for the same consumer stands by.
//! It reads when woken by the extension's NOTIFY on `pgpipe_wakeup`, after a full page,
//! and every `poll_interval` (a NOTIFY sent while reconnecting is lost).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Notification};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Detector, DetectorIo};
use crate::ack::AckTracker;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::db;
use crate::error::Error;
use crate::event::{Delivery, Event, Transaction};

/// The channel the extension's background worker notifies after commits that queued events.
pub const WAKEUP_CHANNEL: &str = "pgpipe_wakeup";

const READ_SQL: &str = "SELECT position, id, channel, operation, payload, source, created_at, \
                        xid::text, lsn::text FROM pgpipe.read($1, $2, $3)";

/// Whether the pgpipe extension is installed in the database at `url`.
pub async fn extension_installed(url: &str) -> Result<bool, Error> {
    let (client, _) = db::connect(url).await?;
    has_extension(&client).await
}

async fn has_extension(client: &Client) -> Result<bool, Error> {
    let row = client
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pgpipe'", &[])
        .await
        .map_err(Error::pg("look for the pgpipe extension"))?;
    Ok(row.is_some())
}

/// Reads the pgpipe queue as one named consumer.
pub struct QueueDetector {
    url: String,
    consumer: String,
    channels: Vec<String>,
    poll_interval: Duration,
    batch_size: u32,
    max_in_flight: u64,
    backoff: Backoff,
    idle_ack_interval: Duration,
    retention_interval: Duration,
    shutdown_timeout: Duration,
}

/// Progress that survives reconnects.
struct Progress {
    tracker: AckTracker<String>,
    /// Where the next read starts; `None` until the first connection fetched the acked one.
    read_position: Option<String>,
    /// Releasable position not yet written with `pgpipe.ack`.
    unwritten_ack: Option<String>,
    /// `tracker.released_seq()` at the last written ack.
    written_seq: u64,
    last_write: Instant,
}

enum Wake {
    Read,
    Rotate,
    Acks,
    Shutdown,
    Deadline,
}

impl QueueDetector {
    /// A detector for `config.channels`, as consumer `config.detector.consumer` (default:
    /// the sorted channel names joined by commas).
    pub fn new(config: &Config) -> Self {
        let d = &config.detector;
        QueueDetector {
            url: config.database_url.clone(),
            consumer: consumer_name(&d.consumer, &config.channels),
            channels: config.channels.clone(),
            poll_interval: d.poll_interval,
            batch_size: d.batch_size,
            max_in_flight: d.max_in_flight as u64,
            backoff: Backoff::new(d.backoff_base, d.backoff_cap),
            idle_ack_interval: d.idle_ack_interval,
            retention_interval: d.retention_interval,
            shutdown_timeout: config.shutdown_timeout,
        }
    }

    async fn run_loop(
        mut self,
        mut io: DetectorIo,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let mut progress = Progress {
            tracker: AckTracker::new(io.durable_adapters),
            read_position: None,
            unwritten_ack: None,
            written_seq: 0,
            last_write: Instant::now(),
        };
        loop {
            match self.session(&mut io, &mut progress, &cancel).await {
                Ok(()) => return Ok(()),
                Err(e @ (Error::Extension(_) | Error::Adapter { .. } | Error::BusClosed)) => {
                    return Err(e)
                }
                Err(e) => {
                    io.health.down(e.to_string());
                    let delay = self.backoff.next_delay();
                    tracing::warn!(component = "detector", detector = "queue", error = %e,
                        retry_in = ?delay, "queue connection lost; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            // Shutting down while disconnected: in-flight events stay
                            // unacknowledged and are read again next time.
                            return Ok(());
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection's life: returns Ok after a clean shutdown, Err when the connection
    /// failed (the caller reconnects).
    async fn session(
        &mut self,
        io: &mut DetectorIo,
        progress: &mut Progress,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let (client, mut notifications) = db::connect(&self.url).await?;
        self.check_extension(&client).await?;
        if !self.claim(&client, &io.health, cancel).await? {
            return Ok(());
        }
        let channels: Option<Vec<String>> = Some(self.channels.clone());
        let acked: String = client
            .query_one(
                "SELECT pgpipe.register_consumer($1, $2)",
                &[&self.consumer, &channels],
            )
            .await
            .map_err(Error::pg(format!("register consumer {}", self.consumer)))?
            .get(0);
        client
            .batch_execute(&format!("LISTEN {WAKEUP_CHANNEL}"))
            .await
            .map_err(Error::pg(format!("listen on {WAKEUP_CHANNEL}")))?;
        let mut read_position = progress.read_position.clone().unwrap_or(acked);
        self.backoff.reset();
        io.health.up();
        tracing::info!(component = "detector", detector = "queue", consumer = %self.consumer,
            channels = ?self.channels, "reading the pgpipe queue");

        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Retention runs on the lease holder's connection; zero turns it off.
        let mut rotate =
            tokio::time::interval(self.retention_interval.max(Duration::from_millis(1)));
        rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retention = !self.retention_interval.is_zero();
        let mut want_read = true;
        let mut shutdown_deadline: Option<tokio::time::Instant> = None;
        loop {
            let room = self
                .max_in_flight
                .saturating_sub(progress.tracker.in_flight());
            if want_read && shutdown_deadline.is_none() && room > 0 {
                let limit = room.min(u64::from(self.batch_size)) as i32;
                let published = self
                    .read_batch(&client, &io.bus, progress, &mut read_position, limit)
                    .await?;
                progress.read_position = Some(read_position.clone());
                // A full page means more is waiting.
                want_read = published == limit as usize;
                self.write_ack(&client, progress, false).await?;
                if want_read {
                    continue;
                }
            }
            if shutdown_deadline.is_some() && progress.tracker.in_flight() == 0 {
                break;
            }
            let wake = tokio::select! {
                _ = cancel.cancelled(), if shutdown_deadline.is_none() => Wake::Shutdown,
                _ = sleep_until_opt(shutdown_deadline) => Wake::Deadline,
                ack = io.acks.recv() => {
                    match ack {
                        Some((adapter, seq)) => progress.tracker.finished(adapter, seq),
                        None => return Err(Error::BusClosed),
                    }
                    Wake::Acks
                }
                n = notifications.recv() => wake_from(n)?,
                _ = poll.tick() => Wake::Read,
                _ = rotate.tick(), if retention => Wake::Rotate,
            };
            match wake {
                Wake::Read => want_read = true,
                Wake::Rotate => {
                    // Retention failing must not stop delivery; a broken connection
                    // shows up on the next read anyway.
                    match self.rotate(&client).await {
                        Ok(()) => {}
                        Err(Error::Postgres { source, .. })
                            if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) =>
                        {
                            // A least-privilege forwarder: retention is the admin's.
                            retention = false;
                            tracing::info!(component = "detector", detector = "queue",
                                "queue retention is left to the background worker or a pgpipe_admin: \
                                 this role may not run pgpipe.rotate() (GRANT pgpipe_admin to run it here, \
                                 or set detector.retention_interval: 0)");
                        }
                        Err(e) => {
                            tracing::warn!(component = "detector", detector = "queue", error = %e,
                            "queue retention failed; will try again")
                        }
                    }
                }
                Wake::Acks => {
                    while let Ok((adapter, seq)) = io.acks.try_recv() {
                        progress.tracker.finished(adapter, seq);
                    }
                    self.write_ack(&client, progress, false).await?;
                }
                Wake::Shutdown => {
                    tracing::info!(
                        component = "detector",
                        detector = "queue",
                        in_flight = progress.tracker.in_flight(),
                        "stopping: draining in-flight events"
                    );
                    shutdown_deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                Wake::Deadline => {
                    tracing::warn!(component = "detector", detector = "queue",
                        in_flight = progress.tracker.in_flight(),
                        "shutdown timeout: unacknowledged events will be delivered again on restart");
                    break;
                }
            }
        }
        self.write_ack(&client, progress, true).await?;
        Ok(())
    }

    async fn check_extension(&self, client: &Client) -> Result<(), Error> {
        if !has_extension(client).await? {
            return Err(Error::Extension(
                "the pgpipe extension is not installed in this database: run CREATE EXTENSION pgpipe, \
                 or use --detector listen_notify"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Takes the consumer's lease, waiting as a standby while another forwarder holds it.
    /// Returns false when shutdown came first.
    async fn claim(
        &self,
        client: &Client,
        health: &crate::health::Component,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let mut announced = false;
        loop {
            let claimed: bool = match client
                .query_one("SELECT pgpipe.try_claim_consumer($1)", &[&self.consumer])
                .await
            {
                Ok(row) => row.get(0),
                // A lease lives in the consumer's row: a new consumer is registered
                // first (nobody can hold what does not exist yet).
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                    let channels: Option<Vec<String>> = Some(self.channels.clone());
                    client
                        .execute(
                            "SELECT pgpipe.register_consumer($1, $2)",
                            &[&self.consumer, &channels],
                        )
                        .await
                        .map_err(Error::pg(format!("register consumer {}", self.consumer)))?;
                    continue;
                }
                Err(e) => return Err(Error::pg(format!("claim consumer {}", self.consumer))(e)),
            };
            if claimed {
                return Ok(true);
            }
            if !announced {
                tracing::info!(component = "detector", detector = "queue", consumer = %self.consumer,
                    "another forwarder holds this consumer; standing by");
                announced = true;
                health.standby(format!(
                    "another forwarder holds consumer {}",
                    self.consumer
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.backoff.ceiling(0)) => {}
            }
        }
    }

    /// Runs queue retention: partitions ahead are created, those every consumer is past
    /// are removed (see `pgpipe.rotate()`).
    async fn rotate(&self, client: &Client) -> Result<(), Error> {
        let rows = client
            .query("SELECT action, partition_name FROM pgpipe.rotate()", &[])
            .await
            .map_err(Error::pg("rotate the queue"))?;
        for row in rows {
            let action: String = row.get(0);
            let partition: Option<String> = row.get(1);
            tracing::debug!(component = "detector", detector = "queue", %action, ?partition, "queue retention");
        }
        Ok(())
    }

    /// Reads one page and publishes its events. Returns how many events it published.
    async fn read_batch(
        &self,
        client: &Client,
        bus: &Arc<crate::bus::Bus>,
        progress: &mut Progress,
        read_position: &mut String,
        limit: i32,
    ) -> Result<usize, Error> {
        let rows = client
            .query(READ_SQL, &[&self.consumer, &*read_position, &limit])
            .await
            .map_err(Error::pg(format!(
                "read queue for consumer {}",
                self.consumer
            )))?;
        let mut published = 0;
        for row in rows {
            let position: String = row.get(0);
            let id: Option<Uuid> = row.get(1);
            match id {
                None => progress.tracker.push_position(position.clone()),
                Some(id) => {
                    let event = event_from_row(id, &row)?;
                    let seq = progress.tracker.push_event(position.clone());
                    bus.publish(&Delivery {
                        seq,
                        event: Arc::new(event),
                    })?;
                    published += 1;
                }
            }
            *read_position = position;
        }
        Ok(published)
    }

    /// Writes the newest releasable position with `pgpipe.ack`. Progress past events is
    /// written at once; progress over empty batches at most every `idle_ack_interval`
    /// (each ack is a write, which would otherwise move the next snapshot forever).
    async fn write_ack(
        &self,
        client: &Client,
        progress: &mut Progress,
        force: bool,
    ) -> Result<(), Error> {
        if let Some(position) = progress.tracker.take_releasable() {
            progress.unwritten_ack = Some(position);
        }
        let Some(position) = progress.unwritten_ack.as_ref() else {
            return Ok(());
        };
        let events_released = progress.tracker.released_seq() > progress.written_seq;
        if !(force || events_released || progress.last_write.elapsed() >= self.idle_ack_interval) {
            return Ok(());
        }
        client
            .execute("SELECT pgpipe.ack($1, $2)", &[&self.consumer, position])
            .await
            .map_err(Error::pg(format!("ack consumer {}", self.consumer)))?;
        progress.written_seq = progress.tracker.released_seq();
        progress.last_write = Instant::now();
        progress.unwritten_ack = None;
        Ok(())
    }
}

impl Detector for QueueDetector {
    fn name(&self) -> &str {
        "queue"
    }

    fn reports_health(&self) -> bool {
        true
    }

    fn run(
        self: Box<Self>,
        io: DetectorIo,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.run_loop(io, cancel))
    }
}

fn wake_from(n: Option<Notification>) -> Result<Wake, Error> {
    match n {
        Some(_) => Ok(Wake::Read),
        None => Err(Error::DetectorDisconnected {
            detector: "queue".into(),
            reason: "connection closed".into(),
        }),
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The consumer name: the configured one, else the sorted channels joined by commas.
pub fn consumer_name(configured: &str, channels: &[String]) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let mut sorted: Vec<&str> = channels.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.join(",")
}

fn event_from_row(id: Uuid, row: &tokio_postgres::Row) -> Result<Event, Error> {
    let xid: String = row.get(7);
    Ok(Event {
        id,
        channel: row.get(2),
        operation: row.get(3),
        payload: row.get(4),
        source: row.get(5),
        created_at: row.get::<_, DateTime<Utc>>(6),
        transaction: Some(Transaction {
            xid: xid
                .parse()
                .map_err(|_| Error::Extension(format!("unexpected xid {xid:?}")))?,
            commit_time: None,
            seq: None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_consumer_name_is_stable_across_channel_order() {
        let a = consumer_name("", &["payments".into(), "orders".into(), "orders".into()]);
        assert_eq!(a, "orders,payments");
        assert_eq!(consumer_name("mine", &["x".into()]), "mine");
    }
}
