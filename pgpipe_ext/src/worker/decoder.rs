//! One logical decoding context on pgpipe's slot, kept across reads, so that each WAL
//! record is decoded once.
//!
//! Through SQL every read was a fresh `pg_logical_slot_peek_binary_changes` plus a
//! `pg_replication_slot_advance`, and both decode from the slot's restart LSN, which
//! moves only at the `xl_running_xacts` records the WAL carries every 15 s or so: a
//! backlog was decoded again by every read (quadratic in its length). Here the worker
//! owns a decoding context (pgoutput, with its own write callbacks collecting the
//! messages), reads records with the xlog reader up to the flushed end of the WAL and
//! keeps the reorder buffer between reads, as a walsender does.
//!
//! Crash safety is unchanged: the slot is confirmed ([`Decoder::confirm`]) only after the
//! transaction holding the events and `pgpipe.wal_progress` committed. The slot is held
//! (acquired) only while records are decoded and while it is confirmed — never while
//! the worker writes the queue, where it may wait for locks: a checkpoint invalidating
//! the slot, `pg_drop_replication_slot` and `pgpipe.recreate_slot()` are not held up.
//! On every acquire the decoder checks that the slot is where it left it; if anything
//! else moved, dropped or invalidated it, the context is thrown away and the next read
//! starts a new one from the slot. Any error in a read throws it away too.
//!
//! Unlike a walsender, the worker decodes inside its own transactions and writes the
//! queue with normal snapshots between reads, so two things a walsender never meets are
//! handled here: the memory current while records are read must be the decoder's (a
//! replayed transaction leaves the worker's transaction memory current, which its commit
//! frees), and the catalog caches are flushed around each read (historic and normal
//! entries must never serve each other).

