//! A captured row as JSON, value for value what `to_jsonb(record)` gives, with each
//! column's conversion decided once per table shape (see [`super::shape`]; the WAL
//! worker caches it per image shape) instead of once per value.
//!
//! `to_jsonb` looks every value's type up again (its base type, element type, row type,
//! output function: a few syscache searches per column) and reads the fields out of a
//! flattened copy of the row. Here the trigger's tuple is deformed once and each column
//! goes through the conversion `to_jsonb` would choose for its type — the same output
//! function, `numeric_in` or `JsonEncodeDateTime` call, or for integers and numerics the
//! numeric that `numeric_in` would return, made without the text — pushed into one jsonb
//! parse state with the envelope around it.
//!
//! Only Postgres's own types (and domains over them) are converted here: booleans,
//! numbers, dates and timestamps, jsonb and every other built-in scalar type (as its
//! output text). A row with a column of any other type — arrays, composites, json, and
//! every type a user created, which may have a cast to json that `to_jsonb` calls — has
//! no [`Conversion`] plan and goes through `to_jsonb` as a whole, so user code is
//! called exactly as `to_jsonb` calls it, as the writer.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::shape::Shape;
use crate::jsonb;

/// How `to_jsonb` turns a value of one column's type into JSON (`jsonb_categorize_type`
/// and `datum_to_jsonb` in Postgres's jsonb.c).
#[derive(Clone, Copy, Debug)]
pub enum Conversion {
    Bool,
    /// int2, int4, int8 (the type): the number as a numeric, which is what `numeric_in`
    /// makes of the output text, without the text.
    Integer(pg_sys::Oid),
    /// A numeric value as it is (`numeric_in` of its output text gives it back), its
    /// output text as a string when it is NaN or infinite.
    Numeric(pg_sys::Oid),
    /// Floats: the output text as a JSON number, or as a string when it holds an N or n
    /// (NaN, Infinity).
    Number(pg_sys::Oid),
    /// `JsonEncodeDateTime` of this type (date, timestamp, timestamptz).
    DateTime(pg_sys::Oid),
    /// The jsonb value itself.
    Jsonb,
    /// The output function's text, as a JSON string.
    Text(pg_sys::Oid),
}

/// jsonb's flag for a root that holds one scalar (`JB_FSCALAR`).
const JB_FSCALAR: u32 = 0x1000_0000;
/// The longest string a jsonb value holds (`JENTRY_OFFLENMASK`).
const JSONB_MAX_STRING: usize = 0x0FFF_FFFF;

/// The conversion of values of `typid`; None when `to_jsonb` must convert them itself
/// (arrays, composites, json, any type that is not Postgres's own).
///
/// # Safety
/// Inside a transaction (type catalog lookups).
pub unsafe fn conversion(typid: pg_sys::Oid) -> Option<Conversion> {
    // SAFETY: syscache lookups of a type, as jsonb_categorize_type makes them.
    unsafe {
        let base = pg_sys::getBaseType(typid);
        if base.to_u32() >= pg_sys::FirstNormalObjectId {
            return None;
        }
        let output = || {
            let mut func = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(base, &mut func, &mut varlena);
            func
        };
        Some(match base {
            pg_sys::BOOLOID => Conversion::Bool,
            pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => Conversion::Integer(base),
            pg_sys::NUMERICOID => Conversion::Numeric(output()),
            pg_sys::FLOAT4OID | pg_sys::FLOAT8OID => Conversion::Number(output()),
            pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => {
                Conversion::DateTime(base)
            }
            pg_sys::JSONBOID => Conversion::Jsonb,
            pg_sys::JSONOID
            | pg_sys::ANYARRAYOID
            | pg_sys::ANYCOMPATIBLEARRAYOID
            | pg_sys::RECORDARRAYOID => return None,
            _ if pg_sys::get_element_type(base) != pg_sys::InvalidOid
                || pg_sys::type_is_rowtype(base) =>
            {
                return None
            }
            _ => Conversion::Text(output()),
        })
    }
}

/// The conversions of these types, None when any of them has none.
///
/// # Safety
/// As [`conversion`].
pub unsafe fn plan(types: impl Iterator<Item = pg_sys::Oid>) -> Option<Vec<Conversion>> {
    // SAFETY: see the contract.
    types.map(|typid| unsafe { conversion(typid) }).collect()
}

