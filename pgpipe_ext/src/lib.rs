//! pgpipe, the extension: captures row changes into `pgpipe.events`, a durable queue of
//! UUIDv7-stamped events, and serves it to consumers through a snapshot-based SQL API.
//!
//! This file only wires modules together; the SQL objects live in `sql/pgpipe.sql`.

use pgrx::prelude::*;

mod guc;
mod shared;
mod status;
mod uuid7;
mod worker;

::pgrx::pg_module_magic!(name, version);

// The tables, capture triggers and the consumer API are plain SQL: they need the UUIDv7
// function, which is defined in Rust, so they come after it.
extension_sql_file!(
    "../sql/pgpipe.sql",
    name = "pgpipe_schema",
    requires = [
        uuid7::uuid_generate_v7,
        shared::mark_wakeup,
        status::worker_status
    ]
);

/// Registers the settings in every process that loads pgpipe; when loaded through
/// `shared_preload_libraries`, also the shared memory and the background worker.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    // SAFETY: a flag Postgres sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shared::init();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    /// One-off setup when the test framework starts.
    pub fn setup(_options: Vec<&str>) {}

    /// postgresql.conf settings the tests need.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["wal_level = logical"]
    }
}
