//! The pg_table adapter's config section (`pg_table:` and the `pg_tables:` list), its
//! checks, and its registration.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::registry::{self, Build, Kind, Place};
use crate::config::{self, ConfigError};

use crate::config::redact_url;

/// The pg_table kind: the single `pg_table` section and the `pg_tables` list.
pub const KIND: Kind = Kind {
    name: "pg_table",
    list: Some("pg_tables"),
    entries: |c| c.pg_tables.iter().map(|p| p.name.clone()).collect(),
    validate: |c, used| {
        registry::check_routes(c, "pg_table", "pg_tables", &c.pg_table, &c.pg_tables, |s| (&s.channels, &s.operations))?;
        c.pg_table.validate(Place::single("pg_table"), used)?;
        registry::check_list(
            "pg_table",
            "pg_tables",
            &c.pg_tables,
            |p| &p.name,
            |p, at| p.validate(at, true),
        )
    },
    redact: |c| {
        c.pg_table.url = redact_url(&c.pg_table.url);
        for p in &mut c.pg_tables {
            p.url = redact_url(&p.url);
        }
    },
    build: |b: &Build<'_>, name, entry| {
        let c = b.config;
        let section =
            registry::section(name, &c.pg_table, "pg_tables", &c.pg_tables, entry, |p| {
                &p.name
            })?;
        Ok(Box::new(super::PgTable::adapter(
            name,
            section,
            &c.database_url,
        )))
    },
    route: |c, entry| {
        registry::route_of(&c.pg_table, &c.pg_tables, entry, |s| &s.name, |s| {
            crate::route::Route::new(&s.channels, &s.operations)
        })
    },
    init: Some(super::table_ddl),
};

/// pg_table adapter settings (`pg_table.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgTableConfig {
    /// Connection URL of the target database (`--pg-table-url`); empty: `database_url`.
    pub url: String,
    /// Target table, optionally schema-qualified (`--pg-table-name`).
    pub table: String,
    /// Most rows per INSERT statement.
    pub batch_size: usize,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Channels this adapter gets (empty: every channel the forwarder reads).
    pub channels: Vec<String>,
    /// Operations this adapter gets (empty: all), e.g. `[INSERT, UPDATE]`.
    pub operations: Vec<String>,
    /// Name of a `pg_tables` entry (the adapter is `pg_table:<name>`); unused in `pg_table`.
    pub name: String,
}

impl Default for PgTableConfig {
    fn default() -> Self {
        PgTableConfig {
            url: String::new(),
            table: "pgpipe_events".into(),
            batch_size: 500,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            channels: Vec::new(),
            operations: Vec::new(),
            name: String::new(),
        }
    }
}

impl PgTableConfig {
    /// Checks the section at `at`; `used`: it runs, so its table is required.
    pub fn validate(&self, at: Place, used: bool) -> Result<(), ConfigError> {
        if used {
            if !self.url.is_empty() {
                config::check_conninfo(at.key("url"), &self.url)?;
            }
            if self.table.trim().is_empty() {
                return Err(at.missing(
                    "a table",
                    ConfigError::InvalidValue {
                        origin: config::Origin::Default,
                        key: at.key("table"),
                        message: "the pg_table adapter needs a table name (--pg-table-name)".into(),
                    },
                ));
            }
        }
        config::at_least(at.key("batch_size"), self.batch_size as u64, 1)?;
        config::check_backoff(at.here(), self.backoff_base, self.backoff_cap)
    }
}

impl fmt::Debug for PgTableConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTableConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("batch_size", &self.batch_size)
            .field("channels", &self.channels)
            .field("operations", &self.operations)
            .field("name", &self.name)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .finish()
    }
}

/// pg_table adapter flags of `pgpipe listen` (they override `pg_table.*`).
#[derive(Debug, Default, clap::Args)]
#[group(skip)]
pub struct Flags {
    /// pg_table adapter: connection URL of the target database [default: --db]
    /// [config: pg_table.url] [env: PGPIPE_PG_TABLE_URL]
    #[arg(long, value_name = "URL", help_heading = "Adapters")]
    pg_table_url: Option<String>,

    /// pg_table adapter: target table [default: pgpipe_events] [config: pg_table.table]
    /// [env: PGPIPE_PG_TABLE_TABLE]
    #[arg(long, value_name = "TABLE", help_heading = "Adapters")]
    pg_table_name: Option<String>,
}

impl Flags {
    /// The config overrides of the flags that were given.
    pub fn overrides(&self, out: &mut Vec<config::FlagOverride>) {
        config::override_with(
            out,
            "pg_table.url",
            "--pg-table-url",
            self.pg_table_url.clone(),
        );
        config::override_with(
            out,
            "pg_table.table",
            "--pg-table-name",
            self.pg_table_name.clone(),
        );
    }
}
