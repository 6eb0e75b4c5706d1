//! The `wal` detector: logical replication with pgoutput over the replication protocol,
//! from any Postgres with `wal_level = logical` and no extension.
//!
//! - Publication: `--publication NAME` must exist; with `--all-tables` it is created
//!   `FOR ALL TABLES` when missing (default name `pgpipe_all_tables`).
//! - Slot: a persistent logical slot (`--slot`, default `pgpipe_<publication>`, or the
//!   publication's name when it already starts with `pgpipe_`), created when missing. Replication resumes from its confirmed LSN.
//! - Delivery is at least once: the slot's confirmed LSN is a commit's end LSN, reported
//!   (standby status update) only after every durable adapter finished every event of
//!   that transaction and of all before it. A restart replays from there; replayed events
//!   carry the same ids (see [`changes::event_id`]).
//! - Flow control: at most `max_in_flight` unacknowledged events; beyond that the
//!   detector stops reading and the replication client keeps the server's keepalives
//!   answered while TCP backpressure holds the walsender.
//!
//! The replication connection is `pgwire-replication` (pure Rust, tokio, rustls, SCRAM):
//! it does the startup, authentication, COPY BOTH streaming, keepalives and standby status
//! updates. pgoutput decoding ([`pgoutput`]), typing ([`value`]) and event building
//! ([`changes`]) are ours. A second, ordinary connection checks the server, manages the
//! publication and the slot, and looks up user-defined types.

pub mod changes;
pub use pgpipe_pgoutput as pgoutput;
pub use pgpipe_pgoutput::parse_lsn;
pub mod value;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use pgwire_replication::{
    Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{sleep_until_opt, Detector, DetectorIo, Reconnect};
use crate::ack::InFlight;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::Config;
use crate::db::{self, ConnectTarget, TlsMode};
use crate::error::Error;
use crate::event::{Delivery, Event};
use crate::health::Component;
use changes::{ChangeBuilder, Options};
use pgoutput::Message;
use value::Kind;

/// Detector name in logs.
const NAME: &str = "wal";

/// Publication created by `--all-tables` when no name is given.
pub const DEFAULT_ALL_TABLES_PUBLICATION: &str = "pgpipe_all_tables";

/// Session settings of the replication connection, so values print the way the
/// conversion to JSON expects them (ISO dates, UTC).
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=1";

/// How long a clean shutdown tries to write the final confirmed LSN after the stream
/// closed, and how often.
const FINAL_CONFIRM_ATTEMPTS: u32 = 30;
const FINAL_CONFIRM_PAUSE: Duration = Duration::from_millis(100);

/// Replicates a publication through a persistent slot; see the module documentation.
pub struct WalDetector {
    url: String,
    publication: String,
    create_publication: bool,
    slot: String,
    options: Options,
    max_in_flight: usize,
    stall_warning: Duration,
    backoff: Backoff,
    status_interval: Duration,
    shutdown_timeout: Duration,
}

/// Progress that outlives a connection.
struct Progress {
    window: InFlight<u64>,
    /// The newest LSN reported as confirmed.
    released: u64,
}

impl WalDetector {
    /// A detector for `config.detector` (publication, slot, transaction options).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let d = &config.detector;
        let publication = if d.publication.is_empty() {
            DEFAULT_ALL_TABLES_PUBLICATION.to_string()
        } else {
            d.publication.clone()
        };
        if publication.contains([',', '\'', '"']) || publication.chars().any(char::is_whitespace) {
            return Err(Error::Config(format!(
                "invalid publication name {publication:?}: commas, quotes and spaces cannot be replicated"
            )));
        }
        let slot = if d.slot.is_empty() {
            default_slot(&publication)
        } else {
            d.slot.clone()
        };
        let detector = WalDetector {
            url: config.database_url.clone(),
            publication,
            create_publication: d.all_tables,
            slot,
            options: Options {
                tx_metadata: d.tx_metadata || d.tx_markers,
                tx_markers: d.tx_markers,
                channels: config.channels.clone(),
            },
            max_in_flight: d.max_in_flight,
            stall_warning: d.ack_stall_warning,
            backoff: Backoff::new(d.backoff_base, d.backoff_cap),
            status_interval: d.status_interval,
            shutdown_timeout: config.shutdown_timeout,
        };
        // Settings the replication connection cannot use fail now, before any side effect.
        detector.replication_config(0)?;
        Ok(detector)
    }

