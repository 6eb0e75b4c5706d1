//! `pgpipe status`: what the extension knows about delivery, in one look: consumers with
//! their positions and lag, subscriptions, dead letters per adapter and the background
//! worker's state. A table for people, `--json` for scripts.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{print_output, resolve_config, GlobalArgs, Run};
use crate::config::FlagOverride;

/// Arguments of `pgpipe status`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  pgpipe status --db postgres://app@db/shop
  pgpipe status --db postgres://app@db/shop --json | jq '.consumers[].pending_events'")]
pub struct StatusArgs {
    /// Postgres connection URL of the database with the pgpipe extension
    /// [config: database_url] [env: PGPIPE_DATABASE_URL]
    #[arg(long, value_name = "URL")]
    db: Option<String>,

    /// One JSON document instead of tables
    #[arg(long)]
    json: bool,
}

impl Run for StatusArgs {
    fn run(self, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        let mut flags = Vec::new();
        if let Some(db) = &self.db {
            flags.push(FlagOverride {
                key: "database_url",
                flag: "--db",
                value: Value::from(db.as_str()),
            });
        }
        let config = resolve_config(global, &flags)?;
        if config.database_url.trim().is_empty() {
            bail!("no database URL: pass --db or set database_url / PGPIPE_DATABASE_URL");
        }
        super::init_tracing(&config.log_level, &config.log_format);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        let report = runtime.block_on(async {
            let (client, _) = crate::db::connect(&config.database_url).await?;
            gather(&client).await
        })?;
        let text = if self.json {
            let mut s = serde_json::to_string_pretty(&report).expect("JSON serializes");
            s.push('\n');
            s
        } else {
            render(&report)
        };
        print_output(&text)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| {
        Value::from(t.to_rfc3339_opts(SecondsFormat::Secs, true))
    })
}

