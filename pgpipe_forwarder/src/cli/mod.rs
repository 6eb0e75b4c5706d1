//! The `pgpipe` command line: global options, one module per subcommand, and the edge
//! where errors become `error: ...` on stderr and exit code 1.
//!
//! Adding a subcommand takes one file and one line: write `cli/<name>.rs` with an args
//! struct that derives [`clap::Args`] and implements [`Run`], declare the module below,
//! and add a `Variant(module::Args),` line (with a doc comment, which becomes its help)
//! to the `commands!` list.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, ConfigFile, FlagOverride, LogFormat, LogLevel};

mod config;
mod dlq;
mod init;
mod listen;
mod status;
mod version;

/// What the top-level help says before the command list.
const LONG_ABOUT: &str = "\
pgpipe forwards PostgreSQL change events to stdout, webhooks, Server-Sent Events, \
WebSockets, JSON-lines files, a subprocess's stdin and Postgres tables.

Events come from the pgpipe extension's durable queue (detector `queue`), from plain \
LISTEN/NOTIFY on any Postgres (`listen_notify`), or from logical replication (`wal`).

Settings come from, highest precedence first: command-line flags, PGPIPE_* environment \
variables (the config key upper-cased, with `.` and `-` as `_`, e.g. PGPIPE_WEBHOOK_URL), \
the config file (--config, default ./pgpipe.yaml when present), built-in defaults.";

/// Examples shown after the top-level help.
const EXAMPLES: &str = "\
Examples:
  pgpipe init --table orders | psql \"$DATABASE_URL\"
  pgpipe listen --db postgres://app@db/shop --channel orders
  pgpipe listen --db postgres://app@db/shop -c orders -a webhook -u https://hooks.example/orders
  pgpipe config validate pgpipe.yaml";

/// The `pgpipe` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pgpipe",
    version,
    about = "Postgres change data capture: forward change events to stdout, webhooks, SSE, WebSockets, files, processes and tables",
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    propagate_version = true,
    arg_required_else_help = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Options every subcommand accepts.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts (before or after the subcommand's name).
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Config file (YAML). Without it, ./pgpipe.yaml is read when it exists
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,

    /// Log level [default: info] [config: log_level] [env: PGPIPE_LOG_LEVEL]
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "LEVEL",
        help_heading = "Global options"
    )]
    pub log_level: Option<LogLevel>,

    /// Log format; logs always go to stderr [default: text] [config: log_format] [env: PGPIPE_LOG_FORMAT]
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        help_heading = "Global options"
    )]
    pub log_format: Option<LogFormat>,
}

impl GlobalArgs {
    /// The config keys the global options that were given set.
    pub fn overrides(&self) -> Vec<FlagOverride> {
        let mut out = Vec::new();
        if let Some(level) = self.log_level {
            out.push(FlagOverride {
                key: "log_level",
                flag: "--log-level",
                value: Value::from(level.as_str()),
            });
        }
        if let Some(format) = self.log_format {
            out.push(FlagOverride {
                key: "log_format",
                flag: "--log-format",
                value: Value::from(format.as_str()),
            });
        }
        out
    }
}

/// A subcommand: its parsed arguments know how to run it.
pub trait Run {
    /// Runs the subcommand; an error is printed as `error: ...` and exits with 1.
    fn run(self, global: &GlobalArgs) -> anyhow::Result<ExitCode>;
}