    async fn run_loop(self, io: DetectorIo, cancel: CancellationToken) -> Result<(), Error> {
        let (bus, health, window) = io.split(NAME, self.max_in_flight, self.stall_warning);
        let mut progress = Progress {
            window,
            released: 0,
        };
        let mut reconnect = Reconnect::new(
            NAME,
            self.backoff.clone(),
            "replication stream down (changes wait in the slot)",
            format!("slot {}", self.slot),
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

    /// One connection's life: Ok after a clean shutdown, Err when something failed.
    async fn session(
        &self,
        bus: &Bus,
        health: &Component,
        progress: &mut Progress,
        reconnect: &mut Reconnect,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let (client, _notifications) = db::connect(&self.url).await?;
        reconnect.reached();
        check_wal_level(&client).await?;
        self.ensure_publication(&client).await?;
        let start = self.ensure_slot(&client).await?;
        let reference_xid: String = client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await
            .map_err(Error::pg("read the current transaction id"))?
            .get(0);
        let reference_xid: u64 = reference_xid.parse().unwrap_or(0);

        let config = self.replication_config(start)?;
        let mut repl = ReplicationClient::connect(config)
            .await
            .map_err(|e| Error::replication("connect for replication")(e.to_string()))?;
        // connect() returns before the handshake: wait until the server holds the slot
        // for us (a second forwarder waits here, retrying, while the first runs: the
        // server answers 55006 object_in_use, which makes it a standby).
        repl.wait_started().await.map_err(|e| {
            Error::replication(format!("start replication from slot {}", self.slot))(e.to_string())
        })?;
        health.up();
        reconnect.connected();
        if progress.released > start {
            // Released before the last connection dropped but never reported.
            repl.update_applied_lsn(Lsn::from_u64(progress.released));
        }
        progress.released = progress.released.max(start);
        tracing::info!(component = "detector", detector = NAME, publication = %self.publication,
            slot = %self.slot, start_lsn = %Lsn::from_u64(start), "replicating");

        let mut builder = ChangeBuilder::new(self.options.clone());
        let mut kinds: HashMap<u32, Kind> = HashMap::new();
        // The newest position that may be confirmed once everything before it is done: a
        // commit's end, or a keepalive's position between transactions.
        let mut safe = start;
        let mut shutdown_deadline: Option<tokio::time::Instant> = None;
        loop {
            if shutdown_deadline.is_some() && progress.window.in_flight() == 0 {
                break;
            }
            let room = shutdown_deadline.is_none() && progress.window.room() > 0;
            tokio::select! {
                _ = cancel.cancelled(), if shutdown_deadline.is_none() => {
                    tracing::info!(component = "detector", detector = NAME,
                        in_flight = progress.window.in_flight(), "stopping: draining in-flight events");
                    shutdown_deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                _ = sleep_until_opt(shutdown_deadline) => {
                    tracing::warn!(component = "detector", detector = NAME,
                        in_flight = progress.window.in_flight(),
                        "shutdown timeout: unacknowledged changes will be replicated again on restart");
                    break;
                }
                acked = progress.window.acked() => acked?,
                event = repl.recv(), if room => {
                    let event = event
                        .map_err(|e| disconnected(format!("replication stream: {e}")))?
                        .ok_or_else(|| disconnected("replication stream ended".into()))?;
                    match event {
                        ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                            let xid = changes::full_xid(xid, reference_xid);
                            if let Some(marker) = builder.begin(final_lsn.as_u64(), commit_time_micros, xid) {
                                publish(bus, progress, safe, marker)?;
                            }
                        }
                        ReplicationEvent::Commit { end_lsn, .. } => {
                            if let Some(marker) = builder.commit() {
                                publish(bus, progress, safe, marker)?;
                            }
                            safe = safe.max(end_lsn.as_u64());
                            progress.window.push_position(safe);
                        }
                        ReplicationEvent::XLogData { data, .. } => {
                            let message = pgoutput::decode(&data)
                                .map_err(|e| disconnected(e.to_string()))?;
                            match message {
                                Some(Message::Relation(relation)) => {
                                    let mut column_kinds = Vec::with_capacity(relation.columns.len());
                                    for column in &relation.columns {
                                        column_kinds.push(kind_of(&client, &mut kinds, column.type_oid).await?);
                                    }
                                    let primary_key = primary_key(&client, relation.id).await?;
                                    builder.relation(relation, column_kinds, primary_key);
                                }
                                Some(change) => {
                                    let events = builder
                                        .change(&change)
                                        .map_err(|e| disconnected(e.to_string()))?;
                                    for event in events {
                                        publish(bus, progress, safe, event)?;
                                    }
                                }
                                None => {}
                            }
                        }
                        ReplicationEvent::KeepAlive { wal_end, .. } => {
                            // Between transactions everything the server sent is processed:
                            // its position may be confirmed (keeps an idle slot moving).
                            if !builder.in_transaction() && wal_end.as_u64() > safe {
                                safe = wal_end.as_u64();
                                progress.window.push_position(safe);
                            }
                        }
                        ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
                    }
                }
            }
            progress.window.drain();
            if let Some(lsn) = progress.window.take_releasable() {
                if lsn > progress.released {
                    progress.released = lsn;
                    repl.update_applied_lsn(Lsn::from_u64(lsn));
                }
            }
        }
        // The replication client sends status updates on its own clock; close the stream
        // and write the final position through the slot itself.
        let _ = tokio::time::timeout(self.shutdown_timeout, repl.shutdown()).await;
        self.confirm_final(&client, progress.released).await;
        Ok(())
    }

    async fn ensure_publication(&self, client: &Client) -> Result<(), Error> {
        let row = client
            .query_opt(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(Error::pg(format!(
                "look up publication {}",
                self.publication
            )))?;
        match row {
            Some(_) => Ok(()),
            None if self.create_publication => {
                client
                    .batch_execute(&format!(
                        "CREATE PUBLICATION {} FOR ALL TABLES",
                        quote_ident(&self.publication)
                    ))
                    .await
                    .map_err(Error::pg(format!(
                        "create publication {} (FOR ALL TABLES needs superuser)",
                        self.publication
                    )))?;
                tracing::info!(component = "detector", detector = NAME, publication = %self.publication,
                    "created publication FOR ALL TABLES");
                Ok(())
            }
            None => Err(Error::SourceNotReady(format!(
                "publication {:?} does not exist in this database: create it \
                 (`pgpipe init --detector wal --table T --publication {}` prints the SQL) \
                 or pass --all-tables to replicate every table",
                self.publication, self.publication
            ))),
        }
    }

    /// Creates the slot when missing; returns the LSN replication resumes from.
    async fn ensure_slot(&self, client: &Client) -> Result<u64, Error> {
        let row = client
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text, \
                        current_database()::text, wal_status::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(Error::pg(format!("look up replication slot {}", self.slot)))?;
        if let Some(row) = row {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let confirmed: Option<String> = row.get(2);
            let current: String = row.get(3);
            let wal_status: Option<String> = row.get(4);
            if wal_status.as_deref() == Some("lost") {
                return Err(Error::SlotInvalidated {
                    slot: self.slot.clone(),
                });
            }
            if plugin.as_deref() != Some("pgoutput")
                || database.as_deref() != Some(current.as_str())
            {
                return Err(Error::SourceNotReady(format!(
                    "replication slot {:?} exists but is not a pgoutput slot of database {current:?} \
                     (plugin {plugin:?}, database {database:?}): pass another --slot",
                    self.slot
                )));
            }
            return Ok(confirmed.as_deref().and_then(parse_lsn).unwrap_or(0));
        }
        let lsn: String = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&self.slot],
            )
            .await
            .map_err(Error::pg(format!(
                "create replication slot {} (needs the REPLICATION privilege)",
                self.slot
            )))?
            .get(0);
        tracing::warn!(component = "detector", detector = NAME, slot = %self.slot, lsn = %lsn,
            "created persistent replication slot: it keeps WAL until pgpipe confirms it; \
             drop it (SELECT pg_drop_replication_slot('{}')) when pgpipe is retired, \
             and consider max_slot_wal_keep_size", self.slot);
        Ok(parse_lsn(&lsn).unwrap_or(0))
    }

    /// After the stream closed: moves the slot to `lsn` if the last status update did not.
    async fn confirm_final(&self, client: &Client, lsn: u64) {
        if lsn == 0 {
            return;
        }
        let target = Lsn::from_u64(lsn).to_string();
        for _ in 0..FINAL_CONFIRM_ATTEMPTS {
            let row = client
                .query_opt(
                    "SELECT active, confirmed_flush_lsn >= $2::text::pg_lsn \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot, &target],
                )
                .await;
            match row {
                Ok(Some(row)) => {
                    let active: bool = row.get(0);
                    let done: Option<bool> = row.get(1);
                    if done == Some(true) {
                        return;
                    }
                    if !active {
                        match client
                            .execute(
                                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                                &[&self.slot, &target],
                            )
                            .await
                        {
                            Ok(_) => {
                                tracing::info!(component = "detector", detector = NAME,
                                    slot = %self.slot, lsn = %target, "final position confirmed");
                                return;
                            }
                            Err(e) => tracing::debug!(component = "detector", detector = NAME,
                                error = %e, "advance slot"),
                        }
                    }
                }
                Ok(None) | Err(_) => return,
            }
            tokio::time::sleep(FINAL_CONFIRM_PAUSE).await;
        }
        tracing::warn!(component = "detector", detector = NAME, slot = %self.slot, lsn = %target,
            "could not confirm the final position; the last changes will be replicated again on restart");
    }

    fn replication_config(&self, start: u64) -> Result<ReplicationConfig, Error> {
        let target = ConnectTarget::parse(&self.url)?;
        let pg: tokio_postgres::Config = target
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| Error::DatabaseUrl(e.to_string()))?;
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
            None => "localhost".to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg.get_user().unwrap_or("postgres").to_string();
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = pg.get_dbname().unwrap_or(&user).to_string();
        let ca = target.root_cert.map(std::path::PathBuf::from);
        let tls = match target.tls {
            TlsMode::Disable => TlsConfig::disabled(),
            TlsMode::Prefer => TlsConfig {
                mode: SslMode::Prefer,
                ..TlsConfig::default()
            },
            TlsMode::Require => TlsConfig::require(),
            TlsMode::VerifyCa => TlsConfig::verify_ca(ca),
            TlsMode::VerifyFull if host.parse::<std::net::IpAddr>().is_ok() => {
                return Err(Error::Config(format!(
                    "sslmode=verify-full with an IP address ({host}) is not supported by the \
                     replication connection, which verifies DNS names only: connect by the DNS \
                     name in the server's certificate, or use sslmode=verify-ca"
                )))
            }
            TlsMode::VerifyFull => TlsConfig::verify_full(ca),
        };
        Ok(ReplicationConfig::new(
            host,
            user,
            password,
            database,
            self.slot.clone(),
            self.publication.as_str(),
        )
        .with_port(port)
        .with_tls(tls)
        .with_start_lsn(Lsn::from_u64(start))
        .with_status_interval(self.status_interval)
        .with_wakeup_interval(self.status_interval)
        .with_buffer_size(self.max_in_flight.clamp(1, 8192))
        .with_options(SESSION_OPTIONS)
        .with_application_name(pg.get_application_name().unwrap_or("pgpipe").to_string()))
    }
}

