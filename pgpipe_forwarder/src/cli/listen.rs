//! `pgpipe listen`: loads the configuration, then runs the pipeline until SIGINT/SIGTERM.
//!
//! Every flag is optional with no clap default, so a flag that was not given never
//! overrides the environment or the config file; defaults live in [`Config::default`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{init_tracing, GlobalArgs, Run};
use crate::config::{self, Config, ConfigFile, FlagOverride};

/// Shown after `pgpipe listen --help`.
const AFTER_HELP: &str = "\
Every option can also be set in the config file (key in [config: ...]) or the environment \
(PGPIPE_ + the key upper-cased, `.` and `-` as `_`); flags win over the environment, which \
wins over the file. List-valued variables take comma-separated values \
(PGPIPE_CHANNELS=orders,payments). Durations are written 5s, 100ms, 1m30s.

SIGINT or SIGTERM stops reading, lets adapters drain for shutdown_timeout and exits 0; a \
second signal exits at once.

Examples:
  pgpipe listen --db postgres://app@db/shop -c orders
  pgpipe listen --db postgres://app@db/shop -c orders -a webhook -u https://hooks.example/in \\
      --signing-key \"$KEY\"
  pgpipe listen --detector wal --publication pgpipe_orders -a file --file-path events.jsonl";

/// Arguments of `pgpipe listen`.
#[derive(Debug, Default, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ListenArgs {
    // --- source -------------------------------------------------------------------------
    /// Postgres connection URL (required) [config: database_url] [env: PGPIPE_DATABASE_URL]
    #[arg(long, value_name = "URL", help_heading = "Source")]
    db: Option<String>,

    /// Channel to forward; repeat or comma-separate for several. Required unless
    /// --detector wal [config: channels] [env: PGPIPE_CHANNELS]
    #[arg(
        short = 'c',
        long = "channel",
        value_name = "NAME",
        value_delimiter = ',',
        help_heading = "Source"
    )]
    channels: Vec<String>,

    /// Where events come from; without it, `queue` when the pgpipe extension is installed,
    /// else `listen_notify` [config: detector.type] [env: PGPIPE_DETECTOR_TYPE]
    #[arg(long, value_name = "TYPE", value_parser = ["queue", "listen_notify", "wal"], help_heading = "Source")]
    detector: Option<String>,

    /// Queue detector: consumer name whose position is kept in pgpipe.consumers, e.g.
    /// orders+webhook [default: derived from the channels and adapters]
    /// [config: detector.consumer] [env: PGPIPE_DETECTOR_CONSUMER]
    #[arg(long, value_name = "NAME", help_heading = "Source")]
    consumer: Option<String>,

    /// Queue detector: where a consumer that does not exist yet starts: every retained
    /// event (beginning) or what is committed from now on (now) [default: beginning]
    /// [config: detector.start] [env: PGPIPE_DETECTOR_START]
    #[arg(long, value_name = "WHERE", value_parser = ["beginning", "now"], help_heading = "Source")]
    start: Option<String>,
    /// Queue detector: join consumer group NAME; forwarders with the same group and
    /// channels share the events, each key on one member [config: detector.group]
    /// [env: PGPIPE_DETECTOR_GROUP]
    #[arg(long, value_name = "NAME", help_heading = "Source")]
    group: Option<String>,

    /// Queue detector: this forwarder's member name in --group (derived from the group,
    /// host and pid when not given) [config: detector.group_member]
    /// [env: PGPIPE_DETECTOR_GROUP_MEMBER]
    #[arg(long, value_name = "NAME", help_heading = "Source")]
    group_member: Option<String>,

    /// Queue detector: a group member not heard from for this long is replaced
    /// [default: 30s] [config: detector.group_member_timeout]
    /// [env: PGPIPE_DETECTOR_GROUP_MEMBER_TIMEOUT]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Source")]
    group_member_timeout: Option<Duration>,

    /// Queue detector: poll interval when no wake-up arrives [default: 50ms]
    /// [config: detector.poll_interval] [env: PGPIPE_DETECTOR_POLL_INTERVAL]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Source")]
    poll_interval: Option<Duration>,

    /// Most events read per batch [default: 5000] [config: detector.batch_size]
    /// [env: PGPIPE_DETECTOR_BATCH_SIZE]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Source")]
    batch_size: Option<u32>,

    /// Most events delivered but not yet acknowledged by every durable adapter
    /// [default: 10000] [config: detector.max_in_flight] [env: PGPIPE_DETECTOR_MAX_IN_FLIGHT]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Source")]
    max_in_flight: Option<u64>,

    // --- wal ----------------------------------------------------------------------------
    /// Publication to replicate (required with --detector wal unless --all-tables)
    /// [config: detector.publication] [env: PGPIPE_DETECTOR_PUBLICATION]
    #[arg(long, value_name = "NAME", help_heading = "WAL detector")]
    publication: Option<String>,

    /// Persistent replication slot name [default: derived] [config: detector.slot]
    /// [env: PGPIPE_DETECTOR_SLOT]
    #[arg(long, value_name = "NAME", help_heading = "WAL detector")]
    slot: Option<String>,

    /// Capture every table through a FOR ALL TABLES publication [config: detector.all_tables]
    /// [env: PGPIPE_DETECTOR_ALL_TABLES]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "WAL detector")]
    all_tables: Option<bool>,

    /// Add transaction {xid, commit_time, seq} to every event [config: detector.tx_metadata]
    /// [env: PGPIPE_DETECTOR_TX_METADATA]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "WAL detector")]
    tx_metadata: Option<bool>,

    /// Emit BEGIN/COMMIT marker events around each transaction [config: detector.tx_markers]
    /// [env: PGPIPE_DETECTOR_TX_MARKERS]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "WAL detector")]
    tx_markers: Option<bool>,

    // --- adapters -----------------------------------------------------------------------
    /// Adapter to deliver to; repeat or comma-separate for several [default: stdout]
    /// [config: adapters] [env: PGPIPE_ADAPTERS]
    #[arg(
        short = 'a',
        long = "adapter",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(crate::adapter::registry::names()),
        help_heading = "Adapters"
    )]
    adapters: Vec<String>,

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

    // --- http ---------------------------------------------------------------------------
    /// Listen address of the HTTP server: SSE, WebSocket, /healthz, /metrics [default: :8080]
    /// [config: sse.addr] [env: PGPIPE_SSE_ADDR]
    #[arg(long, value_name = "ADDR", help_heading = "HTTP")]
    sse_addr: Option<String>,

    /// WebSocket ping interval [default: 15s] [config: websocket.ping_interval]
    /// [env: PGPIPE_WEBSOCKET_PING_INTERVAL]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "HTTP")]
    ws_ping_interval: Option<Duration>,

    /// Address of a standalone /healthz + /metrics server [default: none]
    /// [config: metrics_addr] [env: PGPIPE_METRICS_ADDR]
    #[arg(long, value_name = "ADDR", help_heading = "HTTP")]
    metrics_addr: Option<String>,

    /// Bearer token SSE and WebSocket clients must send (Authorization header or ?token=)
    /// [default: none] [config: sse.auth_token] [env: PGPIPE_SSE_AUTH_TOKEN]
    #[arg(long, value_name = "TOKEN", help_heading = "HTTP")]
    auth_token: Option<String>,
}

