//! The nats adapter's config section (`nats:` and the `natss:` list), its checks, and its
//! registration.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::registry::{self, Build, Kind, Place};
use super::subject::Template;
use crate::config::{self, redact_url, ConfigError, Secret};

/// The nats kind: the single `nats` section and the `natss` list (the `<kind>s` rule).
pub const KIND: Kind = Kind {
    name: "nats",
    list: Some("natss"),
    entries: |c| c.natss.iter().map(|n| n.name.clone()).collect(),
    validate: |c, used| {
        c.nats.validate(Place::single("nats"), used)?;
        registry::check_list(
            "nats",
            "natss",
            &c.natss,
            |n| &n.name,
            |n, at| n.validate(at, true),
        )
    },
    redact: |c| {
        c.nats = c.nats.redacted();
        c.natss = c.natss.iter().map(NatsConfig::redacted).collect();
    },
    build: |b: &Build<'_>, name, entry| {
        let c = b.config;
        let section = registry::section(name, &c.nats, "natss", &c.natss, entry, |n| &n.name)?;
        Ok(Box::new(super::Nats::adapter(
            name,
            section,
            &c.database_url,
        )?))
    },
    init: None,
};

/// Where JetStream keeps the stream the adapter creates (`nats.storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: survives a server restart.
    File,
    /// In memory: lost when the server stops.
    Memory,
}

/// NATS JetStream adapter settings (`nats.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`--nats-url`; `nats://`, `tls://`); required.
    pub url: String,
    /// Subject template: `{channel}`, `{operation}` and `{key}` are filled in (`--nats-subject`).
    pub subject: String,
    /// JetStream stream the subjects belong to, created when missing (`--nats-stream`).
    pub stream: String,
    /// Create the stream when it is missing; false: it must exist.
    pub create_stream: bool,
    /// Subjects of a created stream; empty: derived from `subject` (`pgpipe.>`).
    pub stream_subjects: Vec<String>,
    /// Storage of a created stream: `file` or `memory`.
    pub storage: Storage,
    /// Replicas of a created stream (1 for a single server).
    pub replicas: usize,
    /// JetStream's deduplication window of a created stream: a redelivery (after a crash)
    /// within it is dropped by `Nats-Msg-Id`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Most publishes awaiting JetStream's ack at once (events per delivery batch).
    pub max_pending: usize,
    /// How long one publish waits for JetStream's ack before it is retried.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// How long connecting to a server may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect and retry delay (full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest reconnect and retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Authentication token; a secret.
    pub token: Secret,
    /// User name (with `password`).
    pub user: String,
    /// Password of `user`; a secret.
    pub password: Secret,
    /// NKey seed (`SU...`); a secret.
    pub nkey: Secret,
    /// Path of a `.creds` file (JWT and NKey seed, as `nsc` writes it).
    pub creds_file: String,
    /// Require TLS even for `nats://` URLs (`tls://` URLs always require it).
    pub tls_required: bool,
    /// PEM file of the CA(s) that sign the server's certificate; empty: the system's.
    pub tls_ca_file: String,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Name of a `natss` entry (the adapter is `nats:<name>`); unused in `nats`.
    pub name: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: String::new(),
            subject: "pgpipe.{channel}".into(),
            stream: "PGPIPE".into(),
            create_stream: true,
            stream_subjects: Vec::new(),
            storage: Storage::File,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_pending: 256,
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            token: Secret::default(),
            user: String::new(),
            password: Secret::default(),
            nkey: Secret::default(),
            creds_file: String::new(),
            tls_required: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            name: String::new(),
        }
    }
}

impl NatsConfig {
    /// A copy with the token, password, NKey seed and URL userinfo masked (the creds file
    /// is a path; its contents are never read into the config).
    pub fn redacted(&self) -> NatsConfig {
        let mut n = self.clone();
        n.url = n.servers().iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(",");
        n.token = n.token.redacted();
        n.password = n.password.redacted();
        n.nkey = n.nkey.redacted();
        n
    }

