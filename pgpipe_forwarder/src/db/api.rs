//! The one typed client of the extension's SQL API (`pgpipe.read`, `pgpipe.ack`,
//! `pgpipe.events_after`, `pgpipe.dead_letter`, ...). Every SQL text the forwarder sends
//! to the extension lives here, and queue rows become [`Event`]s in one place.

use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use crate::error::Error;
use crate::event::{Event, Transaction};

/// The event columns, in the order [`event_from_row`] reads them from `offset` on.
const EVENT_COLUMNS: &str = "id, channel, operation, payload, source, created_at, xid::text, key";

/// One row of a `pgpipe.read` page: the position after it, and its event (none for a
/// row that only moves the position past an empty batch).
#[derive(Debug)]
pub struct QueueRow {
    /// The position to acknowledge once this row is handled.
    pub position: String,
    /// The event, if the row carries one.
    pub event: Option<Event>,
}

/// One row of `pgpipe.dead_letters`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The dead letter's id.
    pub id: i64,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's channel.
    pub channel: String,
    /// The whole event, as JSON.
    pub event: serde_json::Value,
    /// The adapter that gave up on it.
    pub adapter: String,
    /// Why it gave up.
    pub error: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When it gave up.
    pub failed_at: DateTime<Utc>,
}

/// Which dead letters: of one adapter (`None`: all), with these ids (empty: any).
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterFilter<'a> {
    /// Only those of this adapter.
    pub adapter: Option<&'a str>,
    /// Only these ids.
    pub ids: &'a [i64],
}

/// One consumer's position and lag (`pgpipe.consumer_lag`).
#[derive(Debug, Clone)]
pub struct ConsumerLag {
    /// Consumer name.
    pub name: String,
    /// Its channels (`None`: all).
    pub channels: Option<Vec<String>>,
    /// Its acknowledged position.
    pub position: String,
    /// When it last acknowledged.
    pub acked_at: Option<DateTime<Utc>>,
    /// Events it has not acknowledged.
    pub pending_events: i64,
    /// The oldest of those.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// The role that registered it.
    pub owner: Option<String>,
    /// The session holding its lease (pid, application, client address).
    pub holder: Option<String>,
    /// No acknowledgement for `pgpipe.consumer_stale_after`.
    pub stale: Option<bool>,
    /// It keeps the oldest events in the queue.
    pub holds_retention: Option<bool>,
}

/// One member of a consumer group (`pgpipe.group_members`).
#[derive(Debug, Clone)]
pub struct GroupMember {
    /// The group.
    pub group: String,
    /// The member (a consumer name).
    pub member: String,
    /// Its session holds its lease and it was seen within the group's member timeout.
    pub alive: Option<bool>,
    /// The group's open (or last) batch.
    pub batch: i64,
    /// Slots it holds in the open batch.
    pub slots: i64,
    /// Events the group gave it.
    pub events: i64,
    /// Its fraction of the group's events.
    pub share: Option<f64>,
    /// The session holding its lease.
    pub holder: Option<String>,
}

/// One captured table (`pgpipe.subscriptions`).
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The table, as `regclass` text.
    pub table: String,
    /// Its channel.
    pub channel: String,
    /// Captured operations (`None`: all).
    pub operations: Option<Vec<String>>,
    /// `trigger` or `wal`.
    pub mode: String,
}

/// A snapshot of a table and its progress (`pgpipe status`, from `pgpipe.snapshots`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The table, schema-qualified.
    pub table: String,
    /// `running`, `done`, `failed` or `cancelled`.
    pub state: String,
    /// Rows queued as READ events so far.
    pub rows: i64,
    /// Chunks read so far.
    pub chunks: i64,
    /// When it was started.
    pub started: DateTime<Utc>,
    /// When it ended, if it did.
    pub finished: Option<DateTime<Utc>>,
    /// Why it failed or was cancelled, if it says.
    pub error: Option<String>,
}

/// Dead letters of one adapter (`pgpipe status`).
#[derive(Debug, Clone)]
pub struct DeadLetterCount {
    /// The adapter.
    pub adapter: String,
    /// How many.
    pub count: i64,
    /// The newest one's time.
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// The background worker's state (`pgpipe.status()`).
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Its state.
    pub state: Option<String>,
    /// Its process id.
    pub pid: Option<i32>,
    /// The slot it reads.
    pub slot_name: Option<String>,
    /// The slot's WAL status.
    pub slot_status: Option<String>,
    /// Bytes of WAL behind.
    pub lag_bytes: Option<String>,
    /// Events it wrote.
    pub events_written: Option<i64>,
    /// Its last error.
    pub last_error: Option<String>,
    /// More about its state.
    pub detail: Option<String>,
}

