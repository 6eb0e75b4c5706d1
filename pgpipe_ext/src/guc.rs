//! pgpipe's settings (GUCs), all under the `pgpipe.` prefix.
//!
//! Everything the background worker uses is a setting here, with a default that works for
//! a small database. They can be changed with a reload (`SELECT pg_reload_conf()`), except
//! where noted.

use std::ffi::{CStr, CString};
use std::time::Duration;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// How long Postgres waits before restarting the background worker after it exits with an
/// error (or after `pgpipe.database` changed). Fixed: Postgres reads it at registration.
pub const WORKER_RESTART_INTERVAL: Duration = Duration::from_secs(5);

/// Database the background worker connects to.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Worker latch timeout: how often it polls the replication slot when nothing wakes it.
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(200);
/// At most this many logical decoding messages per worker transaction (whole source
/// transactions are never split, so a large one may exceed it).
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Name of the logical replication slot the worker consumes.
pub static SLOT_NAME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pgpipe"));
/// Name of the publication holding the tables subscribed with `mode => 'wal'`.
pub static PUBLICATION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pgpipe"));
/// Minimum gap between two wake-up NOTIFYs sent by the worker.
pub static NOTIFY_MIN_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5);
/// How often the worker runs `pgpipe.rotate()` (queue retention); 0 turns it off.
pub static ROTATE_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// How `pgpipe.emit()` queues: `queue` (directly) or `wal` (a logical decoding message
/// the worker turns into the event, in commit order with WAL-mode captures).
pub static EMIT_MODE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"queue"));
/// Testing only: the worker writes events but never advances its slot, as if it crashed
/// after every commit; shows that re-reading the slot does not duplicate events.
pub static DEBUG_NO_ADVANCE: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Transaction ids one partition of `pgpipe.events` covers (read by `pgpipe.rotate()`).
pub static PARTITION_XIDS: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
/// The largest `pgpipe.partition_xids`: a partition must end long before xid wraparound
/// matters, or it is never dropped.
const MAX_PARTITION_XIDS: i32 = 100_000_000;
/// Rows per snapshot chunk: one worker transaction reads (and locks FOR SHARE) this many
/// rows of the table and queues their READ events.
pub static SNAPSHOT_CHUNK_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// At most this many snapshot rows per second (0: no limit).
pub static SNAPSHOT_ROWS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// How long a snapshot chunk waits for a row lock held by a writer before it gives up
/// (and is retried): the worker does not stall WAL capture behind a long transaction.
pub static SNAPSHOT_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// `pgpipe.consumer_stale_after`, in seconds (an hour by default).
pub static CONSUMER_STALE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// Registers every setting. Called from `_PG_init` in every process that loads pgpipe.
pub fn register() {
    GucRegistry::define_string_guc(
        c"pgpipe.database",
        c"Database the pgpipe background worker connects to.",
        c"The worker captures WAL-mode subscriptions and sends wake-up notifications for this \
          database only. It waits idly until CREATE EXTENSION pgpipe has run there. Changing \
          it restarts the worker.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.poll_interval",
        c"How often the pgpipe worker polls its replication slot when idle.",
        c"Upper bound on the delay between a commit of a WAL-mode table and its event in \
          pgpipe.events while the worker is idle.",
        &POLL_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgpipe.batch_size",
        c"Logical decoding messages the pgpipe worker handles per transaction.",
        c"Source transactions are never split, so one large transaction can exceed it.",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgpipe.slot_name",
        c"Logical replication slot consumed by the pgpipe worker.",
        c"Created by the first pgpipe.subscribe(..., mode => 'wal'); recreated only by \
          pgpipe.recreate_slot().",
        &SLOT_NAME,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgpipe.publication",
        c"Publication holding the tables subscribed with mode => 'wal'.",
        c"Created on demand by pgpipe.subscribe; pgpipe's own tables are never in it.",
        &PUBLICATION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.notify_min_interval",
        c"Minimum time between two wake-up NOTIFYs from the pgpipe worker.",
        c"Commits that queue events wake the worker, which sends one NOTIFY pgpipe_wakeup \
          for all of them; this bounds how often it does so under load.",
        &NOTIFY_MIN_INTERVAL_MS,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgpipe.rotate_interval",
        c"How often the pgpipe worker runs pgpipe.rotate() (queue retention).",
        c"0 turns it off; the forwarder can run it instead.",
        &ROTATE_INTERVAL_S,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgpipe.partition_xids",
        c"Transaction ids one partition of pgpipe.events covers.",
        c"Read by pgpipe.rotate() when it creates partitions.",
        &PARTITION_XIDS,
        1000,
        MAX_PARTITION_XIDS,
        // Retention is the admin's: a session must not make a partition that is never
        // dropped.
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.consumer_stale_after",
        c"Seconds without an acknowledgement after which a pgpipe consumer is reported stale.",
        c"pgpipe.status(), pgpipe.consumer_lag and a WARNING from pgpipe.rotate() name it: it holds retention.",
        &CONSUMER_STALE_AFTER_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.snapshot_chunk_size",
        c"Rows the pgpipe worker reads per snapshot chunk (one transaction).",
        c"The chunk's rows are locked FOR SHARE until its READ events commit; writers of \
          those rows wait that long.",
        &SNAPSHOT_CHUNK_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.snapshot_rows_per_second",
        c"At most this many rows per second for pgpipe snapshots; 0 means no limit.",
        c"The worker waits between chunks to stay under it.",
        &SNAPSHOT_ROWS_PER_SECOND,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgpipe.snapshot_lock_timeout",
        c"How long a snapshot chunk waits for a writer's row lock before it is retried.",
        c"Keeps the worker (and WAL capture) from stalling behind a long transaction.",
        &SNAPSHOT_LOCK_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"pgpipe.emit_mode",
        c"How pgpipe.emit() queues events: 'queue' (directly) or 'wal'.",
        c"'wal' sends them through the WAL as logical decoding messages, so the worker \
          queues them in commit order with the changes of WAL-mode tables.",
        &EMIT_MODE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgpipe.debug_no_advance",
        c"Testing only: the pgpipe worker never advances its replication slot.",
        c"As if the worker crashed after each commit; WAL is retained while it is on.",
        &DEBUG_NO_ADVANCE,
        GucContext::Sighup,
        GucFlags::NO_SHOW_ALL,
    );
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    // SAFETY: a static C string; called from _PG_init.
    unsafe {
        pgrx::pg_sys::MarkGUCPrefixReserved(c"pgpipe".as_ptr());
    }
}

