//! The `queue` detector: reads `pgpipe.events` through the extension's consumer API
//! (`pgpipe.read` / `pgpipe.ack`), so delivery is ordered, gap-free and at-least-once.
//!
//! One dedicated connection reads and acknowledges. It holds the consumer's lease
//! (`pgpipe.try_claim_consumer`), so a second forwarder for the same consumer stands by.
//! It reads when woken by the extension's NOTIFY on `pgpipe_wakeup`, after a full page,
//! and every `poll_interval` (a NOTIFY sent while reconnecting is lost).
//!
//! With `detector.group` it is a member of a consumer group instead
//! (`pgpipe.join_group` / `read_group` / `ack_group`, sql/groups.sql): it reads only its
//! share of each batch, acknowledges a finished share at once (the next batch waits for
//! every member), wakes on `pgpipe_group` when a batch closes, and leaves the group on a
//! clean stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use tokio_postgres::{Client, Notification};
use tokio_util::sync::CancellationToken;

use super::{sleep_until_opt, Detector, DetectorIo, Reconnect};
use crate::ack::InFlight;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::Config;
use crate::db::{self, QueueClient, QueueRow};
use crate::error::Error;
use crate::health::Component;

/// Detector name in logs and health.
const NAME: &str = "queue";
/// SQLSTATE of a refused privilege (a least-privilege role running pgpipe.rotate()).
const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// SQLSTATE of an unknown consumer (`pgpipe.try_claim_consumer` before it is registered).
const UNDEFINED_OBJECT: &str = "42704";

/// The channel the extension's background worker notifies after commits that queued events.
pub const WAKEUP_CHANNEL: &str = "pgpipe_wakeup";
/// The channel a consumer group's batch closing (or reassignment) is announced on.
pub const GROUP_CHANNEL: &str = "pgpipe_group";

/// Whether the pgpipe extension is installed in the database at `url`.
pub async fn extension_installed(url: &str) -> Result<bool, Error> {
    let (client, _) = db::connect(url).await?;
    QueueClient::new(&client).has_extension().await
}

/// The oldest extension version (`pg_extension.extversion`) whose SQL API this forwarder
/// uses: leases in rows, consumer groups, `register_consumer`'s start.
pub const MIN_EXTENSION_VERSION: &str = "0.2.0";