/// The extension's SQL API on one connection.
#[derive(Clone)]
pub struct QueueClient<'a> {
    client: &'a Client,
    /// The statements a detector runs for every page, prepared once per connection (a
    /// text query is parsed and planned again each time, one more round trip).
    read: OnceCell<Statement>,
    ack: OnceCell<Statement>,
    read_group: OnceCell<Statement>,
}

impl<'a> QueueClient<'a> {
    /// The API on `client`.
    pub fn new(client: &'a Client) -> Self {
        QueueClient {
            client,
            read: OnceCell::new(),
            ack: OnceCell::new(),
            read_group: OnceCell::new(),
        }
    }

    /// Runs `sql`, prepared on this connection (into `cell`) the first time.
    async fn query_prepared(
        &self,
        cell: &OnceCell<Statement>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = cell.get_or_try_init(|| self.client.prepare(sql)).await?;
        self.client.query(statement, params).await
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
    pub async fn register(
        &self,
        consumer: &str,
        channels: &[String],
        start: &str,
    ) -> Result<String, Error> {
        let channels: Option<Vec<String>> = Some(channels.to_vec());
        let row = self
            .client
            .query_one(
                "SELECT pgpipe.register_consumer($1, $2, $3)",
                &[&consumer, &channels, &start],
            )
            .await
            .map_err(Error::pg(format!("register consumer {consumer}")))?;
        Ok(row.get(0))
    }

    /// Who holds `consumer`'s lease (`pid 123 (pgpipe) from 10.0.0.5`), if anyone does and
    /// this role may see it.
    pub async fn holder(&self, consumer: &str) -> Result<Option<String>, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT holder FROM pgpipe.consumer_lag WHERE name = $1",
                &[&consumer],
            )
            .await
            .map_err(Error::pg(format!("look up consumer {consumer}")))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The channels of `channels` that no subscription carries (only `pgpipe.emit` could
    /// produce events on them).
    pub async fn unsubscribed_channels(&self, channels: &[String]) -> Result<Vec<String>, Error> {
        let rows = self
            .client
            .query(
                "SELECT c FROM unnest($1::text[]) AS c \
                 WHERE NOT EXISTS (SELECT 1 FROM pgpipe.subscriptions s WHERE s.channel = c)",
                &[&channels],
            )
            .await
            .map_err(Error::pg("look up subscriptions"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Whether a consumer named `consumer` exists (and this role may see it).
    pub async fn consumer_exists(&self, consumer: &str) -> Result<bool, Error> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pgpipe.consumer_lag WHERE name = $1)",
                &[&consumer],
            )
            .await
            .map_err(Error::pg(format!("look up consumer {consumer}")))?;
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
            .query_prepared(&self.read, &sql, &[&consumer, &position, &limit])
            .await
            .map_err(|e| Error::pg(format!("read queue for consumer {consumer}"))(e))?;
        queue_rows(&rows)
    }

    /// Acknowledges `position` for `consumer`.
    pub async fn ack(&self, consumer: &str, position: &str) -> Result<(), Error> {
        self.query_prepared(
            &self.ack,
            "SELECT pgpipe.ack($1, $2)",
            &[&consumer, &position],
        )
        .await
        .map_err(|e| Error::pg(format!("ack consumer {consumer}"))(e))?;
        Ok(())
    }

    /// Joins consumer group `group` as `member` for `channels` (the group is made on first
    /// use) and takes the member's lease; returns its position, `None` while another
    /// session holds this member.
    pub async fn join_group(
        &self,
        group: &str,
        member: &str,
        channels: &[String],
        member_timeout: std::time::Duration,
    ) -> Result<Option<String>, Error> {
        let channels: Option<Vec<String>> = Some(channels.to_vec());
        let row = self
            .client
            .query_one(
                "SELECT pgpipe.join_group($1, $2, $3, 'beginning', make_interval(secs => $4))",
                &[&group, &member, &channels, &member_timeout.as_secs_f64()],
            )
            .await
            .map_err(Error::pg(format!(
                "join consumer group {group} as {member}"
            )))?;
        Ok(row.get(0))
    }

    /// Reads at most `limit` rows of `member`'s share after `position`.
    pub async fn read_group(
        &self,
        member: &str,
        position: &str,
        limit: i32,
    ) -> Result<Vec<QueueRow>, Error> {
        let sql = format!("SELECT position, {EVENT_COLUMNS} FROM pgpipe.read_group($1, $2, $3)");
        let rows = self
            .query_prepared(&self.read_group, &sql, &[&member, &position, &limit])
            .await
            .map_err(|e| Error::pg(format!("read the queue as group member {member}"))(e))?;
        queue_rows(&rows)
    }

    /// Acknowledges `position` for group member `member`.
    pub async fn ack_group(&self, member: &str, position: &str) -> Result<(), Error> {
        self.client
            .execute("SELECT pgpipe.ack_group($1, $2)", &[&member, &position])
            .await
            .map_err(Error::pg(format!("ack group member {member}")))?;
        Ok(())
    }

    /// Tells the group that `member` is alive while it reads nothing.
    pub async fn group_heartbeat(&self, member: &str) -> Result<(), Error> {
        self.client
            .execute("SELECT pgpipe.group_heartbeat($1)", &[&member])
            .await
            .map_err(Error::pg(format!("keep group member {member} alive")))?;
        Ok(())
    }

    /// Leaves the group `member` belongs to (its unfinished share goes to the others).
    pub async fn leave_group(&self, member: &str) -> Result<(), Error> {
        self.client
            .execute("SELECT pgpipe.leave_group($1)", &[&member])
            .await
            .map_err(Error::pg(format!("leave the consumer group as {member}")))?;
        Ok(())
    }

    /// Every consumer group member this role may see (`pgpipe.group_members`).
    pub async fn group_members(&self) -> Result<Vec<GroupMember>, Error> {
        let rows = self
            .client
            .query(
                "SELECT \"group\", member, alive, batch, slots, events, share::float8, holder \
                 FROM pgpipe.group_members ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.group_members"))?;
        Ok(rows
            .iter()
            .map(|r| GroupMember {
                group: r.get(0),
                member: r.get(1),
                alive: r.get(2),
                batch: r.get(3),
                slots: r.get(4),
                events: r.get(5),
                share: r.get(6),
                holder: r.get(7),
            })
            .collect())
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

    /// The installed extension's version, if it is installed.
    pub async fn extension_version(&self) -> Result<Option<String>, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'",
                &[],
            )
            .await
            .map_err(Error::pg("look for the pgpipe extension"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Whether relation `name` exists (objects of older extension versions may not).
    pub async fn has_relation(&self, name: &str) -> bool {
        self.client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
    }

    /// Whether function `signature` exists.
    pub async fn has_function(&self, signature: &str) -> bool {
        self.client
            .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&signature])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
    }