impl ListenArgs {
    /// The config keys set by the flags that were given.
    pub fn overrides(&self) -> Vec<FlagOverride> {
        let mut out = Vec::new();
        let mut set = |key: &'static str, flag: &'static str, value: Option<Value>| {
            if let Some(value) = value {
                out.push(FlagOverride { key, flag, value });
            }
        };
        let string = |s: &Option<String>| s.as_ref().map(|s| Value::from(s.as_str()));
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| Value::from(v.clone()));
        let duration = |d: &Option<Duration>| {
            d.map(|d| Value::from(humantime::format_duration(d).to_string()))
        };

        set("database_url", "--db", string(&self.db));
        set("channels", "--channel", list(&self.channels));
        set("detector.type", "--detector", string(&self.detector));
        set("detector.consumer", "--consumer", string(&self.consumer));
        set("detector.start", "--start", string(&self.start));
        set("detector.group", "--group", string(&self.group));
        set(
            "detector.group_member",
            "--group-member",
            string(&self.group_member),
        );
        set(
            "detector.group_member_timeout",
            "--group-member-timeout",
            duration(&self.group_member_timeout),
        );
        set(
            "detector.poll_interval",
            "--poll-interval",
            duration(&self.poll_interval),
        );
        set(
            "detector.batch_size",
            "--batch-size",
            self.batch_size.map(Value::from),
        );
        set(
            "detector.max_in_flight",
            "--max-in-flight",
            self.max_in_flight.map(Value::from),
        );
        set(
            "detector.publication",
            "--publication",
            string(&self.publication),
        );
        set("detector.slot", "--slot", string(&self.slot));
        set(
            "detector.all_tables",
            "--all-tables",
            self.all_tables.map(Value::from),
        );
        set(
            "detector.tx_metadata",
            "--tx-metadata",
            self.tx_metadata.map(Value::from),
        );
        set(
            "detector.tx_markers",
            "--tx-markers",
            self.tx_markers.map(Value::from),
        );
        set("adapters", "--adapter", list(&self.adapters));
        set("sse.addr", "--sse-addr", string(&self.sse_addr));
        set(
            "websocket.ping_interval",
            "--ws-ping-interval",
            duration(&self.ws_ping_interval),
        );
        set("metrics_addr", "--metrics-addr", string(&self.metrics_addr));
        set("sse.auth_token", "--auth-token", string(&self.auth_token));
        // Each adapter's own flags.
        self.webhook.overrides(&mut out);
        self.file.overrides(&mut out);
        self.exec.overrides(&mut out);
        self.pg_table.overrides(&mut out);
        self.nats.overrides(&mut out);
        out
    }
}

