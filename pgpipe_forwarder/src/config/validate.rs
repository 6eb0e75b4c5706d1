//! Validation: the settings fit together; every error names the key.

use super::*;

impl Config {
    /// Checks the settings fit together, failing fast with the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.trim().is_empty() {
            return Err(ConfigError::NoDatabaseUrl);
        }
        check_conninfo("database_url", &self.database_url)?;

        let d = &self.detector;
        let wal = d.kind == DetectorKind::Wal;
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

        self.validate_group()?;

        if self.channels.is_empty() && !wal {
            return Err(ConfigError::NoChannels);
        }
        if let Some(bad) = self.channels.iter().find(|c| !valid_channel(c)) {
            return Err(ConfigError::InvalidChannel { name: bad.clone() });
        }

        // `adapters: []` with only listed entries (`webhooks:` ...) is a complete setup.
        if crate::adapter::registry::configured(self).is_empty() {
            return Err(ConfigError::NoAdapters);
        }
        for (i, name) in self.adapters.iter().enumerate() {
            if crate::adapter::registry::kind(name).is_none() {
                return Err(ConfigError::UnknownAdapter { name: name.clone() });
            }
            if self.adapters[..i].contains(name) {
                return Err(ConfigError::DuplicateAdapter { name: name.clone() });
            }
        }
        // Each adapter kind checks its own section and list entries.
        crate::adapter::registry::validate(self)?;

        at_least("detector.batch_size", u64::from(d.batch_size), 1)?;
        at_least("detector.max_in_flight", d.max_in_flight as u64, 1)?;
        at_least("bus.buffer_size", self.bus.buffer_size as u64, 1)?;
        at_least("sse.client_buffer", self.sse.client_buffer as u64, 1)?;
        at_least(
            "websocket.client_buffer",
            self.websocket.client_buffer as u64,
            1,
        )?;

        nonzero("detector.poll_interval", d.poll_interval)?;
        if d.group_member_timeout < Duration::from_secs(1) {
            return Err(ConfigError::TooSmall {
                key: "detector.group_member_timeout (seconds)".into(),
                min: 1,
                value: d.group_member_timeout.as_secs(),
            });
        }
        nonzero("detector.ack_stall_warning", d.ack_stall_warning)?;
        nonzero("detector.status_interval", d.status_interval)?;
        nonzero("sse.heartbeat_interval", self.sse.heartbeat_interval)?;
        nonzero("sse.read_timeout", self.sse.read_timeout)?;
        nonzero("websocket.ping_interval", self.websocket.ping_interval)?;
        nonzero("websocket.pong_timeout", self.websocket.pong_timeout)?;
        nonzero("sse.idle_timeout", self.sse.idle_timeout)?;
        check_backoff("detector", d.backoff_base, d.backoff_cap)?;

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

/// `value` of `key` is at least `min`.
pub fn at_least(key: impl Into<String>, value: u64, min: u64) -> Result<(), ConfigError> {
    if value >= min {
        Ok(())
    } else {
        Err(ConfigError::TooSmall {
            key: key.into(),
            min,
            value,
        })
    }
}

/// Duration `value` of `key` is not zero.
pub fn nonzero(key: impl Into<String>, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::ZeroDuration { key: key.into() })
    } else {
        Ok(())
    }
}

/// `section.backoff_base` does not exceed `section.backoff_cap`.
pub fn check_backoff(
    section: impl Into<String>,
    base: Duration,
    cap: Duration,
) -> Result<(), ConfigError> {
    if base > cap {
        return Err(ConfigError::BackoffOrder {
            section: section.into(),
            base,
            cap,
        });
    }
    Ok(())
}

/// Parses a connection string the way the detectors will (TLS parameters split off by
/// [`crate::db::ConnectTarget`], the rest by tokio-postgres), so a typo fails at startup.
pub fn check_conninfo(key: impl Into<String>, url: &str) -> Result<(), ConfigError> {
    let key = key.into();
    let invalid = |message: String| ConfigError::InvalidDatabaseUrl {
        key: key.clone(),
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

/// A header name (in `key`) must be an HTTP token; a value must not contain line breaks.
pub fn check_header(key: &str, name: &str, value: &str) -> Result<(), ConfigError> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(ConfigError::InvalidHeader {
            key: key.to_owned(),
            name: name.to_owned(),
            reason: "a header name is letters, digits and !#$%&'*+-.^_`|~",
        });
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(ConfigError::InvalidHeader {
            key: key.to_owned(),
            name: name.to_owned(),
            reason: "a header value must not contain line breaks",
        });
    }
    Ok(())
}

/// A channel name: 1 to 63 characters of ASCII letters, digits, `_`, `.`, `:` and `-`.
impl Config {
    /// A group needs the queue detector and names the extension accepts.
    fn validate_group(&self) -> Result<(), ConfigError> {
        let d = &self.detector;
        let names = [
            (&d.group, "detector.group"),
            (&d.group_member, "detector.group_member"),
        ];
        for (name, key) in names {
            if !name.is_empty() && !valid_group_name(name) {
                return Err(ConfigError::InvalidGroupName {
                    key,
                    name: name.clone(),
                });
            }
        }
        if d.group.is_empty() {
            if !d.group_member.is_empty() {
                return Err(ConfigError::MemberWithoutGroup);
            }
            return Ok(());
        }
        if !matches!(d.kind, DetectorKind::Queue | DetectorKind::Auto) {
            return Err(ConfigError::GroupNeedsQueue {
                setting: "detector.group (--group)",
            });
        }
        Ok(())
    }
}

/// A consumer (group, member) name as `pgpipe.consumers` accepts it.
pub fn valid_group_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | ',' | '+' | '-'))
}

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
