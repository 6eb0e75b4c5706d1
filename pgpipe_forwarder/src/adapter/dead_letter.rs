//! Dead letters: an event an adapter gave up on is recorded in `pgpipe.dead_letters` (in the
//! source database, through `pgpipe.dead_letter()`), and only then acknowledged.
//!
//! Writing a dead letter is itself retried until it succeeds: a dead letter that could not
//! be written would otherwise be a lost event. When the source database has no pgpipe
//! extension (the `listen_notify` and `wal` detectors work without it), there is nowhere
//! to put the event: the adapter logs an error naming the event and keeps retrying at the
//! backoff cap, holding everything behind it, until the extension is installed or the
//! operator fixes the destination. Nothing is dropped silently.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::durable::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::db::{self, QueueClient};
use crate::error::Error;
use crate::event::Event;

/// Writes an adapter's dead letters to the source database on a connection of its own.
pub struct DeadLetters {
    url: String,
    adapter: String,
    client: Option<Client>,
    backoff: Backoff,
    cap: Duration,
}

impl DeadLetters {
    /// Dead letters of adapter `adapter`, written to the database at `url`; failed writes
    /// are retried with backoff from `base` to `cap`.
    pub fn new(url: &str, adapter: &str, base: Duration, cap: Duration) -> Self {
        DeadLetters {
            url: url.to_string(),
            adapter: adapter.to_string(),
            client: None,
            backoff: Backoff::new(base, cap).with_floor(Duration::from_millis(100)),
            cap,
        }
    }

    /// Records `event` as undeliverable after `attempts` attempts ending in `error`.
    /// Retries until the row is written; returns `false` only when shutdown started first
    /// (the event then stays unacknowledged).
    pub async fn record(
        &mut self,
        event: &Event,
        error: &str,
        attempts: u32,
        cancel: &CancellationToken,
    ) -> bool {
        loop {
            match self.try_record(event, error, attempts).await {
                Ok(id) => {
                    self.backoff.reset();
                    crate::metrics::dead_letters(1);
                    tracing::error!(component = "dead_letter", adapter = %self.adapter,
                        event_id = %event.id, channel = %event.channel, attempts, error,
                        dead_letter_id = id, "event dead-lettered");
                    return true;
                }
                Err(e) => {
                    let missing = [SqlState::UNDEFINED_FUNCTION, SqlState::INVALID_SCHEMA_NAME]
                        .iter()
                        .any(|c| e.sqlstate() == Some(c.code()));
                    let delay = if missing {
                        self.cap
                    } else {
                        self.backoff.next_delay()
                    };
                    if missing {
                        tracing::error!(component = "dead_letter", adapter = %self.adapter,
                            event_id = %event.id, channel = %event.channel, delivery_error = error,
                            "cannot dead-letter: pgpipe.dead_letters does not exist in the source \
                             database (CREATE EXTENSION pgpipe); holding the event and retrying");
                    } else {
                        tracing::warn!(component = "dead_letter", adapter = %self.adapter,
                            event_id = %event.id, error = %e, retry_in = ?delay,
                            "writing a dead letter failed; retrying");
                    }
                    self.client = None;
                    if !sleep_or_cancel(delay, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn try_record(
        &mut self,
        event: &Event,
        error: &str,
        attempts: u32,
    ) -> Result<i64, Error> {
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let (client, _) = db::connect(&self.url).await?;
                self.client.insert(client)
            }
        };
        QueueClient::new(client)
            .dead_letter(event, &self.adapter, error, attempts)
            .await
    }
}
