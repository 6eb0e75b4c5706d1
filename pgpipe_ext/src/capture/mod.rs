//! Trigger capture: the native `pgpipe.capture_row()` and `pgpipe.capture_truncate()`.
//!
//! Both are plain C-language trigger functions (not SECURITY DEFINER): they run with the
//! rights of the role that wrote the row, so a cast or output function that `to_jsonb`
//! calls on a user-defined type runs as that role and never as pgpipe's owner. The queue
//! row is written straight into the right partition of `pgpipe.events` (see [`queue`]),
//! without PL/pgSQL, SPI or a privilege check, so writers need no right on pgpipe's own
//! tables. Nothing here resolves a name through the writer's `search_path`.
//!
//! The payload is exactly what `jsonb_build_object('op', TG_OP, ..., 'row', to_jsonb(NEW),
//! ...)` gave (jsonb sorts keys; NULL becomes JSON null), and what WAL mode gives. For a
//! table of Postgres's own types the trigger converts the columns itself, each the way
//! `to_jsonb` converts its type, decided once per table ([`json`]); any other table's
//! rows go through `to_jsonb` of an envelope record `(op, schema, table, row, old)`. The
//! event's `key` is the row's primary-key columns as an object, converted the same way
//! ([`key`]). A subscription with a
//! column choice passes the captured attribute numbers as the trigger's second argument
//! (`'1 2 5'`): `row` and `old` are then records of only those columns ([`shape`]), and
//! the others are never converted (no output function of theirs runs).
//!
//! On a partition (the trigger is a clone of a partitioned table's), the event names the
//! subscribed table, with its key and column choice mapped onto the partition ([`origin`]).
//!
//! The trigger's arguments, positional: the channel; the captured columns (`'1 2 5'`,
//! empty or absent: every column); the event's operation when it is not the one that
//! fired (`INSERT` or `DELETE`, for the triggers of a row filter that fire on an UPDATE
//! moving a row into or out of the filter: see `pgpipe.create_row_triggers`). An
//! UPDATE captured as an INSERT carries the new row, one captured as a DELETE the old
//! row, as a real INSERT or DELETE does (and as pgoutput sends them in WAL mode).

pub(crate) mod json;
mod key;
mod origin;
mod shape;

use std::ffi::{c_char, CStr};
use std::ptr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::queue::{self, envelope};

/// What the trigger fired for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
    }

    fn from_event(event: pg_sys::TriggerEvent) -> Op {
        match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
            pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
            pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
            _ => Op::Truncate,
        }
    }
}

/// Declares a C-language function's calling convention (`PG_FUNCTION_INFO_V1`).
macro_rules! function_info_v1 {
    ($finfo:ident) => {
        #[no_mangle]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

// After the macro, which it uses.
mod filter;

function_info_v1!(pg_finfo_pgpipe_capture_row);
function_info_v1!(pg_finfo_pgpipe_capture_truncate);

/// `pgpipe.capture_row()`: AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW, with the
/// channel as the trigger's first argument.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgpipe_capture_row(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this through the fmgr with a valid fcinfo.
    unsafe { capture(fcinfo, true) }
}

/// `pgpipe.capture_truncate()`: AFTER TRUNCATE ... FOR EACH STATEMENT (row triggers do
/// not fire for TRUNCATE), with the channel as the trigger's first argument.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgpipe_capture_truncate(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this through the fmgr with a valid fcinfo.
    unsafe { capture(fcinfo, false) }
}

/// Raises a Postgres ERROR with a SQLSTATE.
pub(crate) fn raise(code: PgSqlErrorCode, message: String) -> ! {
    pg_sys::panic::ErrorReport::new(code, message, "pgpipe capture").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

fn protocol_error(message: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        message.to_string(),
    )
}