impl Run for ListenArgs {
    fn run(self, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        let file = ConfigFile::discover(global.config.as_deref())?;
        let mut flags = global.overrides();
        flags.extend(self.overrides());
        let config = config::load(
            &Config::default(),
            file.as_ref(),
            &config::process_env,
            &flags,
        )?;

        init_tracing(config.log_level, config.log_format);
        match &file {
            Some(f) => tracing::info!(component = "cli", file = %f.name, "config file loaded"),
            None => tracing::info!(
                component = "cli",
                "no config file; using flags, env and defaults"
            ),
        }
        // Debug output of Config masks passwords, the signing key and header values.
        tracing::debug!(component = "cli", config = ?config, "configuration");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        let drain = config.shutdown_timeout;
        let result = runtime.block_on(serve(config));
        // Tasks still blocked (a stuck stdin write, say) must not hold the process forever.
        runtime.shutdown_timeout(drain);
        result?;
        tracing::info!(component = "cli", "stopped");
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs the pipeline with signal handling: the first SIGINT/SIGTERM cancels the token, a
/// second one exits at once.
async fn serve(config: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    // Installed before the pipeline starts so an early signal is not lost.
    let signals = Signals::install().context("install signal handlers")?;
    let watcher = tokio::spawn(watch_signals(signals, cancel.clone()));
    let result = crate::run(config, cancel).await;
    watcher.abort();
    result.map_err(anyhow::Error::from)
}

async fn watch_signals(mut signals: Signals, cancel: CancellationToken) {
    let name = signals.recv().await;
    tracing::info!(
        component = "cli",
        signal = name,
        "shutting down; send it again to exit at once"
    );
    cancel.cancel();
    let name = signals.recv().await;
    tracing::warn!(
        component = "cli",
        signal = name,
        "second signal: exiting without draining"
    );
    // 128 + SIGINT, what a shell reports for an interrupted command.
    std::process::exit(130);
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    #[cfg(unix)]
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) -> &'static str {
        // Without a handler there is nothing to wait for; never resolve.
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 5s, 100ms, 1m30s)"))
}

