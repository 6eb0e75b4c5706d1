//! Output formats: how an adapter writes an event. `pgpipe` is the envelope itself;
//! `cloudevents` a CloudEvents 1.0 event in structured mode (the whole event is the JSON
//! body), `cloudevents_binary` the same event in binary mode (attributes in `ce-*`
//! headers, the body is the payload; webhook and nats only); `debezium` the value of a
//! Debezium change event (`before`, `after`, `op`, `source`, `ts_ms`).
//!
//! Each adapter section has a `format` key; the adapter asks its [`Renderer`] for a body
//! (one event or a batch), its content type and the headers that go with it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::adapter::registry::Place;
use crate::config::ConfigError;
use crate::event::Event;

mod cloudevents;
mod debezium;

/// How an adapter writes events (`<section>.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// pgpipe's own envelope (the default).
    #[default]
    Pgpipe,
    /// CloudEvents 1.0, structured mode (`application/cloudevents+json`).
    Cloudevents,
    /// CloudEvents 1.0, binary mode: `ce-*` headers, the payload as the body.
    CloudeventsBinary,
    /// A Debezium change event's value.
    Debezium,
}

impl Format {
    /// Checks that the adapter at `at` can send this format: binary mode needs message
    /// headers (`has_headers`) and one event per message (`batch_size` 1).
    pub fn check(self, at: Place, has_headers: bool, batch_size: usize) -> Result<(), ConfigError> {
        if self != Format::CloudeventsBinary {
            return Ok(());
        }
        if !has_headers {
            return Err(ConfigError::InvalidFormat {
                key: at.key("format"),
                message: "cloudevents_binary puts the attributes in message headers, which \
                          this adapter has not: use format: cloudevents (structured mode)"
                    .into(),
            });
        }
        if batch_size > 1 {
            return Err(ConfigError::InvalidFormat {
                key: at.key("format"),
                message: format!(
                    "cloudevents_binary carries one event per request, but batch_size is \
                     {batch_size}: set batch_size: 1, or use format: cloudevents (a batch \
                     is then sent as application/cloudevents-batch+json)"
                ),
            });
        }
        Ok(())
    }
}

/// What the formats say about where events come from, read once from the database URL
/// (never its user name, password or parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The CloudEvents `source`: `postgres://host:port/dbname`.
    pub source: String,
    /// The database's name (Debezium's `source.db` and `source.name`).
    pub database: String,
}

impl Origin {
    /// The origin named by `database_url` (a URL or a key/value connection string).
    pub fn from_database_url(database_url: &str) -> Origin {
        let config: Option<tokio_postgres::Config> = database_url.parse().ok();
        let database = config
            .as_ref()
            .and_then(|c| c.get_dbname().map(str::to_string))
            .or_else(|| {
                config
                    .as_ref()
                    .and_then(|c| c.get_user().map(str::to_string))
            })
            .unwrap_or_else(|| "postgres".into());
        let host = config.as_ref().and_then(|c| {
            c.get_hosts().first().and_then(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
                // A socket directory is not a host name anyone else could use.
                tokio_postgres::config::Host::Unix(_) => None,
            })
        });
        let port = config
            .as_ref()
            .and_then(|c| c.get_ports().first().copied())
            .unwrap_or(5432);
        let source = match host {
            Some(host) if host.contains(':') => format!("postgres://[{host}]:{port}/{database}"),
            Some(host) => format!("postgres://{host}:{port}/{database}"),
            None => format!("postgres:///{database}"),
        };
        Origin { source, database }
    }
}

/// Renders events in one format for one adapter.
#[derive(Debug, Clone)]
pub struct Renderer {
    format: Format,
    origin: Arc<Origin>,
}

impl Renderer {
    /// A renderer of `format` for events read from `database_url`.
    pub fn new(format: Format, database_url: &str) -> Renderer {
        Renderer {
            format,
            origin: Arc::new(Origin::from_database_url(database_url)),
        }
    }

    /// One event as the body of a message (a JSON document, no trailing newline).
    pub fn body(&self, event: &Event) -> Vec<u8> {
        match self.format {
            Format::Pgpipe => serde_json::to_vec(event).expect("events serialize"),
            Format::Cloudevents => cloudevents::structured(event, &self.origin),
            Format::CloudeventsBinary => cloudevents::binary_body(event),
            Format::Debezium => serde_json::to_vec(&debezium::value(event, &self.origin))
                .expect("JSON values serialize"),
        }
    }

    /// Several events as one body: a JSON array of what [`Renderer::body`] gives each
    /// (binary mode never batches: [`Format::check`] refuses it).
    pub fn batch_body(&self, events: &[&Event]) -> Vec<u8> {
        let mut out = Vec::with_capacity(events.len() * 256 + 2);
        out.push(b'[');
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.body(event));
        }
        out.push(b']');
        out
    }

    /// The content type of a body of one event (`batch` false) or of a batch.
    pub fn content_type(&self, batch: bool) -> &'static str {
        match (self.format, batch) {
            (Format::Cloudevents, false) => "application/cloudevents+json",
            (Format::Cloudevents, true) => "application/cloudevents-batch+json",
            _ => "application/json",
        }
    }

    /// The message headers that carry the event in binary mode (`ce-specversion`, ...),
    /// none in the other formats.
    pub fn headers(&self, event: &Event) -> Vec<(String, String)> {
        match self.format {
            Format::CloudeventsBinary => cloudevents::binary_headers(event, &self.origin),
            _ => Vec::new(),
        }
    }
}

/// The payload's `schema` and `table`, for events that are table changes: read without
/// building the payload's value (the other fields are skipped, not parsed into a tree).
fn table_of(event: &Event) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        schema: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        table: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        row: Option<serde::de::IgnoredAny>,
    }
    let head: Head<'_> = serde_json::from_str(event.payload.get()).ok()?;
    head.row?;
    let table = head.table?.into_owned();
    let schema = head
        .schema
        .map_or_else(|| "public".to_string(), |s| s.into_owned());
    Some((schema, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_names_the_database_and_never_the_credentials() {
        let o = Origin::from_database_url(
            "postgres://app:s3cret@db.internal:6543/shop?sslmode=require",
        );
        assert_eq!(o.source, "postgres://db.internal:6543/shop");
        assert_eq!(o.database, "shop");
        let o =
            Origin::from_database_url("host=/var/run/postgresql dbname=test user=me password=x");
        assert_eq!(o.source, "postgres:///test");
        let o = Origin::from_database_url("postgres://me@[::1]/x");
        assert_eq!(o.source, "postgres://[::1]:5432/x");
    }

    #[test]
    fn binary_mode_needs_headers_and_single_events() {
        let at = Place::single("webhook");
        assert!(Format::CloudeventsBinary.check(at, true, 1).is_ok());
        let err = Format::CloudeventsBinary.check(at, true, 10).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("webhook.format: cloudevents_binary"),
            "{err}"
        );
        assert!(Format::CloudeventsBinary.check(at, false, 1).is_err());
        assert!(Format::Cloudevents.check(at, false, 10).is_ok());
    }
}
