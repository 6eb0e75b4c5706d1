//! The payload of a change event, `{"op", "schema", "table", "row", "old"}` (plus
//! `"unchanged_toast"` from WAL capture when the WAL left values out), made by one
//! jsonb construction that sorts keys and turns NULL into JSON null, so it is exactly what
//! `jsonb_build_object('op', ..., 'row', ..., 'old', ...)` gives. The trigger's `row`/`old`
//! are its tuples: fields it converted itself (`capture::json`, tables of Postgres's own
//! types: [`fields_payload`]), or records converted by one `to_jsonb` of a blessed
//! envelope record with them as fields ([`records_payload`]). The worker's are already
//! jsonb (converted as the table's owner):
//! its envelope is pushed value by value into a jsonb parse state (`pushJsonbValue`, what
//! `jsonb_build_object` and `to_jsonb` do inside), the strings as they are and the rows
//! embedded, without `to_jsonb`'s per-field type lookups and output function calls.
//! Nothing here runs user code.

use std::ffi::CStr;
use std::ptr;

use pgrx::pg_sys;

use crate::jsonb;

/// Per-backend state of the JSON conversion, allocated once in TopMemoryContext.
struct JsonState {
    /// `to_jsonb(record)`, with a call expression telling it its argument is a record.
    to_jsonb: *mut pg_sys::FmgrInfo,
    /// `(op text, schema text, "table" text, "row" record, old record)`, the trigger's.
    records: pg_sys::TupleDesc,
}

thread_local! {
    static JSON_STATE: std::cell::Cell<Option<&'static JsonState>> = const { std::cell::Cell::new(None) };
}

/// A blessed record descriptor of these fields (so that `to_jsonb` can look it up by its
/// typmod), in the current memory context.
///
/// # Safety
/// Inside a transaction (type catalog lookups).
unsafe fn blessed(fields: &[(&CStr, pg_sys::Oid)]) -> pg_sys::TupleDesc {
    // SAFETY: a template descriptor with one entry per field.
    unsafe {
        let desc = pg_sys::CreateTemplateTupleDesc(fields.len() as i32);
        for (i, (name, typid)) in fields.iter().enumerate() {
            pg_sys::TupleDescInitEntry(desc, (i + 1) as i16, name.as_ptr(), *typid, -1, 0);
        }
        pg_sys::BlessTupleDesc(desc)
    }
}

/// # Safety
/// Call inside a transaction (catalog lookups).
unsafe fn json_state() -> &'static JsonState {
    if let Some(state) = JSON_STATE.get() {
        return state;
    }
    // SAFETY: allocations in TopMemoryContext live as long as the backend; the catalog
    // lookups (fmgr_info, TupleDescInitEntry) need a transaction, which callers have.
    let state = unsafe {
        let old_cxt = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let flinfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(
            pg_sys::Oid::from(pg_sys::F_TO_JSONB),
            flinfo,
            pg_sys::TopMemoryContext,
        );
        // to_jsonb(anyelement) reads its argument's type from the call expression.
        let arg = pg_sys::makeNullConst(pg_sys::RECORDOID, -1, pg_sys::InvalidOid);
        let args = pg_sys::lappend(ptr::null_mut(), arg.cast());
        let call = pg_sys::makeFuncExpr(
            pg_sys::Oid::from(pg_sys::F_TO_JSONB),
            pg_sys::JSONBOID,
            args,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        );
        (*flinfo).fn_expr = call.cast();

        let records = blessed(&[
            (c"op", pg_sys::TEXTOID),
            (c"schema", pg_sys::TEXTOID),
            (c"table", pg_sys::TEXTOID),
            (c"row", pg_sys::RECORDOID),
            (c"old", pg_sys::RECORDOID),
        ]);
        pg_sys::MemoryContextSwitchTo(old_cxt);
        let state: &'static JsonState = Box::leak(Box::new(JsonState {
            to_jsonb: flinfo,
            records,
        }));
        state
    };
    JSON_STATE.set(Some(state));
    state
}

