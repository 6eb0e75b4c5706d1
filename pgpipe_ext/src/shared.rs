//! Shared memory and the wake-up path.
//!
//! Writers must not pay for NOTIFY (it takes a global lock at commit). Instead the capture
//! path calls `pgpipe.mark_wakeup()`, which registers a transaction callback once per
//! backend and flags the current transaction; when it commits, the callback sets the
//! background worker's latch. The worker then sends one `NOTIFY pgpipe_wakeup` for every
//! commit since its last one. A writer pays one atomic swap per commit, plus one
//! `SetLatch` (a `kill`) only when no wake-up is pending yet.
//!
//! Everything here needs `shared_preload_libraries = 'pgpipe'`; without it the shared
//! memory does not exist and `mark_wakeup()` does nothing (the forwarder then polls).

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};

/// Capacity of the text fields of [`WorkerStatus`], in bytes.
pub const STATUS_TEXT_LEN: usize = 256;

/// Index of the worker's `PGPROC` in `ProcGlobal->allProcs`, or -1 when it is not running.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pgpipe.worker_procno") };
/// Database the worker serves (its NOTIFY reaches listeners of that database only).
static WORKER_DATABASE: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pgpipe.worker_database") };
/// A committed transaction queued events and the worker has not yet sent its NOTIFY.
static WAKEUP_PENDING: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pgpipe.wakeup_pending") };
/// What the worker is doing, for `pgpipe.status()`.
pub static WORKER_STATUS: PgLwLock<WorkerStatus> =
    unsafe { PgLwLock::new(c"pgpipe.worker_status") };

/// Set in `_PG_init` when pgpipe is preloaded, i.e. when the shared memory above exists.
/// Backends inherit it from the postmaster.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);

/// The worker's state, as shown by `pgpipe.status()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Not running (not started yet, or exited and waiting to be restarted).
    NotRunning = 0,
    /// Connected, looking at the database.
    Starting = 1,
    /// `CREATE EXTENSION pgpipe` has not run in `pgpipe.database`.
    WaitingForExtension = 2,
    /// No table is subscribed with `mode => 'wal'` (no slot yet); only wake-ups are sent.
    Idle = 3,
    /// Consuming the replication slot.
    Streaming = 4,
    /// The slot pgpipe created is gone; `pgpipe.recreate_slot()` starts a new one.
    SlotMissing = 5,
    /// The slot was invalidated (e.g. `max_slot_wal_keep_size`); changes were lost.
    SlotInvalidated = 6,
    /// The last cycle failed; see `last_error`. The worker retries every poll interval.
    Error = 7,
    /// The extension in `pgpipe.database` is at another version than this library (its
    /// SQL objects may not be what the worker expects): waiting for `ALTER EXTENSION
    /// pgpipe UPDATE`; `last_error` says which versions.
    WaitingForUpgrade = 8,
}

impl WorkerState {
    /// The name shown by `pgpipe.status()`.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::NotRunning => "not_running",
            WorkerState::Starting => "starting",
            WorkerState::WaitingForExtension => "waiting_for_extension",
            WorkerState::Idle => "idle",
            WorkerState::Streaming => "streaming",
            WorkerState::SlotMissing => "slot_missing",
            WorkerState::SlotInvalidated => "slot_invalidated",
            WorkerState::Error => "error",
            WorkerState::WaitingForUpgrade => "waiting_for_upgrade",
        }
    }

    fn from_u8(value: u8) -> WorkerState {
        match value {
            1 => WorkerState::Starting,
            2 => WorkerState::WaitingForExtension,
            3 => WorkerState::Idle,
            4 => WorkerState::Streaming,
            5 => WorkerState::SlotMissing,
            6 => WorkerState::SlotInvalidated,
            7 => WorkerState::Error,
            8 => WorkerState::WaitingForUpgrade,
            _ => WorkerState::NotRunning,
        }
    }
}

/// The worker's status in shared memory (plain old data).
#[derive(Clone, Copy)]
pub struct WorkerStatus {
    pub pid: i32,
    state: u8,
    /// Database the worker is connected to (NUL-padded).
    database: [u8; STATUS_TEXT_LEN],
    /// Message of the last error (NUL-padded), kept until a cycle succeeds.
    last_error: [u8; STATUS_TEXT_LEN],
    /// `TimestampTz` the worker started.
    pub started_at: i64,
    /// `TimestampTz` the worker last found nothing left to decode (0: never).
    pub caught_up_at: i64,
    /// Commit end LSN of the last source transaction written to the queue.
    pub last_lsn: u64,
    /// Events the worker wrote since it started.
    pub events_written: u64,
    /// Wake-up NOTIFYs sent since it started.
    pub notifies_sent: u64,
}

// SAFETY: plain old data without pointers.
unsafe impl PGRXSharedMemory for WorkerStatus {}

