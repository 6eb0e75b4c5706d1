//! The background worker (needs `shared_preload_libraries = 'pgpipe'`).
//!
//! One worker per cluster, connected to `pgpipe.database`. A wait-on-latch loop, no
//! threads: every `pgpipe.poll_interval` it reads the logical replication slot of
//! WAL-mode subscriptions into the queue ([`wal`]); whenever committed captures set its
//! latch it sends one `NOTIFY pgpipe_wakeup` (at most one per
//! `pgpipe.notify_min_interval`); between those it reads the chunks of running snapshots
//! ([`snapshot`]), at most `pgpipe.snapshot_rows_per_second`. A failing cycle is logged, shown by `pgpipe.status()`
//! and retried; the worker does not crash-loop. Postgres restarts it
//! [`guc::WORKER_RESTART_INTERVAL`] after it exits (SIGTERM from
//! `pg_terminate_backend`, a FATAL error, or a change of `pgpipe.database`).

pub use pgpipe_pgoutput as pgoutput;
mod convert;
mod decoder;
pub(crate) mod queue;
mod snapshot;
pub mod wal;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::guc;
use crate::shared::{self, WorkerState, WORKER_STATUS};
use snapshot::{Snapshots, Step};
use wal::{ReadOutcome, WalCapture};

/// How often the worker looks for a slot while there is none (or no extension).
const IDLE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Channel of the coalesced wake-up notification (the forwarder LISTENs on it).
pub const WAKEUP_CHANNEL: &str = "pgpipe_wakeup";

/// Registers the worker with the postmaster. `_PG_init`, while preloading only.
pub fn register() {
    BackgroundWorkerBuilder::new("pgpipe worker")
        .set_type("pgpipe worker")
        .set_library("pgpipe")
        .set_function("pgpipe_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(guc::WORKER_RESTART_INTERVAL))
        .load();
}

/// Entry point of the background worker process.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgpipe_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    shared::register_worker();
    {
        let mut status = WORKER_STATUS.exclusive();
        status.reset();
        // SAFETY: plain reads of process globals.
        unsafe {
            status.pid = pg_sys::MyProcPid;
            status.started_at = pg_sys::GetCurrentTimestamp();
        }
        status.set_database(&database);
        status.set_state(WorkerState::Starting);
    }
    log!("pgpipe worker started for database \"{database}\"");

    let mut worker = Worker {
        wal: WalCapture::default(),
        state: WorkerState::Starting,
        last_notify: None,
        next_poll: Instant::now(),
        next_rotate: Instant::now(),
        more: false,
        warned_leftover_slot: false,
        notify_plan: None,
        snapshots: Snapshots::default(),
        next_snapshot: Instant::now(),
    };
    worker.run(&database);
    // Exit code 1: Postgres restarts the worker after the restart interval (exit code 0
    // would unregister it for good, e.g. after pg_terminate_backend).
    // SAFETY: ends the process the normal way.
    unsafe { pg_sys::proc_exit(1) };
}

struct Worker {
    wal: WalCapture,
    state: WorkerState,
    last_notify: Option<Instant>,
    next_poll: Instant,
    next_rotate: Instant,
    /// The last read stopped at the batch size: read again without waiting.
    more: bool,
    /// Logged that a slot outlived the extension.
    warned_leftover_slot: bool,
    /// `SELECT pg_notify('pgpipe_wakeup', '')`, prepared once.
    notify_plan: Option<pgrx::spi::OwnedPreparedStatement>,
    snapshots: Snapshots,
    /// When to read the next snapshot chunk (or look for a snapshot to run).
    next_snapshot: Instant,
}

/// `timeout` rounded up to whole milliseconds: `wait_latch` truncates to milliseconds, so
/// the last fraction of a millisecond before a deadline (a NOTIFY held back by
/// `pgpipe.notify_min_interval`, the next poll) would wait 0 ms, again and again: under
/// a steady stream of commits that spin cost the machine more than capture itself.
fn whole_millis(timeout: Duration) -> Duration {
    Duration::from_millis(timeout.as_micros().div_ceil(1000) as u64)
}

