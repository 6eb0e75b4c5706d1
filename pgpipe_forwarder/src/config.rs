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
use serde_json::{Map, Value};

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

// ---------------------------------------------------------------------------------------
// Secrets: redacting Debug and `redacted()`
// ---------------------------------------------------------------------------------------

impl Config {
    /// A copy with every secret masked (URL passwords, signing key, header values), for logs.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database_url = redact_url(&c.database_url);
        c.webhook = c.webhook.redacted();
        c.webhooks = c.webhooks.iter().map(WebhookConfig::redacted).collect();
        for p in &mut c.pg_tables {
            p.url = redact_url(&p.url);
        }
        c.pg_table.url = redact_url(&c.pg_table.url);
        if !c.sse.auth_token.is_empty() {
            c.sse.auth_token = REDACTED.into();
        }
        c
    }

    /// Whether `name` is among the configured adapters.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a == name)
    }
}

impl WebhookConfig {
    /// A copy with the signing key, header values and any URL password masked.
    pub fn redacted(&self) -> WebhookConfig {
        let mut w = self.clone();
        w.url = redact_url(&w.url);
        if !w.signing_key.is_empty() {
            w.signing_key = REDACTED.into();
        }
        for value in w.headers.values_mut() {
            *value = REDACTED.into();
        }
        w
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("channels", &self.channels)
            .field("adapters", &self.adapters)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_level", &self.log_level)
            .field("log_format", &self.log_format)
            .field("detector", &self.detector)
            .field("bus", &self.bus)
            .field("webhook", &self.webhook)
            .field("sse", &self.sse)
            .field("file", &self.file)
            .field("exec", &self.exec)
            .field("pg_table", &self.pg_table)
            .field("websocket", &self.websocket)
            .field("webhooks", &self.webhooks)
            .field("files", &self.files)
            .field("execs", &self.execs)
            .field("pg_tables", &self.pg_tables)
            .finish()
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.redacted();
        f.debug_struct("WebhookConfig")
            .field("url", &w.url)
            .field("max_retries", &w.max_retries)
            .field("signing_key", &w.signing_key)
            .field("headers", &w.headers)
            .field("timeout", &w.timeout)
            .field("backoff_base", &w.backoff_base)
            .field("backoff_cap", &w.backoff_cap)
            .field("batch_size", &w.batch_size)
            .field("name", &w.name)
            .finish()
    }
}

impl fmt::Debug for SseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.auth_token.is_empty() {
            ""
        } else {
            REDACTED
        };
        f.debug_struct("SseConfig")
            .field("addr", &self.addr)
            .field("cors_origins", &self.cors_origins)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("read_timeout", &self.read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("auth_token", &token)
            .field("replay_buffer", &self.replay_buffer)
            .field("replay_max", &self.replay_max)
            .finish()
    }
}

impl fmt::Debug for PgTableConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTableConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("batch_size", &self.batch_size)
            .field("name", &self.name)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .finish()
    }
}

/// Masks the password of a Postgres URL (`postgres://u:***@h/db`, `?password=***`) or of a
/// key/value connection string (`password=***`); other text is returned unchanged.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (scheme, rest) = url.split_at(scheme_end + 3);
        // The userinfo ends at the last '@' (an unencoded '@' in a password is common enough).
        let rest = match rest.rfind('@') {
            Some(at) => {
                let (userinfo, host) = rest.split_at(at);
                match userinfo.find(':') {
                    Some(colon) => format!("{}:{REDACTED}{host}", &userinfo[..colon]),
                    None => rest.to_owned(),
                }
            }
            None => rest.to_owned(),
        };
        let out = format!("{scheme}{rest}");
        match out.find('?') {
            Some(q) => {
                let (head, query) = out.split_at(q + 1);
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                            format!("{k}={REDACTED}")
                        }
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{head}{}", query.join("&"))
            }
            None => out,
        }
    } else {
        redact_conninfo(url)
    }
}

/// Masks `password=...` in a libpq key/value connection string (values may be quoted).
fn redact_conninfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = find_password_key(rest) {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let eq = after.find('=').map_or(after.len(), |i| i + 1);
        out.push_str(&after[..eq]);
        out.push_str(REDACTED);
        let value = after[eq..].trim_start();
        rest = skip_conninfo_value(value);
    }
    out.push_str(rest);
    out
}

/// Byte offset of a `password` key (at a word start, followed by optional spaces and `=`).
fn find_password_key(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find("password") {
        let start = from + i;
        let at_word_start = start == 0 || lower.as_bytes()[start - 1].is_ascii_whitespace();
        let after = lower[start + "password".len()..].trim_start();
        if at_word_start && after.starts_with('=') {
            return Some(start);
        }
        from = start + 1;
    }
    None
}