/// `to_jsonb(record)`: call it with a composite datum of a blessed record type. Lives as
/// long as the backend.
///
/// # Safety
/// Inside a transaction (the first call looks up the function).
pub unsafe fn to_jsonb_record() -> *mut pg_sys::FmgrInfo {
    // SAFETY: see the contract.
    unsafe { json_state().to_jsonb }
}

/// What a change event's payload holds.
pub struct Change<'a> {
    pub op: &'a [u8],
    pub schema: &'a [u8],
    /// The bare table name.
    pub table: &'a [u8],
    pub row: Option<pg_sys::Datum>,
    pub old: Option<pg_sys::Datum>,
}

/// The trigger's payload: `row`/`old` are composite datums (records), converted by the
/// same `to_jsonb` call (running their output functions and casts as the caller).
///
/// # Safety
/// Inside a transaction; `row`/`old` are composite datums without external values.
pub unsafe fn records_payload(change: &Change<'_>) -> pg_sys::Datum {
    let text = super::text_datum;
    let null = pg_sys::Datum::from(0);
    let mut values = [
        text(change.op),
        text(change.schema),
        text(change.table),
        change.row.unwrap_or(null),
        change.old.unwrap_or(null),
    ];
    let mut nulls = [
        false,
        false,
        false,
        change.row.is_none(),
        change.old.is_none(),
    ];
    // SAFETY: the envelope has 5 fields; it holds no external values (the rows were
    // flattened), so its header is a valid composite datum as it is.
    unsafe {
        let state = json_state();
        let tuple = pg_sys::heap_form_tuple(state.records, values.as_mut_ptr(), nulls.as_mut_ptr());
        let envelope = pg_sys::Datum::from((*tuple).t_data);
        pg_sys::FunctionCall1Coll(state.to_jsonb, pg_sys::InvalidOid, envelope)
    }
}

/// An envelope object begun with its `op`, `schema` and `table`.
///
/// # Safety
/// The strings stay valid until the object is finished.
unsafe fn named(op: &[u8], schema: &[u8], table: &[u8]) -> jsonb::Object {
    let mut object = jsonb::Object::new();
    // SAFETY: see the contract.
    unsafe {
        object.push(b"op", &mut jsonb::string(op));
        object.push(b"schema", &mut jsonb::string(schema));
        object.push(b"table", &mut jsonb::string(table));
    }
    object
}

/// The trigger's payload from the rows' fields, each already JSON (see
/// `capture::json`): the same object [`records_payload`] makes of their records.
///
/// # Safety
/// Inside a transaction; the fields' names and values stay valid for the call.
pub unsafe fn fields_payload(
    op: &[u8],
    schema: &[u8],
    table: &[u8],
    row: Option<&mut [(&[u8], pg_sys::JsonbValue)]>,
    old: Option<&mut [(&[u8], pg_sys::JsonbValue)]>,
) -> pg_sys::Datum {
    // SAFETY: see the contract.
    unsafe {
        let mut object = named(op, schema, table);
        object.push_object(b"row", row);
        object.push_object(b"old", old);
        object.finish()
    }
}

/// The worker's payload: `row`/`old` are jsonb, and `unchanged_toast` (a jsonb array of
/// column names) is there only when given.
///
/// # Safety
/// Inside a transaction; the datums are jsonb with a 4-byte header (built in memory, not
/// toasted).
pub unsafe fn jsonb_payload(
    change: &Change<'_>,
    unchanged_toast: Option<pg_sys::Datum>,
) -> pg_sys::Datum {
    // SAFETY: the values point to the change's strings and datums, which outlive the
    // object; the datums are jsonb (see the contract).
    unsafe {
        let mut object = named(change.op, change.schema, change.table);
        object.push(b"row", &mut jsonb::embedded(change.row));
        object.push(b"old", &mut jsonb::embedded(change.old));
        if unchanged_toast.is_some() {
            object.push(b"unchanged_toast", &mut jsonb::embedded(unchanged_toast));
        }
        object.finish()
    }
}