impl Worker {
    fn run(&mut self, database: &str) {
        loop {
            let now = Instant::now();
            let mut timeout = if self.more {
                Duration::ZERO
            } else {
                self.next_poll.saturating_duration_since(now)
            };
            if shared::wakeup_pending() {
                timeout = timeout.min(self.notify_delay(now));
            }
            timeout = timeout.min(self.next_snapshot.saturating_duration_since(now));
            if !BackgroundWorker::wait_latch(Some(whole_millis(timeout))) {
                log!("pgpipe worker exiting");
                return;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: the standard way to re-read the configuration in a process.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                if guc::database() != database {
                    log!(
                        "pgpipe.database changed from \"{database}\" to \"{}\": the worker restarts",
                        guc::database()
                    );
                    return;
                }
            }
            let now = Instant::now();
            if shared::wakeup_pending() {
                // A commit that queued events may also have started a snapshot.
                self.next_snapshot = self.next_snapshot.min(now + IDLE_POLL_INTERVAL / 10);
            }
            if shared::wakeup_pending() && self.notify_delay(now).is_zero() && shared::take_wakeup()
            {
                self.notify();
            }
            if self.more || now >= self.next_poll {
                self.poll_wal();
                // Without a slot there is nothing to decode; a new WAL subscription
                // creates the slot first, so looking once a second loses nothing.
                let interval = match self.state {
                    WorkerState::Idle
                    | WorkerState::WaitingForExtension
                    | WorkerState::WaitingForUpgrade => {
                        guc::poll_interval().max(IDLE_POLL_INTERVAL)
                    }
                    _ => guc::poll_interval(),
                };
                self.next_poll = now + interval;
            }
            if now >= self.next_snapshot {
                self.next_snapshot = Instant::now() + self.snapshot_step();
            }
            if let Some(interval) = guc::rotate_interval() {
                let waiting = matches!(
                    self.state,
                    WorkerState::WaitingForExtension | WorkerState::WaitingForUpgrade
                );
                if now >= self.next_rotate && !waiting {
                    self.next_rotate = now + interval;
                    self.rotate();
                }
            }
        }
    }

    /// How long until the next NOTIFY may go out.
    fn notify_delay(&self, now: Instant) -> Duration {
        match self.last_notify {
            Some(at) => (at + guc::notify_min_interval()).saturating_duration_since(now),
            None => Duration::ZERO,
        }
    }

    fn notify(&mut self) {
        self.last_notify = Some(Instant::now());
        let plan = &mut self.notify_plan;
        // The NOTIFY transaction need not wait for its commit record to reach disk: it
        // carries no data. (Restored right after: event transactions commit durably.)
        // SAFETY: a plain int setting of this process, read at commit.
        let durable = unsafe { pg_sys::synchronous_commit };
        unsafe {
            pg_sys::synchronous_commit = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
        };
        let result = in_transaction(AssertUnwindSafe(|| {
            Spi::connect(|client| {
                if plan.is_none() {
                    *plan = Some(
                        client
                            .prepare(
                                &*format!("SELECT pg_catalog.pg_notify('{WAKEUP_CHANNEL}', '')"),
                                &[],
                            )?
                            .keep(),
                    );
                }
                let plan = plan.as_ref().expect("prepared above");
                client.select(plan, None, &[]).map(|_| ())
            })
        }));
        // SAFETY: as above.
        unsafe { pg_sys::synchronous_commit = durable };
        match result {
            Ok(Ok(())) => WORKER_STATUS.exclusive().notifies_sent += 1,
            Ok(Err(e)) => warning!("pgpipe worker: send the wake-up NOTIFY: {e}"),
            Err(message) => warning!("pgpipe worker: send the wake-up NOTIFY: {message}"),
        }
    }