/// The text after a conninfo value: a quoted value ends at its closing quote, else at space.
fn skip_conninfo_value(value: &str) -> &str {
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return &quoted[i + 1..],
                _ => escaped = false,
            }
        }
        ""
    } else {
        let end = value.find(char::is_whitespace).unwrap_or(value.len());
        &value[end..]
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Where a config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file, by the name it was given.
    File(String),
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, e.g. `--batch-size`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default value"),
            Origin::File(name) => write!(f, "config file {name}"),
            Origin::Env(var) => f.write_str(var),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Why a configuration could not be loaded or is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    ReadFile {
        /// Path as given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML, or not a mapping at the top.
    #[error("config file {file}: {message}")]
    Yaml {
        /// File name as given.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A key that the configuration does not have.
    #[error("{origin}: unknown key {key:?} {} (known keys: {known})", place(.section))]
    UnknownKey {
        /// Where the key was found.
        origin: Origin,
        /// The unknown key's own name.
        key: String,
        /// Dotted path of the section holding it; empty at top level.
        section: String,
        /// Comma-separated keys valid there.
        known: String,
    },
    /// An environment variable whose text cannot be read as the key's type.
    #[error("{var}: invalid value {value:?}: expected {expected}")]
    InvalidEnv {
        /// The variable's name.
        var: String,
        /// Its text.
        value: String,
        /// What the key takes.
        expected: &'static str,
    },
    /// A value of the wrong type or format.
    #[error("{origin}: {key}: {message}")]
    InvalidValue {
        /// Where the value came from.
        origin: Origin,
        /// Dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// No `database_url`.
    #[error("no database URL: pass --db or set database_url / PGPIPE_DATABASE_URL")]
    NoDatabaseUrl,
    /// A connection URL that cannot be parsed.
    #[error("{key}: invalid connection string {url:?}: {message}")]
    InvalidDatabaseUrl {
        /// Dotted key.
        key: &'static str,
        /// The URL with its password masked.
        url: String,
        /// The parser's complaint.
        message: String,
    },
    /// No channels, and the detector needs them.
    #[error(
        "no channels: pass --channel (repeatable) or set channels / PGPIPE_CHANNELS \
         (only the wal detector works without channels)"
    )]
    NoChannels,
    /// A malformed channel name.
    #[error(
        "invalid channel name {name:?}: use 1 to {MAX_CHANNEL_LEN} characters of letters, \
         digits, '_', '.', ':' and '-'"
    )]
    InvalidChannel {
        /// The name.
        name: String,
    },
    /// An empty adapter list.
    #[error("no adapters: pass --adapter or set adapters (valid: {})", ADAPTERS.join(", "))]
    NoAdapters,
    /// An adapter name that does not exist.
    #[error("unknown adapter {name:?}: valid adapters are {}", ADAPTERS.join(", "))]
    UnknownAdapter {
        /// The name.
        name: String,
    },
    /// The same adapter listed twice (it would deliver every event twice).
    #[error("adapter {name:?} is listed more than once")]
    DuplicateAdapter {
        /// The name.
        name: String,
    },
    /// The webhook adapter without a URL.
    #[error("the webhook adapter needs a URL: pass --url or set webhook.url / PGPIPE_WEBHOOK_URL")]
    WebhookWithoutUrl,
    /// A webhook URL that is not http(s).
    #[error("webhook.url {url:?} is not an http:// or https:// URL")]
    InvalidWebhookUrl {
        /// The URL with any password masked.
        url: String,
    },
    /// A webhook header that cannot be sent.
    #[error("webhook.headers: invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// Header name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file adapter without a path.
    #[error("the file adapter needs a path: pass --file-path or set file.path / PGPIPE_FILE_PATH")]
    FileWithoutPath,
    /// The exec adapter without a command.
    #[error(
        "the exec adapter needs a command: pass --exec-command or set exec.command / \
         PGPIPE_EXEC_COMMAND"
    )]
    ExecWithoutCommand,
    /// The wal detector with neither a publication nor `all_tables`.
    #[error(
        "the wal detector needs a publication: pass --publication or set detector.publication \
         / PGPIPE_DETECTOR_PUBLICATION (or --all-tables)"
    )]
    WalWithoutPublication,
    /// A wal-only setting with another detector.
    #[error("{setting} only works with the wal detector (--detector wal)")]
    WalOnly {
        /// The setting, as key and flag.
        setting: &'static str,
    },
    /// A detector name that does not exist.
    #[error("unknown detector {name:?}: valid detectors are {} (or empty to pick automatically)", DETECTORS.join(", "))]
    UnknownDetector {
        /// The name.
        name: String,
    },
    /// A replication slot name Postgres would refuse.
    #[error(
        "detector.slot: invalid replication slot name {name:?}: use 1 to 63 lower-case letters, \
         digits and '_'"
    )]
    InvalidSlot {
        /// The name.
        name: String,
    },
    /// A value outside its allowed set.
    #[error("{key}: invalid value {value:?}: expected one of {}", .allowed.join(", "))]
    NotOneOf {
        /// Dotted key.
        key: &'static str,
        /// The value.
        value: String,
        /// The allowed values.
        allowed: &'static [&'static str],
    },
    /// A count or size below its minimum.
    #[error("{key} must be at least {min}, got {value}")]
    TooSmall {
        /// Dotted key.
        key: &'static str,
        /// Smallest allowed value.
        min: u64,
        /// The value.
        value: u64,
    },
    /// A zero duration where it would mean a busy loop or no time at all.
    #[error("{key} must be longer than 0")]
    ZeroDuration {
        /// Dotted key.
        key: &'static str,
    },
    /// A backoff whose base exceeds its cap.
    #[error("{section}.backoff_base ({base:?}) must not exceed {section}.backoff_cap ({cap:?})")]
    BackoffOrder {
        /// Section holding the pair.
        section: &'static str,
        /// The base.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
    /// A listen address that cannot be parsed.
    #[error("{key}: invalid listen address {value:?}: {reason}")]
    InvalidAddr {
        /// Dotted key.
        key: &'static str,
        /// The address.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// An entry of `webhooks`, `files`, `execs` or `pg_tables` that cannot be used.
    #[error("{list}[{index}]: {message}")]
    ListedAdapter {
        /// The list's key.
        list: &'static str,
        /// Position in the list (0-based).
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A bug: the defaults could not be turned into a tree, or a flag names no key.
    #[error("internal configuration error: {0}")]
    Internal(String),
}

fn place(section: &str) -> String {
    if section.is_empty() {
        "at top level".to_owned()
    } else {
        format!("in section {section:?}")
    }
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

/// A config file's name (for messages) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// The path as given, used in error messages.
    pub name: String,
    /// The YAML text.
    pub text: String,
}

impl ConfigFile {
    /// Reads the file at `path`; a missing file is an error.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(ConfigFile { name, text }),
            Err(source) => Err(ConfigError::ReadFile { path: name, source }),
        }
    }

    /// The explicit `--config` file (must exist), else `./pgpipe.yaml` when it exists, else none.
    pub fn discover(explicit: Option<&Path>) -> Result<Option<ConfigFile>, ConfigError> {
        match explicit {
            Some(path) => ConfigFile::read(path).map(Some),
            None => {
                let path = Path::new(DEFAULT_CONFIG_FILE);
                match std::fs::read_to_string(path) {
                    Ok(text) => Ok(Some(ConfigFile {
                        name: DEFAULT_CONFIG_FILE.to_owned(),
                        text,
                    })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ConfigError::ReadFile {
                        path: DEFAULT_CONFIG_FILE.to_owned(),
                        source,
                    }),
                }
            }
        }
    }
}

/// One command-line flag that was given: the key it sets and its typed value.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagOverride {
    /// Dotted config key, e.g. `detector.batch_size`.
    pub key: &'static str,
    /// The flag as typed, e.g. `--batch-size`, for messages.
    pub flag: &'static str,
    /// The value, shaped as the key's JSON form (durations as humantime strings).
    pub value: Value,
}