/// One value as JSON (pointing to memory of the current context).
///
/// # Safety
/// `datum` is a value of a type `how` was made for, unless `isnull`.
pub unsafe fn value(how: Conversion, datum: pg_sys::Datum, isnull: bool) -> pg_sys::JsonbValue {
    // SAFETY: a plain C struct, all-zero is valid; the calls are those datum_to_jsonb
    // makes for the value's category.
    unsafe {
        let mut v: pg_sys::JsonbValue = std::mem::zeroed();
        if isnull {
            v.type_ = pg_sys::jbvType::jbvNull;
            return v;
        }
        match how {
            Conversion::Bool => {
                v.type_ = pg_sys::jbvType::jbvBool;
                v.val.boolean = datum.value() != 0;
            }
            Conversion::Integer(typid) => {
                let n = match typid {
                    pg_sys::INT2OID => datum.value() as i16 as i64,
                    pg_sys::INT4OID => datum.value() as i32 as i64,
                    _ => datum.value() as i64,
                };
                v.type_ = pg_sys::jbvType::jbvNumeric;
                v.val.numeric = pg_sys::int64_to_numeric(n);
            }
            Conversion::Numeric(output) => {
                // With a 4-byte header, as numeric_in returns it (a stored value may
                // have a short one).
                let numeric = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as pg_sys::Numeric;
                if pg_sys::numeric_is_nan(numeric) || pg_sys::numeric_is_inf(numeric) {
                    let text = pg_sys::OidOutputFunctionCall(output, datum);
                    v = string(text, CStr::from_ptr(text).to_bytes().len());
                } else {
                    v.type_ = pg_sys::jbvType::jbvNumeric;
                    v.val.numeric = numeric;
                }
            }
            Conversion::Number(output) => {
                let text = pg_sys::OidOutputFunctionCall(output, datum);
                let bytes = CStr::from_ptr(text).to_bytes();
                if bytes.iter().any(|&b| b == b'N' || b == b'n') {
                    v = string(text, bytes.len());
                } else {
                    v.type_ = pg_sys::jbvType::jbvNumeric;
                    v.val.numeric = pg_sys::OidInputFunctionCall(
                        pg_sys::Oid::from(pg_sys::F_NUMERIC_IN),
                        text,
                        pg_sys::InvalidOid,
                        -1,
                    )
                    .cast_mut_ptr();
                    pg_sys::pfree(text.cast());
                }
            }
            Conversion::DateTime(typid) => {
                let text = pg_sys::JsonEncodeDateTime(
                    std::ptr::null_mut(),
                    datum,
                    typid,
                    std::ptr::null(),
                );
                v = string(text, CStr::from_ptr(text).to_bytes().len());
            }
            Conversion::Jsonb => {
                let detoasted = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
                let root = &raw mut (*(detoasted as *mut pg_sys::Jsonb)).root;
                if (*root).header & JB_FSCALAR != 0 {
                    pg_sys::JsonbExtractScalar(root, &mut v);
                } else {
                    v = jsonb::embedded(Some(pg_sys::Datum::from(detoasted)));
                }
            }
            Conversion::Text(output) => {
                let text = pg_sys::OidOutputFunctionCall(output, datum);
                let len = CStr::from_ptr(text).to_bytes().len();
                if len > JSONB_MAX_STRING {
                    super::raise(
                        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "string too long to represent as jsonb string (jsonb strings cannot exceed {JSONB_MAX_STRING} bytes)"
                        ),
                    );
                }
                v = string(text, len);
            }
        }
        v
    }
}

/// A JSON string of `len` bytes at `text`.
fn string(text: *const std::ffi::c_char, len: usize) -> pg_sys::JsonbValue {
    // SAFETY: `text` points to `len` bytes (a C string from an output function).
    jsonb::string(unsafe { std::slice::from_raw_parts(text.cast(), len) })
}

/// The columns of `shape` of `tuple` (a row of `rel`) as named JSON values, in the
/// shape's order; None for no tuple.
///
/// # Safety
/// `rel` is open; `tuple` is null or one of its rows; `plan` is `shape.json`, made for
/// `rel`; inside a transaction.
pub unsafe fn fields<'a>(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    shape: &'a Shape,
    plan: &[Conversion],
) -> Option<Vec<(&'a [u8], pg_sys::JsonbValue)>> {
    if tuple.is_null() {
        return None;
    }
    // SAFETY: the tuple is deformed with its relation's descriptor; the shape's
    // attribute numbers are live columns of it, and its descriptor (names) lives in
    // CacheMemoryContext for the backend's life.
    unsafe {
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let names = (*shape.desc).attrs.as_slice(shape.attnums.len());
        Some(
            shape
                .attnums
                .iter()
                .zip(plan)
                .zip(names)
                .map(|((&attnum, &how), att)| {
                    let i = attnum as usize - 1;
                    let name = CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
                    (name, value(how, values[i], nulls[i]))
                })
                .collect(),
        )
    }
}
