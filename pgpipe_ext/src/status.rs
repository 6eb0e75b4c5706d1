//! `pgpipe.worker_status()`: the background worker's shared-memory status, which the SQL
//! function `pgpipe.status()` combines with the replication slot's state.

use pgrx::prelude::*;

use crate::shared::{self, WorkerState, WORKER_STATUS};
use crate::worker::pgoutput::format_lsn;

/// The background worker's status as it last recorded it. Timestamps are microseconds
/// since 2000-01-01 (0: never); `pgpipe.status()` shows them as timestamptz.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
pub fn worker_status() -> TableIterator<
    'static,
    (
        name!(preloaded, bool),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(database, Option<String>),
        name!(last_error, Option<String>),
        name!(started_at_us, Option<i64>),
        name!(caught_up_at_us, Option<i64>),
        name!(last_lsn, Option<String>),
        name!(events_written, i64),
        name!(notifies_sent, i64),
    ),
> {
    if !shared::available() {
        return TableIterator::once((
            false,
            None,
            "not_loaded".to_string(),
            None,
            None,
            None,
            None,
            None,
            0,
            0,
        ));
    }
    let s = *WORKER_STATUS.share();
    let nonzero = |v: i64| (v != 0).then_some(v);
    let error = s.last_error();
    let row = (
        true,
        (s.pid != 0).then_some(s.pid),
        s.state().name().to_string(),
        Some(s.database()).filter(|d| !d.is_empty()),
        Some(error).filter(|e| !e.is_empty() && s.state() != WorkerState::NotRunning),
        nonzero(s.started_at),
        nonzero(s.caught_up_at),
        (s.last_lsn != 0).then(|| format_lsn(s.last_lsn)),
        i64::try_from(s.events_written).unwrap_or(i64::MAX),
        i64::try_from(s.notifies_sent).unwrap_or(i64::MAX),
    );
    TableIterator::once(row)
}