/// The environment of the running process, for [`load`]'s `env` argument.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The environment variable that sets a dotted key: `detector.poll_interval` →
/// `PGPIPE_DETECTOR_POLL_INTERVAL`.
pub fn env_var_name(key: &str) -> String {
    let mut name = String::from(ENV_PREFIX);
    name.extend(key.chars().map(|c| match c {
        '.' | '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// Every leaf key of the configuration with its environment variable, in tree order.
#[cfg(test)]
pub fn env_vars() -> Vec<(String, String)> {
    let Ok(tree) = serde_json::to_value(Config::default()) else {
        return Vec::new();
    };
    let mut leaves = Vec::new();
    collect_leaves(&tree, "", &mut leaves);
    leaves
        .into_iter()
        .filter(|(key, _)| !MAP_KEYS.contains(&key.as_str()))
        .map(|(key, _)| {
            let var = env_var_name(&key);
            (key, var)
        })
        .collect()
}

/// Builds the configuration from `defaults` < `file` < `env` < `flags`, then validates it.
///
/// `env` looks a variable up by name (pass [`process_env`] for the real environment); an
/// empty value counts as unset, as it did in the original.
pub fn load(
    defaults: &Config,
    file: Option<&ConfigFile>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> Result<Config, ConfigError> {
    let config = resolve(defaults, file, env, flags)?;
    config.validate()?;
    Ok(config)
}

/// Like [`load`] without validation: merges the sources and deserializes the result.
pub fn resolve(
    defaults: &Config,
    file: Option<&ConfigFile>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> Result<Config, ConfigError> {
    let mut tree = serde_json::to_value(defaults)
        .map_err(|e| ConfigError::Internal(format!("serialize defaults: {e}")))?;
    let mut leaves = Vec::new();
    collect_leaves(&tree, "", &mut leaves);
    let mut origins: HashMap<String, Origin> = HashMap::new();

    if let Some(file) = file {
        let origin = Origin::File(file.name.clone());
        let parsed = parse_yaml(file)?;
        if let Value::Object(map) = parsed {
            merge_file(&mut tree, map, "", &origin, &mut origins)?;
        }
    }

    for (key, default) in &leaves {
        if MAP_KEYS.contains(&key.as_str()) {
            continue;
        }
        let var = env_var_name(key);
        let Some(raw) = env(&var) else { continue };
        if raw.is_empty() {
            continue;
        }
        let value = env_value(key, default, &var, &raw)?;
        set_path(&mut tree, key, value);
        origins.insert(key.clone(), Origin::Env(var));
    }

    for flag in flags {
        if !leaves.iter().any(|(key, _)| key == flag.key) {
            return Err(ConfigError::Internal(format!(
                "flag {} sets unknown key {:?}",
                flag.flag, flag.key
            )));
        }
        set_path(&mut tree, flag.key, flag.value.clone());
        origins.insert(flag.key.to_owned(), Origin::Flag(flag.flag.to_owned()));
    }

    serde_path_to_error::deserialize::<_, Config>(tree).map_err(|e| {
        let (key, lookup) = error_key(e.path());
        let origin = origin_of(&origins, &lookup);
        ConfigError::InvalidValue {
            origin,
            key,
            message: e.into_inner().to_string(),
        }
    })
}

/// Parses the file as YAML into a JSON tree; an empty document is an empty mapping.
fn parse_yaml(file: &ConfigFile) -> Result<Value, ConfigError> {
    if file.text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    // A pure-Rust YAML parser; its errors name the line and column.
    let value: Value = serde_saphyr::from_str(&file.text).map_err(|e| {
        // Its first line ("error: line L column C: what") says it all; the rest is a
        // source snippet.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        ConfigError::Yaml {
            file: file.name.clone(),
            message: format!("invalid YAML: {}", first.trim_start_matches("error: ")),
        }
    })?;
    match value {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(value),
        other => Err(ConfigError::Yaml {
            file: file.name.clone(),
            message: format!(
                "expected a mapping of keys at top level, found {}",
                json_kind(&other)
            ),
        }),
    }
}

/// Merges a file's mapping into `tree`, rejecting keys the defaults do not have.
fn merge_file(
    tree: &mut Value,
    file: Map<String, Value>,
    section: &str,
    origin: &Origin,
    origins: &mut HashMap<String, Origin>,
) -> Result<(), ConfigError> {
    let Value::Object(target) = tree else {
        return Err(ConfigError::Internal(format!(
            "{section:?} is not a section"
        )));
    };
    for (key, value) in file {
        // Keys are matched case-insensitively, as the original (viper) did.
        let key = if target.contains_key(&key) {
            key
        } else {
            key.to_ascii_lowercase()
        };
        let path = join_key(section, &key);
        let Some(slot) = target.get_mut(&key) else {
            return Err(ConfigError::UnknownKey {
                origin: origin.clone(),
                key,
                section: section.to_owned(),
                known: target.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        if value.is_null() {
            // `webhook:` with everything below commented out: keep the defaults.
            continue;
        }
        let is_section = slot.is_object() && !MAP_KEYS.contains(&path.as_str());
        if is_section {
            match value {
                Value::Object(map) => merge_file(slot, map, &path, origin, origins)?,
                other => {
                    return Err(ConfigError::InvalidValue {
                        origin: origin.clone(),
                        key: path,
                        message: format!("expected a section of keys, found {}", json_kind(&other)),
                    })
                }
            }
        } else {
            *slot = value;
            origins.insert(path, origin.clone());
        }
    }
    Ok(())
}

/// Reads an environment variable's text as the JSON form of the key's default.
fn env_value(key: &str, default: &Value, var: &str, raw: &str) -> Result<Value, ConfigError> {
    let invalid = |expected: &'static str| ConfigError::InvalidEnv {
        var: var.to_owned(),
        value: raw.to_owned(),
        expected,
    };
    let text = raw.trim();
    match default {
        Value::Bool(_) => parse_bool(text)
            .map(Value::Bool)
            .ok_or_else(|| invalid("a boolean (true or false)")),
        Value::Number(n) if SIZE_KEYS.contains(&key) && n.is_u64() => parse_size(text)
            .map(Value::from)
            .map_err(|_| invalid("a size in bytes, optionally with a unit (100MiB)")),
        Value::Number(n) if n.is_u64() => text
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| invalid("a non-negative integer")),
        Value::Number(n) if n.is_i64() => text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| invalid("an integer")),
        Value::Number(_) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| invalid("a number")),
        // Commas, or spaces as the original (viper) split them.
        Value::Array(_) => Ok(Value::Array(
            text.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        // Strings (durations included) are taken verbatim; the deserializer checks formats.
        _ => Ok(Value::String(raw.to_owned())),
    }
}

/// `true/false`, `1/0`, `yes/no`, `on/off`, any case.
fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Every leaf of the default tree (free-form maps count as leaves) with its default value.
fn collect_leaves(tree: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match tree {
        Value::Object(map) if prefix.is_empty() || !MAP_KEYS.contains(&prefix) => {
            for (key, value) in map {
                collect_leaves(value, &join_key(prefix, key), out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// Sets the value at a dotted path that exists in `tree`.
fn set_path(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    for part in key.split('.') {
        let Value::Object(map) = node else { return };
        node = map.entry(part.to_owned()).or_insert(Value::Null);
    }
    *node = value;
}

fn join_key(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// The key to show for a deserialization error, and the dotted prefix to look its origin up.
fn error_key(path: &serde_path_to_error::Path) -> (String, String) {
    use serde_path_to_error::Segment;
    let mut shown = String::new();
    let mut lookup = String::new();
    let mut in_map = true;
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(key);
                if in_map {
                    lookup = join_key(&lookup, key);
                }
            }
            Segment::Seq { index } => {
                shown.push_str(&format!("[{index}]"));
                in_map = false;
            }
            Segment::Enum { variant } => shown.push_str(&format!("::{variant}")),
            Segment::Unknown => {}
        }
    }
    if shown.is_empty() {
        shown.push_str("(top level)");
    }
    (shown, lookup)
}

/// Origin of the longest recorded prefix of `key`.
fn origin_of(origins: &HashMap<String, Origin>, key: &str) -> Origin {
    let mut candidate = key;
    loop {
        if let Some(origin) = origins.get(candidate) {
            return origin.clone();
        }
        match candidate.rfind('.') {
            Some(dot) => candidate = &candidate[..dot],
            None => return Origin::Default,
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

impl Config {
    /// Checks the settings fit together, failing fast with the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        one_of("log_level", &self.log_level, LOG_LEVELS)?;
        one_of("log_format", &self.log_format, LOG_FORMATS)?;

        if self.database_url.trim().is_empty() {
            return Err(ConfigError::NoDatabaseUrl);
        }
        check_conninfo("database_url", &self.database_url)?;

        let d = &self.detector;
        let kind = d.kind.as_str();
        if !kind.is_empty() && !DETECTORS.contains(&kind) {
            return Err(ConfigError::UnknownDetector {
                name: d.kind.clone(),
            });
        }
        let wal = kind == "wal";
        if wal {
            if d.publication.is_empty() && !d.all_tables {
                return Err(ConfigError::WalWithoutPublication);
            }
        } else {
            let wal_only: [(bool, &'static str); 5] = [
                (d.tx_metadata, "detector.tx_metadata (--tx-metadata)"),
                (d.tx_markers, "detector.tx_markers (--tx-markers)"),
                (
                    !d.publication.is_empty(),
                    "detector.publication (--publication)",
                ),
                (d.all_tables, "detector.all_tables (--all-tables)"),
                (!d.slot.is_empty(), "detector.slot (--slot)"),
            ];
            if let Some((_, setting)) = wal_only.iter().find(|(set, _)| *set) {
                return Err(ConfigError::WalOnly { setting });
            }
        }
        if !d.slot.is_empty() && !valid_slot_name(&d.slot) {
            return Err(ConfigError::InvalidSlot {
                name: d.slot.clone(),
            });
        }

        if self.channels.is_empty() && !wal {
            return Err(ConfigError::NoChannels);
        }
        if let Some(bad) = self.channels.iter().find(|c| !valid_channel(c)) {
            return Err(ConfigError::InvalidChannel { name: bad.clone() });
        }

        if self.adapters.is_empty() {
            return Err(ConfigError::NoAdapters);
        }
        for (i, name) in self.adapters.iter().enumerate() {
            if !ADAPTERS.contains(&name.as_str()) {
                return Err(ConfigError::UnknownAdapter { name: name.clone() });
            }
            if self.adapters[..i].contains(name) {
                return Err(ConfigError::DuplicateAdapter { name: name.clone() });
            }
        }
        if self.has_adapter("webhook") {
            let url = self.webhook.url.trim();
            if url.is_empty() {
                return Err(ConfigError::WebhookWithoutUrl);
            }
            let lower = url.to_ascii_lowercase();
            let host = lower
                .strip_prefix("http://")
                .or_else(|| lower.strip_prefix("https://"));
            if host.is_none_or(str::is_empty) {
                return Err(ConfigError::InvalidWebhookUrl {
                    url: redact_url(url),
                });
            }
        }
        for (name, value) in &self.webhook.headers {
            check_header(name, value)?;
        }
        for (index, hook) in self.webhooks.iter().enumerate() {
            check_listed_webhook(index, hook, &self.webhooks[..index])?;
        }
        self.check_listed_others()?;
        if self.has_adapter("file") && self.file.path.as_os_str().is_empty() {
            return Err(ConfigError::FileWithoutPath);
        }
        if self.has_adapter("exec") && self.exec.command.trim().is_empty() {
            return Err(ConfigError::ExecWithoutCommand);
        }
        if self.has_adapter("pg_table") {
            if !self.pg_table.url.is_empty() {
                check_conninfo("pg_table.url", &self.pg_table.url)?;
            }
            if self.pg_table.table.trim().is_empty() {
                return Err(ConfigError::InvalidValue {
                    origin: Origin::Default,
                    key: "pg_table.table".into(),
                    message: "the pg_table adapter needs a table name (--pg-table-name)".into(),
                });
            }
        }

        at_least("detector.batch_size", u64::from(d.batch_size), 1)?;
        at_least("detector.max_in_flight", d.max_in_flight as u64, 1)?;
        at_least("bus.buffer_size", self.bus.buffer_size as u64, 1)?;
        at_least(
            "webhook.max_retries",
            u64::from(self.webhook.max_retries),
            1,
        )?;
        at_least("file.max_size", self.file.max_size, 1)?;
        at_least("file.max_files", u64::from(self.file.max_files), 1)?;
        at_least("webhook.batch_size", self.webhook.batch_size as u64, 1)?;
        at_least("pg_table.batch_size", self.pg_table.batch_size as u64, 1)?;
        one_of("file.fsync", &self.file.fsync, FSYNC_POLICIES)?;
        nonzero("file.fsync_interval", self.file.fsync_interval)?;

        nonzero("detector.poll_interval", d.poll_interval)?;
        nonzero("detector.ack_stall_warning", d.ack_stall_warning)?;
        nonzero("detector.status_interval", d.status_interval)?;
        nonzero("webhook.timeout", self.webhook.timeout)?;
        nonzero("sse.heartbeat_interval", self.sse.heartbeat_interval)?;
        nonzero("sse.read_timeout", self.sse.read_timeout)?;
        nonzero("websocket.ping_interval", self.websocket.ping_interval)?;
        nonzero("websocket.pong_timeout", self.websocket.pong_timeout)?;
        nonzero("sse.idle_timeout", self.sse.idle_timeout)?;
        let backoffs = [
            ("detector", d.backoff_base, d.backoff_cap),
            (
                "webhook",
                self.webhook.backoff_base,
                self.webhook.backoff_cap,
            ),
            ("exec", self.exec.backoff_base, self.exec.backoff_cap),
            ("file", self.file.backoff_base, self.file.backoff_cap),
            (
                "pg_table",
                self.pg_table.backoff_base,
                self.pg_table.backoff_cap,
            ),
        ];
        for (section, base, cap) in backoffs {
            if base > cap {
                return Err(ConfigError::BackoffOrder { section, base, cap });
            }
        }

        if !self.sse.addr.is_empty() {
            parse_listen_addr(&self.sse.addr).map_err(|reason| ConfigError::InvalidAddr {
                key: "sse.addr",
                value: self.sse.addr.clone(),
                reason,
            })?;
        }
        if !self.metrics_addr.is_empty() {
            parse_listen_addr(&self.metrics_addr).map_err(|reason| ConfigError::InvalidAddr {
                key: "metrics_addr",
                value: self.metrics_addr.clone(),
                reason,
            })?;
        }
        Ok(())
    }
}

impl Config {
    /// Checks the `files`, `execs` and `pg_tables` entries.
    fn check_listed_others(&self) -> Result<(), ConfigError> {
        let bad = |list: &'static str, index: usize, message: &str| ConfigError::ListedAdapter {
            list,
            index,
            message: message.to_owned(),
        };
        for (i, f) in self.files.iter().enumerate() {
            check_entry_name(
                "files",
                i,
                &f.name,
                self.files[..i].iter().map(|x| x.name.as_str()),
            )?;
            if f.path.as_os_str().is_empty() {
                return Err(bad("files", i, "needs a path"));
            }
            if f.max_size == 0 || f.max_files == 0 {
                return Err(bad("files", i, "max_size and max_files must be at least 1"));
            }
            one_of("files[].fsync", &f.fsync, FSYNC_POLICIES)?;
            if f.backoff_base > f.backoff_cap {
                return Err(bad("files", i, "backoff_base must not exceed backoff_cap"));
            }
        }
        for (i, e) in self.execs.iter().enumerate() {
            check_entry_name(
                "execs",
                i,
                &e.name,
                self.execs[..i].iter().map(|x| x.name.as_str()),
            )?;
            if e.command.trim().is_empty() {
                return Err(bad("execs", i, "needs a command"));
            }
            if e.backoff_base > e.backoff_cap {
                return Err(bad("execs", i, "backoff_base must not exceed backoff_cap"));
            }
        }
        for (i, p) in self.pg_tables.iter().enumerate() {
            check_entry_name(
                "pg_tables",
                i,
                &p.name,
                self.pg_tables[..i].iter().map(|x| x.name.as_str()),
            )?;
            if !p.url.is_empty() {
                check_conninfo("pg_tables[].url", &p.url)?;
            }
            if p.table.trim().is_empty() || p.batch_size == 0 {
                return Err(bad(
                    "pg_tables",
                    i,
                    "needs a table and a batch_size of at least 1",
                ));
            }
            if p.backoff_base > p.backoff_cap {
                return Err(bad(
                    "pg_tables",
                    i,
                    "backoff_base must not exceed backoff_cap",
                ));
            }
        }
        Ok(())
    }
}

/// Checks the `name` of entry `index` of list `list`: present, portable, not used before.
fn check_entry_name<'a>(
    list: &'static str,
    index: usize,
    name: &str,
    mut earlier: impl Iterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::ListedAdapter {
        list,
        index,
        message,
    };
    let name_ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        return Err(bad(format!(
            "name {name:?}: give each entry a name of letters, digits, '_' and '-'"
        )));
    }
    if earlier.any(|n| n == name) {
        return Err(bad(format!("name {name:?} is used twice")));
    }
    Ok(())
}

/// Checks entry `index` of `webhooks` (`earlier` are the entries before it).
fn check_listed_webhook(
    index: usize,
    hook: &WebhookConfig,
    earlier: &[WebhookConfig],
) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::ListedAdapter {
        list: "webhooks",
        index,
        message,
    };
    check_entry_name(
        "webhooks",
        index,
        &hook.name,
        earlier.iter().map(|h| h.name.as_str()),
    )?;
    let lower = hook.url.trim().to_ascii_lowercase();
    let host = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    if host.is_none_or(str::is_empty) {
        return Err(bad(format!(
            "url {:?} is not an http:// or https:// URL",
            redact_url(&hook.url)
        )));
    }
    for (name, value) in &hook.headers {
        check_header(name, value)?;
    }
    if hook.max_retries == 0 || hook.batch_size == 0 {
        return Err(bad("max_retries and batch_size must be at least 1".into()));
    }
    if hook.timeout.is_zero() {
        return Err(bad("timeout must be longer than 0".into()));
    }
    if hook.backoff_base > hook.backoff_cap {
        return Err(bad("backoff_base must not exceed backoff_cap".into()));
    }
    Ok(())
}

fn one_of(
    key: &'static str,
    value: &str,
    allowed: &'static [&'static str],
) -> Result<(), ConfigError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::NotOneOf {
            key,
            value: value.to_owned(),
            allowed,
        })
    }
}

fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value >= min {
        Ok(())
    } else {
        Err(ConfigError::TooSmall { key, min, value })
    }
}

fn nonzero(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::ZeroDuration { key })
    } else {
        Ok(())
    }
}

/// Parses a connection string the way the detectors will (TLS parameters split off by
/// [`crate::db::ConnectTarget`], the rest by tokio-postgres), so a typo fails at startup.
fn check_conninfo(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::InvalidDatabaseUrl {
        key,
        url: redact_url(url),
        message,
    };
    let target = crate::db::ConnectTarget::parse(url).map_err(|e| match e {
        crate::Error::DatabaseUrl(message) => invalid(message),
        other => invalid(other.to_string()),
    })?;
    tokio_postgres::Config::from_str(&target.url).map_err(|e| {
        // tokio-postgres says only "invalid connection string"; the reason is its source.
        let reason =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        invalid(reason)
    })?;
    Ok(())
}

/// A header name must be an HTTP token; a value must not contain line breaks.
fn check_header(name: &str, value: &str) -> Result<(), ConfigError> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(ConfigError::InvalidHeader {
            name: name.to_owned(),
            reason: "a header name is letters, digits and !#$%&'*+-.^_`|~",
        });
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(ConfigError::InvalidHeader {
            name: name.to_owned(),
            reason: "a header value must not contain line breaks",
        });
    }
    Ok(())
}

