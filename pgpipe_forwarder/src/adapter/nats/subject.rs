//! Subject templates (`nats.subject`): `pgpipe.{channel}` by default, with the
//! placeholders `{channel}`, `{operation}` and `{key}`, and the stream subjects derived
//! from them.
//!
//! `{key}` is one subject token made of the event's key: its values in the order of the
//! column names (sorted), joined by `,`; strings as they are, other values as compact
//! JSON; `_` when the event has no key. `{"id": 7}` gives `7`, `{"a": "x", "b": 2}`
//! gives `x,2`. Characters a token may not hold (spaces, `.`, `*`, `>`) become `_`, so
//! distinct keys can share a subject (`"a.b"` and `"a_b"`): route and filter by it, and
//! read the exact key from the message body.

use crate::event::Event;

/// Placeholders a subject template may use.
pub const PLACEHOLDERS: &[&str] = &["channel", "operation", "key"];

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Text taken as it is.
    Literal(String),
    /// `{channel}`.
    Channel,
    /// `{operation}`.
    Operation,
    /// `{key}` (see the module documentation).
    Key,
}

/// A parsed, checked subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

impl Template {
    /// Parses `template`; the error says what is wrong (the caller names the key).
    pub fn parse(template: &str) -> Result<Template, String> {
        if template.is_empty() {
            return Err("the subject template is empty".into());
        }
        if let Some(c) = template
            .chars()
            .find(|c| c.is_whitespace() || matches!(c, '*' | '>'))
        {
            return Err(format!(
                "{c:?} is not allowed in a subject (no spaces, no wildcards '*' or '>')"
            ));
        }
        if template.split('.').any(str::is_empty) {
            return Err("a subject has no empty tokens (no leading, trailing or double '.')".into());
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err("a '{' without its '}'".into());
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "channel" => Part::Channel,
                "operation" => Part::Operation,
                "key" => Part::Key,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} (known: {})",
                        PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err("a '}' without its '{'".into());
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            parts,
            source: template.to_string(),
        })
    }

    /// The subject of `event`. Placeholder values cannot leave their place: characters a
    /// subject token may not hold (spaces, `*`, `>`) become `_`, an empty value `_`; a
    /// channel's `.` stays (`shop.orders` gives `pgpipe.shop.orders`).
    pub fn render(&self, event: &Event) -> String {
        let mut out = String::with_capacity(self.source.len() + event.channel.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Channel => push_value(&mut out, &event.channel, true),
                Part::Operation => push_value(&mut out, &event.operation, false),
                Part::Key => push_value(&mut out, &key_token(event.key.as_ref()), false),
            }
        }
        out
    }

    /// The subjects a stream needs to hold every subject of this template: the literal
    /// tokens before the first placeholder plus `>` (`pgpipe.{channel}` → `pgpipe.>`), the
    /// template itself when it has no placeholder; `None` when it starts with one (then
    /// `nats.stream_subjects` must say).
    pub fn stream_subjects(&self) -> Option<Vec<String>> {
        match self.parts.as_slice() {
            [Part::Literal(all)] => Some(vec![all.clone()]),
            [Part::Literal(head), ..] => {
                let prefix = head.rsplit_once('.').map(|(before, _)| before)?;
                Some(vec![format!("{prefix}.>")])
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// The text of `{key}` before token escaping (see the module documentation).
fn key_token(key: Option<&serde_json::Value>) -> String {
    let Some(serde_json::Value::Object(columns)) = key else {
        return match key {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(other) => other.to_string(),
        };
    };
    let mut names: Vec<&String> = columns.keys().collect();
    names.sort();
    names
        .iter()
        .map(|name| match &columns[name.as_str()] {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Appends `value` as (part of) a subject token; `dots` keeps `.` (a channel's hierarchy).
fn push_value(out: &mut String, value: &str, dots: bool) {
    if value.is_empty() {
        out.push('_');
        return;
    }
    for c in value.chars() {
        let bad = c.is_whitespace() || c.is_control() || matches!(c, '*' | '>') || (c == '.' && !dots);
        out.push(if bad { '_' } else { c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, operation: &str) -> Event {
        Event {
            id: uuid::Uuid::nil(),
            channel: channel.into(),
            operation: operation.into(),
            payload: serde_json::json!({}),
            key: None,
            source: "trigger".into(),
            created_at: chrono::Utc::now(),
            transaction: None,
        }
    }

    #[test]
    fn the_default_template_gives_pgpipe_channel() {
        let t = Template::parse("pgpipe.{channel}").unwrap();
        assert_eq!(t.render(&event("orders", "INSERT")), "pgpipe.orders");
        assert_eq!(t.render(&event("shop.orders", "INSERT")), "pgpipe.shop.orders");
        assert_eq!(t.stream_subjects(), Some(vec!["pgpipe.>".to_string()]));
    }

    #[test]
    fn channel_and_operation_fill_their_tokens() {
        let t = Template::parse("cdc.{channel}.{operation}").unwrap();
        assert_eq!(t.render(&event("orders", "UPDATE")), "cdc.orders.UPDATE");
        // An emitter's own operation cannot add tokens or wildcards.
        assert_eq!(t.render(&event("orders", "a.b *>")), "cdc.orders.a_b___");
        assert_eq!(t.render(&event("orders", "")), "cdc.orders._");
        assert_eq!(t.stream_subjects(), Some(vec!["cdc.>".to_string()]));
        let t = Template::parse("app.db.ev_{channel}").unwrap();
        assert_eq!(t.render(&event("t", "INSERT")), "app.db.ev_t");
        assert_eq!(t.stream_subjects(), Some(vec!["app.db.>".to_string()]));
    }

    #[test]
    fn key_is_one_token() {
        let t = Template::parse("cdc.{channel}.{key}").unwrap();
        let with_key = |key: serde_json::Value| {
            let mut e = event("orders", "INSERT");
            e.key = Some(key);
            t.render(&e)
        };
        assert_eq!(with_key(serde_json::json!({"id": 7})), "cdc.orders.7");
        assert_eq!(with_key(serde_json::json!({"b": 2, "a": "x"})), "cdc.orders.x,2");
        assert_eq!(with_key(serde_json::json!({"id": "a.b *>"})), "cdc.orders.a_b___");
        assert_eq!(with_key(serde_json::json!({"id": 1.5, "n": null})), "cdc.orders.1_5,null");
        assert_eq!(t.render(&event("orders", "INSERT")), "cdc.orders._");
        assert_eq!(t.stream_subjects(), Some(vec!["cdc.>".to_string()]));
    }

    #[test]
    fn stream_subjects_need_a_literal_prefix() {
        let fixed = Template::parse("all.events").unwrap();
        assert_eq!(fixed.stream_subjects(), Some(vec!["all.events".to_string()]));
        assert_eq!(fixed.render(&event("x", "INSERT")), "all.events");
        assert_eq!(Template::parse("{channel}.cdc").unwrap().stream_subjects(), None);
        assert_eq!(Template::parse("ev_{channel}").unwrap().stream_subjects(), None);
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (template, needle) in [
            ("", "empty"),
            ("pgpipe.>", "wildcards"),
            ("pgpipe.*", "wildcards"),
            ("pg pipe", "spaces"),
            ("pgpipe..{channel}", "empty tokens"),
            ("pgpipe.{channel}.", "empty tokens"),
            ("pgpipe.{channel", "without its '}'"),
            ("pgpipe.channel}", "without its '{'"),
            ("pgpipe.{table}", "unknown placeholder {table}"),
        ] {
            let err = Template::parse(template).unwrap_err();
            assert!(err.contains(needle), "{template:?}: {err}");
        }
    }
}
