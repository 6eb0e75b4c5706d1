//! The one typed client of the extension's SQL API (`pgpipe.read`, `pgpipe.ack`,
//! `pgpipe.events_after`, `pgpipe.dead_letter`, ...). Every SQL text the forwarder sends
//! to the extension lives here, and queue rows become [`Event`]s in one place.

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use crate::error::Error;
use crate::event::{Event, Transaction};

/// The event columns, in the order [`event_from_row`] reads them from `offset` on.
const EVENT_COLUMNS: &str = "id, channel, operation, payload, source, created_at, xid::text";

/// One row of a `pgpipe.read` page: the position after it, and its event (none for a
/// row that only moves the position past an empty batch).
#[derive(Debug)]
pub struct QueueRow {
    /// The position to acknowledge once this row is handled.
    pub position: String,
    /// The event, if the row carries one.
    pub event: Option<Event>,
}

/// The extension's SQL API on one connection.
#[derive(Clone, Copy)]
pub struct QueueClient<'a> {
    client: &'a Client,
}

impl<'a> QueueClient<'a> {
    /// The API on `client`.
    pub fn new(client: &'a Client) -> Self {
        QueueClient { client }
    }

    /// Whether the pgpipe extension is installed in this database.
    pub async fn has_extension(&self) -> Result<bool, Error> {
        let row = self
            .client
            .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pgpipe'", &[])
            .await
            .map_err(Error::pg("look for the pgpipe extension"))?;
        Ok(row.is_some())
    }

    /// Registers `consumer` for `channels` (idempotent); returns its acknowledged position.
    pub async fn register(&self, consumer: &str, channels: &[String]) -> Result<String, Error> {
        let channels: Option<Vec<String>> = Some(channels.to_vec());
        let row = self
            .client
            .query_one(
                "SELECT pgpipe.register_consumer($1, $2)",
                &[&consumer, &channels],
            )
            .await
            .map_err(Error::pg(format!("register consumer {consumer}")))?;
        Ok(row.get(0))
    }

    /// Tries to take `consumer`'s lease; `false` while another session holds it.
    pub async fn try_claim(&self, consumer: &str) -> Result<bool, Error> {
        let row = self
            .client
            .query_one("SELECT pgpipe.try_claim_consumer($1)", &[&consumer])
            .await
            .map_err(Error::pg(format!("claim consumer {consumer}")))?;
        Ok(row.get(0))
    }

    /// Reads at most `limit` rows after `position` for `consumer`.
    pub async fn read(
        &self,
        consumer: &str,
        position: &str,
        limit: i32,
    ) -> Result<Vec<QueueRow>, Error> {
        let sql = format!("SELECT position, {EVENT_COLUMNS} FROM pgpipe.read($1, $2, $3)");
        let rows = self
            .client
            .query(&sql, &[&consumer, &position, &limit])
            .await
            .map_err(Error::pg(format!("read queue for consumer {consumer}")))?;
        rows.iter()
            .map(|row| {
                let id: Option<Uuid> = row.get(1);
                Ok(QueueRow {
                    position: row.get(0),
                    event: id.map(|id| event_from_row(id, row, 1)).transpose()?,
                })
            })
            .collect()
    }

    /// Acknowledges `position` for `consumer`.
    pub async fn ack(&self, consumer: &str, position: &str) -> Result<(), Error> {
        self.client
            .execute("SELECT pgpipe.ack($1, $2)", &[&consumer, &position])
            .await
            .map_err(Error::pg(format!("ack consumer {consumer}")))?;
        Ok(())
    }

    /// Runs queue retention (`pgpipe.rotate()`); returns `(action, partition)` rows.
    pub async fn rotate(&self) -> Result<Vec<(String, Option<String>)>, Error> {
        let rows = self
            .client
            .query("SELECT action, partition_name FROM pgpipe.rotate()", &[])
            .await
            .map_err(Error::pg("rotate the queue"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The events committed after event `after` (SSE replay), at most `max`.
    pub async fn events_after(
        &self,
        after: Uuid,
        channels: Option<&[String]>,
        max: i32,
    ) -> Result<Vec<Event>, Error> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM pgpipe.events_after($1, $2, $3)");
        let channels: Option<Vec<String>> = channels.map(<[String]>::to_vec);
        let rows = self
            .client
            .query(&sql, &[&after, &channels, &max])
            .await
            .map_err(Error::pg("replay events from the queue"))?;
        rows.iter()
            .map(|row| event_from_row(row.get(0), row, 0))
            .collect()
    }

    /// Events `consumer` has not acknowledged yet (0 for an unknown consumer).
    pub async fn consumer_lag(&self, consumer: &str) -> Result<i64, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT pending_events FROM pgpipe.consumer_lag WHERE name = $1",
                &[&consumer],
            )
            .await
            .map_err(Error::pg("measure queue lag"))?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// The consumers `pgpipe.status()` calls stale (no ack for
    /// `pgpipe.consumer_stale_after`): the role's own, or all for an admin.
    pub async fn stale_consumers(&self) -> Result<Vec<String>, Error> {
        let row = self
            .client
            .query_one("SELECT stale_consumers FROM pgpipe.status()", &[])
            .await
            .map_err(Error::pg("look for stale consumers"))?;
        Ok(row.get::<_, Option<Vec<String>>>(0).unwrap_or_default())
    }

    /// Records `event` as a dead letter of `adapter`; returns the dead letter's id.
    pub async fn dead_letter(
        &self,
        event: &Event,
        adapter: &str,
        error: &str,
        attempts: u32,
    ) -> Result<i64, Error> {
        let json = serde_json::to_value(event).expect("an Event always serializes");
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        let row = self
            .client
            .query_one(
                "SELECT pgpipe.dead_letter($1::jsonb, $2, $3, $4)",
                &[&json, &adapter, &error, &attempts],
            )
            .await
            .map_err(Error::pg("write dead letter"))?;
        Ok(row.get(0))
    }
}

/// The event in `row`'s [`EVENT_COLUMNS`], which start at column `offset` (`id` given).
fn event_from_row(id: Uuid, row: &Row, offset: usize) -> Result<Event, Error> {
    let xid: Option<String> = row.get(offset + 6);
    let transaction = match xid {
        None => None,
        Some(xid) => Some(Transaction {
            xid: xid
                .parse()
                .map_err(|_| Error::Extension(format!("unexpected xid {xid:?}")))?,
            commit_time: None,
            seq: None,
        }),
    };
    Ok(Event {
        id,
        channel: row.get(offset + 1),
        operation: row.get(offset + 2),
        payload: row.get(offset + 3),
        source: row.get(offset + 4),
        created_at: row.get::<_, DateTime<Utc>>(offset + 5),
        transaction,
    })
}
