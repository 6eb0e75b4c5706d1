//! Journey: the `wal` detector keeps every committed change through crashes. The
//! forwarder is killed with `kill -9` while rows are being written and started again;
//! Postgres itself is restarted (immediate shutdown) under the forwarder. Every committed
//! row reaches the durable file adapter at least once, and a change delivered twice
//! carries the same event id both times. A slot Postgres invalidated (WAL over
//! `max_slot_wal_keep_size`) is reported, not silently recreated. A second forwarder on
//! the same slot waits as a standby and takes over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use pgpipe_tests::{wait_until, Forwarder, PgOptions, TempPg, TestDb};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const ROWS: i32 = 400;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
        .collect()
}

/// Event ids per row id.
fn ids_by_row(events: &[Value]) -> BTreeMap<i64, BTreeSet<String>> {
    let mut out: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for e in events {
        let row = e["payload"]["row"]["id"].as_i64().expect("row id");
        out.entry(row)
            .or_default()
            .insert(e["id"].as_str().unwrap().to_string());
    }
    out
}

fn spawn(db: &TestDb, slot: &str, file: &Path) -> Forwarder {
    let url = db.url();
    Forwarder::listen(&url)
        .detector("wal")
        .flag("--publication", "pub")
        .flag("--slot", slot)
        .adapter("file")
        .flag("--file-path", file.to_str().unwrap())
        .env("PGPIPE_DETECTOR_STATUS_INTERVAL", "200ms")
        .env("PGPIPE_DETECTOR_BACKOFF_BASE", "100ms")
        .env("PGPIPE_DETECTOR_BACKOFF_CAP", "500ms")
        .spawn()
}

async fn confirmed_lsn(db: &TestDb, slot: &str) -> String {
    db.query_one(
        "SELECT coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .get(0)
}

/// Inserts rows 1..=ROWS, one transaction each, pausing now and then.
fn start_writer(db: &TestDb) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        let client = db.client().await;
        for i in 1..=ROWS {
            client
                .execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
                .await
                .unwrap_or_else(|e| panic!("insert {i}: {e}"));
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    })
}

fn assert_every_row_once_or_same_id(events: &[Value]) {
    let by_row = ids_by_row(events);
    let missing: Vec<i32> = (1..=ROWS)
        .filter(|i| !by_row.contains_key(&i64::from(*i)))
        .collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    let changed: Vec<(&i64, &BTreeSet<String>)> =
        by_row.iter().filter(|(_, ids)| ids.len() != 1).collect();
    assert!(
        changed.is_empty(),
        "a redelivered change got a new id: {changed:?}"
    );
}

#[tokio::test]
async fn kill9_under_writes_loses_nothing() {
    let db = TempPg::shared()
        .database_without_extension("wal_kill9")
        .await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let slot = format!("s_{}", db.name());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");

    let first = spawn(&db, &slot, &file);
    first.wait_for_stderr("replicating", WAIT).await;
    let created = confirmed_lsn(&db, &slot).await;
    let writer = start_writer(&db);

    // Kill once some progress has been confirmed to the slot (and more is in flight).
    let progressed = wait_until(WAIT, async || {
        lines(&file).len() >= 100 && confirmed_lsn(&db, &slot).await != created
    })
    .await;
    assert!(
        progressed,
        "no confirmed progress:\n{}",
        first.stderr_text()
    );
    first.kill9();
    let before_restart = lines(&file).len();

    let second = spawn(&db, &slot, &file);
    writer.await.unwrap();
    let all = wait_until(WAIT, async || {
        ids_by_row(&lines(&file)).len() == ROWS as usize
    })
    .await;
    assert!(all, "not every row arrived:\n{}", second.stderr_text());
    let events = lines(&file);
    assert_every_row_once_or_same_id(&events);
    let replayed = events.len() - ROWS as usize;
    assert!(
        replayed < before_restart,
        "the restart resumed from the confirmed position, not from the start \
         ({replayed} replayed of {before_restart})"
    );

    second.sigterm();
    assert!(second.wait_exit(WAIT).await.success());
    db.query("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}

#[tokio::test]
async fn postgres_restart_under_the_forwarder_loses_nothing() {
    let pg = TempPg::start_dedicated(PgOptions::new()).await;
    let db = pg.database_without_extension("wal_pg_restart").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let fwd = spawn(&db, "s_restart", &file);
    fwd.wait_for_stderr("replicating", WAIT).await;

    db.execute("INSERT INTO t SELECT i, 'x' FROM generate_series(1, 200) i")
        .await;
    pg.restart(true).await;
    db.execute(&format!(
        "INSERT INTO t SELECT i, 'x' FROM generate_series(201, {ROWS}) i"
    ))
    .await;

    let all = wait_until(WAIT, async || {
        ids_by_row(&lines(&file)).len() == ROWS as usize
    })
    .await;
    assert!(all, "not every row arrived:\n{}", fwd.stderr_text());
    assert_every_row_once_or_same_id(&lines(&file));
    assert!(
        fwd.stderr_text().contains("replication stream down"),
        "the outage was noticed"
    );
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_reported() {
    let pg = TempPg::start_dedicated(PgOptions::new().conf("max_slot_wal_keep_size = 1MB")).await;
    let db = pg.database_without_extension("wal_slot_lost").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let fwd = spawn(&db, "s_lost", &file);
    fwd.wait_for_stderr("replicating", WAIT).await;
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());

    // While the forwarder is away, more WAL than the cap is written and checkpointed.
    for i in 0..4 {
        db.execute(&format!(
            "INSERT INTO t VALUES ({i}, 'x'); SELECT pg_switch_wal();"
        ))
        .await;
    }
    db.execute("CHECKPOINT").await;
    let status: Option<String> = db
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 's_lost'",
            &[],
        )
        .await
        .get(0);
    assert_eq!(status.as_deref(), Some("lost"));

    let fwd = spawn(&db, "s_lost", &file);
    assert_eq!(fwd.wait_exit(WAIT).await.code(), Some(1));
    let stderr = fwd.stderr_text();
    assert!(
        stderr.contains("was invalidated") && stderr.contains("pg_drop_replication_slot('s_lost')"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_second_forwarder_on_the_slot_stands_by_and_takes_over() {
    let db = TempPg::shared()
        .database_without_extension("wal_standby")
        .await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let slot = format!("s_{}", db.name());
    let dir = tempfile::tempdir().unwrap();
    let (file_a, file_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let active = spawn(&db, &slot, &file_a);
    active.wait_for_stderr("replicating", WAIT).await;
    let standby = spawn(&db, &slot, &file_b);
    standby.wait_for_stderr("standing by", WAIT).await;

    db.execute("INSERT INTO t VALUES (1, 'x')").await;
    assert!(wait_until(WAIT, async || lines(&file_a).len() == 1).await);
    active.kill9();
    db.execute("INSERT INTO t VALUES (2, 'x')").await;
    let took_over = wait_until(WAIT, async || ids_by_row(&lines(&file_b)).contains_key(&2)).await;
    assert!(took_over, "{}", standby.stderr_text());

    standby.sigterm();
    assert!(standby.wait_exit(WAIT).await.success());
    db.query("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}
