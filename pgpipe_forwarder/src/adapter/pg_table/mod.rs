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
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::adapter::dead_letter::DeadLetters;
use crate::adapter::durable::{Durable, Failure, Policy, Sink};

mod config;

use crate::config::redact_url;
use crate::db;
use crate::error::Error;
use crate::event::Delivery;
pub use config::{Flags, PgTableConfig, KIND};

/// The pg_table sink (run by the delivery driver, see [`PgTable::adapter`]).
pub struct PgTable {
    name: String,
    url: String,
    table: String,
    on_conflict: bool,
    client: Option<Client>,
}

impl PgTable {
    /// The adapter named `name`; `database_url` is the source database (the target when
    /// `config.url` is empty, and where dead letters go). Retries never give up: the
    /// operator can fix a missing table or privilege, and nothing is dropped meanwhile.
    pub fn adapter(name: &str, config: &PgTableConfig, database_url: &str) -> Durable<PgTable> {
        let url = if config.url.is_empty() {
            database_url
        } else {
            &config.url
        };
        let sink = PgTable {
            name: name.to_string(),
            url: url.to_string(),
            table: quote_table(&config.table),
            on_conflict: true,
            client: None,
        };
        let policy = Policy::new(
            config.batch_size,
            config.backoff_base,
            config.backoff_cap,
            None,
        );
        let dead_letters =
            DeadLetters::new(database_url, name, config.backoff_base, config.backoff_cap);
        Durable::new(name, sink, policy, Some(dead_letters))
    }

    /// Inserts `rows` once, connecting first when needed.
    async fn insert_batch(&mut self, rows: &[Delivery]) -> Result<(), Failure> {
        loop {
            let (table, on_conflict) = (&self.table, self.on_conflict);
            let result = match &self.client {
                Some(c) if !c.is_closed() => insert(c, table, on_conflict, rows).await,
                _ => match db::connect(&self.url).await {
                    Ok((c, _)) => {
                        tracing::info!(component = "pg_table", adapter = %self.name, "connected");
                        let c = self.client.insert(c);
                        insert(c, table, on_conflict, rows).await
                    }
                    Err(e) => Err(e),
                },
            };
            let Err(e) = result else { return Ok(()) };
            if e.sqlstate() == Some(SqlState::INVALID_COLUMN_REFERENCE.code()) && self.on_conflict {
                tracing::warn!(component = "pg_table", adapter = %self.name, table = %self.table,
                    "the table has no unique key on id: inserting without ON CONFLICT (id) \
                     DO NOTHING, so redelivered events become duplicate rows");
                self.on_conflict = false;
                continue;
            }
            if is_bad_row(&e) {
                return Err(Failure::BadEvent {
                    error: e.to_string(),
                });
            }
            if self.client.as_ref().is_some_and(Client::is_closed) {
                self.client = None;
            }
            return Err(Failure::retry(e.to_string()));
        }
    }
}

/// One INSERT of `rows` into `table`.
async fn insert(
    client: &Client,
    table: &str,
    on_conflict: bool,
    rows: &[Delivery],
) -> Result<(), Error> {
    let mut ids: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut channels: Vec<&str> = Vec::with_capacity(rows.len());
    let mut operations: Vec<&str> = Vec::with_capacity(rows.len());
    let mut payloads: Vec<&crate::event::Payload> = Vec::with_capacity(rows.len());
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
    let sql = insert_sql(table, on_conflict);
    client
        .execute(
            &sql,
            &[&ids, &channels, &operations, &payloads, &sources, &created],
        )
        .await
        .map_err(Error::pg(format!("insert into {table}")))?;
    Ok(())
}

/// The table `pgpipe init --adapter pg_table` prints, for the quoted name `table`: the
/// columns this adapter inserts, the event id as primary key (redeliveries are no-ops).
pub fn table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    \
         id         uuid        PRIMARY KEY,\n    \
         channel    text        NOT NULL,\n    \
         operation  text        NOT NULL,\n    \
         payload    jsonb       NOT NULL,\n    \
         source     text        NOT NULL,\n    \
         created_at timestamptz NOT NULL\n);\n",
        table
    )
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

impl Sink for PgTable {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.insert_batch(batch))
    }

    fn retrying(&mut self, error: &str, _attempt: u32, delay: Duration) {
        tracing::error!(component = "pg_table", adapter = %self.name, table = %self.table,
            error, retry_in = ?delay, "insert failed; retrying the batch");
    }

    fn started(&self) {
        tracing::info!(component = "pg_table", adapter = %self.name, table = %self.table,
            url = %redact_url(&self.url), "pg_table adapter started");
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
