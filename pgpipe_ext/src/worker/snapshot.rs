//! Snapshots: the worker queues the rows already in a subscribed table as READ events,
//! one chunk per transaction (the SQL side, and why the result is consistent with the
//! change stream, is in sql/snapshot.sql).
//!
//! A chunk: find the chunk's upper key, read its rows `FOR SHARE` and turn them into
//! JSON — both as the table's owner inside a security-restricted operation, because the
//! key's casts and comparisons and `to_jsonb` may run code that owner wrote — then, as
//! the worker again, queue the READ events and record the chunk, all in one transaction.
//! A crash loses at most the chunk in flight, which the next run reads again.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::convert::Restricted;
use super::in_transaction;
use crate::guc;

/// Consecutive failed attempts at one snapshot's chunk after which the snapshot ends as
/// `failed`: an error in the table's own code (a cast, an output function) would repeat
/// forever. Waiting too long for a lock (a long writer, ALTER TABLE) or a deadlock with
/// a writer is only retried.
const MAX_ATTEMPTS: u32 = 5;

/// What one step did.
pub enum Step {
    /// No snapshot is running.
    Idle,
    /// A chunk of `rows` rows was queued; `done` when it was the table's last.
    Chunk { rows: u64, done: bool },
}

/// The snapshots the worker runs, one chunk at a time.
#[derive(Default)]
pub struct Snapshots {
    /// The snapshot whose last chunks failed, and how many times in a row.
    failing: Option<(i64, u32)>,
}

impl Snapshots {
    /// Reads and queues the next chunk of the oldest running snapshot, if any. An error
    /// comes back as its message (the transaction is rolled back; the chunk is read
    /// again next time, or the snapshot is ended as failed after [`MAX_ATTEMPTS`]).
    pub fn step(&mut self) -> Result<Step, String> {
        let job = Cell::new(None);
        let result = in_transaction(AssertUnwindSafe(|| {
            Spi::connect_mut(|client| chunk(client, &job))
        }));
        match result {
            Ok(step) => {
                self.failing = None;
                Ok(step)
            }
            Err(message) if waited_for_a_lock(&message) => Err(message),
            Err(message) => {
                if let Some(id) = job.get() {
                    let attempts = match self.failing {
                        Some((failed, n)) if failed == id => n + 1,
                        _ => 1,
                    };
                    self.failing = Some((id, attempts));
                    if attempts >= MAX_ATTEMPTS {
                        self.failing = None;
                        let ended = in_transaction(|| {
                            Spi::run_with_args(
                                "SELECT pgpipe.fail_snapshot($1, $2)",
                                &[id.into(), message.as_str().into()],
                            )
                        });
                        if let Ok(Ok(())) = ended {
                            warning!(
                                "pgpipe worker: snapshot {id} failed {attempts} times in a row \
                                 and is ended as failed: {message}"
                            );
                        }
                    }
                }
                Err(message)
            }
        }
    }
}

/// One chunk, inside the caller's transaction. Sets `job` as soon as it is known, so a
/// failure can be counted against it.
fn chunk(client: &mut SpiClient<'_>, job: &Cell<Option<i64>>) -> Step {
    let installed = client
        .select(
            "SELECT pg_catalog.to_regprocedure('pgpipe.snapshot_next_chunk()') IS NOT NULL",
            None,
            &[],
        )
        .ok()
        .and_then(|t| t.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false);
    if !installed {
        return Step::Idle;
    }
    let next = client
        .select(
            "SELECT job, owner, last_key, bounds_sql, rows_sql \
             FROM pgpipe.snapshot_next_chunk() WHERE job IS NOT NULL",
            None,
            &[],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: find the next snapshot chunk: {e}"));
    if next.is_empty() {
        return Step::Idle;
    }
    let row = next.first();
    let read_error = |e| -> ! { error!("pgpipe worker: read the next snapshot chunk: {e}") };
    let id = row
        .get::<i64>(1)
        .unwrap_or_else(|e| read_error(e))
        .unwrap_or_default();
    job.set(Some(id));
    let owner = row
        .get::<pg_sys::Oid>(2)
        .unwrap_or_else(|e| read_error(e))
        .unwrap_or(pg_sys::InvalidOid);
    let last_key = row
        .get::<Vec<Option<String>>>(3)
        .unwrap_or_else(|e| read_error(e));
    let bounds_sql = row
        .get::<String>(4)
        .unwrap_or_else(|e| read_error(e))
        .unwrap_or_default();
    let rows_sql = row
        .get::<String>(5)
        .unwrap_or_else(|e| read_error(e))
        .unwrap_or_default();

    // A writer holding a lock on a row of the chunk makes the chunk wait, at most this
    // long; a deadlock with a writer is found quickly and costs the chunk (retried), not
    // the writer's transaction.
    client
        .select(
            "SELECT pg_catalog.set_config('lock_timeout', $1, true), \
                    pg_catalog.set_config('deadlock_timeout', '50ms', true)",
            None,
            &[format!("{}ms", guc::snapshot_lock_timeout_ms())
                .as_str()
                .into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: set the snapshot's lock timeout: {e}"));

    let chunk_size = guc::snapshot_chunk_size();
    let restricted = Restricted::enter(owner);
    let upper: Option<Vec<Option<String>>> = client
        .select(
            &bounds_sql,
            None,
            &[last_key.clone().into(), chunk_size.into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: snapshot {id}: find the chunk's end: {e}"))
        .first()
        .get_one::<Vec<Option<String>>>()
        .ok()
        .flatten();
    let mut keys: Vec<Option<String>> = Vec::with_capacity(chunk_size as usize);
    let mut rows: Vec<Option<String>> = Vec::with_capacity(chunk_size as usize);
    let table = client
        .select(&rows_sql, None, &[last_key.into(), upper.clone().into()])
        .unwrap_or_else(|e| error!("pgpipe worker: snapshot {id}: read the chunk: {e}"));
    for row in table {
        keys.push(row.get::<String>(1).unwrap_or_else(|e| read_error(e)));
        rows.push(row.get::<String>(2).unwrap_or_else(|e| read_error(e)));
    }
    restricted.leave();

    let count = rows.len() as u64;
    let done = upper.is_none();
    client
        .update(
            "SELECT pgpipe.queue_read_events($1, $2, $3, $4)",
            None,
            &[id.into(), keys.into(), rows.into(), upper.into()],
        )
        .unwrap_or_else(|e| error!("pgpipe worker: snapshot {id}: queue the READ events: {e}"));
    Step::Chunk { rows: count, done }
}

/// The chunk gave up waiting for a lock (`pgpipe.snapshot_lock_timeout`) or lost a
/// deadlock with a writer: worth retrying, whatever the number of attempts.
fn waited_for_a_lock(message: &str) -> bool {
    message.contains("lock timeout") || message.contains("deadlock detected")
}