impl Detector for WalDetector {
    fn name(&self) -> &str {
        NAME
    }

    fn reports_health(&self) -> bool {
        true
    }

    fn run(
        self: Box<Self>,
        io: DetectorIo,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin((*self).run_loop(io, cancel))
    }
}

/// Fails with how to fix it when the server cannot do logical decoding.
pub async fn check_wal_level(client: &Client) -> Result<(), Error> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(Error::pg("read wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(Error::SourceNotReady(wal_level_error(&level)));
    }
    Ok(())
}

/// The message for a server whose `wal_level` is not `logical`.
pub fn wal_level_error(level: &str) -> String {
    format!(
        "the wal detector needs wal_level = logical, but this server has wal_level = {level}. \
         Fix: run ALTER SYSTEM SET wal_level = logical; as a superuser and restart Postgres \
         (on managed services, turn on logical replication in the instance's parameters, \
         e.g. rds.logical_replication = 1 or cloudsql.logical_decoding = on)"
    )
}

fn publish(bus: &Bus, progress: &mut Progress, safe: u64, event: Event) -> Result<(), Error> {
    let seq = progress.window.push_event(safe);
    bus.publish(&Delivery {
        seq,
        event: Arc::new(event),
    })
}

/// The primary-key column names of table `relid` (empty: none), for the events' key.
async fn primary_key(client: &Client, relid: u32) -> Result<Vec<String>, Error> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) \
                              FROM pg_catalog.pg_index i \
                              JOIN pg_catalog.pg_attribute a \
                                ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) \
                              WHERE i.indrelid = $1 AND i.indisprimary), '{}')",
            &[&relid],
        )
        .await
        .map_err(Error::pg(format!(
            "look up the primary key of relation {relid}"
        )))?;
    Ok(row.get(0))
}

