//! Journey: a consumer that needs the rows already in a table subscribes it with
//! `snapshot => true` and rebuilds the table from what it reads: the READ events of the
//! existing rows, and the INSERT/UPDATE/DELETE events of everything written meanwhile.
//! Two tables, one captured by trigger and one from the WAL, are snapshotted in chunks
//! while four writers update, insert (between existing keys too) and delete rows, in
//! single- and multi-row transactions across both tables.
//!
//! Failure that matters: Postgres crashes (immediate stop) in the middle of the
//! snapshot. The snapshot goes on from its last finished chunk (no row is read twice),
//! and applying the delivered events in order (READ, INSERT and UPDATE as upserts,
//! DELETE as delete) gives exactly the table, row by row, in both capture modes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgpipe_tests::{describe, wait_until, PgOptions, TempPg};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

/// Rows per table before the snapshot; ids are 1000, 2000, ... so writers can insert
/// keys between them.
const ROWS: i64 = 6000;
const WRITERS: u64 = 4;
const TABLES: [&str; 2] = ["snap_trig", "snap_wal"];

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A small deterministic random sequence (no test should depend on luck to fail).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One writer: random short transactions until `stop`; reconnects after the server went
/// away. Counts committed transactions in `committed`.
async fn writer(url: String, w: u64, stop: Arc<AtomicBool>, committed: Arc<AtomicU64>) {
    let mut rng = Lcg(w * 7919 + 17);
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref() else {
            match connect(&url).await {
                Ok(c) => client = Some(c),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        let statements = 1 + rng.below(3);
        let mut sql = String::from("BEGIN;");
        for _ in 0..statements {
            let table = TABLES[rng.below(2) as usize];
            let near = 1000 * (1 + rng.below(ROWS as u64));
            match rng.below(10) {
                0..=4 => sql.push_str(&format!(
                    "UPDATE {table} SET v = v + 1, note = md5(random()::text) WHERE id = {near};"
                )),
                5..=7 => sql.push_str(&format!(
                    "INSERT INTO {table} (id, v, note) VALUES ({}, 0, 'w{w}') \
                     ON CONFLICT (id) DO UPDATE SET v = {table}.v + 1;",
                    near + 1 + rng.below(999)
                )),
                _ => sql.push_str(&format!(
                    "DELETE FROM {table} WHERE id = {};",
                    if rng.below(2) == 0 {
                        near
                    } else {
                        near + 1 + rng.below(999)
                    }
                )),
            }
        }
        sql.push_str("COMMIT;");
        match c.batch_execute(&sql).await {
            Ok(()) => {
                committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // A deadlock between writers, or the server went away.
                if c.batch_execute("ROLLBACK").await.is_err() {
                    client = None;
                }
            }
        }
    }
}

/// The table as a consumer rebuilds it from the events of its channel.
#[derive(Default)]
struct Replica {
    rows: BTreeMap<i64, Value>,
    reads: BTreeMap<i64, u32>,
}

impl Replica {
    fn apply(&mut self, operation: &str, payload: &Value) {
        let row = &payload["row"];
        let id = row["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id: {payload}"));
        match operation {
            "READ" => {
                *self.reads.entry(id).or_default() += 1;
                self.rows.insert(id, row.clone());
            }
            "INSERT" | "UPDATE" => {
                self.rows.insert(id, row.clone());
            }
            "DELETE" => {
                self.rows.remove(&id);
            }
            other => panic!("unexpected operation {other}: {payload}"),
        }
    }
}