    /// The server URLs of `url`, trimmed, empty ones left out.
    pub fn servers(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The subjects a created stream holds: `stream_subjects`, else derived from `subject`.
    pub fn subjects_of_stream(&self) -> Vec<String> {
        if !self.stream_subjects.is_empty() {
            return self.stream_subjects.clone();
        }
        Template::parse(&self.subject)
            .ok()
            .and_then(|t| t.stream_subjects())
            .unwrap_or_default()
    }

    /// Checks the section at `at`; `used`: it runs, so its URL is required.
    pub fn validate(&self, at: Place, used: bool) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::InvalidValue {
            origin: config::Origin::Default,
            key: at.key(field),
            message,
        };
        let servers = self.servers();
        if used && servers.is_empty() {
            return Err(at.missing(
                "a url",
                invalid(
                    "url",
                    "the nats adapter needs a server URL: --nats-url nats://host:4222 \
                     (or PGPIPE_NATS_URL)"
                        .into(),
                ),
            ));
        }
        for server in &servers {
            check_server_url(server).map_err(|m| invalid("url", m))?;
        }
        let template = Template::parse(&self.subject).map_err(|m| {
            invalid(
                "subject",
                format!("{m}; e.g. pgpipe.{{channel}} or cdc.{{channel}}.{{operation}}"),
            )
        })?;
        if valid_stream_name(&self.stream).is_err() {
            return Err(invalid(
                "stream",
                format!(
                    "{:?} is not a stream name: use letters, digits, '_' and '-' (e.g. PGPIPE)",
                    self.stream
                ),
            ));
        }
        if self.create_stream && self.stream_subjects.is_empty() && template.stream_subjects().is_none() {
            return Err(invalid(
                "stream_subjects",
                format!(
                    "the subject {:?} starts with a placeholder, so the stream's subjects \
                     cannot be derived: list them (e.g. [\"*.cdc\"]) or start the subject \
                     with a fixed token (pgpipe.{{channel}})",
                    self.subject
                ),
            ));
        }
        for subject in &self.stream_subjects {
            if subject.is_empty() || subject.contains(char::is_whitespace) {
                return Err(invalid(
                    "stream_subjects",
                    format!("{subject:?} is not a subject"),
                ));
            }
        }
        let auth = [
            !self.token.is_empty(),
            !self.user.is_empty() || !self.password.is_empty(),
            !self.nkey.is_empty(),
            !self.creds_file.is_empty(),
        ];
        if auth.iter().filter(|set| **set).count() > 1 {
            return Err(invalid(
                "token",
                "set one way to authenticate: token, user and password, nkey or creds_file"
                    .into(),
            ));
        }
        if self.user.is_empty() != self.password.is_empty() {
            return Err(invalid(
                if self.user.is_empty() { "user" } else { "password" },
                "user and password go together: set both".into(),
            ));
        }
        if !self.nkey.is_empty() && !self.nkey.expose().trim().starts_with('S') {
            return Err(invalid(
                "nkey",
                "expected an NKey seed (it starts with 'S', e.g. SU...), not a public key".into(),
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(invalid(
                if self.tls_cert_file.is_empty() { "tls_cert_file" } else { "tls_key_file" },
                "a client certificate needs both tls_cert_file and tls_key_file".into(),
            ));
        }
        config::at_least(at.key("replicas"), self.replicas as u64, 1)?;
        config::at_least(at.key("max_pending"), self.max_pending as u64, 1)?;
        config::nonzero(at.key("duplicate_window"), self.duplicate_window)?;
        config::nonzero(at.key("ack_timeout"), self.ack_timeout)?;
        config::nonzero(at.key("connect_timeout"), self.connect_timeout)?;
        config::check_backoff(at.here(), self.backoff_base, self.backoff_cap)
    }
}

/// A stream name JetStream accepts.
fn valid_stream_name(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

/// `nats://host:port`, `tls://host:port` (also `host:port`); the error shows it redacted.
fn check_server_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let rest = match url.split_once("://") {
        Some(("nats" | "tls", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{shown:?}: scheme {scheme}:// is not nats:// or tls://"
            ))
        }
        None => url,
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') || host.contains('/') {
        return Err(format!(
            "{shown:?} is not a server address: use nats://host:4222"
        ));
    }
    Ok(())
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.redacted();
        f.debug_struct("NatsConfig")
            .field("url", &n.url)
            .field("subject", &n.subject)
            .field("stream", &n.stream)
            .field("create_stream", &n.create_stream)
            .field("stream_subjects", &n.stream_subjects)
            .field("storage", &n.storage)
            .field("replicas", &n.replicas)
            .field("duplicate_window", &n.duplicate_window)
            .field("max_pending", &n.max_pending)
            .field("ack_timeout", &n.ack_timeout)
            .field("connect_timeout", &n.connect_timeout)
            .field("backoff_base", &n.backoff_base)
            .field("backoff_cap", &n.backoff_cap)
            .field("token", &n.token)
            .field("user", &n.user)
            .field("password", &n.password)
            .field("nkey", &n.nkey)
            .field("creds_file", &n.creds_file)
            .field("tls_required", &n.tls_required)
            .field("tls_ca_file", &n.tls_ca_file)
            .field("tls_cert_file", &n.tls_cert_file)
            .field("tls_key_file", &n.tls_key_file)
            .field("name", &n.name)
            .finish()
    }
}

/// nats adapter flags of `pgpipe listen` (they override `nats.*`).
#[derive(Debug, Default, clap::Args)]
#[group(skip)]
pub struct Flags {
    /// NATS server URL(s), comma-separated (required with -a nats) [config: nats.url]
    /// [env: PGPIPE_NATS_URL]
    #[arg(long, value_name = "URL", help_heading = "Adapters")]
    nats_url: Option<String>,

