//! pgoutput's text values to typed JSON, by the rules of Postgres' `to_jsonb`, so that a
//! row replicated by the `wal` detector reads the same as one captured by a trigger with
//! `to_jsonb(NEW)`:
//!
//! - `bool` → `true`/`false`;
//! - `int2/int4/int8/float4/float8/numeric` → a JSON number, written as `numeric` would
//!   print it (`1e+300` becomes `1` and 300 zeros, `10.50` keeps its zero); `NaN` and the
//!   infinities → strings;
//! - `json`/`jsonb` → the parsed JSON (numbers as `jsonb` prints them);
//! - `timestamp`/`timestamptz` → ISO 8601 with a `T` (`2026-11-27T02:14:52.123456+00:00`),
//!   `date` as printed (`2026-11-27`);
//! - arrays of any of these → JSON arrays (nested for multi-dimensional arrays);
//! - composite types → JSON objects of their attributes, each converted by these rules;
//! - everything else (text, uuid, `oid`, money, intervals, enums, ranges, ...) → the
//!   value's text as a JSON string. Domains convert as their base type. (Types with their
//!   own cast to json, such as hstore, are the exception: they stay strings here.)
//!
//! The walsender must print values with `DateStyle=ISO` (the detector sets it).

use serde_json::Value;

/// How a column's text is turned into JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `true`/`false` from `t`/`f`.
    Bool,
    /// A JSON number (strings for NaN/Infinity).
    Number,
    /// Parsed JSON.
    Json,
    /// `timestamp` (no zone).
    Timestamp,
    /// `timestamptz`.
    TimestampTz,
    /// The text as a JSON string.
    Text,
    /// An array of elements of a kind, with the element type's delimiter.
    Array(Box<Kind>, u8),
    /// A composite (row) type: a JSON object of its attributes.
    Composite(Vec<(String, Kind)>),
}

/// The kind of a built-in type, or `None` when the type must be looked up (user types,
/// domains, arrays of them).
pub fn builtin_kind(oid: u32) -> Option<Kind> {
    let array = |k: Kind| Some(Kind::Array(Box::new(k), b','));
    match oid {
        16 => Some(Kind::Bool),
        20 | 21 | 23 | 700 | 701 | 1700 => Some(Kind::Number),
        114 | 3802 => Some(Kind::Json),
        1114 => Some(Kind::Timestamp),
        1184 => Some(Kind::TimestampTz),
        1000 => array(Kind::Bool),
        1005 | 1007 | 1016 | 1021 | 1022 | 1231 => array(Kind::Number),
        199 | 3807 => array(Kind::Json),
        1115 => array(Kind::Timestamp),
        1185 => array(Kind::TimestampTz),
        // box[] is the one built-in array whose elements are separated by ';'.
        1020 => Some(Kind::Array(Box::new(Kind::Text), b';')),
        // Common arrays of text-like elements.
        1009 | 1015 | 1014 | 1003 | 2951 | 1182 | 1183 | 1028 | 1002 | 1187 | 1270 | 1561
        | 1563 | 1041 | 651 | 1040 | 2211 | 1001 | 1008 | 1010 | 1011 | 1012 | 1017 | 1018
        | 1019 => array(Kind::Text),
        _ if is_builtin_scalar(oid) => Some(Kind::Text),
        _ => None,
    }
}

/// Built-in scalar types that convert as text (no lookup needed).
fn is_builtin_scalar(oid: u32) -> bool {
    matches!(
        oid,
        17 | 18
            | 19
            | 25
            | 26
            | 27
            | 28
            | 29
            | 142
            | 600
            | 601
            | 602
            | 603
            | 604
            | 628
            | 650
            | 718
            | 774
            | 790
            | 829
            | 869
            | 1042
            | 1043
            | 1082
            | 1083
            | 1186
            | 1266
            | 1560
            | 1562
            | 1790
            | 2202
            | 2203
            | 2204
            | 2205
            | 2206
            | 2950
            | 3220
            | 3614
            | 3615
            | 3734
            | 3769
            | 4089
            | 4096
            | 5038
            | 3904
            | 3906
            | 3908
            | 3910
            | 3912
            | 3926
            | 4451
            | 4532
            | 4533
            | 4534
            | 4535
            | 4536
            | 3500
            | 2249
    )
}

