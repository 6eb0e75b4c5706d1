//! jsonb without SQL: an object's field, and objects built value by value, with the
//! functions jsonb's own SQL functions use (`getKeyJsonValueFromContainer` as `->` does,
//! `pushJsonbValue` as `jsonb_build_object` does: keys sorted, the last of equal keys
//! kept). Values pointing into other data stay valid only as long as it does; building a
//! datum copies them.

use std::ptr;

use pgrx::pg_sys;
use pgrx::pg_sys::JsonbIteratorToken::{WJB_BEGIN_OBJECT, WJB_END_OBJECT, WJB_KEY, WJB_VALUE};

/// The root container of a jsonb datum.
///
/// # Safety
/// `datum` is a jsonb with a 4-byte header (built in memory, not toasted).
unsafe fn root(datum: pg_sys::Datum) -> *mut pg_sys::JsonbContainer {
    // SAFETY: see the contract.
    unsafe { &raw mut (*datum.cast_mut_ptr::<pg_sys::Jsonb>()).root }
}

/// The value of `name` in a jsonb object (pointing into it); None when it has none.
///
/// # Safety
/// As [`root`].
pub unsafe fn field(object: pg_sys::Datum, name: &[u8]) -> Option<pg_sys::JsonbValue> {
    // SAFETY: a plain C struct, all-zero is valid; the lookup reads the container.
    unsafe {
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        let found = pg_sys::getKeyJsonValueFromContainer(
            root(object),
            name.as_ptr().cast(),
            name.len() as i32,
            &mut value,
        );
        (!found.is_null()).then_some(value)
    }
}

/// A JSON string of these bytes (pointing to them).
pub fn string(s: &[u8]) -> pg_sys::JsonbValue {
    // SAFETY: a plain C struct, all-zero is valid; the string arm of the union is set.
    unsafe {
        let mut v: pg_sys::JsonbValue = std::mem::zeroed();
        v.type_ = pg_sys::jbvType::jbvString;
        v.val.string.len = s.len() as i32;
        v.val.string.val = s.as_ptr().cast_mut().cast();
        v
    }
}

/// A jsonb datum as a value to embed (pointing into it); None as JSON null.
///
/// # Safety
/// As [`root`].
pub unsafe fn embedded(datum: Option<pg_sys::Datum>) -> pg_sys::JsonbValue {
    // SAFETY: a plain C struct, all-zero is valid; the binary arm points at the root
    // container, which pushJsonbValue unpacks.
    unsafe {
        let mut v: pg_sys::JsonbValue = std::mem::zeroed();
        match datum {
            None => v.type_ = pg_sys::jbvType::jbvNull,
            Some(datum) => {
                v.type_ = pg_sys::jbvType::jbvBinary;
                v.val.binary.len = pgrx::varsize_any_exhdr(datum.cast_mut_ptr()) as i32;
                v.val.binary.data = root(datum);
            }
        }
        v
    }
}

/// A value as a new jsonb datum (in the current memory context).
///
/// # Safety
/// `value` and what it points to are valid.
pub unsafe fn datum(value: &mut pg_sys::JsonbValue) -> pg_sys::Datum {
    // SAFETY: see the contract.
    unsafe { pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(value)) }
}

/// An object being built (its parse state in the current memory context).
pub struct Object {
    state: *mut pg_sys::JsonbParseState,
}

impl Object {
    pub fn new() -> Object {
        let mut state: *mut pg_sys::JsonbParseState = ptr::null_mut();
        // SAFETY: starts a parse state (allocated in the current memory context).
        unsafe { pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, ptr::null_mut()) };
        Object { state }
    }

    /// Adds a field.
    ///
    /// # Safety
    /// `key` and what `value` points to stay valid until [`Object::finish`].
    pub unsafe fn push(&mut self, key: &[u8], value: &mut pg_sys::JsonbValue) {
        let mut key = string(key);
        // SAFETY: see the contract (pushJsonbValue copies the values, not what they
        // point to).
        unsafe {
            pg_sys::pushJsonbValue(&mut self.state, WJB_KEY, &mut key);
            pg_sys::pushJsonbValue(&mut self.state, WJB_VALUE, value);
        }
    }

    /// Adds a field whose value is an object of these fields (null when None).
    ///
    /// # Safety
    /// As [`Object::push`], for every key and value.
    pub unsafe fn push_object(
        &mut self,
        key: &[u8],
        fields: Option<&mut [(&[u8], pg_sys::JsonbValue)]>,
    ) {
        let Some(fields) = fields else {
            return unsafe { self.push(key, &mut embedded(None)) };
        };
        let mut key = string(key);
        // SAFETY: see the contract; a WJB_BEGIN_OBJECT after a key opens the key's value.
        unsafe {
            pg_sys::pushJsonbValue(&mut self.state, WJB_KEY, &mut key);
            pg_sys::pushJsonbValue(&mut self.state, WJB_BEGIN_OBJECT, ptr::null_mut());
            for (name, value) in fields.iter_mut() {
                self.push(name, value);
            }
            pg_sys::pushJsonbValue(&mut self.state, WJB_END_OBJECT, ptr::null_mut());
        }
    }

    /// The object as a jsonb datum (in the current memory context).
    ///
    /// # Safety
    /// What the pushed values and keys point to is still valid.
    pub unsafe fn finish(mut self) -> pg_sys::Datum {
        // SAFETY: see the contract.
        unsafe {
            let object = pg_sys::pushJsonbValue(&mut self.state, WJB_END_OBJECT, ptr::null_mut());
            datum(&mut *object)
        }
    }
}