impl WorkerStatus {
    const EMPTY: WorkerStatus = WorkerStatus {
        pid: 0,
        state: WorkerState::NotRunning as u8,
        database: [0; STATUS_TEXT_LEN],
        last_error: [0; STATUS_TEXT_LEN],
        started_at: 0,
        caught_up_at: 0,
        last_lsn: 0,
        events_written: 0,
        notifies_sent: 0,
    };

    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state)
    }

    pub fn set_state(&mut self, state: WorkerState) {
        self.state = state as u8;
    }

    pub fn database(&self) -> String {
        text_from(&self.database)
    }

    pub fn set_database(&mut self, value: &str) {
        text_into(&mut self.database, value);
    }

    pub fn last_error(&self) -> String {
        text_from(&self.last_error)
    }

    pub fn set_last_error(&mut self, value: &str) {
        text_into(&mut self.last_error, value);
    }

    pub fn reset(&mut self) {
        *self = WorkerStatus::EMPTY;
    }
}

fn text_from(buf: &[u8; STATUS_TEXT_LEN]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn text_into(buf: &mut [u8; STATUS_TEXT_LEN], value: &str) {
    *buf = [0; STATUS_TEXT_LEN];
    // Cut on a character boundary, keeping one NUL at the end.
    let mut end = value.len().min(STATUS_TEXT_LEN - 1);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    buf[..end].copy_from_slice(&value.as_bytes()[..end]);
}

/// Requests the shared memory. `_PG_init`, while preloading only.
pub fn init() {
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(WORKER_DATABASE = AtomicU32::new(0));
    pg_shmem_init!(WAKEUP_PENDING = AtomicBool::new(false));
    pg_shmem_init!(WORKER_STATUS = WorkerStatus::EMPTY);
    SHMEM_READY.store(true, Ordering::Relaxed);
}

/// Whether pgpipe was preloaded (the shared memory exists).
pub fn available() -> bool {
    SHMEM_READY.load(Ordering::Relaxed)
}

/// The worker announces itself: its latch becomes the target of wake-ups.
pub fn register_worker() {
    // SAFETY: MyProc and ProcGlobal are set up for a connected background worker.
    let procno = unsafe { pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs) };
    // SAFETY: set once the worker is connected to its database.
    let database = unsafe { pg_sys::MyDatabaseId };
    WORKER_DATABASE
        .get()
        .store(database.to_u32(), Ordering::Release);
    WORKER_PROCNO
        .get()
        .store(i32::try_from(procno).unwrap_or(-1), Ordering::Release);
    // SAFETY: a static function with no argument.
    unsafe { pg_sys::on_shmem_exit(Some(unregister_worker), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister_worker(_code: i32, _arg: pg_sys::Datum) {
    WORKER_PROCNO.get().store(-1, Ordering::Release);
    let mut status = WORKER_STATUS.exclusive();
    status.pid = 0;
    status.set_state(WorkerState::NotRunning);
}

/// The worker takes the pending wake-up, if any.
pub fn take_wakeup() -> bool {
    WAKEUP_PENDING.get().swap(false, Ordering::AcqRel)
}

/// Whether a wake-up is pending (without taking it).
pub fn wakeup_pending() -> bool {
    WAKEUP_PENDING.get().load(Ordering::Acquire)
}

/// Sets the worker's latch unless a wake-up is already pending.
fn wake_worker() {
    if WAKEUP_PENDING.get().swap(true, Ordering::AcqRel) {
        return;
    }
    let procno = WORKER_PROCNO.get().load(Ordering::Acquire);
    if procno < 0 {
        // No worker right now: the flag stays set and the next worker sends the NOTIFY.
        return;
    }
    // SAFETY: procno indexes allProcs (it was computed from MyProc of the worker); the
    // latch is shared and SetLatch on it is how Postgres itself wakes other processes.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

thread_local! {
    /// The current transaction queued events: wake the worker when it commits.
    static PENDING_IN_XACT: Cell<bool> = const { Cell::new(false) };
    /// The transaction callback is registered in this backend.
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    let committed = matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT);
    let ended = committed
        || matches!(
            event,
            XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE
        );
    if ended && PENDING_IN_XACT.replace(false) && committed {
        wake_worker();
    }
}

/// Flags the current transaction as having queued events: when it commits, the background
/// worker is woken and sends one coalesced `NOTIFY pgpipe_wakeup`. Called by the capture
/// triggers and `pgpipe.emit`; cheap (no lock, no syscall). Returns whether a worker can
/// be woken: false when pgpipe is not preloaded, or when the worker serves another
/// database (NOTIFY does not cross databases; the forwarder then polls).
#[pg_extern(volatile, parallel_restricted)]
pub fn mark_wakeup() -> bool {
    if !available() {
        return false;
    }
    // SAFETY: a plain read of the backend's database.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let served = WORKER_DATABASE.get().load(Ordering::Acquire);
    if served != 0 && served != database {
        return false;
    }
    if !PENDING_IN_XACT.get() {
        if !CALLBACK_REGISTERED.get() {
            // SAFETY: a static callback with no argument, registered once per backend.
            unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
            CALLBACK_REGISTERED.set(true);
        }
        PENDING_IN_XACT.set(true);
    }
    true
}