/// Converts one non-null text value.
pub fn to_json(kind: &Kind, text: &str) -> Value {
    match kind {
        Kind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            other => Value::String(other.to_string()),
        },
        Kind::Number => number(text),
        Kind::Json => match serde_json::from_str::<Value>(text) {
            Ok(v) => normalize_json_numbers(v),
            Err(_) => Value::String(text.to_string()),
        },
        Kind::Timestamp | Kind::TimestampTz => Value::String(iso_timestamp(text)),
        Kind::Text => Value::String(text.to_string()),
        Kind::Array(element, delimiter) => match parse_array(text, *delimiter) {
            Some(tree) => array_to_json(&tree, element),
            None => Value::String(text.to_string()),
        },
        Kind::Composite(attributes) => match parse_record(text) {
            Some(fields) if fields.len() == attributes.len() => Value::Object(
                attributes
                    .iter()
                    .zip(fields)
                    .map(|((name, kind), field)| {
                        let value = match field {
                            Some(text) => to_json(kind, &text),
                            None => Value::Null,
                        };
                        (name.clone(), value)
                    })
                    .collect(),
            ),
            _ => Value::String(text.to_string()),
        },
    }
}

/// Parses a composite value's text (`(1,"a b",,"x""y")`): fields in order, `None` for an
/// empty unquoted field (NULL; `""` is the empty string). `None` if the text is not a
/// record literal.
pub fn parse_record(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let b = inner.as_bytes();
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let mut out = Vec::new();
        let mut quoted = false;
        let mut had_quotes = false;
        while let Some(&c) = b.get(pos) {
            match c {
                b',' if !quoted => break,
                b'"' if quoted && b.get(pos + 1) == Some(&b'"') => {
                    out.push(b'"');
                    pos += 2;
                }
                b'"' => {
                    quoted = !quoted;
                    had_quotes = true;
                    pos += 1;
                }
                b'\\' => {
                    out.push(*b.get(pos + 1)?);
                    pos += 2;
                }
                c => {
                    out.push(c);
                    pos += 1;
                }
            }
        }
        if quoted {
            return None;
        }
        let field = String::from_utf8(out).ok()?;
        fields.push((had_quotes || !field.is_empty()).then_some(field));
        if pos >= b.len() {
            return Some(fields);
        }
        pos += 1; // the comma
    }
}

/// A number as `to_jsonb` writes it: the text of a valid JSON number re-printed the way
/// `numeric` prints it; anything else (NaN, Infinity) as a string.
pub fn number(text: &str) -> Value {
    match canonical_number(text) {
        Some(canonical) => match serde_json::from_str::<Value>(&canonical) {
            Ok(v @ Value::Number(_)) => v,
            _ => Value::String(text.to_string()),
        },
        None => Value::String(text.to_string()),
    }
}