/// A channel name: 1 to 63 characters of ASCII letters, digits, `_`, `.`, `:` and `-`.
pub fn valid_channel(name: &str) -> bool {
    (1..=MAX_CHANNEL_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

/// A replication slot name Postgres accepts: 1 to 63 of `[a-z0-9_]`.
pub fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Parses a listen address: `:8080` (all interfaces), `localhost:8080`, `127.0.0.1:8080`,
/// `[::1]:8080`. Host names other than `localhost` are not resolved.
pub fn parse_listen_addr(addr: &str) -> Result<SocketAddr, String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))
    };
    if let Some(port) = addr.strip_prefix(':') {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port_of(port)?,
        ));
    }
    if let Some(port) = addr.strip_prefix("localhost:") {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_of(port)?,
        ));
    }
    SocketAddr::from_str(addr)
        .map_err(|_| "expected :PORT, localhost:PORT or IP:PORT (IPv6 in brackets)".to_owned())
}

// ---------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------

/// Parses a byte size: a plain integer, or a number with a unit. `K`, `M`, `G`, `T` and
/// `KiB`, `MiB`, `GiB`, `TiB` (also `Ki`…) are powers of 1024; `KB`, `MB`, `GB`, `TB` are
/// powers of 1000; `B` is bytes. Case-insensitive; a space before the unit is allowed.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("invalid size {text:?}: unknown unit {unit:?}")),
    };
    if number.is_empty() {
        return Err(format!("invalid size {text:?}: expected a number"));
    }
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(multiplier)
            .ok_or_else(|| format!("invalid size {text:?}: too large"));
    }
    let n: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number"))?;
    let bytes = (n * multiplier as f64).round();
    if bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        // In range and rounded: the cast is exact enough for a file size.
        Ok(bytes as u64)
    } else {
        Err(format!("invalid size {text:?}: too large"))
    }
}