    /// Every consumer's position and lag, by name.
    pub async fn consumer_lags(&self) -> Result<Vec<ConsumerLag>, Error> {
        let rows = self
            .client
            .query(
                "SELECT name, channels, position, acked_at, pending_events, oldest_pending_at, \
                 owner::text, holder, stale, holds_retention \
                 FROM pgpipe.consumer_lag ORDER BY name",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.consumer_lag"))?;
        Ok(rows
            .iter()
            .map(|r| ConsumerLag {
                name: r.get(0),
                channels: r.get(1),
                position: r.get(2),
                acked_at: r.get(3),
                pending_events: r.get(4),
                oldest_pending_at: r.get(5),
                owner: r.get(6),
                holder: r.get(7),
                stale: r.get(8),
                holds_retention: r.get(9),
            })
            .collect())
    }

    /// Every captured table, by name.
    pub async fn subscriptions(&self) -> Result<Vec<Subscription>, Error> {
        let rows = self
            .client
            .query(
                "SELECT \"table\"::text, channel, operations, mode FROM pgpipe.subscriptions \
                 ORDER BY 1",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.subscriptions"))?;
        Ok(rows
            .iter()
            .map(|r| Subscription {
                table: r.get(0),
                channel: r.get(1),
                operations: r.get(2),
                mode: r.get(3),
            })
            .collect())
    }

    /// The snapshots of the tables the role may read, newest first.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, Error> {
        let rows = self
            .client
            .query(
                "SELECT \"table\", state, rows, chunks, started, finished, error \
                 FROM pgpipe.snapshots ORDER BY id DESC",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.snapshots"))?;
        Ok(rows
            .iter()
            .map(|r| Snapshot {
                table: r.get(0),
                state: r.get(1),
                rows: r.get(2),
                chunks: r.get(3),
                started: r.get(4),
                finished: r.get(5),
                error: r.get(6),
            })
            .collect())
    }

    /// Dead letters per adapter.
    pub async fn dead_letter_counts(&self) -> Result<Vec<DeadLetterCount>, Error> {
        let rows = self
            .client
            .query(
                "SELECT adapter, count(*), max(failed_at) FROM pgpipe.dead_letters \
                 GROUP BY adapter ORDER BY adapter",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.dead_letters"))?;
        Ok(rows
            .iter()
            .map(|r| DeadLetterCount {
                adapter: r.get(0),
                count: r.get(1),
                last_failed_at: r.get(2),
            })
            .collect())
    }

    /// The background worker's state, if the extension reports one.
    pub async fn worker_status(&self) -> Result<Option<WorkerStatus>, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT worker_state, worker_pid, slot_name, slot_status, lag_bytes::text, \
                 events_written, last_error, detail FROM pgpipe.status()",
                &[],
            )
            .await
            .map_err(Error::pg("read pgpipe.status()"))?;
        Ok(row.map(|r| WorkerStatus {
            state: r.get(0),
            pid: r.get(1),
            slot_name: r.get(2),
            slot_status: r.get(3),
            lag_bytes: r.get(4),
            events_written: r.get(5),
            last_error: r.get(6),
            detail: r.get(7),
        }))
    }

    /// Dead letters matching `filter`, oldest first, at most `limit`.
    pub async fn dead_letters(
        &self,
        filter: DeadLetterFilter<'_>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, Error> {
        let rows = self
            .client
            .query(
                "SELECT id, event_id, channel, event, adapter, error, attempts, failed_at \
                 FROM pgpipe.dead_letters \
                 WHERE ($1::text IS NULL OR adapter = $1) \
                   AND (cardinality($2::bigint[]) = 0 OR id = ANY($2)) \
                 ORDER BY id LIMIT $3",
                &[&filter.adapter, &filter.ids, &limit],
            )
            .await
            .map_err(Error::pg("read pgpipe.dead_letters"))?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                event_id: r.get(1),
                channel: r.get(2),
                event: r.get(3),
                adapter: r.get(4),
                error: r.get(5),
                attempts: r.get(6),
                failed_at: r.get(7),
            })
            .collect())
    }

    /// Ids of dead letters newer than `after` for these events (they failed again).
    pub async fn dead_letters_again(&self, after: i64, events: &[Uuid]) -> Result<Vec<i64>, Error> {
        let rows = self
            .client
            .query(
                "SELECT id FROM pgpipe.dead_letters WHERE id > $1 AND event_id = ANY($2) ORDER BY id",
                &[&after, &events],
            )
            .await
            .map_err(Error::pg("read pgpipe.dead_letters"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Deletes the dead letters with these ids; returns how many went.
    pub async fn delete_dead_letters(&self, ids: &[i64]) -> Result<u64, Error> {
        self.client
            .execute(
                "DELETE FROM pgpipe.dead_letters WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(Error::pg("delete replayed dead letters"))
    }

    /// Deletes the dead letters matching `filter` that failed more than `older_than`
    /// (a Postgres interval text) ago, or all of them; returns how many went.
    pub async fn purge_dead_letters(
        &self,
        filter: DeadLetterFilter<'_>,
        older_than: Option<&str>,
    ) -> Result<u64, Error> {
        self.client
            .execute(
                "DELETE FROM pgpipe.dead_letters \
                 WHERE ($1::text IS NULL OR adapter = $1) \
                   AND (cardinality($2::bigint[]) = 0 OR id = ANY($2)) \
                   AND ($3::text IS NULL OR failed_at < now() - $3::interval)",
                &[&filter.adapter, &filter.ids, &older_than],
            )
            .await
            .map_err(Error::pg("delete dead letters"))
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

/// The rows of a `pgpipe.read` (or `read_group`) page.
fn queue_rows(rows: &[Row]) -> Result<Vec<QueueRow>, Error> {
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
        key: row.get(offset + 7),
        source: row.get(offset + 4),
        created_at: row.get::<_, DateTime<Utc>>(offset + 5),
        transaction,
    })
}