async fn snapshot_state(client: &Client, table: &str) -> (String, i64, i64) {
    let row = client
        .query_one(
            "SELECT state, rows, chunks FROM pgpipe.snapshots WHERE \"table\" = $1 \
             ORDER BY id DESC LIMIT 1",
            &[&format!("public.{table}")],
        )
        .await
        .unwrap_or_else(|e| panic!("read pgpipe.snapshots: {}", describe(&e)));
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn snapshots_under_writes_and_a_crash_rebuild_the_table_in_both_modes() {
    let pg = TempPg::start_dedicated(
        PgOptions::new()
            .conf("pgpipe.database = 'postgres'")
            .conf("pgpipe.poll_interval = '20ms'")
            .conf("pgpipe.snapshot_chunk_size = 100")
            .conf("pgpipe.snapshot_rows_per_second = 2000"),
    )
    .await;
    let url = pg.url("postgres");
    let admin = connect(&url).await.unwrap();
    admin
        .batch_execute("CREATE EXTENSION pgpipe")
        .await
        .unwrap_or_else(|e| panic!("setup: {}", describe(&e)));
    // The slot, in a transaction of its own.
    admin
        .batch_execute("SELECT pgpipe.ensure_slot()")
        .await
        .unwrap_or_else(|e| panic!("create the slot: {}", describe(&e)));
    for table in TABLES {
        admin
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigint PRIMARY KEY, v int NOT NULL, note text);
                 INSERT INTO {table} SELECT 1000 * g, g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {table}: {}", describe(&e)));
    }
    admin
        .batch_execute(
            "SELECT pgpipe.register_consumer('rebuild', ARRAY['snap_trig', 'snap_wal']);",
        )
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(url.clone(), w, stop.clone(), committed.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin
        .batch_execute(
            "SELECT pgpipe.subscribe('snap_trig', snapshot => true);
             SELECT pgpipe.subscribe('snap_wal', mode => 'wal', snapshot => true);",
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe: {}", describe(&e)));

    // Crash once the first snapshot is under way.
    let started = wait_until(Duration::from_secs(30), async || {
        let (state, _, chunks) = snapshot_state(&admin, "snap_trig").await;
        state == "running" && chunks >= 10
    })
    .await;
    assert!(
        started,
        "the snapshot did not start: {:?}",
        snapshot_state(&admin, "snap_trig").await
    );
    let before_crash = committed.load(Ordering::Relaxed);
    pg.restart(true).await;
    let admin = connect(&url).await.unwrap();
    let (state, rows, chunks) = snapshot_state(&admin, "snap_trig").await;
    assert_eq!(state, "running", "after the crash");
    assert!(
        // A chunk has fewer rows than the chunk size when writers deleted some of them.
        chunks >= 10 && rows >= 10 * 80,
        "progress kept over the crash: {rows} rows, {chunks} chunks"
    );

    let finished = wait_until(Duration::from_secs(90), async || {
        let mut all = true;
        for table in TABLES {
            all &= snapshot_state(&admin, table).await.0 == "done";
        }
        all
    })
    .await;
    let status: String = admin
        .query_one(
            "SELECT worker_state || ' ' || coalesce(last_error, '') FROM pgpipe.status()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        finished,
        "snapshots not done: {:?} {:?}; worker: {status}",
        snapshot_state(&admin, "snap_trig").await,
        snapshot_state(&admin, "snap_wal").await
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let total = committed.load(Ordering::Relaxed);
    assert!(
        total > before_crash + 50,
        "writers kept committing after the crash ({before_crash} before, {total} in all)"
    );
    let caught_up: bool = admin
        .query_one("SELECT pgpipe.wait_for_wal_capture('30s')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(caught_up, "the worker did not catch up with the WAL");

    // Read the channels as a consumer does, in delivery order.
    let mut replicas: BTreeMap<String, Replica> = BTreeMap::new();
    let mut sources: BTreeMap<(String, String), u64> = BTreeMap::new();
    loop {
        let page = admin
            .query(
                "SELECT position, channel, operation, payload, source, key \
                 FROM pgpipe.read('rebuild', NULL, 1000)",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("read: {}", describe(&e)));
        let position: String = page.last().expect("read returns a row").get(0);
        let mut events = 0;
        for row in &page {
            let Some(channel) = row.get::<_, Option<String>>(1) else {
                continue;
            };
            events += 1;
            let operation: String = row.get(2);
            let payload: Value = row.get(3);
            let source: String = row.get(4);
            if operation == "READ" {
                assert_eq!(source, "snapshot");
                assert_eq!(payload["op"], "READ");
                assert_eq!(payload["schema"], "public");
                assert_eq!(payload["table"], channel.as_str());
                assert!(payload["old"].is_null());
                let key: Option<Value> = row.get(5);
                assert_eq!(
                    key,
                    Some(serde_json::json!({"id": payload["row"]["id"]})),
                    "a READ event's key is its primary key"
                );
            }
            *sources.entry((channel.clone(), source)).or_default() += 1;
            replicas
                .entry(channel)
                .or_default()
                .apply(&operation, &payload);
        }
        admin
            .execute("SELECT pgpipe.ack('rebuild', $1)", &[&position])
            .await
            .unwrap();
        if events == 0 {
            break;
        }
    }

    for table in TABLES {
        let replica = replicas.remove(table).unwrap_or_default();
        let (_, rows, chunks) = snapshot_state(&admin, table).await;
        let reads: u32 = replica.reads.values().sum();
        assert_eq!(
            i64::from(reads),
            rows,
            "{table}: READ events = the snapshot's rows"
        );
        let twice: Vec<_> = replica.reads.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{table}: rows read twice (the snapshot started over?): {twice:?}"
        );
        assert!(
            chunks >= rows / 100,
            "{table}: {chunks} chunks for {rows} rows"
        );
        let actual: BTreeMap<i64, Value> = admin
            .query(
                &format!("SELECT id, to_jsonb(t) FROM {table} t ORDER BY id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert!(
            actual.len() as i64 > ROWS / 2,
            "{table}: {} rows left",
            actual.len()
        );
        let missing: Vec<_> = actual
            .keys()
            .filter(|k| !replica.rows.contains_key(k))
            .take(5)
            .collect();
        let extra: Vec<_> = replica
            .rows
            .keys()
            .filter(|k| !actual.contains_key(k))
            .take(5)
            .collect();
        let differ: Vec<_> = actual
            .iter()
            .filter(|(k, v)| replica.rows.get(k).is_some_and(|r| r != *v))
            .take(5)
            .map(|(k, v)| (k, v.to_string(), replica.rows[k].to_string()))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{table}: the events do not rebuild the table: missing {missing:?}, extra {extra:?}, \
             different {differ:?} ({} rows, {} rebuilt)",
            actual.len(),
            replica.rows.len()
        );
    }
    let mode_source = |channel: &str, source: &str| {
        sources
            .get(&(channel.to_string(), source.to_string()))
            .copied()
            .unwrap_or(0)
    };
    assert!(mode_source("snap_trig", "trigger") > 100, "{sources:?}");
    assert!(mode_source("snap_wal", "wal") > 100, "{sources:?}");
}
