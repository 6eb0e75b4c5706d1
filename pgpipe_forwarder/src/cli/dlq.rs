//! `pgpipe dlq list | replay | purge`: the dead letters in `pgpipe.dead_letters`.
//!
//! `replay` sends dead letters through adapters built as `pgpipe listen` builds them: from
//! the config file, the PGPIPE_* environment and `listen`'s own adapter flags (`-u`,
//! `--signing-key`, `--file-path`, ...), so a replayed webhook is signed as the first
//! delivery was. It deletes each dead letter its adapter acknowledged. An event that
//! fails again is dead-lettered again by the adapter (a new row), and its old row goes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use chrono::SecondsFormat;
use clap::{Args, Subcommand};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{print_output, GlobalArgs, Run};
use crate::ack::Acker;
use crate::config::{Config, FlagOverride};
use crate::db::{DeadLetter, DeadLetterFilter, QueueClient};
use crate::event::{Delivery, Event};

/// Widest error text shown by `dlq list` (use --json for all of it).
const ERROR_WIDTH: usize = 60;

/// Arguments of `pgpipe dlq`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  pgpipe dlq list --db postgres://app@db/shop
  pgpipe dlq replay --db postgres://app@db/shop --adapter webhook --id 12
  pgpipe dlq replay --db postgres://app@db/shop -u https://hooks.example/in --signing-key \"$KEY\"
  pgpipe dlq purge --db postgres://app@db/shop --older-than 7d")]
pub struct DlqArgs {
    /// Postgres connection URL of the database with pgpipe.dead_letters
    /// [config: database_url] [env: PGPIPE_DATABASE_URL]
    #[arg(long, value_name = "URL", global = true)]
    db: Option<String>,

    /// What to do.
    #[command(subcommand)]
    command: DlqCommand,
}

/// `pgpipe dlq` subcommands.
// Parsed once at startup: the size of the `replay` variant (listen's flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first
    List(ListArgs),
    /// Deliver dead letters again and delete those delivered
    Replay(ReplayArgs),
    /// Delete dead letters
    Purge(PurgeArgs),
}

/// Which dead letters a command works on.
#[derive(Debug, Args)]
struct Filter {
    /// Only dead letters of this adapter (list, purge); replay: deliver through this
    /// adapter instead of each letter's own
    #[arg(short = 'a', long, value_name = "NAME")]
    adapter: Option<String>,

    /// Only these dead letters (repeatable or comma-separated)
    #[arg(long, value_name = "N", value_delimiter = ',')]
    id: Vec<i64>,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    filter: Filter,
    /// Most rows shown
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: i64,
    /// One JSON object per line, with the whole event and error
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    filter: Filter,
    #[command(flatten)]
    adapters: AdapterFlags,
}

/// `pgpipe listen`'s adapter flags: a replay builds its adapters from the same flags,
/// environment and config file as `listen`, so it delivers (and signs) as `listen` does.
/// A test below keeps this list equal to `listen`'s.
#[derive(Debug, Default, Args)]
struct AdapterFlags {
    #[command(flatten)]
    webhook: crate::adapter::webhook::Flags,
    #[command(flatten)]
    file: crate::adapter::file::Flags,
    #[command(flatten)]
    exec: crate::adapter::exec::Flags,
    #[command(flatten)]
    pg_table: crate::adapter::pg_table::Flags,
    #[command(flatten)]
    nats: crate::adapter::nats::Flags,
}

impl AdapterFlags {
    /// The config keys set by the flags that were given.
    fn overrides(&self) -> Vec<FlagOverride> {
        let mut out = Vec::new();
        self.webhook.overrides(&mut out);
        self.file.overrides(&mut out);
        self.exec.overrides(&mut out);
        self.pg_table.overrides(&mut out);
        self.nats.overrides(&mut out);
        out
    }
}

