//! Journey: a busy table is switched from trigger capture to WAL capture and back while
//! writers keep inserting; every committed row is queued exactly once, by one mode or the
//! other, and each writer's rows stay in commit order in the queue (leaving WAL mode
//! waits for the worker to queue the table's last WAL changes).
//!
//! Failure that matters: the switch happening between a writer's insert and its commit
//! (the table lock `subscribe` takes makes the switch wait for it, so the row is captured
//! by the mode it was written under — not by both, not by neither).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgpipe_tests::{describe, wait_until, PgOptions, TempPg};
use tokio_postgres::{Client, NoTls};

const WRITERS: i32 = 4;

async fn connect(pg: &TempPg) -> Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn switching_modes_under_writes_loses_and_duplicates_nothing() {
    let pg = TempPg::start_dedicated(
        PgOptions::new()
            .conf("pgpipe.database = 'postgres'")
            .conf("pgpipe.poll_interval = '50ms'"),
    )
    .await;
    let admin = connect(&pg).await;
    admin
        .batch_execute(
            "CREATE EXTENSION pgpipe;
             CREATE TABLE sw (id bigserial PRIMARY KEY, writer int NOT NULL, seq int NOT NULL);
             SELECT pgpipe.subscribe('sw');",
        )
        .await
        .unwrap();
    // Create the slot up front (a transaction of its own), so the switches below only
    // move the table between the trigger and the publication.
    admin
        .batch_execute("SELECT pgpipe.ensure_slot()")
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = connect(&pg).await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                // Some transactions hold their insert a moment before committing, so a
                // switch lands between insert and commit.
                let sql = if seq % 7 == 0 {
                    format!("BEGIN; INSERT INTO sw (writer, seq) VALUES ({w}, {seq}); SELECT pg_sleep(0.02); COMMIT;")
                } else {
                    format!("INSERT INTO sw (writer, seq) VALUES ({w}, {seq})")
                };
                client
                    .batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w}: {}", describe(&e)));
                seq += 1;
            }
            seq
        }));
    }

    let mut switches = Vec::new();
    for mode in ["wal", "trigger", "wal", "trigger", "wal"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        admin
            .batch_execute(&format!("SELECT pgpipe.subscribe('sw', mode => '{mode}')"))
            .await
            .unwrap_or_else(|e| panic!("switch to {mode}: {}", describe(&e)));
        switches.push(mode);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = HashMap::new();
    for (w, task) in writers.into_iter().enumerate() {
        written.insert(w as i32, task.await.unwrap());
    }
    let total: i64 = written.values().map(|&n| i64::from(n)).sum();
    assert!(total > 50, "writers wrote {total} rows");

    let queued = async || -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = 'sw'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };
    let done = wait_until(Duration::from_secs(30), async || queued().await >= total).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(done, "queued {} of {total}", queued().await);
    assert_eq!(queued().await, total, "no duplicates");

    let rows = admin
        .query(
            "SELECT (payload->'row'->>'writer')::int, (payload->'row'->>'seq')::int, source
             FROM pgpipe.events WHERE channel = 'sw' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mut seen: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut sources: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        seen.entry(row.get(0)).or_default().push(row.get(1));
        *sources.entry(row.get(2)).or_default() += 1;
    }
    for (w, n) in &written {
        let seqs = seen.remove(w).unwrap_or_default();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..*n).collect::<Vec<_>>(),
            "writer {w}: each row exactly once"
        );
        assert_eq!(
            seqs, sorted,
            "writer {w}: rows in commit order across the switches"
        );
    }
    assert!(
        sources.get("trigger").is_some_and(|&n| n > 0)
            && sources.get("wal").is_some_and(|&n| n > 0),
        "both modes captured rows: {sources:?} after {switches:?}"
    );
}
