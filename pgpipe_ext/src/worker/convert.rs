//! Turning decoded column values into JSON, as the captured table's owner.
//!
//! pgoutput sends each value as its type's text output. The worker turns it back into a
//! datum with the type's input function and the row into JSON with `to_jsonb` on a
//! record of the same column names and types — the conversion `to_jsonb(NEW)` makes in
//! trigger mode, so both modes give the same payload. Both steps may run code the
//! table's owner wrote (a domain's CHECK, a cast to json, an I/O function), so they run
//! as that owner inside a security-restricted operation ([`Restricted`]), the way
//! autovacuum and REFRESH MATERIALIZED VIEW run index expressions: never with the
//! worker's (superuser) rights.

use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::pgoutput::{Datum as Value, Relation};
use crate::capture::json::{self, Conversion};
use crate::jsonb;

/// The search_path user code sees while the worker converts values (what Postgres 17's
/// `RestrictSearchPath()` sets for maintenance commands).
const SAFE_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// A security-restricted operation as a given role: the current user is that role, the
/// security context forbids what SECURITY DEFINER code must not do (SET ROLE, temporary
/// objects, ...), and GUC changes (search_path pinned on entry) are undone on leaving.
///
/// Leave it with [`Restricted::leave`]. On an error the transaction's abort restores the
/// user, the security context and the GUCs, as it does for REFRESH MATERIALIZED VIEW.
pub struct Restricted {
    role: pg_sys::Oid,
    saved_user: pg_sys::Oid,
    saved_context: i32,
    nest_level: i32,
}

