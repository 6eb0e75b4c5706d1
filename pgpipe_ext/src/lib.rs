//! pgpipe, the extension: captures row changes into `pgpipe.events`, a durable queue of
//! UUIDv7-stamped events, and serves it to consumers through a snapshot-based SQL API.
//!
//! This file only wires modules together; the SQL objects live in `sql/pgpipe.sql`.

use pgrx::prelude::*;

mod uuid7;

::pgrx::pg_module_magic!(name, version);

// The tables, capture triggers and the consumer API are plain SQL: they need the UUIDv7
// function, which is defined in Rust, so they come after it.
extension_sql_file!(
    "../sql/pgpipe.sql",
    name = "pgpipe_schema",
    requires = [uuid7::uuid_generate_v7]
);

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