#[cfg(test)]
mod tests {
    use super::super::Cli;
    use super::*;
    use clap::Parser;

    fn listen_args(args: &[&str]) -> (GlobalArgs, ListenArgs) {
        let cli = Cli::try_parse_from(std::iter::once("pgpipe").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            super::super::Command::Listen(l) => (cli.global, l),
            other => panic!("not listen: {other:?}"),
        }
    }

    #[test]
    fn group_flags_set_the_detector_keys() {
        let (_, l) = listen_args(&[
            "listen",
            "--db",
            "postgres://h/db",
            "-c",
            "orders",
            "--group",
            "billing",
            "--group-member",
            "billing-1",
            "--group-member-timeout",
            "5s",
        ]);
        let no_env = |_: &str| None;
        let c = config::load(&Config::default(), None, &no_env, &l.overrides()).expect("valid");
        assert_eq!(c.detector.group, "billing");
        assert_eq!(c.detector.group_member, "billing-1");
        assert_eq!(c.detector.group_member_timeout, Duration::from_secs(5));

        let (_, l) = listen_args(&[
            "listen",
            "--db",
            "postgres://h/db",
            "-c",
            "orders",
            "--group",
            "billing",
            "--detector",
            "wal",
            "--publication",
            "p",
        ]);
        let err = config::load(&Config::default(), None, &no_env, &l.overrides()).unwrap_err();
        assert!(
            err.to_string()
                .contains("only works with the queue detector"),
            "{err}"
        );
    }

    #[test]
    fn no_flags_override_nothing() {
        let (_, l) = listen_args(&["listen"]);
        assert!(l.overrides().is_empty());
    }

    #[test]
    fn every_flag_sets_an_existing_key() {
        let (global, l) = listen_args(&[
            "--log-format",
            "json",
            "listen",
            "--db",
            "postgres://u:p@h/db",
            "-c",
            "orders,payments",
            "--channel",
            "users",
            "--detector",
            "wal",
            "--consumer",
            "c1",
            "--poll-interval",
            "1s 500ms",
            "--batch-size",
            "7",
            "--max-in-flight",
            "8",
            "--publication",
            "pub",
            "--slot",
            "slot_1",
            "--all-tables",
            "--tx-metadata",
            "--tx-markers=false",
            "-a",
            "stdout,webhook",
            "-a",
            "file",
            "--adapter",
            "exec",
            "-a",
            "pg_table",
            "-u",
            "https://hooks.example/in",
            "--retries",
            "3",
            "--signing-key",
            "k",
            "--file-path",
            "/tmp/e.jsonl",
            "--file-max-size",
            "2MiB",
            "--file-max-files",
            "9",
            "--exec-command",
            "cat > /dev/null",
            "--pg-table-url",
            "postgres://h/other",
            "--pg-table-name",
            "audit.events",
            "--sse-addr",
            "127.0.0.1:0",
            "--ws-ping-interval",
            "3s",
            "--metrics-addr",
            ":9100",
            "--log-level",
            "warn",
        ]);
        let mut flags = global.overrides();
        flags.extend(l.overrides());
        let no_env = |_: &str| None;
        let c = config::load(&Config::default(), None, &no_env, &flags).expect("valid");
        assert_eq!(c.database_url, "postgres://u:p@h/db");
        assert_eq!(c.channels, ["orders", "payments", "users"]);
        assert_eq!(c.detector.kind, crate::config::DetectorKind::Wal);
        assert_eq!(c.detector.consumer, "c1");
        assert_eq!(c.detector.poll_interval, Duration::from_millis(1500));
        assert_eq!((c.detector.batch_size, c.detector.max_in_flight), (7, 8));
        assert_eq!(
            (c.detector.publication.as_str(), c.detector.slot.as_str()),
            ("pub", "slot_1")
        );
        assert!(c.detector.all_tables && c.detector.tx_metadata && !c.detector.tx_markers);
        assert_eq!(
            c.adapters,
            ["stdout", "webhook", "file", "exec", "pg_table"]
        );
        assert_eq!(c.webhook.url, "https://hooks.example/in");
        assert_eq!(
            (c.webhook.max_retries, c.webhook.signing_key.expose()),
            (3, "k")
        );
        assert_eq!(c.file.path, std::path::PathBuf::from("/tmp/e.jsonl"));
        assert_eq!((c.file.max_size, c.file.max_files), (2 << 20, 9));
        assert_eq!(c.exec.command, "cat > /dev/null");
        assert_eq!(
            (c.pg_table.url.as_str(), c.pg_table.table.as_str()),
            ("postgres://h/other", "audit.events")
        );
        assert_eq!(c.sse.addr, "127.0.0.1:0");
        assert_eq!(c.websocket.ping_interval, Duration::from_secs(3));
        assert_eq!(c.metrics_addr, ":9100");
        assert_eq!(
            (c.log_level.as_str(), c.log_format.as_str()),
            ("warn", "json")
        );
    }

