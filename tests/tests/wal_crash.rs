//! Journey: WAL capture survives the worker being killed and Postgres crashing. Writers
//! keep committing to a `mode => 'wal'` table while the background worker is terminated
//! (`pg_terminate_backend`) and while Postgres is stopped in immediate mode (a crash) and
//! started again; the queue ends up with every committed change exactly once, each
//! writer's changes in commit order, nothing from rolled-back transactions.
//!
//! Failure that matters: a crash between writing events and advancing the slot must not
//! duplicate them (the progress row commits with the events), nor lose any (the slot
//! moves only after that commit).

use std::collections::HashMap;
use std::time::Duration;

use pgpipe_tests::{describe, wait_until, PgOptions, TempPg};
use tokio_postgres::{Client, NoTls};

const WRITERS: i32 = 3;

async fn connect(pg: &TempPg) -> Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    client
}

/// Writes transactions of 1..=4 rows (every fifth one rolled back) for writer `w`,
/// numbering rows from `next`; returns the next number. Stops at the first error (the
/// server went away) and reports how far it got: a transaction whose COMMIT got no answer
/// is checked for in the table afterwards.
async fn write(client: &Client, w: i32, mut next: i32, transactions: i32) -> i32 {
    for n in 0..transactions {
        let rows = 1 + n % 4;
        let rollback = n % 5 == 4;
        let mut sql = String::from("BEGIN;");
        for k in 0..rows {
            sql.push_str(&format!(
                "INSERT INTO items (writer, seq, note) VALUES ({w}, {}, repeat('x', {}));",
                if rollback { -1 - k } else { next + k },
                (n * 37) % 300
            ));
        }
        sql.push_str(if rollback { "ROLLBACK;" } else { "COMMIT;" });
        if client.batch_execute(&sql).await.is_err() {
            return next;
        }
        if !rollback {
            next += rows;
        }
    }
    next
}

async fn run_writers(pg: &TempPg, next: &mut [i32], transactions: i32) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = connect(pg).await;
        let start = next[w as usize];
        tasks.push(tokio::spawn(async move {
            write(&client, w, start, transactions).await
        }));
    }
    for (w, task) in tasks.into_iter().enumerate() {
        next[w] = task.await.unwrap();
    }
}

#[tokio::test]
async fn changes_are_queued_exactly_once_across_worker_kill_and_crash() {
    let pg = TempPg::start_dedicated(
        PgOptions::new()
            .conf("pgpipe.database = 'postgres'")
            .conf("pgpipe.poll_interval = '20ms'")
            .conf("pgpipe.batch_size = 50"),
    )
    .await;
    let client = connect(&pg).await;
    client
        .batch_execute(
            "CREATE EXTENSION pgpipe;
             CREATE TABLE items (id bigserial PRIMARY KEY, writer int NOT NULL, seq int NOT NULL, note text);",
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "SELECT pgpipe.subscribe('items', operations => ARRAY['INSERT'], mode => 'wal')",
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe: {}", describe(&e)));

    let mut next = vec![0i32; WRITERS as usize];
    let queued = async |client: &Client| -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = 'items'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1)
    };

    // As if the worker crashed after every commit, before advancing the slot: it reads
    // the same transactions again and again, and must not queue them twice. (The batch
    // must hold them all: a slot that never moves shows the same first batch each time.)
    client
        .batch_execute("ALTER SYSTEM SET pgpipe.debug_no_advance = on")
        .await
        .unwrap();
    client
        .batch_execute("ALTER SYSTEM SET pgpipe.batch_size = 100000")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let slot_lsn = async |client: &Client| -> String {
        client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgpipe'", &[])
            .await
            .unwrap()
            .get(0)
    };
    let held_at = slot_lsn(&client).await;
    run_writers(&pg, &mut next, 30).await;
    let written = i64::from(next.iter().sum::<i32>());
    assert!(
        wait_until(Duration::from_secs(20), async || queued(&client).await
            >= written)
        .await,
        "queued {} of {written} while the slot is held",
        queued(&client).await
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // many more re-reads
    assert_eq!(
        queued(&client).await,
        written,
        "re-reading the slot queued duplicates"
    );
    assert_eq!(slot_lsn(&client).await, held_at, "the slot was held");
    client
        .batch_execute("ALTER SYSTEM RESET pgpipe.debug_no_advance")
        .await
        .unwrap();
    client
        .batch_execute("ALTER SYSTEM RESET pgpipe.batch_size")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    run_writers(&pg, &mut next, 60).await;

    // Kill the worker while it has a backlog; Postgres starts a new one.
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = 'pgpipe worker'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one worker to kill");
    run_writers(&pg, &mut next, 60).await;

    // Crash Postgres in the middle of the stream.
    let writers = {
        let pg = pg.clone();
        let start = next.clone();
        tokio::spawn(async move {
            let mut next = start;
            run_writers(&pg, &mut next, 200).await;
            next
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.restart(true).await;
    let _ = writers.await.unwrap();
    let client = connect(&pg).await;
    // Writers that lost their connection may or may not have committed their last
    // transaction: what counts is what the table holds.
    let mut committed: HashMap<i32, Vec<i32>> = HashMap::new();
    for row in client
        .query("SELECT writer, seq FROM items ORDER BY writer, seq", &[])
        .await
        .unwrap()
    {
        committed.entry(row.get(0)).or_default().push(row.get(1));
    }
    let mut next: Vec<i32> = (0..WRITERS)
        .map(|w| {
            committed
                .get(&w)
                .and_then(|s| s.last().copied())
                .map_or(0, |s| s + 1)
        })
        .collect();
    // A source transaction far larger than pgpipe.batch_size, while others commit.
    let big = {
        let client = connect(&pg).await;
        tokio::spawn(async move {
            client
                .batch_execute(
                    "INSERT INTO items (writer, seq, note) SELECT 99, g, 'big' FROM generate_series(0, 4999) g",
                )
                .await
                .unwrap();
        })
    };
    run_writers(&pg, &mut next, 40).await;
    big.await.unwrap();

    let expected: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    let count = async || -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = 'items'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1)
    };
    let done = wait_until(Duration::from_secs(60), async || count().await >= expected).await;
    // Give a duplicate a chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        done,
        "queued {} of {expected} changes\n{}",
        count().await,
        pg.log_contents()
    );

    let rows = client
        .query(
            "SELECT (payload->'row'->>'writer')::int, (payload->'row'->>'seq')::int, (payload->'row'->>'id')::bigint
             FROM pgpipe.events WHERE channel = 'items' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, expected, "each change exactly once");
    let mut per_writer: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut ids = Vec::new();
    for row in &rows {
        per_writer.entry(row.get(0)).or_default().push(row.get(1));
        ids.push(row.get::<_, i64>(2));
    }
    for (w, seqs) in &per_writer {
        assert!(
            seqs.iter().all(|&s| s >= 0),
            "writer {w}: a rolled-back row was queued"
        );
        let in_order: Vec<i32> = (0..seqs.len() as i32).collect();
        assert_eq!(
            seqs, &in_order,
            "writer {w}: every row once, in commit order"
        );
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no row queued twice");

    let status = client
        .query_one("SELECT worker_state, slot_status FROM pgpipe.status()", &[])
        .await
        .unwrap();
    assert_eq!(status.get::<_, String>(0), "streaming");
    assert_eq!(status.get::<_, String>(1), "reserved");
}