    /// NATS subject template, {channel}, {operation} and {key} filled in [default: pgpipe.{channel}]
    /// [config: nats.subject] [env: PGPIPE_NATS_SUBJECT]
    #[arg(long, value_name = "TEMPLATE", help_heading = "Adapters")]
    nats_subject: Option<String>,

    /// JetStream stream, created when missing [default: PGPIPE] [config: nats.stream]
    /// [env: PGPIPE_NATS_STREAM]
    #[arg(long, value_name = "NAME", help_heading = "Adapters")]
    nats_stream: Option<String>,

    /// NATS credentials file (JWT + NKey seed) [config: nats.creds_file]
    /// [env: PGPIPE_NATS_CREDS_FILE]
    #[arg(long, value_name = "PATH", help_heading = "Adapters")]
    nats_creds: Option<String>,
}

impl Flags {
    /// The config overrides of the flags that were given.
    pub fn overrides(&self, out: &mut Vec<config::FlagOverride>) {
        config::override_with(out, "nats.url", "--nats-url", self.nats_url.clone());
        config::override_with(
            out,
            "nats.subject",
            "--nats-subject",
            self.nats_subject.clone(),
        );
        config::override_with(out, "nats.stream", "--nats-stream", self.nats_stream.clone());
        config::override_with(
            out,
            "nats.creds_file",
            "--nats-creds",
            self.nats_creds.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(c: &NatsConfig) -> Result<(), String> {
        c.validate(Place::single("nats"), true)
            .map_err(|e| e.to_string())
    }

    fn with_url() -> NatsConfig {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            ..NatsConfig::default()
        }
    }

    #[test]
    fn defaults_derive_the_stream_subjects() {
        let c = with_url();
        check(&c).unwrap();
        assert_eq!(c.subjects_of_stream(), vec!["pgpipe.>".to_string()]);
        // An unused section needs no URL.
        NatsConfig::default()
            .validate(Place::single("nats"), false)
            .unwrap();
    }

    #[test]
    fn mistakes_name_the_key_and_the_fix() {
        let cases: Vec<(NatsConfig, &str)> = vec![
            (NatsConfig::default(), "nats.url: the nats adapter needs a server URL: --nats-url"),
            (
                NatsConfig { url: "http://h:4222".into(), ..with_url() },
                "nats.url: \"http://h:4222\": scheme http:// is not nats:// or tls://",
            ),
            (
                NatsConfig { subject: "pgpipe.{table}".into(), ..with_url() },
                "nats.subject: unknown placeholder {table}",
            ),
            (
                NatsConfig { subject: "{channel}.cdc".into(), ..with_url() },
                "nats.stream_subjects: the subject \"{channel}.cdc\" starts with a placeholder",
            ),
            (
                NatsConfig { stream: "PG.PIPE".into(), ..with_url() },
                "nats.stream: \"PG.PIPE\" is not a stream name",
            ),
            (
                NatsConfig { token: "t".into(), nkey: "SUABC".into(), ..with_url() },
                "nats.token: set one way to authenticate",
            ),
            (
                NatsConfig { user: "u".into(), ..with_url() },
                "nats.password: user and password go together",
            ),
            (
                NatsConfig { nkey: "UABC".into(), ..with_url() },
                "nats.nkey: expected an NKey seed",
            ),
            (
                NatsConfig { tls_cert_file: "c.pem".into(), ..with_url() },
                "nats.tls_key_file: a client certificate needs both",
            ),
            (NatsConfig { max_pending: 0, ..with_url() }, "nats.max_pending"),
            (
                NatsConfig { ack_timeout: Duration::ZERO, ..with_url() },
                "nats.ack_timeout",
            ),
        ];
        for (c, needle) in cases {
            let err = check(&c).unwrap_err();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
        // A fixed subject prefix or explicit stream subjects make any template usable.
        check(&NatsConfig {
            subject: "{channel}.cdc".into(),
            stream_subjects: vec!["*.cdc".into()],
            ..with_url()
        })
        .unwrap();
        check(&NatsConfig {
            url: "tls://a:4222, nats://u:p@b:4222".into(),
            ..with_url()
        })
        .unwrap();
    }

    #[test]
    fn secrets_are_masked() {
        let c = NatsConfig {
            url: "nats://me:hunter2@h:4222,nats://tok3n@g:4222".into(),
            token: "s3cret-token".into(),
            password: "pw-123".into(),
            nkey: "SUAKEYSEED".into(),
            ..NatsConfig::default()
        };
        for shown in [format!("{c:?}"), format!("{:?}", c.redacted())] {
            for secret in ["hunter2", "tok3n", "s3cret-token", "pw-123", "SUAKEYSEED"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
        assert_eq!(c.redacted().url, "nats://***@h:4222,nats://***@g:4222");
    }
}
