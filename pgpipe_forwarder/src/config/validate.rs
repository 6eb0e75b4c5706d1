//! Validation: the settings fit together; every error names the key.

use super::*;

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