#[derive(Debug, Args)]
struct PurgeArgs {
    #[command(flatten)]
    filter: Filter,
    /// Only dead letters that failed longer ago than this (e.g. 7d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

/// One row of pgpipe.dead_letters.
type Letter = DeadLetter;

impl Run for DlqArgs {
    fn run(self, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        let flags = match &self.command {
            DlqCommand::Replay(args) => args.adapters.overrides(),
            DlqCommand::List(_) | DlqCommand::Purge(_) => Vec::new(),
        };
        super::with_database_and(
            global,
            self.db.as_deref(),
            flags,
            |config, client| async move {
                match self.command {
                    DlqCommand::List(args) => list(&client, args).await,
                    DlqCommand::Replay(args) => replay(&client, &config, args).await,
                    DlqCommand::Purge(args) => purge(&client, args).await,
                }
            },
        )
    }
}

impl Filter {
    fn as_db(&self) -> DeadLetterFilter<'_> {
        DeadLetterFilter {
            adapter: self.adapter.as_deref(),
            ids: &self.id,
        }
    }
}

async fn select(client: &Client, filter: &Filter, limit: i64) -> anyhow::Result<Vec<Letter>> {
    QueueClient::new(client)
        .dead_letters(filter.as_db(), limit)
        .await
        .map_err(explain)
}

/// A database error, with a hint when the table is missing.
fn explain(e: crate::error::Error) -> anyhow::Error {
    let missing = e.sqlstate() == Some(tokio_postgres::error::SqlState::UNDEFINED_TABLE.code());
    if missing {
        anyhow::anyhow!("{e} (is the pgpipe extension installed? CREATE EXTENSION pgpipe)")
    } else {
        anyhow::anyhow!("{e}")
    }
}

