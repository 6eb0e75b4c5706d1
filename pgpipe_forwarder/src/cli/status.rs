//! `pgpipe status`: what the extension knows about delivery, in one look: consumers with
//! their positions and lag, consumer groups with their members and shares, subscriptions,
//! snapshots and their progress, dead letters per adapter and the background worker's
//! state. A table for people, `--json` for scripts.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::bail;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{print_output, GlobalArgs, Run};
use crate::db::QueueClient;

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
        let json = self.json;
        super::with_database(global, self.db.as_deref(), |_, client| async move {
            let report = gather(&client).await?;
            print_report(&report, json)
        })
    }
}

fn print_report(report: &Value, json: bool) -> anyhow::Result<ExitCode> {
    let text = if json {
        let mut s = serde_json::to_string_pretty(report).expect("JSON serializes");
        s.push('\n');
        s
    } else {
        render(report)
    };
    print_output(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| {
        Value::from(t.to_rfc3339_opts(SecondsFormat::Secs, true))
    })
}

/// Queries everything shown; parts whose objects are missing (an older extension) or
/// not readable (privileges) are `null` with a note.
async fn gather(client: &Client) -> anyhow::Result<Value> {
    let queue = QueueClient::new(client);
    let Some(version) = queue.extension_version().await? else {
        bail!("the pgpipe extension is not installed in this database (CREATE EXTENSION pgpipe)");
    };
    let mut notes = Vec::new();

    let consumers = queue
        .consumer_lags()
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "name": c.name,
                "channels": c.channels,
                "position": c.position,
                "acked_at": time(c.acked_at),
                "pending_events": c.pending_events,
                "oldest_pending_at": time(c.oldest_pending_at),
                "owner": c.owner,
                "holder": c.holder,
                "stale": c.stale,
                "holds_retention": c.holds_retention,
            })
        })
        .collect::<Vec<_>>();

    // Consumer groups came with extension 0.2.0.
    let groups = if queue.has_relation("pgpipe.group_members").await {
        match queue.group_members().await {
            Ok(members) => Value::from(
                members
                    .into_iter()
                    .map(|m| {
                        json!({
                            "group": m.group,
                            "member": m.member,
                            "alive": m.alive,
                            "batch": m.batch,
                            "slots": m.slots,
                            "events": m.events,
                            "share": m.share,
                            "holder": m.holder,
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                notes.push(format!("consumer groups: {e}"));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    let subscriptions = queue
        .subscriptions()
        .await?
        .into_iter()
        .map(|s| {
            json!({
                "table": s.table,
                "channel": s.channel,
                "operations": s.operations,
                "mode": s.mode,
            })
        })
        .collect::<Vec<_>>();

    let snapshots = if queue.has_relation("pgpipe.snapshots").await {
        match queue.snapshots().await {
            Ok(snapshots) => Value::from(
                snapshots
                    .into_iter()
                    .map(|s| {
                        json!({
                            "table": s.table,
                            "state": s.state,
                            "rows": s.rows,
                            "chunks": s.chunks,
                            "started": time(Some(s.started)),
                            "finished": time(s.finished),
                            "error": s.error,
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                notes.push(format!("snapshots: {e}"));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    let dead_letters = if queue.has_relation("pgpipe.dead_letters").await {
        match queue.dead_letter_counts().await {
            Ok(counts) => Value::from(
                counts
                    .into_iter()
                    .map(|d| {
                        json!({
                            "adapter": d.adapter,
                            "count": d.count,
                            "last_failed_at": time(d.last_failed_at),
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                notes.push(format!("dead letters: {e}"));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    let worker = if queue.has_function("pgpipe.status()").await {
        match queue.worker_status().await {
            Ok(Some(w)) => json!({
                "state": w.state,
                "pid": w.pid,
                "slot_name": w.slot_name,
                "slot_status": w.slot_status,
                "lag_bytes": w.lag_bytes,
                "events_written": w.events_written,
                "last_error": w.last_error,
                "detail": w.detail,
            }),
            Ok(None) => Value::Null,
            Err(e) => {
                notes.push(format!("worker: {e}"));
                Value::Null
            }
        }
    } else {
        Value::Null
    };

    Ok(json!({
        "extension_version": version,
        "consumers": consumers,
        "group_members": groups,
        "subscriptions": subscriptions,
        "snapshots": snapshots,
        "dead_letters": dead_letters,
        "worker": worker,
        "notes": notes,
    }))
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
    if let Value::Array(rows) = &report["group_members"] {
        table(
            &mut out,
            "Consumer group members",
            &[
                ("group", "GROUP"),
                ("member", "MEMBER"),
                ("alive", "ALIVE"),
                ("slots", "SLOTS"),
                ("events", "EVENTS"),
                ("share", "SHARE"),
                ("holder", "HELD BY"),
            ],
            rows,
        );
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
    match &report["snapshots"] {
        Value::Array(rows) => table(
            &mut out,
            "Snapshots",
            &[
                ("table", "TABLE"),
                ("state", "STATE"),
                ("rows", "ROWS"),
                ("chunks", "CHUNKS"),
                ("started", "STARTED"),
                ("finished", "FINISHED"),
                ("error", "ERROR"),
            ],
            rows,
        ),
        _ => out.push_str("Snapshots\n  (not available)\n\n"),
    }
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
            "group_members": [{"group": "billing", "member": "billing.h.7", "alive": true,
                               "slots": 2, "events": 10, "share": 0.5, "holder": null}],
            "subscriptions": [],
            "snapshots": [{"table": "public.orders", "state": "running", "rows": 12000, "chunks": 12,
                           "started": "2026-01-01T00:00:00Z", "finished": null, "error": null}],
            "dead_letters": [{"adapter": "webhook", "count": 2, "last_failed_at": "2026-01-01T00:00:00Z"}],
            "worker": null,
            "notes": [],
        });
        let text = render(&report);
        assert!(text.contains("  NAME    CHANNELS  LAG (EVENTS)"), "{text}");
        assert!(text.contains("  orders  orders,x  3"), "{text}");
        assert!(text.contains("Subscriptions\n  (none)"), "{text}");
        assert!(
            text.contains("  billing  billing.h.7  true   2      10      0.5"),
            "{text}"
        );
        assert!(text.contains("  webhook  2"), "{text}");
        assert!(
            text.contains("  public.orders  running  12000  12      2026-01-01T00:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains("Background worker\n  (not available)"),
            "{text}"
        );
    }
}
