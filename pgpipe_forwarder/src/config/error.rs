//! Why a configuration could not be loaded or is not usable, and where a value came from.

use super::*;

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
        key: String,
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
    /// An adapter's `channels`/`operations` route that cannot deliver what it names.
    #[error("{key}: {message}")]
    InvalidRoute {
        /// Dotted key (`webhooks[1].channels`).
        key: String,
        /// What is wrong, and the fix.
        message: String,
    },
    /// An adapter's `format` that the adapter cannot send.
    #[error("{key}: {message}")]
    InvalidFormat {
        /// Dotted key (`webhook.format`).
        key: String,
        /// What is wrong, and the fix.
        message: String,
    },
    /// An empty adapter list.
    #[error(
        "no adapters: pass --adapter or set adapters (valid: {})",
        adapter_names()
    )]
    NoAdapters,
    /// An adapter name that does not exist.
    #[error("unknown adapter {name:?}: valid adapters are {}", adapter_names())]
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
    #[error("{key} {url:?} is not an http:// or https:// URL")]
    InvalidWebhookUrl {
        /// Dotted key (`webhook.url`, `webhooks[1].url`).
        key: String,
        /// The URL with any password masked.
        url: String,
    },
    /// A webhook header that cannot be sent.
    #[error("{key}: invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// Dotted key (`webhook.headers`, `webhooks[1].headers`).
        key: String,
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
    /// A consumer group or member name the extension would refuse.
    #[error(
        "{key}: invalid name {name:?}: use 1 to 200 letters, digits, '_', '.', ':', ',', '+' \
         or '-'"
    )]
    InvalidGroupName {
        /// Dotted key.
        key: &'static str,
        /// The name.
        name: String,
    },
    /// A member name without a group.
    #[error("detector.group_member (--group-member) needs detector.group (--group NAME)")]
    MemberWithoutGroup,
    /// A group setting with a detector other than `queue`.
    #[error(
        "{setting} only works with the queue detector (the pgpipe extension's consumer groups); \
         drop it or use --detector queue"
    )]
    GroupNeedsQueue {
        /// The setting, as key and flag.
        setting: &'static str,
    },
    /// A count or size below its minimum.
    #[error("{key} must be at least {min}, got {value}")]
    TooSmall {
        /// Dotted key.
        key: String,
        /// Smallest allowed value.
        min: u64,
        /// The value.
        value: u64,
    },
    /// A zero duration where it would mean a busy loop or no time at all.
    #[error("{key} must be longer than 0")]
    ZeroDuration {
        /// Dotted key.
        key: String,
    },
    /// A backoff whose base exceeds its cap.
    #[error("{section}.backoff_base ({base:?}) must not exceed {section}.backoff_cap ({cap:?})")]
    BackoffOrder {
        /// Section holding the pair.
        section: String,
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

/// The registered adapter kinds, for messages.
fn adapter_names() -> String {
    crate::adapter::registry::names().join(", ")
}
