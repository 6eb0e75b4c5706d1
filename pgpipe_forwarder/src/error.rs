//! Errors callers branch on. Context strings say what failed: `connect to postgres`,
//! `read queue for consumer orders`.

use std::time::Duration;

/// Errors of the forwarder library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration is invalid; the message names the key.
    #[error("{0}")]
    Config(String),
    /// A Postgres operation failed.
    #[error("{context}: {source}")]
    Postgres {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
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
}