    /// Reads one chunk of a running snapshot; returns how long to wait before the next.
    fn snapshot_step(&mut self) -> Duration {
        if self.state == WorkerState::WaitingForExtension {
            return IDLE_POLL_INTERVAL;
        }
        match self.snapshots.step() {
            Ok(Step::Idle) => IDLE_POLL_INTERVAL,
            Ok(Step::Chunk { rows, done }) => {
                WORKER_STATUS.exclusive().events_written += rows;
                if done {
                    log!("pgpipe worker: a snapshot finished");
                    Duration::ZERO
                } else {
                    guc::snapshot_pause(rows)
                }
            }
            Err(message) => {
                warning!("pgpipe worker: snapshot chunk: {message}; retrying");
                IDLE_POLL_INTERVAL
            }
        }
    }

    /// Queue retention: `pgpipe.rotate()` creates partitions ahead and drops consumed ones.
    fn rotate(&mut self) {
        let result = in_transaction(|| Spi::run("SELECT count(*) FROM pgpipe.rotate()"));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warning!("pgpipe worker: pgpipe.rotate(): {e}"),
            Err(message) => warning!("pgpipe worker: pgpipe.rotate(): {message}"),
        }
    }

    fn poll_wal(&mut self) {
        self.more = false;
        let wal = &mut self.wal;
        let outcome = in_transaction(AssertUnwindSafe(|| wal.read()));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(message) => {
                self.set_state(WorkerState::Error, Some(&message));
                self.wal.reset();
                return;
            }
        };
        match outcome {
            ReadOutcome::NoExtension(leftover) => {
                self.set_state(WorkerState::WaitingForExtension, None);
                match leftover {
                    Some(slot) if !self.warned_leftover_slot => {
                        warning!(
                            "pgpipe worker: replication slot \"{slot}\" remains from a dropped pgpipe \
                             extension and holds WAL; drop it with \
                             SELECT pg_drop_replication_slot('{slot}')"
                        );
                        self.warned_leftover_slot = true;
                    }
                    Some(_) => {}
                    None => self.warned_leftover_slot = false,
                }
            }
            ReadOutcome::OtherVersion(version) => {
                let message = format!(
                    "extension pgpipe in database \"{}\" is at version {version}, the loaded \
                     library is {}: WAL capture and retention wait until ALTER EXTENSION \
                     pgpipe UPDATE runs there",
                    guc::database(),
                    wal::LIBRARY_VERSION
                );
                self.set_state(WorkerState::WaitingForUpgrade, Some(&message));
            }
            ReadOutcome::NoSlot => self.set_state(WorkerState::Idle, None),
            ReadOutcome::SlotMissing => self.set_state(WorkerState::SlotMissing, None),
            ReadOutcome::SlotInvalidated => self.set_state(WorkerState::SlotInvalidated, None),
            ReadOutcome::Read(batch) => {
                let hold = guc::DEBUG_NO_ADVANCE.get();
                let confirm_started = Instant::now();
                match batch.advance_to {
                    Some(target) if !hold => {
                        let wal = &mut self.wal;
                        if let Err(message) =
                            in_transaction(AssertUnwindSafe(|| wal.confirm(target)))
                        {
                            self.wal.reset();
                            self.set_state(WorkerState::Error, Some(&message));
                            return;
                        }
                    }
                    // Not confirmed: the next read must see the same changes again.
                    _ if hold => self.wal.forget_decoder(),
                    _ => {}
                }
                if batch.events > 0 {
                    // What each read costs (log_min_messages = debug1).
                    debug1!(
                        "pgpipe worker: read {} events; decoded from {} (start) over {} \
                         (confirmed) to {}: decode {:.1} ms, convert+insert {:.1} ms, confirm \
                         {:.1} ms",
                        batch.events,
                        pgoutput::format_lsn(batch.decoded_from),
                        pgoutput::format_lsn(batch.confirmed),
                        pgoutput::format_lsn(batch.advance_to.unwrap_or(batch.confirmed)),
                        batch.decode_time.as_secs_f64() * 1e3,
                        batch.write_time.as_secs_f64() * 1e3,
                        confirm_started.elapsed().as_secs_f64() * 1e3,
                    );
                }
                self.more = batch.more && !hold;
                {
                    let mut status = WORKER_STATUS.exclusive();
                    status.events_written += batch.events;
                    if let Some(lsn) = batch.last_commit {
                        status.last_lsn = lsn;
                    }
                    if !batch.more {
                        // SAFETY: a plain clock read.
                        status.caught_up_at = unsafe { pg_sys::GetCurrentTimestamp() };
                    }
                }
                if batch.events > 0 {
                    self.last_notify = Some(Instant::now());
                    WORKER_STATUS.exclusive().notifies_sent += 1;
                }
                self.set_state(WorkerState::Streaming, None);
            }
        }
    }

    /// Records the state; logs each change of state once (and every new error).
    fn set_state(&mut self, state: WorkerState, error: Option<&str>) {
        let changed = state != self.state;
        {
            let mut status = WORKER_STATUS.exclusive();
            let repeated_error = error.is_some_and(|e| status.last_error() == e);
            status.set_state(state);
            if let Some(e) = error {
                status.set_last_error(e);
            } else if matches!(state, WorkerState::Streaming | WorkerState::Idle) {
                status.set_last_error("");
            }
            if !changed && (error.is_none() || repeated_error) {
                self.state = state;
                return;
            }
        }
        self.state = state;
        let slot = guc::slot_name();
        match state {
            WorkerState::WaitingForExtension => log!(
                "pgpipe worker: extension pgpipe is not created in database \"{}\"; waiting \
                 (run CREATE EXTENSION pgpipe there, or set pgpipe.database)",
                guc::database()
            ),
            WorkerState::Idle => log!("pgpipe worker: no table is subscribed with mode 'wal'"),
            WorkerState::Streaming => log!("pgpipe worker: consuming replication slot \"{slot}\""),
            WorkerState::SlotMissing => warning!(
                "pgpipe worker: replication slot \"{slot}\" does not exist any more; WAL-mode \
                 changes are not captured. Changes made since it was dropped are lost; \
                 SELECT pgpipe.recreate_slot() starts capturing again"
            ),
            WorkerState::SlotInvalidated => warning!(
                "pgpipe worker: replication slot \"{slot}\" was invalidated (it fell behind \
                 max_slot_wal_keep_size); WAL-mode changes were lost. \
                 SELECT pgpipe.recreate_slot() starts capturing again"
            ),
            WorkerState::Error => warning!(
                "pgpipe worker: {}; retrying every pgpipe.poll_interval",
                error.unwrap_or("error")
            ),
            WorkerState::WaitingForUpgrade => {
                warning!(
                    "pgpipe worker: {}",
                    error.unwrap_or("waiting for an upgrade")
                )
            }
            WorkerState::Starting | WorkerState::NotRunning => {}
        }
    }
}

/// Runs `body` in a transaction of its own. A Postgres error aborts the transaction and
/// comes back as its message, so the worker can go on.
pub fn in_transaction<R>(body: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    PgTryBuilder::new(move || {
        // SAFETY: the worker is between transactions here.
        unsafe {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
        let result = body();
        // SAFETY: matches the calls above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    })
    .catch_others(|error| {
        // SAFETY: cleans up the failed transaction (locks, snapshots, memory).
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(caught_message(&error))
    })
    .execute()
}

/// Raises a Postgres ERROR with a SQLSTATE and an optional hint.
pub fn raise(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(code, message, "pgpipe worker");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

fn caught_message(error: &CaughtError) -> String {
    match error {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => {
            match report.hint() {
                Some(hint) => format!("{} ({hint})", report.message()),
                None => report.message().to_string(),
            }
        }
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}
