//! The forwarder's configuration: one [`Config`] struct, filled from
//! defaults < config file (`pgpipe.yaml`) < environment (`PGPIPE_*`) < command-line flags.
//!
//! The key tree is the original Go pgpipe's, unchanged, plus our additions; see
//! `shared/ORIGINAL.md`. Loading is generic rather than hand-written per key:
//!
//! 1. `Config::default()` is serialized to a JSON tree; its leaves are the known keys.
//! 2. The YAML file's tree is merged over it. A key the default tree does not have is
//!    rejected with its name; a `null` value (an empty YAML key) keeps the default.
//! 3. For every leaf key `a.b_c`, the environment variable `PGPIPE_A_B_C` replaces it
//!    (`.` and `-` become `_`). The default's JSON type tells how to read the text:
//!    booleans, integers, comma-separated lists, strings (durations are strings).
//! 4. The flags that were given replace their keys.
//! 5. The tree is deserialized into [`Config`]; an error names the key and where the
//!    offending value came from. [`load`] then runs [`Config::validate`].
//!
//! [`load`] is pure (the file text, the environment and the flags are arguments), so the
//! precedence rules are unit-tested without touching the process environment.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Detector names accepted in `detector.type` / `--detector` (empty picks one automatically).
pub const DETECTORS: &[&str] = &["queue", "listen_notify", "wal"];

/// Config file read when `--config` is not given (optional: absent means defaults).
pub const DEFAULT_CONFIG_FILE: &str = "pgpipe.yaml";

/// Prefix of every environment variable that sets a config key.
pub const ENV_PREFIX: &str = "PGPIPE_";

/// Longest channel name (Postgres identifiers, hence NOTIFY channels, are at most 63 bytes).
pub const MAX_CHANNEL_LEN: usize = 63;

/// Keys whose value is a free-form string map, merged as a whole and not settable from env.
/// (`webhook.headers`, and every adapter kind's list, as the registry names them).
fn is_map_key(key: &str) -> bool {
    key == "webhook.headers" || crate::adapter::registry::lists().any(|list| list == key)
}

/// Integer keys that also accept a size with a unit (`"100MiB"`).
const SIZE_KEYS: &[&str] = &["file.max_size"];

/// What replaces a secret in `Debug` output and [`Config::redacted`].
pub(crate) const REDACTED: &str = "***";

mod error;
mod load;
mod parse;
mod secret;
#[cfg(test)]
mod tests;
mod validate;

pub use error::{ConfigError, Origin};
#[cfg(test)]
pub use load::{env_var_name, env_vars};
pub use load::{load, override_with, process_env, resolve, ConfigFile, FlagOverride};
pub(crate) use parse::size_serde;
pub use parse::{parse_listen_addr, parse_size};
pub use secret::{redact_url, Secret};
pub use validate::{at_least, check_backoff, check_conninfo, check_header, nonzero, valid_channel};

// Each adapter's section lives in its folder; the tree names them here.
pub use crate::adapter::exec::ExecConfig;
pub use crate::adapter::file::FileConfig;
pub use crate::adapter::nats::NatsConfig;
pub use crate::adapter::pg_table::PgTableConfig;
pub use crate::adapter::webhook::WebhookConfig;

// ---------------------------------------------------------------------------------------
// The configuration tree
// ---------------------------------------------------------------------------------------

/// The whole configuration of a forwarder run.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Postgres connection URL of the database to read from (`--db`); a secret (password).
    pub database_url: String,
    /// Channels to forward (`--channel`, repeatable); required unless the detector is `wal`.
    pub channels: Vec<String>,
    /// Adapters to deliver to (`--adapter`, repeatable); default `["stdout"]`.
    pub adapters: Vec<String>,
    /// Time adapters get to drain on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Address of a standalone `/healthz` + `/metrics` server (`--metrics-addr`); empty: none.
    pub metrics_addr: String,
    /// Log level: debug, info, warn or error (`--log-level`).
    pub log_level: LogLevel,
    /// Log format on stderr: text or json (`--log-format`).
    pub log_format: LogFormat,
    /// Where events come from (`detector.*`).
    pub detector: DetectorConfig,
    /// Fan-out bus (`bus.*`).
    pub bus: BusConfig,
    /// Webhook adapter (`webhook.*`).
    pub webhook: WebhookConfig,
    /// Server-Sent Events adapter and the HTTP server it shares with ws, /healthz, /metrics.
    pub sse: SseConfig,
    /// JSON-lines file adapter (`file.*`).
    pub file: FileConfig,
    /// Subprocess adapter fed JSON lines on stdin (`exec.*`).
    pub exec: ExecConfig,
    /// Postgres table adapter (`pg_table.*`).
    pub pg_table: PgTableConfig,
    /// NATS JetStream adapter (`nats.*`).
    pub nats: NatsConfig,
    /// WebSocket adapter (`websocket.*`).
    pub websocket: WebsocketConfig,
    /// More webhook adapters (config file only): each entry is a `webhook` section plus a
    /// `name`, and runs as adapter `webhook:<name>` besides those in `adapters`.
    pub webhooks: Vec<WebhookConfig>,
    /// More file adapters (config file only): `file` sections plus a `name`, run as
    /// adapter `file:<name>`.
    pub files: Vec<FileConfig>,
    /// More exec adapters (config file only): `exec` sections plus a `name`, run as
    /// adapter `exec:<name>`.
    pub execs: Vec<ExecConfig>,
    /// More pg_table adapters (config file only): `pg_table` sections plus a `name`, run
    /// as adapter `pg_table:<name>`.
    pub pg_tables: Vec<PgTableConfig>,
    /// More nats adapters (config file only): `nats` sections plus a `name`, run as
    /// adapter `nats:<name>`.
    pub natss: Vec<NatsConfig>,
}