impl Restricted {
    /// Becomes `role` (inside a transaction).
    pub fn enter(role: pg_sys::Oid) -> Self {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        // SAFETY: out-parameters; then the pattern of matview.c / vacuum.c: switch the
        // user with the restricted flag added, open a GUC nest level and pin search_path
        // in it. Inside a transaction (the caller's).
        let nest_level = unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                role,
                saved_context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
            let nest_level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                SAFE_SEARCH_PATH.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            nest_level
        };
        Self {
            role,
            saved_user,
            saved_context,
            nest_level,
        }
    }

    /// The role converting.
    pub fn role(&self) -> pg_sys::Oid {
        self.role
    }

    /// Undoes the GUC changes made since [`Restricted::enter`] and becomes the worker again.
    pub fn leave(self) {
        // SAFETY: the nest level and the saved user come from `enter`, in this transaction.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.nest_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

/// Which columns of a relation an image holds.
type Shape = (u32, Vec<usize>);

/// How the rows of one image shape become JSON.
#[derive(Clone)]
enum Conversions {
    /// Column by column (every column is of one of Postgres's own types).
    Columns(Rc<[Conversion]>),
    /// `to_jsonb` of a record of this blessed descriptor (in `cx`).
    Record(pg_sys::TupleDesc),
}

/// Converts images of rows to jsonb; caches the type input functions and, per image
/// shape, a blessed record descriptor or, when every column is of one of Postgres's own
/// types, each column's JSON conversion (`capture::json`, as the trigger converts: the
/// values `to_jsonb` gives, without its per-value type lookups). Everything it caches
/// lives in its own long-lived memory context.
#[derive(Default)]
pub struct Converter {
    /// Child of TopMemoryContext, made on first use.
    cx: Option<pgrx::PgMemoryContexts>,
    /// Input function (in `cx`) and I/O parameter per type.
    inputs: HashMap<u32, (*mut pg_sys::FmgrInfo, pg_sys::Oid)>,
    /// How each image shape is converted.
    shapes: HashMap<Shape, Conversions>,
    /// Reused buffer for NUL-terminated values.
    text: Vec<u8>,
}

impl Converter {
    /// The cache's memory context.
    fn cx(&mut self) -> &mut pgrx::PgMemoryContexts {
        self.cx.get_or_insert_with(|| {
            // SAFETY: TopMemoryContext lives as long as the process.
            unsafe {
                pgrx::PgMemoryContexts::TopMemoryContext
                    .switch_to(|_| pgrx::PgMemoryContexts::new("pgpipe wal converter"))
            }
        })
    }

    /// Forgets what depends on a relation's shape (a new Relation message changed it).
    pub fn forget_relation(&mut self, relid: u32) {
        self.shapes.retain(|(id, _), _| *id != relid);
        if self.shapes.is_empty() && self.inputs.len() > 4096 {
            self.reset();
        }
    }

    /// Drops every cache (e.g. after a failed cycle: types may have changed).
    pub fn reset(&mut self) {
        self.inputs.clear();
        self.shapes.clear();
        if let Some(cx) = self.cx.as_mut() {
            // SAFETY: nothing refers to the context's memory any more (cleared above).
            unsafe { cx.reset() };
        }
    }

    /// The jsonb of an image (`to_jsonb` of a record of those columns), allocated in the
    /// current memory context. Call it inside [`Restricted`] as the table's owner: it
    /// runs the columns' input functions and their casts or output functions.
    pub fn image_jsonb(&mut self, rel: &Relation, image: &[(usize, &Value)]) -> pg_sys::Datum {
        let desc = match self.shape(rel, image) {
            Conversions::Columns(plan) => return self.columns_jsonb(rel, image, &plan),
            Conversions::Record(desc) => desc,
        };
        let (mut values, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = image
            .iter()
            .map(|&(column, value)| self.datum(rel, column, value))
            .unzip();
        // SAFETY: `desc` has one attribute per value, of the value's type; the tuple and
        // the result are allocated in the current memory context.
        unsafe {
            let to_jsonb = crate::queue::envelope::to_jsonb_record();
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let record = pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data);
            pg_sys::FunctionCall1Coll(to_jsonb, pg_sys::InvalidOid, record)
        }
    }

    /// The jsonb of an image of Postgres's own types: each value read back with its type's
    /// input function and converted as `to_jsonb` converts it (`plan`, in image order).
    fn columns_jsonb(
        &mut self,
        rel: &Relation,
        image: &[(usize, &Value)],
        plan: &[Conversion],
    ) -> pg_sys::Datum {
        let mut object = jsonb::Object::new();
        for (&(column, value), &how) in image.iter().zip(plan) {
            let (datum, isnull) = self.datum(rel, column, value);
            // SAFETY: the datum is a value of the column's type (its input function made
            // it), which `plan` was made for; the name outlives the object.
            unsafe {
                let mut converted = json::value(how, datum, isnull);
                object.push(rel.columns[column].name.as_bytes(), &mut converted);
            }
        }
        // SAFETY: the values point to memory of the current context.
        unsafe { object.finish() }
    }

    /// A column's value as a datum of its type and a null flag (a value the WAL left out
    /// is null).
    fn datum(&mut self, rel: &Relation, column: usize, value: &Value) -> (pg_sys::Datum, bool) {
        match value {
            Value::Text(text) => (self.input(rel.columns[column].type_oid, text), false),
            Value::Null | Value::UnchangedToast => (pg_sys::Datum::from(0usize), true),
            Value::Binary(_) => error!("pgpipe worker: unexpected binary column value"),
        }
    }

    /// The jsonb of an image with every value as its text (a JSON string), converted by
    /// no code but Postgres's jsonb input. For a table whose owner is unknown (dropped
    /// since the change): nobody whose code could run is left to run it as.
    pub fn text_image_jsonb(&mut self, rel: &Relation, image: &[(usize, &Value)]) -> pg_sys::Datum {
        let object: serde_json::Map<String, serde_json::Value> = image
            .iter()
            .map(|&(column, value)| {
                let value = match value {
                    Value::Text(text) => serde_json::Value::String(text.clone()),
                    _ => serde_json::Value::Null,
                };
                (rel.columns[column].name.clone(), value)
            })
            .collect();
        let text = serde_json::Value::Object(object).to_string();
        self.jsonb(&text)
    }

    /// JSON text as a jsonb datum (Postgres's jsonb input; built-in code only).
    pub fn jsonb(&mut self, text: &str) -> pg_sys::Datum {
        self.input(pg_sys::JSONBOID.to_u32(), text)
    }

    /// A column's text back into a datum, with its type's input function.
    fn input(&mut self, type_oid: u32, text: &str) -> pg_sys::Datum {
        let (finfo, io_param) = match self.inputs.get(&type_oid) {
            Some(&found) => found,
            None => {
                let mut input = pg_sys::Oid::INVALID;
                let mut io_param = pg_sys::Oid::INVALID;
                // SAFETY: out-parameters (errors out for an unknown type); the FmgrInfo
                // is allocated in `cx`, which lives as long as the cache entry.
                let cx = self.cx();
                let finfo = unsafe {
                    pg_sys::getTypeInputInfo(type_oid.into(), &mut input, &mut io_param);
                    let finfo = cx.palloc0_struct::<pg_sys::FmgrInfo>();
                    pg_sys::fmgr_info_cxt(input, finfo, cx.value());
                    finfo
                };
                self.inputs.insert(type_oid, (finfo, io_param));
                (finfo, io_param)
            }
        };
        if text.as_bytes().contains(&0) {
            error!("pgpipe worker: NUL in a column value");
        }
        self.text.clear();
        self.text.extend_from_slice(text.as_bytes());
        self.text.push(0);
        // SAFETY: `finfo` is the type's input function; the buffer is NUL-terminated and
        // outlives the call (input functions copy what they keep).
        unsafe { pg_sys::InputFunctionCall(finfo, self.text.as_mut_ptr().cast(), io_param, -1) }
    }

    /// How an image shape is converted: column by column, or else through `to_jsonb` of
    /// a blessed record descriptor (registered as an anonymous record type, so `to_jsonb`
    /// can look it up from the tuple).
    fn shape(&mut self, rel: &Relation, image: &[(usize, &Value)]) -> Conversions {
        let key: Shape = (rel.id, image.iter().map(|&(c, _)| c).collect());
        if let Some(found) = self.shapes.get(&key) {
            return found.clone();
        }
        // SAFETY: type catalog lookups, inside the worker's transaction.
        let plan = unsafe {
            json::plan(
                image
                    .iter()
                    .map(|&(column, _)| pg_sys::Oid::from(rel.columns[column].type_oid)),
            )
        };
        if let Some(plan) = plan {
            let found = Conversions::Columns(Rc::from(plan));
            self.shapes.insert(key, found.clone());
            return found;
        }
        let natts = i32::try_from(image.len())
            .unwrap_or_else(|_| error!("pgpipe worker: too many columns"));
        // SAFETY: a template descriptor with one entry per column, filled from the type
        // catalog (inside a transaction), in `cx`.
        let cx = self.cx();
        let desc = unsafe {
            cx.switch_to(|_| {
                let desc = pg_sys::CreateTemplateTupleDesc(natts);
                for (n, &(column, _)) in image.iter().enumerate() {
                    let col = &rel.columns[column];
                    let name = std::ffi::CString::new(col.name.as_str())
                        .unwrap_or_else(|_| error!("pgpipe worker: NUL in a column name"));
                    pg_sys::TupleDescInitEntry(
                        desc,
                        (n + 1) as pg_sys::AttrNumber,
                        name.as_ptr(),
                        col.type_oid.into(),
                        -1,
                        0,
                    );
                }
                pg_sys::BlessTupleDesc(desc)
            })
        };
        self.shapes.insert(key, Conversions::Record(desc));
        Conversions::Record(desc)
    }
}

/// The fields `names` of a jsonb object (a converted row) as a new jsonb object, in the
/// current memory context; None when one of them is missing. A change's key is its row's
/// primary-key fields: the same values converted once, with no input, output or cast
/// function run a second time.
///
/// # Safety
/// `object` is a jsonb datum with a 4-byte header (built in memory, not toasted).
pub unsafe fn object_fields(object: pg_sys::Datum, names: &[String]) -> Option<pg_sys::Datum> {
    // SAFETY: the found values point into `object` and the keys into `names`, both valid
    // until the new object is built (which copies them).
    unsafe {
        let mut key = jsonb::Object::new();
        for name in names {
            key.push(name.as_bytes(), &mut jsonb::field(object, name.as_bytes())?);
        }
        Some(key.finish())
    }
}