/// Declares the [`Command`] enum and its dispatch from one list of variants.
macro_rules! commands {
    ($($(#[$attr:meta])* $variant:ident($args:ty),)+) => {
        /// The subcommands.
        // Parsed once at startup: the size of the `listen` variant does not matter.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Subcommand)]
        pub enum Command {
            $($(#[$attr])* $variant($args),)+
        }

        impl Command {
            /// Runs the chosen subcommand.
            pub fn run(self, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
                match self {
                    $(Command::$variant(args) => Run::run(args, global),)+
                }
            }
        }
    };
}

commands! {
    /// Forward change events from Postgres to the adapters until SIGINT/SIGTERM
    Listen(listen::ListenArgs),
    /// Print the SQL that sets a table up for capture
    Init(init::InitArgs),
    /// Work with config files
    Config(config::ConfigArgs),
    /// Print pgpipe's version
    Version(version::VersionArgs),
    /// Show consumers, positions, lag, subscriptions, dead letters and the worker's state
    Status(status::StatusArgs),
    /// List, replay or purge dead letters (events adapters gave up on)
    Dlq(dlq::DlqArgs),
}

/// Entry point of the `pgpipe` binary: parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // Help and version are not failures; a usage error exits 1 like the original.
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::FAILURE,
            };
        }
    };
    match cli.command.run(&cli.global) {
        Ok(code) => code,
        Err(err) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined with `: `, skipping a cause whose text the message
/// already holds (errors that print their source and also return it from `source()`).
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// The configuration from the config file (`--config` or `./pgpipe.yaml`), the process
/// environment and `flags` (plus the global options), without [`Config::validate`]: for
/// subcommands that need only part of it, such as the database URL.
pub fn resolve_config(global: &GlobalArgs, flags: &[FlagOverride]) -> anyhow::Result<Config> {
    let file = ConfigFile::discover(global.config.as_deref())?;
    let mut all = global.overrides();
    all.extend_from_slice(flags);
    let env = crate::config::process_env;
    Ok(crate::config::resolve(
        &Config::default(),
        file.as_ref(),
        &env,
        &all,
    )?)
}

/// The shared start of `status` and `dlq`: the configuration (`--db` overriding
/// `database_url`), logging, a runtime, and one connection; then `work` on them.
pub fn with_database<F, Fut>(
    global: &GlobalArgs,
    db: Option<&str>,
    work: F,
) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Config, tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    with_database_and(global, db, Vec::new(), work)
}

/// [`with_database`] with more flag overrides (e.g. `dlq replay`'s adapter flags).
pub fn with_database_and<F, Fut>(
    global: &GlobalArgs,
    db: Option<&str>,
    more: Vec<FlagOverride>,
    work: F,
) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Config, tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let mut flags: Vec<FlagOverride> = db
        .map(|db| FlagOverride {
            key: "database_url",
            flag: "--db",
            value: serde_json::Value::from(db),
        })
        .into_iter()
        .collect();
    flags.extend(more);
    let config = resolve_config(global, &flags)?;
    if config.database_url.trim().is_empty() {
        anyhow::bail!("no database URL: pass --db or set database_url / PGPIPE_DATABASE_URL");
    }
    init_tracing(config.log_level, config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let (client, _) = crate::db::connect(&config.database_url).await?;
        work(config, client).await
    })
}

/// Installs the global tracing subscriber: stderr, `text` or `json`, filtered at `level`.
/// Does nothing when one is already set.
pub fn init_tracing(level: LogLevel, format: LogFormat) {
    let filter = EnvFilter::try_new(level.as_str()).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if format == LogFormat::Json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // Fails only when a subscriber is already installed (tests, embedding): keep that one.
    drop(installed);
}

/// Writes a command's output to stdout; a closed pipe (`| head`) is not an error.
pub fn print_output(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("write to stdout"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        let io = std::io::Error::other("connection refused");
        let err = anyhow::Error::new(io).context("connect to postgres");
        assert_eq!(error_chain(&err), "connect to postgres: connection refused");
        let read = crate::config::ConfigError::ReadFile {
            path: "x.yaml".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(
            error_chain(&anyhow::Error::new(read)),
            "config file x.yaml: gone"
        );
    }

    #[test]
    fn global_options_become_overrides() {
        let cli =
            Cli::try_parse_from(["pgpipe", "version", "--log-level", "debug"]).expect("parses");
        let o = cli.global.overrides();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].key, "log_level");
        assert_eq!(o[0].value, Value::from("debug"));
        assert!(Cli::try_parse_from(["pgpipe", "version"])
            .expect("parses")
            .global
            .overrides()
            .is_empty());
    }
}