/// A string setting's current value, or `default` when unset or empty.
pub fn string(setting: &GucSetting<Option<CString>>, default: &CStr) -> String {
    setting
        .get()
        .filter(|value| !value.as_bytes().is_empty())
        .unwrap_or_else(|| default.to_owned())
        .to_string_lossy()
        .into_owned()
}

/// `pgpipe.database`.
pub fn database() -> String {
    string(&DATABASE, c"postgres")
}

/// `pgpipe.slot_name`.
pub fn slot_name() -> String {
    string(&SLOT_NAME, c"pgpipe")
}

/// `pgpipe.publication`.
pub fn publication() -> String {
    string(&PUBLICATION, c"pgpipe")
}

/// `pgpipe.poll_interval`.
pub fn poll_interval() -> Duration {
    Duration::from_millis(POLL_INTERVAL_MS.get().max(1) as u64)
}

/// `pgpipe.batch_size`.
pub fn batch_size() -> i64 {
    i64::from(BATCH_SIZE.get().max(1))
}

/// `pgpipe.notify_min_interval`.
pub fn notify_min_interval() -> Duration {
    Duration::from_millis(NOTIFY_MIN_INTERVAL_MS.get().max(0) as u64)
}

/// `pgpipe.rotate_interval`; None when off.
pub fn rotate_interval() -> Option<Duration> {
    let seconds = ROTATE_INTERVAL_S.get();
    (seconds > 0).then(|| Duration::from_secs(seconds as u64))
}

/// `pgpipe.partition_xids` as this backend has it (superuser-set only), for
/// `pgpipe.rotate()`: read through the loaded library, never a session's placeholder.
#[pgrx::pg_extern(stable, parallel_safe)]
fn partition_xids() -> i32 {
    PARTITION_XIDS.get()
}

/// `pgpipe.consumer_stale_after`, in seconds.
#[pgrx::pg_extern(stable, parallel_safe)]
fn consumer_stale_after() -> i32 {
    CONSUMER_STALE_AFTER_S.get()
}

/// `pgpipe.snapshot_chunk_size`.
pub fn snapshot_chunk_size() -> i32 {
    SNAPSHOT_CHUNK_SIZE.get().max(1)
}

/// The pause after a snapshot chunk of `rows` rows that keeps under
/// `pgpipe.snapshot_rows_per_second`.
pub fn snapshot_pause(rows: u64) -> Duration {
    match SNAPSHOT_ROWS_PER_SECOND.get() {
        limit if limit > 0 => Duration::from_secs_f64(rows as f64 / f64::from(limit)),
        _ => Duration::ZERO,
    }
}

/// `pgpipe.snapshot_lock_timeout`, in milliseconds.
pub fn snapshot_lock_timeout_ms() -> i32 {
    SNAPSHOT_LOCK_TIMEOUT_MS.get().max(1)
}