/// # Safety
/// `fcinfo` is the fmgr call info of a trigger call (checked).
unsafe fn capture(fcinfo: pg_sys::FunctionCallInfo, row_level: bool) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid; the context is checked to be TriggerData before use.
    let trigdata = unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            protocol_error(
                "pgpipe.capture_row() and capture_truncate() must be called as triggers",
            );
        }
        &*(context as *const pg_sys::TriggerData)
    };
    let event = trigdata.tg_event;
    let op = Op::from_event(event);
    let fired_for_row = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    if event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
        || fired_for_row != row_level
        || (op == Op::Truncate) == row_level
    {
        protocol_error(if row_level {
            "pgpipe.capture_row() must fire AFTER INSERT, UPDATE or DELETE FOR EACH ROW"
        } else {
            "pgpipe.capture_truncate() must fire AFTER TRUNCATE FOR EACH STATEMENT"
        });
    }
    // SAFETY: tg_trigger is set for every trigger call; tgargs holds tgnargs C strings.
    let (channel, columns, event_op, origin) = unsafe {
        let trigger = &*trigdata.tg_trigger;
        if trigger.tgnargs < 1 {
            protocol_error("pgpipe's capture trigger needs the channel as its argument");
        }
        let columns = if trigger.tgnargs >= 2 {
            parse_attnums(CStr::from_ptr(*trigger.tgargs.add(1))).unwrap_or_else(|| {
                protocol_error(
                    "pgpipe's capture trigger: the second argument is not a list of column numbers",
                )
            })
        } else {
            None
        };
        let event_op = if trigger.tgnargs >= 3 {
            match (op, CStr::from_ptr(*trigger.tgargs.add(2)).to_bytes()) {
                (_, b"") => op,
                (Op::Update, b"INSERT") => Op::Insert,
                (Op::Update, b"DELETE") => Op::Delete,
                _ => protocol_error(
                    "pgpipe's capture trigger: the third argument turns an UPDATE into INSERT or DELETE",
                ),
            }
        } else {
            op
        };
        // SAFETY: tg_relation is the open relation the trigger fired on.
        let origin = origin::origin(trigdata.tg_relation, trigger, columns.as_deref());
        (CStr::from_ptr(*trigger.tgargs), columns, event_op, origin)
    };
    let rel = trigdata.tg_relation;
    // A partition's columns in its own numbers.
    let columns = match &origin {
        Some(origin) => origin.columns.as_deref(),
        None => columns.as_deref(),
    };
    // SAFETY: rel is open for the trigger call.
    let projection = columns.map(|columns| unsafe {
        shape::shape(rel, shape::Columns::These(columns))
            .unwrap_or_else(|| protocol_error("pgpipe's capture trigger: no column list"))
    });
    // The tuples of the event: (row, old). The old row of an UPDATE is tg_trigtuple, its
    // new row tg_newtuple; INSERT and DELETE have only tg_trigtuple. An UPDATE captured as
    // an INSERT is its new row, one captured as a DELETE its old row.
    let (row_tuple, old_tuple) = match (op, event_op) {
        (Op::Update, Op::Update) => (trigdata.tg_newtuple, trigdata.tg_trigtuple),
        (Op::Update, Op::Insert) => (trigdata.tg_newtuple, ptr::null_mut()),
        (Op::Insert | Op::Delete | Op::Update, _) => (trigdata.tg_trigtuple, ptr::null_mut()),
        (Op::Truncate, _) => (ptr::null_mut(), ptr::null_mut()),
    };
    let op = event_op;
    // SAFETY: rel is the open relation the trigger fired on.
    let (schema, table) = unsafe {
        match &origin {
            // A partition's events name its subscribed table, as WAL mode does.
            Some(origin) => (
                pg_sys::pstrdup(origin.schema_name.as_ptr()) as *const c_char,
                pg_sys::pstrdup(origin.table_name.as_ptr()) as *const c_char,
            ),
            None => {
                let form = &*(*rel).rd_rel;
                let schema = pg_sys::get_namespace_name(form.relnamespace);
                (schema as *const c_char, form.relname.data.as_ptr())
            }
        }
    };
    // The columns of `row` and `old`: the captured ones, or all.
    // SAFETY: rel is open for the trigger call.
    let row_shape = projection.clone().unwrap_or_else(|| unsafe {
        shape::shape(rel, shape::Columns::All).expect("every table has a shape of all columns")
    });
    // The key is that of the row the event is about: its `row` (the new row, the old one
    // for DELETE).
    let key_columns = match &origin {
        Some(origin) => origin.key.as_deref().map(shape::Columns::Key),
        None => Some(shape::Columns::PrimaryKey),
    };
    // SAFETY: rel is open for the trigger call.
    let key_shape = key_columns
        .filter(|_| !row_tuple.is_null())
        .and_then(|columns| unsafe { shape::shape(rel, columns) });
    // User code (casts, output functions) runs here, before any queue relation is open.
    // SAFETY: the names are NUL-terminated strings valid for this call; the tuples are
    // rows of rel, valid for the trigger call; the shapes were made for rel.
    let (payload, key) = unsafe {
        let op = op.name().as_bytes();
        let schema = CStr::from_ptr(schema).to_bytes();
        let table = CStr::from_ptr(table).to_bytes();
        match &row_shape.json {
            Some(plan) => {
                let mut row = json::fields(rel, row_tuple, &row_shape, plan);
                let mut old = json::fields(rel, old_tuple, &row_shape, plan);
                let key = key_shape
                    .as_ref()
                    .and_then(|key| key::key_of_fields(key, &row_shape, row.as_deref()?));
                let payload = envelope::fields_payload(
                    op,
                    schema,
                    table,
                    row.as_deref_mut(),
                    old.as_deref_mut(),
                );
                (payload, key)
            }
            None => {
                // to_jsonb of records of the table's row type (or of the captured
                // columns).
                let as_datum = |tuple: pg_sys::HeapTuple| {
                    if tuple.is_null() {
                        None
                    } else if let Some(projection) = &projection {
                        Some(shape::record(rel, tuple, projection))
                    } else {
                        Some(pg_sys::heap_copy_tuple_as_datum(tuple, (*rel).rd_att))
                    }
                };
                let payload = envelope::records_payload(&envelope::Change {
                    op,
                    schema,
                    table,
                    row: as_datum(row_tuple),
                    old: as_datum(old_tuple),
                });
                let key = key_shape.as_ref().and_then(|key| {
                    let captured = projection.as_ref().map(|p| &p.attnums[..]);
                    key::key_jsonb(rel, row_tuple, key, captured, envelope::to_jsonb_record())
                });
                (payload, key)
            }
        }
    };
    // SAFETY: called inside the writer's transaction, in a trigger.
    unsafe {
        queue::insert_event(&queue::Event {
            id: crate::uuid7::uuid_generate_v7(),
            channel: channel.to_bytes(),
            operation: op.name().as_bytes(),
            payload,
            source: queue::Source::Trigger,
            lsn: None,
            key,
        })
    };
    crate::shared::mark_wakeup();
    // AFTER triggers return NULL (a null pointer, not an SQL NULL).
    pg_sys::Datum::from(0)
}

/// `'1 2 5'` as attribute numbers, `''` as Some(None) (every column); None when it is
/// not such a list.
fn parse_attnums(text: &CStr) -> Option<Option<Vec<i32>>> {
    let text = text.to_str().ok()?;
    let attnums: Vec<i32> = text
        .split_ascii_whitespace()
        .map(|n| n.parse::<i32>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()?;
    Some((!attnums.is_empty()).then_some(attnums))
}