/// `numeric_out(numeric_in(text))` for a text that is a valid JSON number: exponents are
/// expanded (`1.5e-07` → `0.00000015`, `1e+3` → `1000`), the scale is kept
/// (`10.50` stays), negative zero loses its sign. `None` if `text` is not a JSON number.
pub fn canonical_number(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_part = &text[int_start..i];
    if int_part.is_empty() || (int_part.len() > 1 && int_part.starts_with('0')) {
        return None;
    }
    let mut frac_part = "";
    if i < bytes.len() && bytes[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        frac_part = &text[start..i];
        if frac_part.is_empty() {
            return None;
        }
    }
    let mut exponent: i64 = 0;
    let has_exponent = i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E');
    if has_exponent {
        i += 1;
        let mut exp_negative = false;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            exp_negative = bytes[i] == b'-';
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i || i - start > 6 {
            return None;
        }
        exponent = text[start..i].parse().ok()?;
        if exp_negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return None;
    }
    // digits × 10^(point - digits.len()): the decimal point sits `point` digits in.
    let digits: String = [int_part, frac_part].concat();
    let point = int_part.len() as i64 + exponent;
    let scale = (frac_part.len() as i64 - exponent).max(0) as usize;
    let (int_digits, frac_digits) = if point <= 0 {
        (String::from("0"), "0".repeat((-point) as usize) + &digits)
    } else if point as usize >= digits.len() {
        (
            digits.clone() + &"0".repeat(point as usize - digits.len()),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    let int_trimmed = int_digits.trim_start_matches('0');
    let int_out = if int_trimmed.is_empty() {
        "0"
    } else {
        int_trimmed
    };
    let mut frac_out: String = frac_digits.chars().take(scale).collect();
    while frac_out.len() < scale {
        frac_out.push('0');
    }
    let zero = int_out == "0" && frac_out.bytes().all(|b| b == b'0');
    let mut out = String::with_capacity(int_out.len() + frac_out.len() + 2);
    if negative && !zero {
        out.push('-');
    }
    out.push_str(int_out);
    if !frac_out.is_empty() {
        out.push('.');
        out.push_str(&frac_out);
    }
    Some(out)
}

/// Numbers inside a json/jsonb value as `jsonb` prints them.
fn normalize_json_numbers(v: Value) -> Value {
    match v {
        Value::Number(n) => number(&n.to_string()),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(normalize_json_numbers).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, normalize_json_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `2026-11-27 02:14:52.123456+00` → `2026-11-27T02:14:52.123456+00:00`; `infinity` and
/// other non-dates unchanged; a ` BC` suffix is kept.
pub fn iso_timestamp(text: &str) -> String {
    let Some((date, rest)) = text.split_once(' ') else {
        return text.to_string();
    };
    if !date.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return text.to_string();
    }
    let (time, era) = match rest.strip_suffix(" BC") {
        Some(t) => (t, " BC"),
        None => (rest, ""),
    };
    // The zone starts at the first sign after the time of day.
    let time = match time.find(['+', '-']) {
        Some(at) if time.len() - at == 3 => format!("{time}:00"),
        _ => time.to_string(),
    };
    format!("{date}T{time}{era}")
}

/// A parsed array literal: elements (None = NULL) or nested arrays.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayItem {
    /// An element; `None` for an unquoted NULL.
    Element(Option<String>),
    /// A sub-array (multi-dimensional arrays).
    Nested(Vec<ArrayItem>),
}

/// Parses Postgres' array text format (`{1,2}`, `{{a,"b c"},{NULL,"x\"y"}}`, with an
/// optional `[0:1]=` dimension prefix). `None` if the text is not an array literal.
pub fn parse_array(text: &str, delimiter: u8) -> Option<Vec<ArrayItem>> {
    let body = if text.starts_with('[') {
        &text[text.find('=')? + 1..]
    } else {
        text
    };
    let bytes = body.as_bytes();
    let mut pos = 0;
    let items = parse_level(bytes, &mut pos, delimiter)?;
    if pos != bytes.len() {
        return None;
    }
    Some(items)
}

fn parse_level(b: &[u8], pos: &mut usize, delimiter: u8) -> Option<Vec<ArrayItem>> {
    if b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match b.get(*pos)? {
            b'{' => items.push(ArrayItem::Nested(parse_level(b, pos, delimiter)?)),
            b'"' => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match *b.get(*pos)? {
                        b'\\' => {
                            out.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            out.push(c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Element(Some(String::from_utf8(out).ok()?)));
            }
            _ => {
                let start = *pos;
                let mut out = Vec::new();
                while let Some(&c) = b.get(*pos) {
                    if c == delimiter || c == b'}' {
                        break;
                    }
                    if c == b'\\' {
                        out.push(*b.get(*pos + 1)?);
                        *pos += 2;
                        continue;
                    }
                    out.push(c);
                    *pos += 1;
                }
                if *pos == start {
                    return None;
                }
                let raw = String::from_utf8(out).ok()?;
                let raw = raw.trim().to_string();
                if raw.eq_ignore_ascii_case("NULL") && !b[start..*pos].contains(&b'\\') {
                    items.push(ArrayItem::Element(None));
                } else {
                    items.push(ArrayItem::Element(Some(raw)));
                }
            }
        }
        match *b.get(*pos)? {
            c if c == delimiter => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

fn array_to_json(items: &[ArrayItem], element: &Kind) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| match item {
                ArrayItem::Element(None) => Value::Null,
                ArrayItem::Element(Some(text)) => to_json(element, text),
                ArrayItem::Nested(inner) => array_to_json(inner, element),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text_of(v: &Value) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn numbers_print_as_numeric_does() {
        for (input, want) in [
            ("10.50", "10.50"),
            ("42", "42"),
            ("-7", "-7"),
            ("1e+300", &format!("1{}", "0".repeat(300))),
            ("1.5e-07", "0.00000015"),
            ("1e-05", "0.00001"),
            ("1.25e1", "12.5"),
            ("1.5e+2", "150"),
            ("-0", "0"),
            ("-0.00", "0.00"),
            ("123456789012", "123456789012"),
            ("0.1", "0.1"),
            (
                "12345678901234567890.123456789",
                "12345678901234567890.123456789",
            ),
        ] {
            assert_eq!(canonical_number(input).as_deref(), Some(want), "{input}");
            assert_eq!(text_of(&number(input)), want, "{input}");
        }
        for special in [
            "NaN",
            "Infinity",
            "-Infinity",
            "",
            "1.",
            ".5",
            "01",
            "+1",
            "1e",
        ] {
            assert_eq!(canonical_number(special), None, "{special}");
            assert_eq!(number(special), json!(special));
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(to_json(&Kind::Bool, "t"), json!(true));
        assert_eq!(to_json(&Kind::Bool, "f"), json!(false));
        assert_eq!(to_json(&Kind::Text, "hello"), json!("hello"));
        assert_eq!(
            text_of(&to_json(&Kind::Json, r#"{"k": "v", "n": [1, 2.50, 1e2]}"#)),
            r#"{"k":"v","n":[1,2.50,100]}"#
        );
        assert_eq!(
            text_of(&to_json(&Kind::Json, r#"{"n":2.50}"#)),
            r#"{"n":2.50}"#
        );
        assert_eq!(to_json(&Kind::Json, "not json"), json!("not json"));
        assert_eq!(
            builtin_kind(26),
            Some(Kind::Text),
            "oid is a string in to_jsonb"
        );
        assert_eq!(builtin_kind(1700), Some(Kind::Number));
        assert_eq!(builtin_kind(16384), None);
    }

    #[test]
    fn timestamps_get_a_t() {
        assert_eq!(
            iso_timestamp("2026-11-27 02:14:52.123456+00"),
            "2026-11-27T02:14:52.123456+00:00"
        );
        assert_eq!(
            iso_timestamp("2020-01-01 15:30:00+05:30"),
            "2020-01-01T15:30:00+05:30"
        );
        assert_eq!(
            iso_timestamp("1800-01-01 15:53:28+05:53:28"),
            "1800-01-01T15:53:28+05:53:28"
        );
        assert_eq!(iso_timestamp("2020-01-01 10:00:00"), "2020-01-01T10:00:00");
        assert_eq!(
            iso_timestamp("2020-01-01 10:00:00-08"),
            "2020-01-01T10:00:00-08:00"
        );
        assert_eq!(
            iso_timestamp("0044-03-15 12:00:00 BC"),
            "0044-03-15T12:00:00 BC"
        );
        assert_eq!(
            iso_timestamp("0044-03-15 17:53:28+05:53:28 BC"),
            "0044-03-15T17:53:28+05:53:28 BC"
        );
        assert_eq!(iso_timestamp("infinity"), "infinity");
        assert_eq!(iso_timestamp("-infinity"), "-infinity");
    }

    #[test]
    fn arrays() {
        let ints = Kind::Array(Box::new(Kind::Number), b',');
        assert_eq!(to_json(&ints, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(&ints, "[0:1]={1,2}"), json!([1, 2]));
        assert_eq!(to_json(&ints, "{}"), json!([]));
        let texts = Kind::Array(Box::new(Kind::Text), b',');
        assert_eq!(
            to_json(
                &texts,
                r#"{"a b","{x}",NULL,"NULL","q\"uote","back\\slash",plain}"#
            ),
            json!([
                "a b",
                "{x}",
                null,
                "NULL",
                "q\"uote",
                "back\\slash",
                "plain"
            ])
        );
        let boxes = Kind::Array(Box::new(Kind::Text), b';');
        assert_eq!(
            to_json(&boxes, "{(3,4),(1,2);(7,8),(5,6)}"),
            json!(["(3,4),(1,2)", "(7,8),(5,6)"])
        );
        let jsons = Kind::Array(Box::new(Kind::Json), b',');
        assert_eq!(to_json(&jsons, r#"{"{\"a\": 1}"}"#), json!([{"a": 1}]));
        let stamps = Kind::Array(Box::new(Kind::TimestampTz), b',');
        assert_eq!(
            to_json(&stamps, r#"{"2020-01-01 10:00:00+00"}"#),
            json!(["2020-01-01T10:00:00+00:00"])
        );
        let pair = Kind::Composite(vec![
            ("a".into(), Kind::Number),
            ("b".into(), Kind::Text),
            ("c".into(), Kind::Array(Box::new(Kind::Number), b',')),
            ("d".into(), Kind::Json),
        ]);
        assert_eq!(
            text_of(&to_json(&pair, r#"(1,"x y","{1.50,2}","{""k"": 1}")"#)),
            r#"{"a":1,"b":"x y","c":[1.50,2],"d":{"k":1}}"#
        );
        assert_eq!(
            to_json(&pair, r#"(,"",,)"#),
            json!({"a": null, "b": "", "c": null, "d": null})
        );
        assert_eq!(
            to_json(&pair, r#"(2,"a""b\\c,(d)",,)"#),
            json!({"a": 2, "b": "a\"b\\c,(d)", "c": null, "d": null})
        );
        assert_eq!(
            to_json(&pair, "(1,2)"),
            json!("(1,2)"),
            "wrong arity stays text"
        );
        let pairs = Kind::Array(Box::new(pair), b',');
        assert_eq!(
            to_json(&pairs, r#"{"(1,q,,)"}"#),
            json!([{"a": 1, "b": "q", "c": null, "d": null}])
        );
        let floats = Kind::Array(Box::new(Kind::Number), b',');
        assert_eq!(to_json(&floats, "{NaN,1e+3}"), json!(["NaN", 1000]));
        assert_eq!(
            to_json(&ints, "{1,2"),
            json!("{1,2"),
            "broken literal stays text"
        );
    }
}
