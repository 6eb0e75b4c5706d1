//! Errors callers branch on. Context strings say what failed: `connect to postgres`,
//! `read queue for consumer orders`.
//!
//! A Postgres error prints what the server said (message, SQLSTATE, detail, hint), so no
//! caller needs to dig into the driver's error to log it. [`Error::fate`] is the one place
//! that decides whether a failure is worth retrying; detectors and the reconnect helper
//! ask it instead of matching error text.

use std::fmt;
use std::time::Duration;

/// SQLSTATE 55006 `object_in_use`: the replication slot is streamed by someone else.
pub const OBJECT_IN_USE: &str = "55006";

/// Errors of the forwarder library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration is invalid; the message names the key.
    #[error("{0}")]
    Config(String),
    /// A Postgres operation failed; prints the server's message, SQLSTATE, detail and hint.
    #[error("{context}: {}", ServerSaid(.source))]
    Postgres {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection (pgwire-replication) failed.
    #[error("{context}: {message}")]
    Replication {
        /// What was being done.
        context: String,
        /// What the client or the server said (the server's SQLSTATE included).
        message: String,
        /// The server's SQLSTATE, when the server answered with an error.
        sqlstate: Option<String>,
    },
    /// The database URL could not be used.
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    /// TLS could not be set up.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The detector lost its connection and could not get it back.
    #[error("detector {detector} disconnected: {reason}")]
    DetectorDisconnected {
        /// The detector's name.
        detector: String,
        /// Why.
        reason: String,
    },
    /// The pgpipe extension is missing or too old for the requested detector.
    #[error("{0}")]
    Extension(String),
    /// The source database cannot serve the detector as configured (wal_level, a missing
    /// publication, a slot of another plugin or database); the message says how to fix it.
    #[error("{0}")]
    SourceNotReady(String),
    /// The replication slot was invalidated: the changes since its confirmed position are
    /// gone.
    #[error(
        "replication slot {slot:?} was invalidated (it fell behind by more than \
         max_slot_wal_keep_size): the changes since its last confirmed position are \
         gone. Resynchronise the receivers, drop the slot \
         (SELECT pg_drop_replication_slot('{slot}')) and start again to capture from now"
    )]
    SlotInvalidated {
        /// The slot's name.
        slot: String,
    },
    /// An operation did not finish in time.
    #[error("{context}: no answer within {after:?}")]
    Timeout {
        /// What was being done.
        context: String,
        /// How long it was given.
        after: Duration,
    },
    /// An adapter failed for good.
    #[error("adapter {adapter}: {reason}")]
    Adapter {
        /// The adapter's name.
        adapter: String,
        /// Why.
        reason: String,
    },
    /// The bus was closed while publishing.
    #[error("bus closed")]
    BusClosed,
    /// Adapters did not drain in time on shutdown.
    #[error("shutdown: adapters did not drain within {0:?}")]
    ShutdownTimeout(Duration),
    /// Local I/O (stdout, files) failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What to do about a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Retrying cannot help: stop and report.
    Fatal,
    /// Try again after a backoff (a lost connection, a server restarting).
    Retry,
    /// Someone else holds what we need (a slot, a lease): wait as a hot standby.
    Standby,
}

impl Error {
    /// Wraps a Postgres error with what was being done.
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Postgres { context, source }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Wraps a replication client error with what was being done.
    pub fn replication(context: impl Into<String>) -> impl FnOnce(String) -> Error {
        let context = context.into();
        move |message| Error::Replication {
            context,
            sqlstate: sqlstate_in(&message),
            message,
        }
    }

    /// The server's SQLSTATE, when the error is a Postgres error response.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres { source, .. } => source.code().map(|c| c.code()),
            Error::Replication { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    /// Whether to stop, retry or stand by. The one place this is decided: by kind, and
    /// for server errors by SQLSTATE (never by message text).
    pub fn fate(&self) -> Fate {
        match self {
            Error::Config(_)
            | Error::DatabaseUrl(_)
            | Error::Tls(_)
            | Error::Extension(_)
            | Error::SourceNotReady(_)
            | Error::SlotInvalidated { .. }
            | Error::Adapter { .. }
            | Error::BusClosed => Fate::Fatal,
            _ => match self.sqlstate() {
                Some(OBJECT_IN_USE) => Fate::Standby,
                // Wrong password or role, or a database that does not exist: no
                // reconnect fixes that.
                Some(code) if code.starts_with("28") || code == "3D000" => Fate::Fatal,
                _ => Fate::Retry,
            },
        }
    }
}

/// Finds `SQLSTATE xxxxx` in a message (how pgwire-replication reports server errors).
fn sqlstate_in(message: &str) -> Option<String> {
    let at = message.find("SQLSTATE ")? + "SQLSTATE ".len();
    let code: String = message[at..].chars().take(5).collect();
    (code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric())).then_some(code)
}

/// What the server said, for display: `message (SQLSTATE x): detail (hint: ...)`, or the
/// driver's own text for errors that are not server answers (the driver prints only
/// "db error" for those that are).
struct ServerSaid<'a>(&'a tokio_postgres::Error);

impl fmt::Display for ServerSaid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(db) = self.0.as_db_error() else {
            // Connection errors: the driver's text, then its cause (e.g. the I/O error).
            write!(f, "{}", self.0)?;
            if let Some(cause) = std::error::Error::source(self.0) {
                write!(f, ": {cause}")?;
            }
            return Ok(());
        };
        write!(f, "{} (SQLSTATE {})", db.message(), db.code().code())?;
        if let Some(detail) = db.detail() {
            write!(f, ": {detail}")?;
        }
        if let Some(hint) = db.hint() {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_errors_carry_their_sqlstate() {
        let e = Error::replication("start replication")(
            "replication slot \"s\" is active for PID 7 (SQLSTATE 55006)".into(),
        );
        assert_eq!(e.sqlstate(), Some(OBJECT_IN_USE));
        assert_eq!(e.fate(), Fate::Standby);
        let e =
            Error::replication("connect")("password authentication failed (SQLSTATE 28P01)".into());
        assert_eq!(e.fate(), Fate::Fatal);
        let e = Error::replication("connect")("connection refused".into());
        assert_eq!((e.sqlstate(), e.fate()), (None, Fate::Retry));
    }

    #[test]
    fn configuration_and_source_problems_are_fatal() {
        assert_eq!(Error::Config("x".into()).fate(), Fate::Fatal);
        assert_eq!(Error::SourceNotReady("x".into()).fate(), Fate::Fatal);
        let lost = Error::DetectorDisconnected {
            detector: "queue".into(),
            reason: "connection closed".into(),
        };
        assert_eq!(lost.fate(), Fate::Retry);
    }
}
