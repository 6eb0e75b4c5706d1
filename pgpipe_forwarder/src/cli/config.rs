//! `pgpipe config validate FILE`: checks a config file offline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{print_output, GlobalArgs, Run};
use crate::config::{self, Config, ConfigFile};

/// Arguments of `pgpipe config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// What to do with config files.
    #[command(subcommand)]
    command: ConfigCommand,
}

/// `pgpipe config` subcommands.
#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config file offline: known keys, value types and the same checks as `listen`.
    /// Prints `ok: FILE`, or the problem and exits with 1
    Validate(ValidateArgs),
}

/// Arguments of `pgpipe config validate`.
#[derive(Debug, Args)]
#[command(after_help = "\
Without --with-env the file is checked on its own, so it must hold every required \
setting (database_url, channels, ...). Nothing connects to Postgres.")]
struct ValidateArgs {
    /// The YAML config file to check
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// Also apply the PGPIPE_* environment variables, as `pgpipe listen` would
    #[arg(long)]
    with_env: bool,
}

impl Run for ConfigArgs {
    fn run(self, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        match self.command {
            ConfigCommand::Validate(args) => {
                let file = ConfigFile::read(&args.file)?;
                let no_env = |_: &str| None;
                let env: &dyn Fn(&str) -> Option<String> = if args.with_env {
                    &config::process_env
                } else {
                    &no_env
                };
                config::load(&Config::default(), Some(&file), env, &[])?;
                print_output(&format!("ok: {}\n", file.name))?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
