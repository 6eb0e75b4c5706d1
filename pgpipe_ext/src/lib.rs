//! pgpipe, the extension: captures row changes into `pgpipe.events`, a durable queue of
//! UUIDv7-stamped events, and serves it to consumers through a snapshot-based SQL API.
//!
//! This file only wires modules together; the SQL objects live in `sql/`, one file per
//! concept.

use pgrx::prelude::*;

mod capture;
mod guc;
mod jsonb;
mod queue;
mod shared;
mod status;
mod uuid7;
mod worker;

::pgrx::pg_module_magic!(name, version);

// The SQL objects, one file per concept, in this order (each file may use what the
// ones before it define). The tables need the UUIDv7 function, defined in Rust, so they
// come after it.
extension_sql_file!("../sql/roles.sql", name = "roles");
extension_sql_file!(
    "../sql/queue.sql",
    name = "queue",
    requires = [
        "roles",
        uuid7::uuid_generate_v7,
        shared::mark_wakeup,
        status::worker_status
    ]
);
extension_sql_file!("../sql/capture.sql", name = "capture", requires = ["queue"]);
extension_sql_file!("../sql/outbox.sql", name = "outbox", requires = ["capture"]);
extension_sql_file!(
    "../sql/consumers.sql",
    name = "consumers",
    requires = ["outbox", guc::consumer_stale_after]
);
extension_sql_file!(
    "../sql/groups.sql",
    name = "groups",
    requires = ["consumers"]
);
extension_sql_file!(
    "../sql/retention.sql",
    name = "retention",
    requires = ["groups"]
);
extension_sql_file!(
    "../sql/dead_letters.sql",
    name = "dead_letters",
    requires = ["retention"]
);
extension_sql_file!(
    "../sql/replay.sql",
    name = "replay",
    requires = ["dead_letters"]
);
extension_sql_file!("../sql/wal.sql", name = "wal", requires = ["replay"]);
extension_sql_file!("../sql/snapshot.sql", name = "snapshot", requires = ["wal"]);
extension_sql_file!("../sql/ddl.sql", name = "ddl", requires = ["snapshot"]);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

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
