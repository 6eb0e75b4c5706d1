//! The file adapter's config section (`file:` and the `files:` list), its checks, and its
//! registration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::registry::{self, Build, Kind, Place};
use crate::config::{self, ConfigError};

/// The file kind: the single `file` section and the `files` list.
pub const KIND: Kind = Kind {
    name: "file",
    list: Some("files"),
    entries: |c| c.files.iter().map(|f| f.name.clone()).collect(),
    validate: |c, used| {
        registry::check_routes(c, "file", "files", &c.file, &c.files, |s| (&s.channels, &s.operations))?;
        c.file.validate(Place::single("file"), used)?;
        registry::check_list(
            "file",
            "files",
            &c.files,
            |f| &f.name,
            |f, at| f.validate(at, true),
        )
    },
    redact: registry::no_secrets,
    build: |b: &Build<'_>, name, entry| {
        let c = b.config;
        let section = registry::section(name, &c.file, "files", &c.files, entry, |f| &f.name)?;
        Ok(Box::new(super::FileAdapter::adapter(
            name,
            section,
            &b.config.database_url,
        )?))
    },
    route: |c, entry| {
        registry::route_of(&c.file, &c.files, entry, |s| &s.name, |s| {
            crate::route::Route::new(&s.channels, &s.operations)
        })
    },
    init: None,
};

/// When the file adapter fsyncs (`file.fsync`: `always`, `interval` or `never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before every acknowledgement.
    Always,
    /// At least every `fsync_interval`; acknowledgements wait for it.
    Interval,
    /// Never: the OS decides; acknowledged once written.
    Never,
}

/// File adapter settings (`file.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Path of the JSON-lines file (`--file-path`); required with the file adapter.
    pub path: PathBuf,
    /// Size in bytes at which the file is rotated (`--file-max-size`; "100MiB" also accepted).
    #[serde(deserialize_with = "crate::config::size_serde::deserialize")]
    pub max_size: u64,
    /// Rotated files kept: `path.1` … `path.N` (`--file-max-files`).
    pub max_files: u32,
    /// When to fsync: `always` (before each acknowledgement), `interval` or `never`.
    pub fsync: FsyncPolicy,
    /// With `fsync: interval`, the longest time between fsyncs (acks wait for them).
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// First retry delay after a failed write (unwritable path, full disk).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay after a failed write.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Channels this adapter gets (empty: every channel the forwarder reads).
    pub channels: Vec<String>,
    /// Operations this adapter gets (empty: all), e.g. `[INSERT, UPDATE]`.
    pub operations: Vec<String>,
    /// How events are written: pgpipe, cloudevents, debezium.
    pub format: crate::format::Format,
    /// Name of a `files` entry (the adapter is `file:<name>`); unused in `file`.
    pub name: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            path: PathBuf::new(),
            max_size: 100 * 1024 * 1024,
            max_files: 5,
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            channels: Vec::new(),
            operations: Vec::new(),
            format: crate::format::Format::default(),
            name: String::new(),
        }
    }
}

impl FileConfig {
    /// Checks the section at `at`; `used`: it runs, so its path is required.
    pub fn validate(&self, at: Place, used: bool) -> Result<(), ConfigError> {
        self.format.check(at, false, 1)?;
        if used && self.path.as_os_str().is_empty() {
            return Err(at.missing("a path", ConfigError::FileWithoutPath));
        }
        config::at_least(at.key("max_size"), self.max_size, 1)?;
        config::at_least(at.key("max_files"), u64::from(self.max_files), 1)?;
        config::nonzero(at.key("fsync_interval"), self.fsync_interval)?;
        config::check_backoff(at.here(), self.backoff_base, self.backoff_cap)
    }
}

/// File adapter flags of `pgpipe listen` (they override `file.*`).
#[derive(Debug, Default, clap::Args)]
#[group(skip)]
pub struct Flags {
    /// File adapter: path of the JSON-lines file (required with -a file)
    /// [config: file.path] [env: PGPIPE_FILE_PATH]
    #[arg(long, value_name = "PATH", help_heading = "Adapters")]
    file_path: Option<String>,

    /// File adapter: rotate at this size, in bytes or with a unit (100MiB, 1G, 500MB)
    /// [default: 100MiB] [config: file.max_size] [env: PGPIPE_FILE_MAX_SIZE]
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size, help_heading = "Adapters")]
    file_max_size: Option<u64>,

    /// File adapter: rotated files kept [default: 5] [config: file.max_files]
    /// [env: PGPIPE_FILE_MAX_FILES]
    #[arg(long, value_name = "N", help_heading = "Adapters")]
    file_max_files: Option<u32>,
}

impl Flags {
    /// The config overrides of the flags that were given.
    pub fn overrides(&self, out: &mut Vec<config::FlagOverride>) {
        config::override_with(out, "file.path", "--file-path", self.file_path.clone());
        config::override_with(out, "file.max_size", "--file-max-size", self.file_max_size);
        config::override_with(
            out,
            "file.max_files",
            "--file-max-files",
            self.file_max_files,
        );
    }
}