    /// The `[default: ..]`, `[config: ..]` and `[env: ..]` notes in the help are hand-written;
    /// they must agree with `Config::default()` and the env naming rule.
    #[test]
    fn help_notes_match_the_config() {
        use clap::CommandFactory;
        let defaults = serde_json::to_value(Config::default()).expect("serializes");
        let cmd = Cli::command();
        let listen = cmd.find_subcommand("listen").expect("listen exists");
        let note = |help: &str, tag: &str| {
            let start = help.find(&format!("[{tag}: "))? + tag.len() + 3;
            let len = help[start..].find(']')?;
            Some(help[start..start + len].to_owned())
        };
        let mut checked = 0;
        for arg in listen.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(key) = note(&help, "config") else {
                continue;
            };
            let leaf = key
                .split('.')
                .try_fold(&defaults, |node, part| node.get(part))
                .unwrap_or_else(|| {
                    panic!("{key} in the help of --{} is no config key", arg.get_id())
                });
            assert_eq!(
                note(&help, "env"),
                Some(config::env_var_name(&key)),
                "{key}"
            );
            let Some(default) = note(&help, "default") else {
                continue;
            };
            let matches = match leaf {
                Value::Number(n) => config::parse_size(&default).ok() == n.as_u64(),
                Value::Array(items) => {
                    let items: Vec<_> = items.iter().filter_map(Value::as_str).collect();
                    items.join(", ") == default
                }
                Value::String(s) if s.is_empty() => [
                    "none",
                    "derived",
                    "derived from the channels and adapters",
                    "--db",
                ]
                .contains(&default.as_str()),
                Value::String(s) => match (
                    humantime::parse_duration(s),
                    humantime::parse_duration(&default),
                ) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => *s == default,
                },
                other => serde_json::from_str::<Value>(&default).ok().as_ref() == Some(other),
            };
            assert!(
                matches,
                "help of --{} says default {default:?}, Config has {leaf}",
                arg.get_id()
            );
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} defaults checked");
    }

    #[test]
    fn flags_beat_environment() {
        let (_, l) = listen_args(&["listen", "--db", "postgres://flag/db", "-c", "a"]);
        let env = |name: &str| match name {
            "PGPIPE_DATABASE_URL" => Some("postgres://env/db".to_owned()),
            "PGPIPE_CHANNELS" => Some("b,c".to_owned()),
            "PGPIPE_ADAPTERS" => Some("stdout".to_owned()),
            _ => None,
        };
        let c = config::load(&Config::default(), None, &env, &l.overrides()).expect("valid");
        assert_eq!(c.database_url, "postgres://flag/db");
        assert_eq!(c.channels, ["a"]);
    }
}