/// Refuses an extension schema older than [`MIN_EXTENSION_VERSION`]: a database created
/// with an older pgpipe and not updated since (the library is new, its SQL is not).
fn check_extension_version(version: &str) -> Result<(), Error> {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    if parse(version) < parse(MIN_EXTENSION_VERSION) {
        return Err(Error::Extension(format!(
            "the pgpipe extension in this database is at version {version}, and this forwarder \
             ({}) needs {MIN_EXTENSION_VERSION} or later: run ALTER EXTENSION pgpipe UPDATE in this \
             database (as its owner; it keeps queued events and consumers)",
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(())
}

/// Reads the pgpipe queue as one named consumer.
pub struct QueueDetector {
    url: String,
    /// The consumer, or the member's name in `group`.
    consumer: String,
    /// The default name this forwarder's consumer had before 0.2 (the channels alone),
    /// when the name is derived: a leftover of it is named at start.
    legacy_consumer: Option<String>,
    /// Where the consumer starts if it does not exist yet.
    start: crate::config::Start,
    group: Option<Group>,
    channels: Vec<String>,
    poll_interval: Duration,
    batch_size: u32,
    max_in_flight: usize,
    stall_warning: Duration,
    backoff: Backoff,
    idle_ack_interval: Duration,
    retention_interval: Duration,
    shutdown_timeout: Duration,
}

/// Membership of a consumer group.
struct Group {
    name: String,
    member_timeout: Duration,
}

/// Progress that survives reconnects.
struct Progress {
    window: InFlight<String>,
    /// Where the next read starts; empty until the first connection fetched the acked one.
    read_position: String,
    /// Releasable position not yet written with `pgpipe.ack`.
    unwritten_ack: Option<String>,
    /// `window.released_seq()` at the last written ack.
    written_seq: u64,
    last_write: Instant,
    /// The last position written (a group member writes every new one at once).
    last_written: Option<String>,
    /// When a group member last told the group it is alive.
    last_heartbeat: Instant,
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
    /// derived from the channels and adapters, see [`consumer_name`]).
    pub fn new(config: &Config) -> Self {
        let d = &config.detector;
        let group = (!d.group.is_empty()).then(|| Group {
            name: d.group.clone(),
            member_timeout: d.group_member_timeout,
        });
        let consumer = if group.is_some() {
            member_name(&d.group, &d.group_member, std::process::id())
        } else {
            consumer_of(config)
        };
        QueueDetector {
            url: config.database_url.clone(),
            consumer,
            legacy_consumer: (group.is_none() && d.consumer.is_empty())
                .then(|| consumer_name("", &config.channels, &[])),
            start: d.start,
            group,
            channels: config.channels.clone(),
            poll_interval: d.poll_interval,
            batch_size: d.batch_size,
            max_in_flight: d.max_in_flight,
            stall_warning: d.ack_stall_warning,
            backoff: Backoff::new(d.backoff_base, d.backoff_cap),
            idle_ack_interval: d.idle_ack_interval,
            retention_interval: d.retention_interval,
            shutdown_timeout: config.shutdown_timeout,
        }
    }

    async fn run_loop(self, io: DetectorIo, cancel: CancellationToken) -> Result<(), Error> {
        let (bus, health, window) = io.split(NAME, self.max_in_flight, self.stall_warning);
        let mut progress = Progress {
            window,
            read_position: String::new(),
            unwritten_ack: None,
            written_seq: 0,
            last_write: Instant::now(),
            last_written: None,
            last_heartbeat: Instant::now(),
        };
        let mut reconnect = Reconnect::new(
            NAME,
            self.backoff.clone(),
            "queue connection lost",
            format!("consumer {}", self.consumer),
        );
        loop {
            let ended = self
                .session(&bus, &health, &mut progress, &mut reconnect, &cancel)
                .await;
            if !reconnect
                .again(ended, &health, &mut progress.window, &cancel)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// One connection's life: returns Ok after a clean shutdown, Err when the connection
    /// failed (the caller reconnects).
    async fn session(
        &self,
        bus: &Arc<Bus>,
        health: &Component,
        progress: &mut Progress,
        reconnect: &mut Reconnect,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let (client, mut notifications) = db::connect(&self.url).await?;
        reconnect.reached();
        self.check_extension(&client).await?;
        // An ack is a commit; waiting for its WAL flush held the next read (same
        // connection) behind an fsync on every page. An ack lost in a crash of Postgres
        // only delivers its events again (at-least-once, receivers deduplicate on the
        // id); it can never skip one, and retention cannot outrun it (WAL is flushed in
        // order, so a durable rotate() implies the acks before it are durable).
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(Error::pg("set synchronous_commit for acks"))?;
        let queue = QueueClient::new(&client);
        let acked = match &self.group {
            Some(group) => match self.join(&client, group, health, reconnect, cancel).await? {
                Some(position) => position,
                None => return Ok(()),
            },
            None => {
                if !self.claim(&client, health, reconnect, cancel).await? {
                    return Ok(());
                }
                queue
                    .register(&self.consumer, &self.channels, self.start.as_sql())
                    .await?
            }
        };
        // Never silence: a forgotten consumer holds every event from its position on.
        match queue.stale_consumers().await {
            Ok(stale) if !stale.is_empty() => {
                crate::metrics::stale_consumers(stale.len());
                tracing::warn!(component = "detector", detector = NAME, consumers = ?stale,
                    "these consumers acknowledged nothing for pgpipe.consumer_stale_after and hold \
                     queue retention back: run their forwarders again or drop them \
                     (SELECT pgpipe.drop_consumer('<name>'); `pgpipe status` lists them)");
            }
            Ok(_) => crate::metrics::stale_consumers(0),
            Err(e) => tracing::debug!(component = "detector", detector = NAME, error = %e,
                "stale consumers not checked"),
        }
        client
            .batch_execute(&format!("LISTEN {WAKEUP_CHANNEL}"))
            .await
            .map_err(Error::pg(format!("listen on {WAKEUP_CHANNEL}")))?;
        if self.group.is_some() {
            client
                .batch_execute(&format!("LISTEN {GROUP_CHANNEL}"))
                .await
                .map_err(Error::pg(format!("listen on {GROUP_CHANNEL}")))?;
        }
        if progress.read_position.is_empty() {
            progress.read_position = acked;
        }
        reconnect.connected();
        health.up();
        match &self.group {
            Some(group) => tracing::info!(component = "detector", detector = NAME,
                group = %group.name, member = %self.consumer, channels = ?self.channels,
                "reading the pgpipe queue as a consumer group member"),
            None => tracing::info!(component = "detector", detector = NAME,
                consumer = %self.consumer, channels = ?self.channels, "reading the pgpipe queue"),
        }
        self.warn_unproduced_channels(&queue).await;

        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Retention runs on the lease holder's connection; zero turns it off.
        let mut rotate =
            tokio::time::interval(self.retention_interval.max(Duration::from_millis(1)));
        rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retention = !self.retention_interval.is_zero();
        let mut want_read = true;
        let mut shutdown_deadline: Option<tokio::time::Instant> = None;
        // The next page, read while the one before was handed out (see below).
        let mut prefetched: Option<(i32, Vec<QueueRow>)> = None;
        loop {
            let room = progress.window.room();
            if want_read && shutdown_deadline.is_none() && room > 0 {
                let (limit, rows) = match prefetched.take() {
                    Some(page) => page,
                    None => {
                        let limit = room.min(u64::from(self.batch_size)) as i32;
                        (
                            limit,
                            self.fetch(&queue, &progress.read_position, limit).await?,
                        )
                    }
                };
                // A full page means more is waiting.
                let events = rows.iter().filter(|r| r.event.is_some()).count();
                want_read = events == limit as usize;
                // Room for one more page after this one: read it now, so that Postgres
                // runs the next read while this page goes to the adapters and the ack is
                // written (one connection, pipelined). A group member reads one page at a
                // time: its reads hand out shares. A prefetched page not used (shutdown, a
                // failed connection) is simply read again: reading changes nothing.
                let next_room = room.saturating_sub(events as u64);
                let next: Option<(String, i32)> = match rows.last() {
                    Some(last) if want_read && self.group.is_none() && next_room > 0 => Some((
                        last.position.clone(),
                        next_room.min(u64::from(self.batch_size)) as i32,
                    )),
                    _ => None,
                };
                match next {
                    Some((after, next_limit)) => {
                        let handed_out = async {
                            self.hand_out(rows, bus, progress)?;
                            self.write_ack(&queue, progress, false).await
                        };
                        let (page, handed_out) =
                            tokio::join!(self.fetch(&queue, &after, next_limit), handed_out);
                        handed_out?;
                        prefetched = Some((next_limit, page?));
                    }
                    None => {
                        self.hand_out(rows, bus, progress)?;
                        self.write_ack(&queue, progress, false).await?;
                    }
                }
                if want_read {
                    continue;
                }
            }
            if shutdown_deadline.is_some() && progress.window.in_flight() == 0 {
                break;
            }
            let wake = tokio::select! {
                _ = cancel.cancelled(), if shutdown_deadline.is_none() => Wake::Shutdown,
                _ = sleep_until_opt(shutdown_deadline) => Wake::Deadline,
                acked = progress.window.acked() => {
                    acked?;
                    Wake::Acks
                }
                n = notifications.recv() => wake_from(n)?,
                _ = poll.tick() => Wake::Read,
                _ = rotate.tick(), if retention => Wake::Rotate,
            };
            match wake {
                Wake::Read => {
                    want_read = true;
                    self.heartbeat(&queue, progress).await?;
                }
                Wake::Rotate => {
                    // Retention failing must not stop delivery; a broken connection
                    // shows up on the next read anyway.
                    match queue.rotate().await {
                        Ok(_) => {}
                        Err(e) if e.sqlstate() == Some(INSUFFICIENT_PRIVILEGE) => {
                            // A least-privilege forwarder: retention is the admin's.
                            retention = false;
                            tracing::info!(component = "detector", detector = NAME,
                                "queue retention is left to the background worker or a pgpipe_admin: \
                                 this role may not run pgpipe.rotate() (GRANT pgpipe_admin to run it here, \
                                 or set detector.retention_interval: 0)");
                        }
                        Err(e) => {
                            tracing::warn!(component = "detector", detector = NAME, error = %e,
                            "queue retention failed; will try again")
                        }
                    }
                }
                Wake::Acks => self.write_ack(&queue, progress, false).await?,
                Wake::Shutdown => {
                    tracing::info!(
                        component = "detector",
                        detector = NAME,
                        in_flight = progress.window.in_flight(),
                        "stopping: draining in-flight events"
                    );
                    shutdown_deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                Wake::Deadline => {
                    tracing::warn!(component = "detector", detector = NAME,
                        in_flight = progress.window.in_flight(),
                        "shutdown timeout: unacknowledged events will be delivered again on restart");
                    break;
                }
            }
        }
        self.write_ack(&queue, progress, true).await?;
        if self.group.is_some() {
            // What this member did not finish goes to the others now, not after a timeout.
            queue.leave_group(&self.consumer).await?;
            tracing::info!(component = "detector", detector = NAME, member = %self.consumer,
                "left the consumer group");
        }
        Ok(())
    }

    /// Joins the consumer group, waiting as a standby while another forwarder holds this
    /// member name. Returns the member's position, `None` when shutdown came first.
    async fn join(
        &self,
        client: &Client,
        group: &Group,
        health: &Component,
        reconnect: &Reconnect,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, Error> {
        let queue = QueueClient::new(client);
        let mut announced = false;
        loop {
            let joined = queue
                .join_group(
                    &group.name,
                    &self.consumer,
                    &self.channels,
                    group.member_timeout,
                )
                .await?;
            if joined.is_some() {
                return Ok(joined);
            }
            if !announced {
                tracing::info!(component = "detector", detector = NAME, member = %self.consumer,
                    "another forwarder holds this group member name; standing by");
                announced = true;
                health.standby(format!(
                    "another forwarder holds member {} of group {}",
                    self.consumer, group.name
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(reconnect.first_delay()) => {}
            }
        }
    }

    /// A group member whose window is full reads nothing: it tells the group it is
    /// alive, well within the member timeout.
    async fn heartbeat(
        &self,
        queue: &QueueClient<'_>,
        progress: &mut Progress,
    ) -> Result<(), Error> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        if progress.window.room() > 0
            || progress.last_heartbeat.elapsed() < group.member_timeout / 10
        {
            return Ok(());
        }
        queue.group_heartbeat(&self.consumer).await?;
        progress.last_heartbeat = Instant::now();
        Ok(())
    }

    async fn check_extension(&self, client: &Client) -> Result<(), Error> {
        let Some(version) = QueueClient::new(client).extension_version().await? else {
            return Err(Error::Extension(
                "the pgpipe extension is not installed in this database: run CREATE EXTENSION pgpipe, \
                 or use --detector listen_notify"
                    .into(),
            ));
        };
        check_extension_version(&version)
    }

    /// Takes the consumer's lease, waiting as a standby while another forwarder holds it.
    /// Returns false when shutdown came first.
    async fn claim(
        &self,
        client: &Client,
        health: &Component,
        reconnect: &Reconnect,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let queue = QueueClient::new(client);
        let mut announced = false;
        loop {
            let claimed = match queue.try_claim(&self.consumer).await {
                Ok(claimed) => claimed,
                // A lease lives in the consumer's row: a new consumer is registered
                // first (nobody can hold what does not exist yet).
                Err(e) if e.sqlstate() == Some(UNDEFINED_OBJECT) => {
                    self.register_new(&queue).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if claimed {
                return Ok(true);
            }
            if !announced {
                let holder = queue.holder(&self.consumer).await.ok().flatten();
                tracing::warn!(component = "detector", detector = NAME, consumer = %self.consumer,
                    holder = holder.as_deref().unwrap_or("another session"),
                    "another forwarder holds this consumer: this one stands by and delivers \
                     nothing until it lets go. If this forwarder should get every event \
                     itself, give it a consumer of its own with --consumer NAME");
                announced = true;
                health.standby(format!(
                    "another forwarder holds consumer {}",
                    self.consumer
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(reconnect.first_delay()) => {}
            }
        }
    }

    /// Never silence: names every channel that no subscription carries, where only
    /// `pgpipe.emit` would produce events (and the original pgpipe's `pgpipe:<table>`
    /// channel names, which the extension does not use).
    async fn warn_unproduced_channels(&self, queue: &QueueClient<'_>) {
        let Ok(unsubscribed) = queue.unsubscribed_channels(&self.channels).await else {
            return;
        };
        for channel in unsubscribed {
            match channel.strip_prefix("pgpipe:") {
                Some(table) => tracing::warn!(component = "detector", detector = NAME, %channel,
                    "no subscription carries channel {channel:?}: that is the original pgpipe's \
                     NOTIFY channel name; the extension's channel is the table's name: use \
                     --channel {table} (after SELECT pgpipe.subscribe('{table}'))"),
                None => tracing::warn!(component = "detector", detector = NAME, %channel,
                    "no subscription carries channel {channel:?}: only pgpipe.emit('{channel}', ...) \
                     produces events on it. To capture a table, SELECT pgpipe.subscribe('<table>', \
                     channel => '{channel}')"),
            }
        }
    }

    /// Registers the consumer, which does not exist yet, starting where `--start` says, and
    /// says so; names a consumer of the channels from before pgpipe 0.2 (whose default
    /// consumer was the channels alone) that this forwarder leaves behind.
    async fn register_new(&self, queue: &QueueClient<'_>) -> Result<(), Error> {
        queue
            .register(&self.consumer, &self.channels, self.start.as_sql())
            .await?;
        tracing::info!(component = "detector", detector = NAME, consumer = %self.consumer,
            start = self.start.as_sql(), "created the consumer");
        if let Some(legacy) = &self.legacy_consumer {
            if legacy != &self.consumer && queue.consumer_exists(legacy).await.unwrap_or(false) {
                tracing::warn!(component = "detector", detector = NAME, consumer = %self.consumer,
                    old = %legacy,
                    "consumer {legacy:?} of these channels exists (the default name before \
                     pgpipe 0.2) and this forwarder does not continue it: pass --consumer \
                     {legacy} to go on from its position, or drop it (SELECT \
                     pgpipe.drop_consumer('{legacy}')) so it stops holding retention");
            }
        }
        Ok(())
    }

    /// Reads the page after `position` (this consumer's, or its share as a group member).
    async fn fetch(
        &self,
        queue: &QueueClient<'_>,
        position: &str,
        limit: i32,
    ) -> Result<Vec<QueueRow>, Error> {
        match self.group {
            Some(_) => queue.read_group(&self.consumer, position, limit).await,
            None => queue.read(&self.consumer, position, limit).await,
        }
    }

    /// Hands a page's events to the bus, in order, and moves the read position past it.
    fn hand_out(
        &self,
        rows: Vec<QueueRow>,
        bus: &Bus,
        progress: &mut Progress,
    ) -> Result<(), Error> {
        if self.group.is_some() {
            progress.last_heartbeat = Instant::now();
        }
        for row in rows {
            match row.event {
                None => progress.window.push_position(row.position.clone()),
                Some(event) => {
                    progress.window.publish(bus, row.position.clone(), event)?;
                }
            }
            progress.read_position = row.position;
        }
        Ok(())
    }

    /// Writes the newest releasable position with `pgpipe.ack`. Progress past events is
    /// written at once; progress over empty batches at most every `idle_ack_interval`
    /// (each ack is a write, which would otherwise move the next snapshot forever).
    async fn write_ack(
        &self,
        queue: &QueueClient<'_>,
        progress: &mut Progress,
        force: bool,
    ) -> Result<(), Error> {
        if let Some(position) = progress.window.take_releasable() {
            progress.unwritten_ack = Some(position);
        }
        let Some(position) = progress.unwritten_ack.as_ref() else {
            return Ok(());
        };
        let events_released = progress.window.released_seq() > progress.written_seq;
        // A member's finished share closes the batch for the whole group: written at once.
        let group_moved = self.group.is_some() && progress.last_written.as_ref() != Some(position);
        if !(force
            || events_released
            || group_moved
            || progress.last_write.elapsed() >= self.idle_ack_interval)
        {
            return Ok(());
        }
        if self.group.is_some() {
            if progress.last_written.as_ref() != Some(position) {
                queue.ack_group(&self.consumer, position).await?;
            }
        } else {
            queue.ack(&self.consumer, position).await?;
        }
        progress.written_seq = progress.window.released_seq();
        progress.last_write = Instant::now();
        progress.last_written = progress.unwritten_ack.take();
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
            detector: NAME.into(),
            reason: "connection closed".into(),
        }),
    }
}

/// The consumer `config` reads as (see [`consumer_name`]).
pub fn consumer_of(config: &Config) -> String {
    consumer_name(
        &config.detector.consumer,
        &config.channels,
        &crate::adapter::names(config),
    )
}

/// The consumer name: the configured one, else the sorted channels joined by commas, a
/// `+` and the sorted adapters (`orders,payments+file:lake,webhook`): two forwarders on
/// the same channels with different adapters each get every event, while a second
/// forwarder with the same adapters stands by for the first. Without adapters (names
/// from before 0.2) it is the channels alone.
pub fn consumer_name(configured: &str, channels: &[String], adapters: &[String]) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let sorted = |names: &[String]| {
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.join(",")
    };
    let name = if adapters.is_empty() {
        sorted(channels)
    } else {
        format!("{}+{}", sorted(channels), sorted(adapters))
    };
    if name.len() <= MAX_CONSUMER_NAME {
        return name;
    }
    // Too long for pgpipe.consumers: a readable prefix and a digest of the whole.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut prefix_end = MAX_CONSUMER_NAME - hex.len() - 1;
    while !name.is_char_boundary(prefix_end) {
        prefix_end -= 1;
    }
    format!("{}.{hex}", &name[..prefix_end])
}

/// The longest consumer name `pgpipe.consumers` takes.
const MAX_CONSUMER_NAME: usize = 200;

/// A group member's name: the configured one, else `<group>.<host>.<pid>`, unique per
/// running forwarder (a restarted one joins as a new member; the old one is cleaned up).
pub fn member_name(group: &str, configured: &str, pid: u32) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let host = if host.is_empty() {
        "host".to_string()
    } else {
        host
    };
    let mut name = format!("{group}.{host}.{pid}");
    // The consumer name limit; the pid at the end keeps it unique.
    if name.len() > 200 {
        let tail = format!(".{pid}");
        name.truncate(200 - tail.len());
        name.push_str(&tail);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_unique_per_process_and_valid() {
        let a = member_name("billing", "", 41);
        let b = member_name("billing", "", 42);
        assert_ne!(a, b);
        assert!(a.starts_with("billing.") && a.ends_with(".41"), "{a}");
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.:,+-".contains(c);
        assert!(a.chars().all(allowed), "{a}");
        assert_eq!(member_name("billing", "m1", 41), "m1");
        let long = member_name(&"g".repeat(199), "", 7);
        assert!(long.len() <= 200 && long.ends_with(".7"), "{long}");
    }

    #[test]
    fn default_consumer_name_is_stable_across_channel_order() {
        let a = consumer_name(
            "",
            &["payments".into(), "orders".into(), "orders".into()],
            &[],
        );
        assert_eq!(a, "orders,payments");
        assert_eq!(
            consumer_name("mine", &["x".into()], &["stdout".into()]),
            "mine"
        );
        let hook = consumer_name("", &["orders".into()], &["webhook".into()]);
        let out = consumer_name("", &["orders".into()], &["stdout".into()]);
        assert_eq!(
            (hook.as_str(), out.as_str()),
            ("orders+webhook", "orders+stdout")
        );
        let two = consumer_name(
            "",
            &["b".into(), "a".into()],
            &["webhook".into(), "file:lake".into()],
        );
        assert_eq!(two, "a,b+file:lake,webhook");
        let many: Vec<String> = (0..40).map(|i| format!("channel_{i:02}")).collect();
        let long = consumer_name("", &many, &["stdout".into()]);
        assert_eq!(long.len(), MAX_CONSUMER_NAME);
        assert!(long.starts_with("channel_00,channel_01"));
        assert_ne!(long, consumer_name("", &many, &["webhook".into()]));
    }

    #[test]
    fn an_older_extension_schema_is_refused_with_the_update_command() {
        let old = check_extension_version("0.1.0").unwrap_err().to_string();
        assert!(old.contains("version 0.1.0"), "{old}");
        assert!(old.contains("ALTER EXTENSION pgpipe UPDATE"), "{old}");
        for ok in ["0.2.0", "0.2.1", "0.10.0", "1.0"] {
            assert!(check_extension_version(ok).is_ok(), "{ok}");
        }
    }
}