/// Where a new queue consumer starts (`detector.start`, `--start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Every event the queue still holds.
    Beginning,
    /// Events committed after the consumer is created.
    Now,
}

impl Start {
    /// The name `pgpipe.register_consumer` takes.
    pub fn as_sql(self) -> &'static str {
        match self {
            Start::Beginning => "beginning",
            Start::Now => "now",
        }
    }
}

/// Detector settings (`detector.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// `queue`, `listen_notify` or `wal`; empty picks `queue` when the extension is installed.
    #[serde(rename = "type")]
    pub kind: DetectorKind,
    /// Publication the `wal` detector replicates (`--publication`).
    pub publication: String,
    /// `wal`: add `transaction {xid, commit_time, seq}` to every event (`--tx-metadata`).
    pub tx_metadata: bool,
    /// `wal`: emit BEGIN/COMMIT marker events around each transaction (`--tx-markers`).
    pub tx_markers: bool,
    /// `wal`: name of the persistent replication slot (`--slot`); empty derives one.
    pub slot: String,
    /// `wal`: capture every table (a `FOR ALL TABLES` publication) instead of a named one.
    pub all_tables: bool,
    /// `wal`: longest time between standby status updates (confirmed LSN reports);
    /// `listen_notify`: how often the idle LISTEN connection is probed.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Consumer name in `pgpipe.consumers` (queue detector); empty derives it from the
    /// channels and the adapters (`orders+webhook`), so forwarders with different adapters
    /// never share a consumer by accident.
    pub consumer: String,
    /// Where a consumer that does not exist yet starts: `beginning` (every retained event)
    /// or `now` (events committed from now on). An existing consumer keeps its position.
    pub start: Start,
    /// Queue detector: consumer group to join (`--group`); its members share the events by
    /// key. Empty: no group, this forwarder reads everything as `consumer`.
    pub group: String,
    /// Queue detector: this forwarder's member name in the group; empty derives a unique
    /// one (`<group>.<host>.<pid>`).
    pub group_member: String,
    /// Queue detector: a group member not heard from for this long is replaced (its
    /// session ending replaces it at once).
    #[serde(with = "humantime_serde")]
    pub group_member_timeout: Duration,
    /// How often the queue is polled when no wake-up arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most events read per batch.
    pub batch_size: u32,
    /// Most events delivered but not yet acknowledged by every durable adapter.
    pub max_in_flight: usize,
    /// A full in-flight window with no acknowledgement for this long is logged as a
    /// stuck adapter (a forgotten acknowledgement is loud, not a silent hang).
    #[serde(with = "humantime_serde")]
    pub ack_stall_warning: Duration,
    /// Queue detector: least time between acks that only move past empty batches.
    #[serde(with = "humantime_serde")]
    pub idle_ack_interval: Duration,
    /// Queue detector: how often `pgpipe.rotate()` runs (queue retention); 0s turns it off.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
}

/// Bus settings (`bus.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// Capacity of each adapter's channel.
    pub buffer_size: usize,
}

/// Default events buffered per live client (`sse.client_buffer`, `websocket.client_buffer`):
/// ten seconds at 1,000 events/s, so a client whose task waits for a busy CPU catches up
/// instead of losing events (`bus.buffer_size`'s 1,024, the original's, lost some with
/// 1,000 clients on two cores: BENCHMARKS.md, issue 13).
pub const LIVE_CLIENT_BUFFER: usize = 10_000;