use std::ffi::{c_char, c_int, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// A log sequence number.
pub type Lsn = u64;

// The raw C symbols: pgrx's `pg_sys` wrappers are Rust functions, which cannot be
// handed to Postgres as callbacks.
unsafe extern "C-unwind" {
    #[link_name = "read_local_xlog_page"]
    fn read_local_xlog_page_cb(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: c_int,
        target_rec: pg_sys::XLogRecPtr,
        buf: *mut c_char,
    ) -> c_int;
    #[link_name = "wal_segment_open"]
    fn wal_segment_open_cb(
        state: *mut pg_sys::XLogReaderState,
        seg_no: pg_sys::XLogSegNo,
        tli: *mut pg_sys::TimeLineID,
    );
    #[link_name = "wal_segment_close"]
    fn wal_segment_close_cb(state: *mut pg_sys::XLogReaderState);
    /// replication/decode.h (not in pgrx's bindings).
    #[link_name = "LogicalDecodingProcessRecord"]
    fn logical_decoding_process_record(
        ctx: *mut pg_sys::LogicalDecodingContext,
        record: *mut pg_sys::XLogReaderState,
    );
}

/// What pgoutput wrote: (LSN, message) in order.
#[derive(Default)]
struct Output {
    messages: Vec<(Lsn, Vec<u8>)>,
}

/// The messages of one read.
pub struct Decoded {
    pub messages: Vec<(Lsn, Vec<u8>)>,
    /// Every record before this was decoded (and every transaction that committed
    /// before it is in `messages` or an earlier read).
    pub reached: Lsn,
    /// Stopped at the message limit before the end of the WAL.
    pub more: bool,
    /// Where this read started decoding.
    pub from: Lsn,
}

/// pgpipe's decoding context.
pub struct Decoder {
    ctx: *mut pg_sys::LogicalDecodingContext,
    /// Parent of the context's memory, a child of TopMemoryContext.
    cx: pg_sys::MemoryContext,
    /// Boxed so that its address, given to the write callback, stays put.
    output: Box<Output>,
    slot: CString,
    /// Where the slot's confirmed LSN must be when the decoder acquires it again.
    confirmed: Lsn,
}

impl Decoder {
    /// Acquires `slot` and makes a context that decodes it from its restart LSN with
    /// pgoutput (protocol 1, `publication`, messages on). Leaves the slot acquired.
    pub fn start(slot: &str, publication: &str) -> Decoder {
        let slot_c =
            CString::new(slot).unwrap_or_else(|_| error!("pgpipe worker: NUL in pgpipe.slot_name"));
        let mut output = Box::<Output>::default();
        // SAFETY: standard use of the slot and decoding APIs, as logicalfuncs.c does:
        // acquire, create the context in long-lived memory, start reading at the
        // slot's restart LSN. Errors are raised as Postgres errors.
        unsafe {
            pg_sys::ReplicationSlotAcquire(slot_c.as_ptr(), true);
            let slot_ptr = pg_sys::MyReplicationSlot;
            if (*slot_ptr).data.database != pg_sys::MyDatabaseId {
                pg_sys::ReplicationSlotRelease();
                super::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("replication slot \"{slot}\" is not a pgoutput slot of this database"),
                    Some("Set pgpipe.slot_name to a name no other slot uses."),
                );
            }
            let cx = pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"pgpipe decoding".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let previous = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = cx;
            let publication = pgrx::spi::quote_identifier(publication);
            let mut options: *mut pg_sys::List = std::ptr::null_mut();
            for (name, value) in [
                ("proto_version", "1"),
                ("publication_names", publication.as_str()),
                ("messages", "true"),
            ] {
                let name = pg_sys::pstrdup(CString::new(name).unwrap_or_default().as_ptr());
                let value = pg_sys::pstrdup(
                    CString::new(value)
                        .unwrap_or_else(|_| error!("pgpipe worker: NUL in pgpipe.publication"))
                        .as_ptr(),
                );
                let elem = pg_sys::makeDefElem(name, pg_sys::makeString(value).cast(), -1);
                options = pg_sys::lappend(options, elem.cast());
            }
            let mut routine = pg_sys::XLogReaderRoutine {
                page_read: Some(read_local_xlog_page_cb),
                segment_open: Some(wal_segment_open_cb),
                segment_close: Some(wal_segment_close_cb),
            };
            let ctx = pg_sys::CreateDecodingContext(
                pg_sys::InvalidXLogRecPtr as pg_sys::XLogRecPtr,
                options,
                false,
                &mut routine,
                Some(prepare_write),
                Some(do_write),
                None,
            );
            pg_sys::CurrentMemoryContext = previous;
            (*ctx).output_writer_private = (&mut *output as *mut Output).cast();
            pg_sys::XLogBeginRead((*ctx).reader, (*slot_ptr).data.restart_lsn);
            Decoder {
                ctx,
                cx,
                output,
                slot: slot_c,
                confirmed: (*slot_ptr).data.confirmed_flush,
            }
        }
    }

    /// Acquires the slot again for a read; false (slot released) when it is not where
    /// this decoder left it: the caller throws the decoder away and starts a new one.
    pub fn reacquire(&mut self) -> bool {
        // SAFETY: acquire without waiting (errors if another process holds the slot);
        // the slot's data is ours to read while we hold it.
        unsafe {
            pg_sys::ReplicationSlotAcquire(self.slot.as_ptr(), true);
            let slot = pg_sys::MyReplicationSlot;
            let same = slot == (*self.ctx).slot
                && (*slot).data.confirmed_flush == self.confirmed
                && (*slot).data.restart_lsn != pg_sys::InvalidXLogRecPtr as pg_sys::XLogRecPtr;
            if !same {
                pg_sys::ReplicationSlotRelease();
            }
            same
        }
    }

    /// Decodes records up to the flushed end of the WAL, stopping after the transaction
    /// that brings the messages to `limit` (or more). The slot must be acquired.
    pub fn read(&mut self, limit: usize) -> Decoded {
        self.output.messages.clear();
        // SAFETY: the context and its reader are valid; records below the flush
        // position are complete, so the page reader never waits.
        unsafe {
            // The reader allocates its buffers (on first use, and as records grow) in
            // the current memory context: it must be one that lives as long as the
            // reader, the decoder's own (see the loop).
            let previous = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            let reader = (*self.ctx).reader;
            let from = (*reader).EndRecPtr;
            let end = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
            let ctx = self.ctx;
            let cx = self.cx;
            let output: *mut Output = &mut *self.output;
            // The catalog caches hold entries built with normal snapshots (the queue
            // writes, lookups, snapshot chunks) between reads, and entries built with
            // the historic snapshots of decoding during a read: neither may be used by
            // the other, or a change made before an ALTER TABLE is decoded with the
            // table's new shape (and the queue written with one of the past). As
            // logicalfuncs.c does around every SQL decoding call: flush them before
            // and after, also when decoding fails.
            pg_sys::InvalidateSystemCaches();
            PgTryBuilder::new(|| {
                while (*reader).EndRecPtr < end && (*output).messages.len() < limit {
                    // Before every record: replaying a transaction ends in a
                    // subtransaction's cleanup, which leaves the transaction's memory
                    // current; the reader's buffers (decode buffer, record buffer,
                    // oversized records) allocated there would be freed at the commit
                    // while the reader keeps pointing at them.
                    pg_sys::CurrentMemoryContext = cx;
                    let mut error: *mut c_char = std::ptr::null_mut();
                    let record = pg_sys::XLogReadRecord(reader, &mut error);
                    if !error.is_null() {
                        let message = std::ffi::CStr::from_ptr(error).to_string_lossy();
                        error!("pgpipe worker: read the WAL: {message}");
                    }
                    if record.is_null() {
                        break;
                    }
                    pg_sys::ffi::pg_guard_ffi_boundary(|| {
                        logical_decoding_process_record(ctx, reader)
                    });
                    pgrx::check_for_interrupts!();
                }
            })
            .catch_others(|error| {
                pg_sys::CurrentMemoryContext = previous;
                pg_sys::InvalidateSystemCaches();
                error.rethrow()
            })
            .execute();
            // Replaying a transaction runs it in a subtransaction, whose end may leave
            // another resource owner current (logicalfuncs.c restores it too).
            pg_sys::CurrentResourceOwner = owner;
            pg_sys::CurrentMemoryContext = previous;
            pg_sys::InvalidateSystemCaches();
            Decoded {
                messages: std::mem::take(&mut self.output.messages),
                reached: (*reader).EndRecPtr,
                more: (*reader).EndRecPtr < end,
                from,
            }
        }
    }

    /// Lets go of the slot (between decoding and confirming: while the queue is written).
    pub fn release(&mut self) {
        release_slot();
    }

    /// Confirms `lsn` (everything before it is committed in the queue) and releases the
    /// slot. Outside any transaction, after the queue's commit. False when the slot is
    /// not where this decoder left it (nothing confirmed; throw the decoder away).
    pub fn confirm(&mut self, lsn: Lsn) -> bool {
        if !self.reacquire() {
            return false;
        }
        if lsn > self.confirmed {
            // SAFETY: the slot is acquired; as a walsender does on a client's reply.
            unsafe { pg_sys::LogicalConfirmReceivedLocation(lsn) };
            // SAFETY: ours while acquired.
            self.confirmed = unsafe { (*pg_sys::MyReplicationSlot).data.confirmed_flush };
        }
        self.release();
        true
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // Not FreeDecodingContext(): its ReorderBufferFree() needs the slot acquired, and
        // the slot may be gone or held by someone else by now. The pieces that matter:
        // pgoutput's shutdown callback (it keeps a process-wide relation cache that must
        // not outlive the context), the xlog reader (its open WAL segment), then the
        // memory. Spill files left in pg_replslot are removed by the next context.
        // SAFETY: the context is valid and no decoding is under way (drop happens
        // between reads).
        unsafe {
            if let Some(shutdown) = (*self.ctx).callbacks.shutdown_cb {
                let ctx = self.ctx;
                pg_sys::ffi::pg_guard_ffi_boundary(|| shutdown(ctx));
            }
            pg_sys::XLogReaderFree((*self.ctx).reader);
            pg_sys::MemoryContextDelete(self.cx);
        }
    }
}

/// Releases the slot this process holds, if any (also after an error: a background
/// worker's abort does not do it).
pub fn release_slot() {
    // SAFETY: only when this process holds a slot.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotRelease();
        }
    }
}

/// pgoutput is about to write a message: start an empty one.
#[pg_guard]
unsafe extern "C-unwind" fn prepare_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last: bool,
) {
    // SAFETY: `out` is the context's buffer.
    unsafe { pg_sys::resetStringInfo((*ctx).out) };
}

/// pgoutput wrote a message: keep a copy.
#[pg_guard]
unsafe extern "C-unwind" fn do_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last: bool,
) {
    // SAFETY: `output_writer_private` is the decoder's Output (set before any record is
    // decoded, alive as long as the context); `out` holds `len` bytes.
    unsafe {
        let output = &mut *(*ctx).output_writer_private.cast::<Output>();
        let out = &*(*ctx).out;
        let bytes = std::slice::from_raw_parts(out.data.cast::<u8>(), out.len as usize);
        output.messages.push((lsn, bytes.to_vec()));
    }
}
