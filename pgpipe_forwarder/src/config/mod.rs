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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Adapter names accepted in `adapters` / `--adapter`.
pub const ADAPTERS: &[&str] = &["stdout", "webhook", "sse", "ws", "file", "exec", "pg_table"];

/// Detector names accepted in `detector.type` / `--detector` (empty picks one automatically).
pub const DETECTORS: &[&str] = &["queue", "listen_notify", "wal"];

/// File adapter fsync policies accepted in `file.fsync`.
pub const FSYNC_POLICIES: &[&str] = &["always", "interval", "never"];

/// Log levels accepted in `log_level` / `--log-level`.
pub const LOG_LEVELS: &[&str] = &["debug", "info", "warn", "error"];

/// Log formats accepted in `log_format` / `--log-format`.
pub const LOG_FORMATS: &[&str] = &["text", "json"];

/// Config file read when `--config` is not given (optional: absent means defaults).
pub const DEFAULT_CONFIG_FILE: &str = "pgpipe.yaml";

/// Prefix of every environment variable that sets a config key.
pub const ENV_PREFIX: &str = "PGPIPE_";

/// Longest channel name (Postgres identifiers, hence NOTIFY channels, are at most 63 bytes).
pub const MAX_CHANNEL_LEN: usize = 63;

/// Keys whose value is a free-form string map, merged as a whole and not settable from env.
const MAP_KEYS: &[&str] = &["webhook.headers", "webhooks", "files", "execs", "pg_tables"];

/// Integer keys that also accept a size with a unit (`"100MiB"`).
const SIZE_KEYS: &[&str] = &["file.max_size"];

/// What replaces a secret in `Debug` output and [`Config::redacted`].
const REDACTED: &str = "***";

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
pub use load::{load, process_env, resolve, ConfigFile, FlagOverride};
use parse::size_serde;
pub use parse::{parse_listen_addr, parse_size};
pub use secret::redact_url;
pub use validate::valid_channel;

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
    pub log_level: String,
    /// Log format on stderr: text or json (`--log-format`).
    pub log_format: String,
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
}

/// Detector settings (`detector.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// `queue`, `listen_notify` or `wal`; empty picks `queue` when the extension is installed.
    #[serde(rename = "type")]
    pub kind: String,
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
    /// Consumer name in `pgpipe.consumers` (queue detector); empty derives it from the channels.
    pub consumer: String,
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

/// Webhook adapter settings (`webhook.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Endpoint events are POSTed to (`--url`); required with the webhook adapter.
    pub url: String,
    /// Total delivery attempts per event, the first one included (`--retries`).
    pub max_retries: u32,
    /// HMAC-SHA256 signing key (`--signing-key`); empty: unsigned; a secret.
    pub signing_key: String,
    /// Extra HTTP headers sent with every request (values are treated as secrets in logs).
    pub headers: BTreeMap<String, String>,
    /// Timeout of one delivery attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay (full jitter; a `Retry-After` answer takes precedence).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Events per POST: 1 sends each event as a JSON object, more send a JSON array.
    pub batch_size: usize,
    /// Name of a `webhooks` entry (the adapter is `webhook:<name>`); unused in `webhook`.
    pub name: String,
}

/// SSE adapter and HTTP server settings (`sse.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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
    pub auth_token: String,
    /// Events kept in memory for `Last-Event-ID` replay (older ones come from the queue).
    pub replay_buffer: usize,
    /// Most events one `Last-Event-ID` replay from the queue sends.
    pub replay_max: usize,
}

/// File adapter settings (`file.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Path of the JSON-lines file (`--file-path`); required with the file adapter.
    pub path: PathBuf,
    /// Size in bytes at which the file is rotated (`--file-max-size`; "100MiB" also accepted).
    #[serde(deserialize_with = "size_serde::deserialize")]
    pub max_size: u64,
    /// Rotated files kept: `path.1` … `path.N` (`--file-max-files`).
    pub max_files: u32,
    /// When to fsync: `always` (before each acknowledgement), `interval` or `never`.
    pub fsync: String,
    /// With `fsync: interval`, the longest time between fsyncs (acks wait for them).
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// First retry delay after a failed write (unwritable path, full disk).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay after a failed write.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Name of a `files` entry (the adapter is `file:<name>`); unused in `file`.
    pub name: String,
}

/// Exec adapter settings (`exec.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Command run with `sh -c` and fed JSON lines on stdin (`--exec-command`).
    pub command: String,
    /// First restart delay after the command exits or fails.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest restart delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// A line counts as handled once the command read it and kept running this long; lines
    /// read more recently are written again to the next command if it dies.
    #[serde(with = "humantime_serde")]
    pub read_grace: Duration,
    /// Commands that may die while a line is in hand before that line is dead-lettered.
    pub max_attempts: u32,
    /// Name of an `execs` entry (the adapter is `exec:<name>`); unused in `exec`.
    pub name: String,
}

/// pg_table adapter settings (`pg_table.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgTableConfig {
    /// Connection URL of the target database (`--pg-table-url`); empty: `database_url`.
    pub url: String,
    /// Target table, optionally schema-qualified (`--pg-table-name`).
    pub table: String,
    /// Most rows per INSERT statement.
    pub batch_size: usize,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Name of a `pg_tables` entry (the adapter is `pg_table:<name>`); unused in `pg_table`.
    pub name: String,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: String::new(),
            channels: Vec::new(),
            adapters: vec!["stdout".into()],
            shutdown_timeout: Duration::from_secs(5),
            metrics_addr: String::new(),
            log_level: "info".into(),
            log_format: "text".into(),
            detector: DetectorConfig::default(),
            bus: BusConfig::default(),
            webhook: WebhookConfig::default(),
            sse: SseConfig::default(),
            file: FileConfig::default(),
            exec: ExecConfig::default(),
            pg_table: PgTableConfig::default(),
            websocket: WebsocketConfig::default(),
            webhooks: Vec::new(),
            files: Vec::new(),
            execs: Vec::new(),
            pg_tables: Vec::new(),
        }
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            kind: String::new(),
            publication: String::new(),
            tx_metadata: false,
            tx_markers: false,
            slot: String::new(),
            all_tables: false,
            status_interval: Duration::from_secs(10),
            consumer: String::new(),
            poll_interval: Duration::from_millis(50),
            batch_size: 1000,
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

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            max_retries: 5,
            signing_key: String::new(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(32),
            batch_size: 1,
            name: String::new(),
        }
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
            auth_token: String::new(),
            replay_buffer: 10_000,
            replay_max: 10_000,
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            path: PathBuf::new(),
            max_size: 100 * 1024 * 1024,
            max_files: 5,
            fsync: "always".into(),
            fsync_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            name: String::new(),
        }
    }
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            command: String::new(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            read_grace: Duration::from_millis(500),
            max_attempts: 5,
            name: String::new(),
        }
    }
}

impl Default for PgTableConfig {
    fn default() -> Self {
        PgTableConfig {
            url: String::new(),
            table: "pgpipe_events".into(),
            batch_size: 500,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            name: String::new(),
        }
    }
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(45),
        }
    }
}