/// SSE adapter and HTTP server settings (`sse.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Listen address of the HTTP server (SSE, WS, /healthz, /metrics), e.g. `:8080`.
    pub addr: String,
    /// Origins allowed by CORS (`*` allows any).
    pub cors_origins: Vec<String>,
    /// Interval between heartbeat comments on idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Time allowed to read a request's headers.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Idle keep-alive connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Bearer token required by `/events*` and `/ws*` (`--auth-token`); empty: none; a secret.
    pub auth_token: Secret,
    /// Events kept in memory for `Last-Event-ID` replay (older ones come from the queue).
    pub replay_buffer: usize,
    /// Most events one `Last-Event-ID` replay from the queue sends.
    pub replay_max: usize,
    /// Events buffered for each connected client; a client further behind loses the
    /// overflow (counted). The events are shared, so a deep buffer costs memory only
    /// while a client lags.
    pub client_buffer: usize,
}

/// WebSocket adapter settings (`websocket.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebsocketConfig {
    /// Interval between pings to each client (`--ws-ping-interval`).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A client silent (no pong, no message) for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Events buffered for each connected client (as `sse.client_buffer`).
    pub client_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: String::new(),
            channels: Vec::new(),
            adapters: vec!["stdout".into()],
            shutdown_timeout: Duration::from_secs(5),
            metrics_addr: String::new(),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            detector: DetectorConfig::default(),
            bus: BusConfig::default(),
            webhook: WebhookConfig::default(),
            sse: SseConfig::default(),
            file: FileConfig::default(),
            exec: ExecConfig::default(),
            pg_table: PgTableConfig::default(),
            nats: NatsConfig::default(),
            websocket: WebsocketConfig::default(),
            webhooks: Vec::new(),
            files: Vec::new(),
            execs: Vec::new(),
            pg_tables: Vec::new(),
            natss: Vec::new(),
        }
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            kind: DetectorKind::Auto,
            publication: String::new(),
            tx_metadata: false,
            tx_markers: false,
            slot: String::new(),
            all_tables: false,
            status_interval: Duration::from_secs(10),
            consumer: String::new(),
            start: Start::Beginning,
            group: String::new(),
            group_member: String::new(),
            group_member_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            // A page of 5,000 amortises pgpipe.read()'s per-call cost: a pre-filled drain
            // ran ~10 % faster than with 1,000 (BENCHMARKS.md, issue 13); a page is read
            // only as large as what is waiting, so live delivery is unchanged.
            batch_size: 5000,
            max_in_flight: 10_000,
            ack_stall_warning: Duration::from_secs(60),
            idle_ack_interval: Duration::from_secs(10),
            retention_interval: Duration::from_secs(60),
            backoff_base: Duration::from_secs(5),
            backoff_cap: Duration::from_secs(60),
        }
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig { buffer_size: 1024 }
    }
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            addr: ":8080".into(),
            cors_origins: vec!["*".into()],
            heartbeat_interval: Duration::from_secs(15),
            read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            auth_token: Secret::default(),
            replay_buffer: 10_000,
            replay_max: 10_000,
            client_buffer: LIVE_CLIENT_BUFFER,
        }
    }
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(45),
            client_buffer: LIVE_CLIENT_BUFFER,
        }
    }
}

/// `log_level` / `--log-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-event detail.
    Debug,
    /// Startup, shutdown, connections and retries.
    Info,
    /// Problems pgpipe recovers from.
    Warn,
    /// Problems it does not.
    Error,
}

impl LogLevel {
    /// The name used in config files and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// `log_format` / `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `detector.type` / `--detector`: where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectorKind {
    /// Empty in the config: `queue` when the extension is installed, else `listen_notify`.
    #[default]
    Auto,
    /// The pgpipe queue through the extension's consumer API.
    Queue,
    /// Plain LISTEN/NOTIFY (the original's mode).
    ListenNotify,
    /// Logical replication (pgoutput) over the replication protocol.
    Wal,
}

impl DetectorKind {
    /// The name in config files and flags (empty for [`DetectorKind::Auto`]).
    pub fn as_str(self) -> &'static str {
        match self {
            DetectorKind::Auto => "",
            DetectorKind::Queue => "queue",
            DetectorKind::ListenNotify => "listen_notify",
            DetectorKind::Wal => "wal",
        }
    }
}

impl std::str::FromStr for DetectorKind {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        [
            DetectorKind::Auto,
            DetectorKind::Queue,
            DetectorKind::ListenNotify,
            DetectorKind::Wal,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| ConfigError::UnknownDetector { name: s.to_owned() })
    }
}

impl Serialize for DetectorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DetectorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