/// How values of type `oid` convert; user types are looked up once (domains convert as
/// their base type, arrays element by element, composites attribute by attribute,
/// everything else as text).
async fn kind_of(client: &Client, cache: &mut HashMap<u32, Kind>, oid: u32) -> Result<Kind, Error> {
    if let Some(kind) = value::builtin_kind(oid) {
        return Ok(kind);
    }
    if let Some(kind) = cache.get(&oid) {
        return Ok(kind.clone());
    }
    let kind = lookup_kind(client, oid, 0).await?;
    cache.insert(oid, kind.clone());
    Ok(kind)
}

fn lookup_kind<'a>(client: &'a Client, oid: u32, depth: u32) -> BoxFuture<'a, Result<Kind, Error>> {
    Box::pin(async move {
        if let Some(kind) = value::builtin_kind(oid) {
            return Ok(kind);
        }
        if depth > 8 {
            return Ok(Kind::Text);
        }
        let row = client
            .query_opt(
                "SELECT t.typtype::text, t.typbasetype, t.typelem, t.typcategory::text, \
                        coalesce((SELECT e.typdelim::text FROM pg_type e WHERE e.oid = t.typelem), ',') \
                 FROM pg_type t WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(Error::pg(format!("look up type {oid}")))?;
        let Some(row) = row else {
            return Ok(Kind::Text);
        };
        let typtype: String = row.get(0);
        let base: u32 = row.get(1);
        let element: u32 = row.get(2);
        let category: String = row.get(3);
        let delimiter: String = row.get(4);
        if typtype == "d" && base != 0 {
            return lookup_kind(client, base, depth + 1).await;
        }
        if typtype == "c" {
            let rows = client
                .query(
                    "SELECT a.attname::text, a.atttypid FROM pg_type t \
                     JOIN pg_attribute a ON a.attrelid = t.typrelid \
                     WHERE t.oid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    &[&oid],
                )
                .await
                .map_err(Error::pg(format!("look up the attributes of type {oid}")))?;
            let mut attributes = Vec::with_capacity(rows.len());
            for row in rows {
                let kind = lookup_kind(client, row.get(1), depth + 1).await?;
                attributes.push((row.get::<_, String>(0), kind));
            }
            return Ok(Kind::Composite(attributes));
        }
        if category == "A" && element != 0 {
            let element_kind = lookup_kind(client, element, depth + 1).await?;
            return Ok(Kind::Array(
                Box::new(element_kind),
                delimiter.bytes().next().unwrap_or(b','),
            ));
        }
        Ok(Kind::Text)
    })
}