/// Deserializes a byte size from an integer or a string with a unit (see [`parse_size`]).
mod size_serde {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes, as an integer or a string like \"100MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v).map_err(E::custom)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DB: &str = "postgres://app:s3cret@db.example/shop";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile {
            name: "pgpipe.yaml".into(),
            text: text.into(),
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn flag(key: &'static str, flag: &'static str, value: Value) -> FlagOverride {
        FlagOverride { key, flag, value }
    }

    /// A configuration that validates, to break one setting at a time.
    fn valid() -> Config {
        Config {
            database_url: DB.into(),
            channels: vec!["orders".into()],
            ..Config::default()
        }
    }

    fn err_of(c: &Config) -> String {
        c.validate()
            .expect_err("config should be invalid")
            .to_string()
    }

    #[test]
    fn defaults_match_the_original() {
        let c = Config::default();
        assert_eq!(c.adapters, ["stdout"]);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.bus.buffer_size, 1024);
        assert_eq!(c.detector.backoff_base, Duration::from_secs(5));
        assert_eq!(c.detector.backoff_cap, Duration::from_secs(60));
        assert_eq!(c.webhook.max_retries, 5);
        assert_eq!(c.webhook.timeout, Duration::from_secs(10));
        assert_eq!(c.webhook.backoff_base, Duration::from_secs(1));
        assert_eq!(c.webhook.backoff_cap, Duration::from_secs(32));
        assert_eq!(c.sse.addr, ":8080");
        assert_eq!(c.sse.cors_origins, ["*"]);
        assert_eq!(c.sse.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.sse.read_timeout, Duration::from_secs(5));
        assert_eq!(c.sse.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.file.max_size, 100 * 1024 * 1024);
        assert_eq!(c.file.max_files, 5);
        assert_eq!(c.exec.backoff_cap, Duration::from_secs(30));
        assert_eq!(c.pg_table.table, "pgpipe_events");
        assert_eq!(c.pg_table.backoff_cap, Duration::from_secs(30));
        assert_eq!(c.websocket.ping_interval, Duration::from_secs(15));
    }

    #[test]
    fn defaults_round_trip_through_the_tree() {
        let got = resolve(&Config::default(), None, &no_env, &[]).expect("defaults load");
        assert_eq!(got, Config::default());
    }

    #[test]
    fn precedence_flag_over_env_over_file_over_default() {
        let f = file("detector:\n  batch_size: 10\n  max_in_flight: 20\n  poll_interval: 1s\n");
        let env = env_of(&[
            ("PGPIPE_DETECTOR_BATCH_SIZE", "30"),
            ("PGPIPE_DETECTOR_MAX_IN_FLIGHT", "40"),
        ]);
        let flags = [flag("detector.batch_size", "--batch-size", json!(50))];
        let c = resolve(&Config::default(), Some(&f), &env, &flags).expect("loads");
        assert_eq!(c.detector.batch_size, 50, "flag beats env");
        assert_eq!(c.detector.max_in_flight, 40, "env beats file");
        assert_eq!(
            c.detector.poll_interval,
            Duration::from_secs(1),
            "file beats default"
        );
        assert_eq!(
            c.detector.backoff_cap,
            Duration::from_secs(60),
            "default stays"
        );
    }

    #[test]
    fn env_names_follow_the_original_rule() {
        assert_eq!(env_var_name("database_url"), "PGPIPE_DATABASE_URL");
        assert_eq!(env_var_name("webhook.url"), "PGPIPE_WEBHOOK_URL");
        assert_eq!(
            env_var_name("detector.poll_interval"),
            "PGPIPE_DETECTOR_POLL_INTERVAL"
        );
        assert_eq!(env_var_name("a-b.c"), "PGPIPE_A_B_C");
        let vars = env_vars();
        assert!(vars.contains(&("detector.type".into(), "PGPIPE_DETECTOR_TYPE".into())));
        assert!(vars.contains(&("sse.cors_origins".into(), "PGPIPE_SSE_CORS_ORIGINS".into())));
        assert!(!vars.iter().any(|(k, _)| k.starts_with("webhook.headers")));
        let mut names: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), vars.len(), "no two keys share an env var");
    }

    #[test]
    fn env_values_are_typed_by_the_default() {
        let env = env_of(&[
            ("PGPIPE_DATABASE_URL", DB),
            ("PGPIPE_CHANNELS", "orders, payments,,users  x"),
            ("PGPIPE_ADAPTERS", "stdout,webhook"),
            ("PGPIPE_WEBHOOK_URL", "https://hooks.example/x"),
            ("PGPIPE_DETECTOR_TYPE", "wal"),
            ("PGPIPE_DETECTOR_PUBLICATION", "pub"),
            ("PGPIPE_DETECTOR_TX_METADATA", "true"),
            ("PGPIPE_DETECTOR_POLL_INTERVAL", "250ms"),
            ("PGPIPE_FILE_MAX_SIZE", "10MiB"),
            ("PGPIPE_SHUTDOWN_TIMEOUT", "1m 30s"),
            ("PGPIPE_METRICS_ADDR", ""),
        ]);
        let c = load(&Config::default(), None, &env, &[]).expect("loads");
        assert_eq!(c.database_url, DB);
        assert_eq!(c.channels, ["orders", "payments", "users", "x"]);
        assert_eq!(c.adapters, ["stdout", "webhook"]);
        assert_eq!(c.detector.kind, "wal");
        assert!(c.detector.tx_metadata);
        assert_eq!(c.detector.poll_interval, Duration::from_millis(250));
        assert_eq!(c.file.max_size, 10 << 20);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(90));
        assert_eq!(c.metrics_addr, "", "an empty variable counts as unset");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let env = env_of(&[("PGPIPE_DETECTOR_BATCH_SIZE", "x")]);
        let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"PGPIPE_DETECTOR_BATCH_SIZE: invalid value "x": expected a non-negative integer"#
        );
        let env = env_of(&[("PGPIPE_DETECTOR_TX_MARKERS", "maybe")]);
        let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PGPIPE_DETECTOR_TX_MARKERS: invalid value"),
            "{e}"
        );
        let env = env_of(&[("PGPIPE_SSE_IDLE_TIMEOUT", "soon")]);
        let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PGPIPE_SSE_IDLE_TIMEOUT: sse.idle_timeout: "),
            "{e}"
        );
        let env = env_of(&[("PGPIPE_DETECTOR_BATCH_SIZE", "99999999999")]);
        let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PGPIPE_DETECTOR_BATCH_SIZE: detector.batch_size: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let e = resolve(
            &Config::default(),
            Some(&file("webhok:\n  url: x\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(r#"config file pgpipe.yaml: unknown key "webhok" at top level"#),
            "{e}"
        );
        let e = resolve(
            &Config::default(),
            Some(&file("detector:\n  batchsize: 1\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                r#"config file pgpipe.yaml: unknown key "batchsize" in section "detector""#
            ),
            "{msg}"
        );
        assert!(msg.contains("batch_size"), "lists the known keys: {msg}");
    }

    #[test]
    fn deny_unknown_fields_also_guards_direct_deserialization() {
        let e = serde_json::from_value::<Config>(json!({"webhok": {}})).unwrap_err();
        assert!(e.to_string().contains("webhok"), "{e}");
    }

    #[test]
    fn file_values_of_the_wrong_type_name_key_and_file() {
        let e = resolve(
            &Config::default(),
            Some(&file("detector:\n  batch_size: lots\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file pgpipe.yaml: detector.batch_size: invalid type"),
            "{e}"
        );
        let e = resolve(
            &Config::default(),
            Some(&file("webhook: 5\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file pgpipe.yaml: webhook: expected a section of keys, found a number"
        );
        let e = resolve(&Config::default(), Some(&file("- a\n- b\n")), &no_env, &[]).unwrap_err();
        assert!(e.to_string().contains("expected a mapping"), "{e}");
        let e = resolve(&Config::default(), Some(&file("a: [\n")), &no_env, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file pgpipe.yaml: invalid YAML"),
            "{e}"
        );
        let e = resolve(
            &Config::default(),
            Some(&file("channels: [a]\nadapters: [stdout\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 2"), "the line is named: {e}");
    }

    #[test]
    fn a_full_original_style_file_loads() {
        let text = r#"
database_url: postgres://localhost/app
channels: [orders, "pgpipe:users"]
adapters:
  - webhook
  - sse
  - file
shutdown_timeout: 10s
log_level: debug
bus:
  buffer_size: 64
detector:
  type: listen_notify
  backoff_base: 1s
  backoff_cap: 2s
webhook:
  url: https://hooks.example/in
  max_retries: 3
  signing_key: k
  headers:
    Authorization: Bearer t
  timeout: 2s
sse:
  addr: 127.0.0.1:9000
  cors_origins: [https://app.example]
file:
  path: /tmp/events.jsonl
  max_size: 1MiB
  max_files: 2
exec:
websocket:
  ping_interval: 5s
"#;
        let c = load(&Config::default(), Some(&file(text)), &no_env, &[]).expect("loads");
        assert_eq!(c.channels, ["orders", "pgpipe:users"]);
        assert_eq!(c.adapters, ["webhook", "sse", "file"]);
        assert_eq!(c.bus.buffer_size, 64);
        assert_eq!(c.detector.kind, "listen_notify");
        assert_eq!(
            c.webhook.headers.get("Authorization").map(String::as_str),
            Some("Bearer t")
        );
        assert_eq!(c.file.max_size, 1 << 20);
        assert_eq!(c.file.path, PathBuf::from("/tmp/events.jsonl"));
        assert_eq!(
            c.exec,
            ExecConfig::default(),
            "an empty section keeps its defaults"
        );
        assert_eq!(c.log_level, "debug");

        let upper = "Database_URL: postgres://h/d\nChannels: [a]\nDetector:\n  Batch_Size: 3\n";
        let c = load(&Config::default(), Some(&file(upper)), &no_env, &[]).expect("loads");
        assert_eq!(
            c.detector.batch_size, 3,
            "keys are case-insensitive, as with viper"
        );
    }

    #[test]
    fn several_webhooks_through_the_config_file() {
        let text = "database_url: postgres://h/d\nchannels: [a]\nwebhook:\n  url: http://one\n\
                    webhooks:\n  - name: billing\n    url: https://b.example/in\n    \
                    max_retries: 2\n  - name: audit\n    url: http://a.example\n";
        let c = load(&Config::default(), Some(&file(text)), &no_env, &[]).expect("loads");
        assert_eq!(
            c.webhook.url, "http://one",
            "the original key keeps working"
        );
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(
            (c.webhooks[0].name.as_str(), c.webhooks[0].max_retries),
            ("billing", 2)
        );
        assert_eq!(
            c.webhooks[1].timeout,
            WebhookConfig::default().timeout,
            "defaults fill each entry"
        );
        let dup = text.replace("name: audit", "name: billing");
        let e = load(&Config::default(), Some(&file(&dup)), &no_env, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("webhooks[1]: name \"billing\" is used twice"),
            "{e}"
        );
        let more = format!(
            "{text}files:\n  - name: copy\n    path: /tmp/x.jsonl\n    max_size: 1MiB\n\
             execs:\n  - name: cat\n    command: cat\npg_tables:\n  - name: audit\n    \
             table: audit.events\n"
        );
        let c = load(&Config::default(), Some(&file(&more)), &no_env, &[]).expect("loads");
        assert_eq!(c.files[0].max_size, 1 << 20);
        assert_eq!(
            (c.execs[0].name.as_str(), c.pg_tables[0].batch_size),
            ("cat", 500)
        );
        let no_path = more.replace("    path: /tmp/x.jsonl\n", "");
        let e = load(&Config::default(), Some(&file(&no_path)), &no_env, &[]).unwrap_err();
        assert_eq!(e.to_string(), "files[0]: needs a path");
        let typo = text.replace("max_retries: 2", "retries: 2");
        let e = load(&Config::default(), Some(&file(&typo)), &no_env, &[]).unwrap_err();
        assert!(e.to_string().contains("retries"), "{e}");
    }

    #[test]
    fn empty_file_means_defaults() {
        let c =
            resolve(&Config::default(), Some(&file("# nothing\n")), &no_env, &[]).expect("loads");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn flags_with_lists_and_durations() {
        let flags = [
            flag("channels", "--channel", json!(["a", "b"])),
            flag("detector.poll_interval", "--poll-interval", json!("2s")),
            flag("database_url", "--db", json!(DB)),
        ];
        let env = env_of(&[("PGPIPE_CHANNELS", "x")]);
        let c = load(&Config::default(), None, &env, &flags).expect("loads");
        assert_eq!(c.channels, ["a", "b"], "flag lists replace, not extend");
        assert_eq!(c.detector.poll_interval, Duration::from_secs(2));
        let bad = [flag("nope", "--nope", json!(1))];
        assert!(matches!(
            resolve(&Config::default(), None, &no_env, &bad),
            Err(ConfigError::Internal(_))
        ));
    }

    #[test]
    fn validation_errors() {
        assert!(valid().validate().is_ok());

        let mut c = valid();
        c.database_url.clear();
        assert_eq!(
            err_of(&c),
            "no database URL: pass --db or set database_url / PGPIPE_DATABASE_URL"
        );

        let mut c = valid();
        c.database_url = "postgres://u:pw@h:notaport/db".into();
        let msg = err_of(&c);
        assert!(
            msg.starts_with("database_url: invalid connection string"),
            "{msg}"
        );
        assert!(msg.contains("port") && !msg.contains("pw"), "{msg}");
        c.database_url = "postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem".into();
        assert!(
            c.validate().is_ok(),
            "TLS parameters tokio-postgres lacks are accepted"
        );
        c.database_url = "host=h sslmode=sometimes".into();
        assert!(err_of(&c).contains("sslmode"));

        let mut c = valid();
        c.channels.clear();
        assert!(err_of(&c).starts_with("no channels"));
        c.detector.kind = "wal".into();
        c.detector.publication = "p".into();
        assert!(c.validate().is_ok(), "wal needs no channels");

        let mut c = valid();
        c.channels.push("bad channel".into());
        assert!(err_of(&c).starts_with(r#"invalid channel name "bad channel""#));
        c.channels = vec!["x".repeat(64)];
        assert!(err_of(&c).starts_with("invalid channel name"));
        c.channels = vec!["pgpipe:orders.v1-2_x".into(), "x".repeat(63)];
        assert!(c.validate().is_ok());

        let mut c = valid();
        c.adapters = vec!["kafka".into()];
        assert_eq!(
            err_of(&c),
            r#"unknown adapter "kafka": valid adapters are stdout, webhook, sse, ws, file, exec, pg_table"#
        );
        c.adapters = vec![];
        assert!(err_of(&c).starts_with("no adapters"));
        c.adapters = vec!["stdout".into(), "stdout".into()];
        assert!(err_of(&c).contains("more than once"));

        let mut c = valid();
        c.adapters = vec!["webhook".into()];
        assert!(err_of(&c).starts_with("the webhook adapter needs a URL"));
        c.webhook.url = "ftp://user:pw@x".into();
        let msg = err_of(&c);
        assert!(msg.contains("not an http"), "{msg}");
        assert!(!msg.contains("pw"), "password masked: {msg}");
        c.webhook.url = "https://hooks.example".into();
        assert!(c.validate().is_ok());
        c.webhook.headers.insert("Bad Header".into(), "v".into());
        assert!(err_of(&c).contains("invalid header"));

        let mut c = valid();
        c.adapters = vec!["file".into()];
        assert!(err_of(&c).starts_with("the file adapter needs a path"));

        let mut c = valid();
        c.adapters = vec!["exec".into()];
        assert!(err_of(&c).starts_with("the exec adapter needs a command"));

        let mut c = valid();
        c.detector.kind = "wal".into();
        assert!(err_of(&c).starts_with("the wal detector needs a publication"));
        c.detector.all_tables = true;
        assert!(
            c.validate().is_ok(),
            "all_tables stands in for a publication"
        );

        type Set = fn(&mut Config);
        let wal_only: [(Set, &str); 5] = [
            (|c| c.detector.tx_metadata = true, "tx_metadata"),
            (|c| c.detector.tx_markers = true, "tx_markers"),
            (|c| c.detector.publication = "p".into(), "publication"),
            (|c| c.detector.all_tables = true, "all_tables"),
            (|c| c.detector.slot = "s".into(), "slot"),
        ];
        for (set, name) in wal_only {
            let mut c = valid();
            set(&mut c);
            let msg = err_of(&c);
            assert!(
                msg.contains(name) && msg.contains("only works with the wal detector"),
                "{msg}"
            );
        }

        let mut c = valid();
        c.detector.kind = "kafka".into();
        assert_eq!(
            err_of(&c),
            r#"unknown detector "kafka": valid detectors are queue, listen_notify, wal (or empty to pick automatically)"#
        );

        let mut c = valid();
        c.detector.kind = "wal".into();
        c.detector.publication = "p".into();
        c.detector.slot = "Bad-Slot".into();
        assert!(err_of(&c).contains("invalid replication slot name"));

        let mut c = valid();
        c.detector.batch_size = 0;
        assert_eq!(err_of(&c), "detector.batch_size must be at least 1, got 0");
        let mut c = valid();
        c.detector.max_in_flight = 0;
        assert!(err_of(&c).starts_with("detector.max_in_flight must be at least 1"));
        let mut c = valid();
        c.bus.buffer_size = 0;
        assert!(err_of(&c).starts_with("bus.buffer_size must be at least 1"));
        let mut c = valid();
        c.webhook.max_retries = 0;
        assert!(err_of(&c).starts_with("webhook.max_retries must be at least 1"));

        let mut c = valid();
        c.detector.poll_interval = Duration::ZERO;
        assert_eq!(err_of(&c), "detector.poll_interval must be longer than 0");

        let mut c = valid();
        c.webhook.backoff_base = Duration::from_secs(60);
        assert!(err_of(&c).starts_with("webhook.backoff_base (60s) must not exceed"));

        let mut c = valid();
        c.sse.addr = "example.com:80".into();
        assert!(err_of(&c).starts_with("sse.addr: invalid listen address"));

        let mut c = valid();
        c.log_level = "loud".into();
        assert!(err_of(&c).starts_with(r#"log_level: invalid value "loud""#));
    }

    #[test]
    fn negative_sizes_are_rejected_when_loading() {
        let e = load(
            &Config::default(),
            Some(&file("bus:\n  buffer_size: -1\n")),
            &no_env,
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file pgpipe.yaml: bus.buffer_size: "),
            "{e}"
        );
        let env = env_of(&[("PGPIPE_BUS_BUFFER_SIZE", "-1")]);
        let e = load(&Config::default(), None, &env, &[]).unwrap_err();
        assert!(e.to_string().contains("non-negative"), "{e}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let mut c = valid();
        c.webhook.signing_key = "hmac-key-123".into();
        c.webhook
            .headers
            .insert("Authorization".into(), "Bearer tok-456".into());
        c.pg_table.url = "host=h password='p w 789' dbname=x".into();
        for text in [
            format!("{c:?}"),
            format!("{c:#?}"),
            format!("{:?}", c.redacted()),
        ] {
            for secret in ["s3cret", "hmac-key-123", "tok-456", "789"] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
            assert!(text.contains("app:***@db.example"), "{text}");
            assert!(text.contains("Authorization"), "{text}");
        }
        assert_eq!(c.redacted().channels, c.channels);
    }

    #[test]
    fn redact_url_forms() {
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgresql://h/db?user=u&password=p&sslmode=require"),
            "postgresql://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_url("host=h password = 'p \\' w' user=u"),
            "host=h password =*** user=u"
        );
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("100 mb"), Ok(100_000_000));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999999T").is_err());
        let c: FileConfig = serde_json::from_value(json!({"max_size": "1KiB"})).expect("size");
        assert_eq!(c.max_size, 1024);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr(":8080"),
            Ok("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("localhost:1"),
            Ok("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(parse_listen_addr("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
        assert!(parse_listen_addr(":http").is_err());
        assert!(parse_listen_addr("host:80").is_err());
    }
}