/// Queries everything shown; parts whose objects are missing (an older extension) or
/// not readable (privileges) are `null` with a note.
async fn gather(client: &Client) -> anyhow::Result<Value> {
    let installed: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'",
            &[],
        )
        .await
        .context("look for the pgpipe extension")?
        .map(|r| r.get(0));
    let Some(version) = installed else {
        bail!("the pgpipe extension is not installed in this database (CREATE EXTENSION pgpipe)");
    };
    let mut notes = Vec::new();

    let consumers = client
        .query(
            "SELECT name, channels, position, acked_at, pending_events, oldest_pending_at, \
             owner::text, holder, stale, holds_retention \
             FROM pgpipe.consumer_lag ORDER BY name",
            &[],
        )
        .await
        .context("read pgpipe.consumer_lag")?
        .iter()
        .map(|r| {
            json!({
                "name": r.get::<_, String>(0),
                "channels": r.get::<_, Option<Vec<String>>>(1),
                "position": r.get::<_, String>(2),
                "acked_at": time(r.get(3)),
                "pending_events": r.get::<_, i64>(4),
                "oldest_pending_at": time(r.get(5)),
                "owner": r.get::<_, Option<String>>(6),
                "holder": r.get::<_, Option<String>>(7),
                "stale": r.get::<_, Option<bool>>(8),
                "holds_retention": r.get::<_, Option<bool>>(9),
            })
        })
        .collect::<Vec<_>>();

    let subscriptions = client
        .query(
            "SELECT \"table\"::text, channel, operations, mode FROM pgpipe.subscriptions \
             ORDER BY 1",
            &[],
        )
        .await
        .context("read pgpipe.subscriptions")?
        .iter()
        .map(|r| {
            json!({
                "table": r.get::<_, String>(0),
                "channel": r.get::<_, String>(1),
                "operations": r.get::<_, Option<Vec<String>>>(2),
                "mode": r.get::<_, String>(3),
            })
        })
        .collect::<Vec<_>>();

    let has = |object: &'static str| async move {
        client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&object])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    };
    let dead_letters = if has("pgpipe.dead_letters").await {
        match client
            .query(
                "SELECT adapter, count(*), max(failed_at) FROM pgpipe.dead_letters \
                 GROUP BY adapter ORDER BY adapter",
                &[],
            )
            .await
        {
            Ok(rows) => Value::from(
                rows.iter()
                    .map(|r| {
                        json!({
                            "adapter": r.get::<_, String>(0),
                            "count": r.get::<_, i64>(1),
                            "last_failed_at": time(r.get(2)),
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                notes.push(format!("dead letters: {}", db_message(&e)));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    let has_status: bool = client
        .query_one("SELECT to_regprocedure('pgpipe.status()') IS NOT NULL", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(false);
    let worker = if has_status {
        match client
            .query_opt(
                "SELECT worker_state, worker_pid, slot_name, slot_status, lag_bytes::text, \
                 events_written, last_error, detail FROM pgpipe.status()",
                &[],
            )
            .await
        {
            Ok(Some(r)) => json!({
                "state": r.get::<_, Option<String>>(0),
                "pid": r.get::<_, Option<i32>>(1),
                "slot_name": r.get::<_, Option<String>>(2),
                "slot_status": r.get::<_, Option<String>>(3),
                "lag_bytes": r.get::<_, Option<String>>(4),
                "events_written": r.get::<_, Option<i64>>(5),
                "last_error": r.get::<_, Option<String>>(6),
                "detail": r.get::<_, Option<String>>(7),
            }),
            Ok(None) => Value::Null,
            Err(e) => {
                notes.push(format!("worker: {}", db_message(&e)));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    Ok(json!({
        "extension_version": version,
        "consumers": consumers,
        "subscriptions": subscriptions,
        "dead_letters": dead_letters,
        "worker": worker,
        "notes": notes,
    }))
}

fn db_message(e: &tokio_postgres::Error) -> String {
    crate::error::server_said(e).to_string()
}

/// Text of a JSON value in a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Left-aligned columns under a header, two spaces apart.
fn table(out: &mut String, title: &str, columns: &[(&str, &str)], rows: &[Value]) {
    let _ = writeln!(out, "{title}");
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)\n");
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(key, _)| cell(&r[*key])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, head))| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([head.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let mut l = String::from(" ");
        for (v, w) in values.iter().zip(&widths) {
            let _ = write!(l, " {v:<w$} ");
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(columns.iter().map(|(_, h)| *h).collect()));
    for row in &cells {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out.push('\n');
}

fn render(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pgpipe extension {}\n",
        cell(&report["extension_version"])
    );
    let list = |key: &str| report[key].as_array().cloned().unwrap_or_default();
    table(
        &mut out,
        "Consumers",
        &[
            ("name", "NAME"),
            ("channels", "CHANNELS"),
            ("pending_events", "LAG (EVENTS)"),
            ("oldest_pending_at", "OLDEST PENDING"),
            ("acked_at", "LAST ACK"),
            ("owner", "OWNER"),
            ("holder", "HELD BY"),
            ("position", "POSITION"),
        ],
        &list("consumers"),
    );
    // Never silence: a consumer nobody acknowledges for keeps every event from its
    // position on (pgpipe.consumer_stale_after).
    for c in list("consumers") {
        if c["stale"] == Value::Bool(true) {
            let _ = writeln!(
                out,
                "STALE: consumer {} has acknowledged nothing since {} and {}; run its forwarder again \
                 or drop it: SELECT pgpipe.drop_consumer('{}');",
                cell(&c["name"]),
                cell(&c["acked_at"]),
                if c["holds_retention"] == Value::Bool(true) {
                    "holds queue retention back"
                } else {
                    "keeps its events in the queue"
                },
                cell(&c["name"]).replace('\'', "''"),
            );
        }
    }
    table(
        &mut out,
        "Subscriptions",
        &[
            ("table", "TABLE"),
            ("channel", "CHANNEL"),
            ("operations", "OPERATIONS"),
            ("mode", "MODE"),
        ],
        &list("subscriptions"),
    );
    match &report["dead_letters"] {
        Value::Array(rows) => table(
            &mut out,
            "Dead letters",
            &[
                ("adapter", "ADAPTER"),
                ("count", "COUNT"),
                ("last_failed_at", "LAST FAILED"),
            ],
            rows,
        ),
        _ => out.push_str("Dead letters\n  (not available)\n\n"),
    }
    match &report["worker"] {
        Value::Object(_) => table(
            &mut out,
            "Background worker",
            &[
                ("state", "STATE"),
                ("pid", "PID"),
                ("slot_name", "SLOT"),
                ("slot_status", "SLOT STATUS"),
                ("lag_bytes", "LAG (BYTES)"),
                ("events_written", "EVENTS WRITTEN"),
                ("last_error", "LAST ERROR"),
            ],
            std::slice::from_ref(&report["worker"]),
        ),
        _ => out.push_str("Background worker\n  (not available)\n\n"),
    }
    for note in list("notes") {
        let _ = writeln!(out, "note: {}", cell(&note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_show_missing_values() {
        let report = json!({
            "extension_version": "0.1.0",
            "consumers": [{"name": "orders", "channels": ["orders", "x"], "pending_events": 3,
                           "oldest_pending_at": null, "acked_at": null, "position": "1:1://"}],
            "subscriptions": [],
            "dead_letters": [{"adapter": "webhook", "count": 2, "last_failed_at": "2026-01-01T00:00:00Z"}],
            "worker": null,
            "notes": [],
        });
        let text = render(&report);
        assert!(text.contains("  NAME    CHANNELS  LAG (EVENTS)"), "{text}");
        assert!(text.contains("  orders  orders,x  3"), "{text}");
        assert!(text.contains("Subscriptions\n  (none)"), "{text}");
        assert!(text.contains("  webhook  2"), "{text}");
        assert!(
            text.contains("Background worker\n  (not available)"),
            "{text}"
        );
    }
}