fn disconnected(reason: String) -> Error {
    Error::DetectorDisconnected {
        detector: NAME.into(),
        reason,
    }
}

/// `pgpipe_<publication>` (the publication's name itself when it starts with `pgpipe_`):
/// lower case, `[a-z0-9_]`, at most 63 bytes.
pub fn default_slot(publication: &str) -> String {
    let base = if publication.to_ascii_lowercase().starts_with("pgpipe_") {
        publication.to_string()
    } else {
        format!("pgpipe_{publication}")
    };
    let mut name: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_and_slot_names() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
        assert_eq!(default_slot("pgpipe_orders"), "pgpipe_orders");
        assert_eq!(default_slot("orders"), "pgpipe_orders");
        assert_eq!(default_slot("Shop-Pub"), "pgpipe_shop_pub");
        assert_eq!(default_slot(&"p".repeat(100)).len(), 63);
    }

    #[test]
    fn the_wal_level_error_says_how_to_fix_it() {
        let msg = wal_level_error("replica");
        assert!(msg.contains("wal_level = replica"), "{msg}");
        assert!(
            msg.contains("ALTER SYSTEM SET wal_level = logical"),
            "{msg}"
        );
        assert!(msg.contains("restart"), "{msg}");
    }

    #[test]
    fn replication_config_from_urls() {
        let mut config = Config {
            database_url:
                "postgres://app:s%40cret@db.example:6432/shop?sslmode=require&application_name=x"
                    .into(),
            ..Config::default()
        };
        config.detector.publication = "pub".into();
        let d = WalDetector::new(&config).unwrap();
        assert_eq!(d.slot, "pgpipe_pub");
        let r = d.replication_config(0x10).unwrap();
        assert_eq!((r.host.as_str(), r.port), ("db.example", 6432));
        assert_eq!((r.user.as_str(), r.database.as_str()), ("app", "shop"));
        assert_eq!(r.password, "s@cret");
        assert_eq!(r.tls.mode, SslMode::Require);
        assert_eq!(r.start_lsn, Lsn::from_u64(0x10));
        assert_eq!(r.application_name.as_deref(), Some("x"));

        config.detector.publication = "a,b".into();
        assert!(WalDetector::new(&config).is_err());
        config.detector.publication = String::new();
        config.detector.all_tables = true;
        let d = WalDetector::new(&config).unwrap();
        assert_eq!(d.publication, DEFAULT_ALL_TABLES_PUBLICATION);
    }
}
