//! The exec adapter's config section (`exec:` and the `execs:` list), its checks, and its
//! registration.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::registry::{self, Build, Kind, Place};
use crate::config::{self, ConfigError};

/// The exec kind: the single `exec` section and the `execs` list.
pub const KIND: Kind = Kind {
    name: "exec",
    list: Some("execs"),
    entries: |c| c.execs.iter().map(|e| e.name.clone()).collect(),
    validate: |c, used| {
        registry::check_routes(c, "exec", "execs", &c.exec, &c.execs, |s| (&s.channels, &s.operations))?;
        c.exec.validate(Place::single("exec"), used)?;
        registry::check_list(
            "exec",
            "execs",
            &c.execs,
            |e| &e.name,
            |e, at| e.validate(at, true),
        )
    },
    redact: registry::no_secrets,
    build: |b: &Build<'_>, name, entry| {
        let c = b.config;
        let section = registry::section(name, &c.exec, "execs", &c.execs, entry, |e| &e.name)?;
        // Half the shutdown budget for the command to exit after its stdin closes.
        Ok(Box::new(super::Exec::new(
            name,
            section,
            &c.database_url,
            c.shutdown_timeout / 2,
        )))
    },
    route: |c, entry| {
        registry::route_of(&c.exec, &c.execs, entry, |s| &s.name, |s| {
            crate::route::Route::new(&s.channels, &s.operations)
        })
    },
    init: None,
};

/// Exec adapter settings (`exec.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Command run with `sh -c` and fed JSON lines on stdin (`--exec-command`).
    pub command: String,
    /// First restart delay after the command exits or fails.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest restart delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// A line counts as handled once the command read it and kept running this long; lines
    /// read more recently are written again to the next command if it dies.
    #[serde(with = "humantime_serde")]
    pub read_grace: Duration,
    /// Commands that may die while a line is in hand before that line is dead-lettered.
    pub max_attempts: u32,
    /// Channels this adapter gets (empty: every channel the forwarder reads).
    pub channels: Vec<String>,
    /// Operations this adapter gets (empty: all), e.g. `[INSERT, UPDATE]`.
    pub operations: Vec<String>,
    /// How events are written: pgpipe, cloudevents, debezium.
    pub format: crate::format::Format,
    /// Name of an `execs` entry (the adapter is `exec:<name>`); unused in `exec`.
    pub name: String,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            command: String::new(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            read_grace: Duration::from_millis(500),
            max_attempts: 5,
            channels: Vec::new(),
            operations: Vec::new(),
            format: crate::format::Format::default(),
            name: String::new(),
        }
    }
}

impl ExecConfig {
    /// Checks the section at `at`; `used`: it runs, so its command is required.
    pub fn validate(&self, at: Place, used: bool) -> Result<(), ConfigError> {
        self.format.check(at, false, 1)?;
        if used && self.command.trim().is_empty() {
            return Err(at.missing("a command", ConfigError::ExecWithoutCommand));
        }
        config::check_backoff(at.here(), self.backoff_base, self.backoff_cap)
    }
}

/// Exec adapter flags of `pgpipe listen` (they override `exec.*`).
#[derive(Debug, Default, clap::Args)]
#[group(skip)]
pub struct Flags {
    /// Exec adapter: command run with `sh -c`, fed JSON lines on stdin (required with -a exec)
    /// [config: exec.command] [env: PGPIPE_EXEC_COMMAND]
    #[arg(long, value_name = "COMMAND", help_heading = "Adapters")]
    exec_command: Option<String>,
}

impl Flags {
    /// The config overrides of the flags that were given.
    pub fn overrides(&self, out: &mut Vec<config::FlagOverride>) {
        config::override_with(
            out,
            "exec.command",
            "--exec-command",
            self.exec_command.clone(),
        );
    }
}
