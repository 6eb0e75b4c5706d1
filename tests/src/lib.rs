//! Scenario-test harness for pgpipe.
//!
//! Scenario files (`tests/tests/<journey>.rs`, one per user journey) use:
//! - [`TempPg`]: a temporary Postgres 15 cluster. [`TempPg::shared`] is one cluster per
//!   test process, started on first use; [`TempPg::database`] gives each test a fresh
//!   database with the pgpipe extension created. [`TempPg::start_dedicated`] starts a
//!   cluster of its own for a test that restarts Postgres or needs TLS or other settings.
//! - [`Forwarder`]: the `pgpipe` binary as a child process, stdout captured as lines;
//!   [`Forwarder::listen`] builds a `pgpipe listen` command line flag by flag ([`Listen`]).
//! - [`TempNats`]: a `nats-server -js` of its own on a free port (killed on drop,
//!   restartable on the same port and store), with a JetStream reader
//!   ([`TempNats::stream_messages`]) for the nats adapter's scenarios.
//! - [`wait_until`]: polls an async condition.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgpipe_tests::{test_db, Forwarder};
//!
//! #[tokio::test]
//! async fn inserts_reach_stdout() {
//!     let db = test_db("inserts_reach_stdout").await;
//!     db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t')").await;
//!     let url = db.url();
//!     let fwd = Forwarder::listen(&url).channel("t").spawn();
//!     db.execute("INSERT INTO t VALUES (1)").await;
//!     let events = fwd.wait_for_events(1, Duration::from_secs(10)).await;
//!     assert_eq!(events[0]["channel"], "t");
//! }
//! ```
//!
//! Running: the harness needs the Postgres 15 binaries (`PGPIPE_PG_BIN`, default
//! `/usr/lib/postgresql/15/bin`), the extension installed into that Postgres
//! (`make install`, i.e. `cargo pgrx install`), and the forwarder built
//! (`cargo build -p pgpipe_forwarder`); then `cargo test -p pgpipe_tests`.
//!
//! Environment switches:
//! - `PGPIPE_PG_BIN`: directory of `initdb`, `postgres` and `pg_config`.
//! - `PGPIPE_TEST_NO_PRELOAD=1`: no `shared_preload_libraries = 'pgpipe'`, no
//!   `CREATE EXTENSION pgpipe`, no check that the extension is installed.
//! - `PGPIPE_TEST_KEEP=1`: keep the `/tmp/pgpipe-test-*` directories (logs) at exit.
//! - `PGPIPE_BIN`: path of the forwarder binary.
//! - `PGPIPE_TEST_QUIET=1`: do not echo the forwarder's stderr.
//! - `PGPIPE_NATS_SERVER`: path of the `nats-server` binary (default `/usr/sbin/nats-server`).

mod forwarder;
pub mod http;
mod nats;
mod pg;
mod process;
mod receiver;
mod tls;

use std::time::{Duration, Instant};

pub use forwarder::{Forwarder, Listen};
pub use nats::{NatsOptions, StreamMessage, TempNats, DEFAULT_NATS_SERVER};
pub use pg::{
    describe, test_db, PgOptions, StopMode, TempPg, TestDb, DEFAULT_PG_BIN, FORWARDER_ROLE,
};
pub use receiver::{HttpReceiver, Reply, Request};

/// Polls `condition` every 50 ms until it returns true (then `true`) or `timeout` passes
/// (then `false`). The condition is always evaluated at least once.
///
/// ```no_run
/// # async fn f(db: pgpipe_tests::TestDb) {
/// use std::time::Duration;
/// let done = pgpipe_tests::wait_until(Duration::from_secs(5), async || {
///     db.query_one("SELECT count(*) FROM t", &[]).await.get::<_, i64>(0) == 3
/// })
/// .await;
/// assert!(done, "three rows expected");
/// # }
/// ```
#[must_use = "check the result: false means the condition never held"]
pub async fn wait_until(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
