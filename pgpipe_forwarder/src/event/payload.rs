//! An event's payload, carried as JSON text.
//!
//! Most adapters only copy the payload into their output (a JSON line, a webhook body, an
//! SSE frame), so the forwarder keeps the text it read from Postgres instead of building a
//! `serde_json::Value` and serialising it again for every event; that round trip was most
//! of the forwarder's CPU per event. Code that needs the structure (a subject template, an
//! output format) asks [`Payload::value`], which parses once per event and keeps the result.
//!
//! The text is compact JSON (no whitespace between tokens) whatever produced it, so the
//! bytes adapters write are the same as when the payload was a `Value`, and two payloads
//! are equal when their texts are.

use std::error::Error as StdError;
use std::fmt;
use std::sync::OnceLock;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// The version byte of Postgres' binary `jsonb` format.
const JSONB_VERSION: u8 = 1;

/// A JSON payload: its compact text, and its parsed form once somebody asked for it.
#[derive(Clone)]
pub struct Payload {
    raw: Box<RawValue>,
    parsed: OnceLock<Value>,
}

impl Payload {
    /// A payload from JSON text (any whitespace between tokens is removed). Fails when
    /// `text` is not one JSON value.
    pub fn from_json(text: &str) -> Result<Payload, serde_json::Error> {
        let raw = RawValue::from_string(compact(text))?;
        Ok(Payload {
            raw,
            parsed: OnceLock::new(),
        })
    }

    /// The payload as compact JSON text.
    pub fn get(&self) -> &str {
        self.raw.get()
    }

    /// The payload's structure, parsed on first use and kept for the event's other readers.
    pub fn value(&self) -> &Value {
        self.parsed
            .get_or_init(|| serde_json::from_str(self.raw.get()).unwrap_or(Value::Null))
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Payload {
        // Serialising a Value cannot fail (its keys are strings); `null` keeps this total.
        // The value is not kept: an event in flight holds its payload once, as text.
        let raw = serde_json::value::to_raw_value(&value).unwrap_or_default();
        Payload {
            raw,
            parsed: OnceLock::new(),
        }
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::from(Value::Null)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    // Through a Value: the raw form only deserialises from serde_json's own text
    // deserialiser, and events are read back (dead letters, exec) rarely.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
        Value::deserialize(d).map(Payload::from)
    }
}

impl<'a> FromSql<'a> for Payload {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Payload, Box<dyn StdError + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((&JSONB_VERSION, rest)) => rest,
                _ => return Err("unsupported jsonb encoding version".into()),
            }
        } else {
            raw
        };
        Ok(Payload::from_json(std::str::from_utf8(text)?)?)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }
}

impl ToSql for Payload {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(JSONB_VERSION);
        }
        out.put_slice(self.raw.get().as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    to_sql_checked!();
}

/// `text` without whitespace outside strings. Postgres prints jsonb as `{"a": 1, "b": 2}`;
/// a payload carried as text must print like the compact serialisation of its value.
fn compact(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut skipped = false;
    for &b in bytes {
        if skipped && !in_string {
            skipped = false;
            // Whitespace between two values (`1 2`) is kept, so that the text stays
            // invalid instead of becoming `12`.
            let after_value = out.last().is_some_and(|p| !b"{[,:".contains(p));
            if after_value && !b"}],: \n\r\t".contains(&b) {
                out.push(b' ');
            }
        }
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            skipped = true;
        } else {
            in_string = b == b'"';
            out.push(b);
        }
    }
    // Only ASCII whitespace was removed, outside strings: still valid UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn postgres_text_prints_like_the_compact_value() {
        let text = r#"{"op": "INSERT", "row": {"id": 1, "note": "a \"b\" c: d, e", "total": 10.50}, "old": null}"#;
        let p = Payload::from_json(text).unwrap();
        let via_value =
            serde_json::to_string(&serde_json::from_str::<Value>(text).unwrap()).unwrap();
        assert_eq!(p.get(), via_value);
        assert_eq!(
            p.get(),
            r#"{"op":"INSERT","row":{"id":1,"note":"a \"b\" c: d, e","total":10.50},"old":null}"#
        );
        assert_eq!(p.value()["row"]["total"].to_string(), "10.50");
    }

    #[test]
    fn a_value_and_its_text_are_the_same_payload() {
        let v = json!({"n": 1, "s": "x y"});
        assert_eq!(
            Payload::from(v.clone()),
            Payload::from_json(r#"{ "n" : 1 , "s": "x y" }"#).unwrap()
        );
        assert_eq!(Payload::from(v.clone()).value(), &v);
        let event_json = serde_json::to_string(&Payload::from(v)).unwrap();
        assert_eq!(event_json, r#"{"n":1,"s":"x y"}"#);
        let back: Payload = serde_json::from_value(json!({"n": 1, "s": "x y"})).unwrap();
        assert_eq!(back.get(), r#"{"n":1,"s":"x y"}"#);
    }

    #[test]
    fn not_json_is_refused() {
        assert!(Payload::from_json("{\"a\": ").is_err());
        assert!(Payload::from_json("1 2").is_err());
    }

    #[test]
    fn jsonb_binary_round_trips() {
        let p = Payload::from_json(r#"{"a": [1, 2]}"#).unwrap();
        let mut buf = BytesMut::new();
        p.to_sql(&Type::JSONB, &mut buf).unwrap();
        assert_eq!(&buf[..], b"\x01{\"a\":[1,2]}");
        assert_eq!(Payload::from_sql(&Type::JSONB, &buf).unwrap(), p);
        assert!(Payload::from_sql(&Type::JSONB, b"\x02{}").is_err());
    }
}