async fn list(client: &Client, args: ListArgs) -> anyhow::Result<ExitCode> {
    let letters = select(client, &args.filter, args.limit).await?;
    let mut out = String::new();
    if args.json {
        for l in &letters {
            let row = serde_json::json!({
                "id": l.id, "event_id": l.event_id, "channel": l.channel, "adapter": l.adapter,
                "attempts": l.attempts, "failed_at": l.failed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                "error": l.error, "event": l.event,
            });
            out.push_str(&row.to_string());
            out.push('\n');
        }
    } else if letters.is_empty() {
        out.push_str("no dead letters\n");
    } else {
        let rows: Vec<[String; 7]> = letters
            .iter()
            .map(|l| {
                [
                    l.id.to_string(),
                    l.failed_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                    l.adapter.clone(),
                    l.channel.clone(),
                    l.event_id.to_string(),
                    l.attempts.to_string(),
                    shorten(&l.error, ERROR_WIDTH),
                ]
            })
            .collect();
        out = table(
            [
                "ID",
                "FAILED_AT",
                "ADAPTER",
                "CHANNEL",
                "EVENT_ID",
                "ATTEMPTS",
                "ERROR",
            ],
            &rows,
        );
    }
    print_output(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn shorten(s: &str, width: usize) -> String {
    let s = s.replace('\n', " ");
    match s.char_indices().nth(width.saturating_sub(1)) {
        Some((i, _)) if s.chars().count() > width => format!("{}…", &s[..i]),
        _ => s,
    }
}

async fn replay(client: &Client, config: &Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let letters = select(client, &args.filter, i64::MAX).await?;
    if letters.is_empty() {
        print_output("no dead letters to replay\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let newest_before = letters.iter().map(|l| l.id).max().unwrap_or(0);
    // Group by the adapter that delivers them, keeping id order within each.
    let mut groups: BTreeMap<String, Vec<&Letter>> = BTreeMap::new();
    for l in &letters {
        let target = args
            .filter
            .adapter
            .clone()
            .unwrap_or_else(|| l.adapter.clone());
        groups.entry(target).or_default().push(l);
    }
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let mut report = String::new();
    let mut exit = ExitCode::SUCCESS;
    for (name, group) in groups {
        let finished = match deliver(config, &name, &group, &cancel).await {
            Ok(n) => n,
            Err(e) => {
                report.push_str(&format!("{name}: {} not replayed: {e}\n", group.len()));
                exit = ExitCode::FAILURE;
                continue;
            }
        };
        let done: Vec<i64> = group[..finished].iter().map(|l| l.id).collect();
        let done_events: Vec<uuid::Uuid> = group[..finished].iter().map(|l| l.event_id).collect();
        let queue = QueueClient::new(client);
        let again = queue
            .dead_letters_again(newest_before, &done_events)
            .await
            .map_err(explain)?;
        queue.delete_dead_letters(&done).await.map_err(explain)?;
        report.push_str(&format!(
            "{name}: {} delivered, {} failed again{}, {} not finished\n",
            finished - again.len(),
            again.len(),
            if again.is_empty() {
                String::new()
            } else {
                format!(
                    " (now dead letters {})",
                    again
                        .iter()
                        .map(|i| format!("#{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            group.len() - finished
        ));
        if !again.is_empty() || finished < group.len() {
            exit = ExitCode::FAILURE;
        }
    }
    ctrl_c.abort();
    print_output(&report)?;
    Ok(exit)
}

/// Runs adapter `name` over `letters`; returns how many (from the first) it finished.
async fn deliver(
    config: &Config,
    name: &str,
    letters: &[&Letter],
    cancel: &CancellationToken,
) -> anyhow::Result<usize> {
    let adapter = crate::adapter::build_one(config, name)?;
    if !adapter.durable() {
        bail!("adapter {name} does not acknowledge deliveries; replay through a durable one");
    }
    let (tx, rx) = tokio::sync::mpsc::channel(letters.len().max(1));
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, letter) in letters.iter().enumerate() {
        let event: Event = serde_json::from_value(letter.event.clone())
            .with_context(|| format!("dead letter #{} holds no valid event", letter.id))?;
        tx.try_send(Delivery {
            seq: i as u64 + 1,
            event: Arc::new(event),
        })
        .expect("channel sized for every letter");
    }
    drop(tx);
    let result = adapter.run(rx, Acker::new(0, ack_tx), cancel.clone()).await;
    let mut finished = 0u64;
    while let Ok((_, seq)) = ack_rx.try_recv() {
        finished = finished.max(seq);
    }
    result?;
    Ok(usize::try_from(finished)
        .unwrap_or(usize::MAX)
        .min(letters.len()))
}

async fn purge(client: &Client, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let older = args.older_than.map(|d| {
        let secs = d.as_secs_f64();
        format!("{secs} seconds")
    });
    let deleted = QueueClient::new(client)
        .purge_dead_letters(args.filter.as_db(), older.as_deref())
        .await
        .map_err(explain)?;
    print_output(&format!("purged {deleted} dead letter(s)\n"))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::{Args as _, Parser as _};

    use super::*;

    /// The adapter flags (help heading "Adapters", besides `--adapter`) of a command.
    fn adapter_flags(command: &clap::Command) -> BTreeSet<String> {
        command
            .get_arguments()
            .filter(|a| a.get_help_heading() == Some("Adapters") && a.get_id() != "adapters")
            .map(|a| a.get_id().to_string())
            .collect()
    }

    #[test]
    fn replay_takes_every_adapter_flag_of_listen() {
        let listen = super::super::listen::ListenArgs::augment_args(clap::Command::new("listen"));
        let replay = ReplayArgs::augment_args(clap::Command::new("replay"));
        assert!(adapter_flags(&listen).contains("signing_key"));
        assert_eq!(adapter_flags(&replay), adapter_flags(&listen));
    }

    #[test]
    fn replay_flags_become_the_same_overrides_as_listen() {
        let cli = super::super::Cli::try_parse_from([
            "pgpipe",
            "dlq",
            "replay",
            "--db",
            "postgres://h/db",
            "-u",
            "https://hooks.example/in",
            "--signing-key",
            "k",
            "-a",
            "webhook",
        ])
        .expect("listen's flags parse");
        let super::super::Command::Dlq(args) = cli.command else {
            panic!("not dlq: {:?}", cli.command);
        };
        let DlqCommand::Replay(replay) = args.command else {
            panic!("not replay");
        };
        assert_eq!(replay.filter.adapter.as_deref(), Some("webhook"));
        let keys: Vec<&str> = replay.adapters.overrides().iter().map(|o| o.key).collect();
        assert_eq!(keys, ["webhook.url", "webhook.signing_key"]);
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            ["ID", "ERROR"],
            &[["1".into(), "HTTP 400".into()], ["12".into(), "x".into()]],
        );
        assert_eq!(t, "ID  ERROR\n1   HTTP 400\n12  x\n");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }
}
