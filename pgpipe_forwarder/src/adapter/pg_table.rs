//! pg_table: INSERTs events into a table, in the source database or another one.
//!
//! Rows are `(id, channel, operation, payload, source, created_at)` (`pgpipe init --adapter
//! pg_table` prints the table), inserted in batches of what is queued with `ON CONFLICT
//! (id) DO NOTHING`, so a redelivered event is harmless. A batch is acknowledged once its
//! INSERT committed. A lost connection is re-established with backoff and the same batch
//! inserted again. A row the table refuses (a constraint violation or bad data: SQLSTATE
//! class 23 or 22) is found by inserting that batch row by row, and dead-lettered; the
//! others go in. Any other error (missing table, no privilege) is logged and retried, as
//! the operator can fix it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::dead_letter::DeadLetters;
use super::durable::{next_batch, park, sleep_or_cancel, Report};
use super::Adapter;
use crate::ack::Acker;
use crate::backoff::Backoff;
use crate::config::{redact_url, PgTableConfig};
use crate::db;
use crate::error::Error;
use crate::event::Delivery;

/// The pg_table adapter.
pub struct PgTable {
    name: String,
    url: String,
    table: String,
    batch_size: usize,
    backoff: Backoff,
    on_conflict: bool,
    dead_letters: DeadLetters,
    report: Report,
}

impl PgTable {
    /// A pg_table adapter named `name`; `database_url` is the source database (the target
    /// when `config.url` is empty, and where dead letters go).
    pub fn new(name: &str, config: &PgTableConfig, database_url: &str) -> PgTable {
        let url = if config.url.is_empty() {
            database_url
        } else {
            &config.url
        };
        PgTable {
            name: name.to_string(),
            url: url.to_string(),
            table: quote_table(&config.table),
            batch_size: config.batch_size.max(1),
            backoff: Backoff::new(config.backoff_base, config.backoff_cap)
                .with_floor(Duration::from_millis(100)),
            on_conflict: true,
            report: Report::new(name),
            dead_letters: DeadLetters::new(
                database_url,
                name,
                config.backoff_base,
                config.backoff_cap,
            ),
        }
    }

    async fn run_loop(
        mut self,
        mut input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        tracing::info!(component = "pg_table", adapter = %self.name, table = %self.table,
            url = %redact_url(&self.url), "pg_table adapter started");
        let ack = |seq: u64| {
            if let Some(acker) = &acker {
                acker.finished(seq);
            }
        };
        let mut client: Option<Client> = None;
        while let Some(batch) = next_batch(&mut input, self.batch_size).await {
            let mut rest: &[Delivery] = &batch;
            let mut one_by_one = false;
            while !rest.is_empty() {
                let chunk = if one_by_one { &rest[..1] } else { rest };
                let started = std::time::Instant::now();
                let result = match &client {
                    Some(c) if !c.is_closed() => self.insert(c, chunk).await,
                    _ => match db::connect(&self.url).await {
                        Ok((c, _)) => {
                            tracing::info!(component = "pg_table", adapter = %self.name, "connected");
                            self.insert(client.insert(c), chunk).await
                        }
                        Err(e) => Err(e),
                    },
                };
                match result {
                    Ok(()) => {
                        self.backoff.reset();
                        self.report.delivered(chunk, started);
                        ack(chunk[chunk.len() - 1].seq);
                        rest = &rest[chunk.len()..];
                    }
                    Err(e) if is_bad_row(&e) && chunk.len() > 1 => {
                        tracing::warn!(component = "pg_table", adapter = %self.name, error = %e,
                            rows = chunk.len(), "batch refused; inserting row by row to find the bad row");
                        one_by_one = true;
                    }
                    Err(e) if is_bad_row(&e) => {
                        let event = &chunk[0].event;
                        if !self
                            .dead_letters
                            .record(event, &e.to_string(), 1, &cancel)
                            .await
                        {
                            park(&mut input).await;
                            return Ok(());
                        }
                        ack(chunk[0].seq);
                        rest = &rest[1..];
                    }
                    Err(e)
                        if e.sqlstate() == Some(SqlState::INVALID_COLUMN_REFERENCE.code())
                            && self.on_conflict =>
                    {
                        tracing::warn!(component = "pg_table", adapter = %self.name, table = %self.table,
                            "the table has no unique key on id: inserting without ON CONFLICT (id) \
                             DO NOTHING, so redelivered events become duplicate rows");
                        self.on_conflict = false;
                    }
                    Err(e) => {
                        self.report.failed(&e.to_string());
                        let delay = self.backoff.next_delay();
                        tracing::error!(component = "pg_table", adapter = %self.name, table = %self.table,
                            error = %e, retry_in = ?delay, "insert failed; retrying the batch");
                        if client.as_ref().is_some_and(Client::is_closed) {
                            client = None;
                        }
                        if !sleep_or_cancel(delay, &cancel).await {
                            park(&mut input).await;
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn insert(&self, client: &Client, rows: &[Delivery]) -> Result<(), Error> {
        let mut ids: Vec<Uuid> = Vec::with_capacity(rows.len());
        let mut channels: Vec<&str> = Vec::with_capacity(rows.len());
        let mut operations: Vec<&str> = Vec::with_capacity(rows.len());
        let mut payloads: Vec<&serde_json::Value> = Vec::with_capacity(rows.len());
        let mut sources: Vec<&str> = Vec::with_capacity(rows.len());
        let mut created: Vec<DateTime<Utc>> = Vec::with_capacity(rows.len());
        for d in rows {
            let e = &*d.event;
            ids.push(e.id);
            channels.push(&e.channel);
            operations.push(&e.operation);
            payloads.push(&e.payload);
            sources.push(&e.source);
            created.push(e.created_at);
        }
        let sql = insert_sql(&self.table, self.on_conflict);
        client
            .execute(
                &sql,
                &[&ids, &channels, &operations, &payloads, &sources, &created],
            )
            .await
            .map_err(Error::pg(format!("insert into {}", self.table)))?;
        Ok(())
    }
}

/// The INSERT of a batch passed as six arrays.
fn insert_sql(table: &str, on_conflict: bool) -> String {
    format!(
        "INSERT INTO {table} (id, channel, operation, payload, source, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[], \
         $6::timestamptz[]){}",
        if on_conflict {
            " ON CONFLICT (id) DO NOTHING"
        } else {
            ""
        }
    )
}

/// `schema.table` or `table`, each part double-quoted (names are taken literally).
pub fn quote_table(table: &str) -> String {
    table
        .trim()
        .splitn(2, '.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A row the table refuses for good: integrity constraint (23) or data exception (22).
fn is_bad_row(e: &Error) -> bool {
    e.sqlstate()
        .is_some_and(|c| c.starts_with("23") || c.starts_with("22"))
}

impl Adapter for PgTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn durable(&self) -> bool {
        true
    }

    fn set_health(&mut self, health: crate::health::Component) {
        self.report.set_health(health);
    }

    fn run(
        self: Box<Self>,
        input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.run_loop(input, acker, cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_literally() {
        assert_eq!(quote_table("pgpipe_events"), "\"pgpipe_events\"");
        assert_eq!(quote_table("audit.Events"), "\"audit\".\"Events\"");
        assert_eq!(quote_table("a\"b"), "\"a\"\"b\"");
        assert!(insert_sql("\"t\"", true).ends_with("ON CONFLICT (id) DO NOTHING"));
        assert!(!insert_sql("\"t\"", false).contains("ON CONFLICT"));
    }
}
