//! Journey: a user subscribes a partitioned table — two partitions, one of them with its
//! columns in another order and a dropped column (so its attribute numbers differ from
//! the parent's), a sub-partitioned one created after the subscription — in trigger mode
//! and in WAL mode, with a column choice. Both modes queue the same events: named after
//! the subscribed parent (not the partition), with the same rows, old rows and keys,
//! also for a row that moves between partitions and for TRUNCATE; a detached partition
//! is no longer captured.
//!
//! Failure that matters: subscribing a partition of a subscribed table (at any level),
//! or a partitioned table one of whose partitions is subscribed, is refused naming both
//! tables and the fix (unsubscribe one), in either mode; nothing changes.

use std::time::Duration;

use pgpipe_tests::{describe, wait_until, TempPg};
use serde_json::Value;
use tokio_postgres::Client;

/// The worker serves database `postgres` (the default `pgpipe.database`).
async fn worker_db() -> Client {
    static CREATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let pg = TempPg::shared();
    let client = pg.client("postgres").await;
    let _guard = CREATE.lock().await;
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pgpipe")
        .await
        .expect("create extension");
    client
}

/// (operation, payload without "table", payload's table, key) of a channel's events.
async fn events(client: &Client, channel: &str) -> Vec<(String, Value, Value, Option<Value>)> {
    client
        .query(
            "SELECT operation, payload - 'table', payload -> 'table', key
             FROM pgpipe.events WHERE channel = $1 ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// `{t}` partitioned by region: `{t}_eu` as the parent has it, `{t}_us` with its columns
/// in another order after a dropped one. REPLICA IDENTITY FULL on the parent (pgoutput
/// sends the old row whole only when the table it publishes as has it) and on every leaf
/// (whose WAL holds the old row), so WAL mode has whole old rows as trigger mode has.
const TABLES: &str = r#"
    CREATE TABLE {t} (id int, region text, name text, total numeric(10,2), PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu');
    CREATE TABLE {t}_us (junk int, total numeric(10,2), name text, region text NOT NULL, id int NOT NULL);
    ALTER TABLE {t}_us DROP COLUMN junk;
    ALTER TABLE {t} ATTACH PARTITION {t}_us FOR VALUES IN ('us');
    ALTER TABLE {t} REPLICA IDENTITY FULL;
    ALTER TABLE {t}_eu REPLICA IDENTITY FULL;
    ALTER TABLE {t}_us REPLICA IDENTITY FULL;"#;

/// A sub-partitioned partition made after the subscription (its leaf gets the trigger
/// clone, and is in the publication through the parent).
const LATER: &str = r#"
    CREATE TABLE {t}_asia PARTITION OF {t} FOR VALUES IN ('asia') PARTITION BY RANGE (id);
    CREATE TABLE {t}_asia_1 (name text, id int NOT NULL, total numeric(10,2), region text NOT NULL);
    ALTER TABLE {t}_asia ATTACH PARTITION {t}_asia_1 FOR VALUES FROM (0) TO (1000);
    ALTER TABLE {t}_asia_1 REPLICA IDENTITY FULL;"#;

const WRITES: &str = r#"
    INSERT INTO {t} (id, region, name, total) VALUES (1, 'eu', 'Ada', 10.50), (2, 'us', 'Bob', 7),
                                                    (3, 'asia', 'Chen', 3);
    INSERT INTO {t}_us (id, region, name, total) VALUES (4, 'us', 'Dee', 4);
    UPDATE {t} SET total = 11 WHERE id = 1;
    UPDATE {t}_us SET name = 'Bobby', total = 8 WHERE id = 2;
    UPDATE {t} SET total = 4 WHERE id = 3;
    UPDATE {t} SET region = 'us' WHERE id = 1;
    DELETE FROM {t} WHERE id = 3;
    DELETE FROM {t}_us WHERE id = 4;
    ALTER TABLE {t} DETACH PARTITION {t}_eu;
    INSERT INTO {t}_eu VALUES (9, 'eu', 'Solo', 1);
    INSERT INTO {t} VALUES (5, 'us', 'Eve', 5);
    TRUNCATE {t}_us;
    TRUNCATE {t};"#;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

async fn run(client: &Client, sql: &str, table: &str) {
    client
        .batch_execute(&sql.replace("{t}", table))
        .await
        .unwrap_or_else(|e| panic!("{table}: {}", describe(&e)));
}

#[tokio::test]
async fn a_partitioned_table_is_named_after_its_parent_in_both_modes() {
    let client = worker_db().await;
    run(&client, TABLES, "pt_trg").await;
    run(&client, TABLES, "pt_wal").await;
    run(
        &client,
        "SELECT pgpipe.subscribe('{t}', exclude_columns => ARRAY['name'])",
        "pt_trg",
    )
    .await;
    // Its own transaction: the first WAL subscription may create the slot.
    run(
        &client,
        "SELECT pgpipe.subscribe('{t}', mode => 'wal', exclude_columns => ARRAY['name'])",
        "pt_wal",
    )
    .await;
    run(&client, LATER, "pt_trg").await;
    run(&client, LATER, "pt_wal").await;
    run(&client, WRITES, "pt_trg").await;
    run(&client, WRITES, "pt_wal").await;

    let trigger = events(&client, "pt_trg").await;
    assert_eq!(trigger.len(), 14, "{trigger:#?}");
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "pt_wal").await.len() >= trigger.len()
    })
    .await;
    let wal = events(&client, "pt_wal").await;
    assert!(arrived, "WAL events: {wal:#?}");
    assert_eq!(wal.len(), trigger.len(), "{wal:#?}");

    let ops: Vec<&str> = trigger.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        ops,
        [
            "INSERT", "INSERT", "INSERT", "INSERT", "UPDATE", "UPDATE", "UPDATE",
            // the row moved from pt_trg_eu to pt_trg_us
            "DELETE", "INSERT", "DELETE", "DELETE",
            // DETACH PARTITION is an ALTER TABLE of the subscribed table
            "DDL", "INSERT",
            // TRUNCATE of the partitioned table (of one partition alone: none)
            "TRUNCATE",
        ]
    );
    // Nothing from the detached partition: the row written after it comes next.
    assert_eq!(trigger[12].3, Some(json(r#"{"id": 5, "region": "us"}"#)));
    for (n, (t, w)) in trigger.iter().zip(&wal).enumerate() {
        assert_eq!(t.2, "pt_trg", "event {n}: named after the parent: {t:?}");
        assert_eq!(w.2, "pt_wal", "event {n}: named after the parent: {w:?}");
        assert_eq!(t.1["schema"], "public");
        assert_eq!((&t.0, &t.1, &t.3), (&w.0, &w.1, &w.3), "event {n}");
    }
    // The partition with other attribute numbers: the chosen columns and the key, by name.
    let bobby = &trigger[5];
    assert_eq!(
        bobby.1["row"],
        json(r#"{"id": 2, "region": "us", "total": 8.00}"#),
        "{bobby:?}"
    );
    assert_eq!(
        bobby.1["old"],
        json(r#"{"id": 2, "region": "us", "total": 7.00}"#),
        "{bobby:?}"
    );
    assert_eq!(bobby.3, Some(json(r#"{"id": 2, "region": "us"}"#)));
    // The sub-partition's leaf, created after the subscription.
    assert_eq!(
        trigger[2].1["row"],
        json(r#"{"id": 3, "region": "asia", "total": 3.00}"#)
    );
}

#[tokio::test]
async fn a_partition_and_its_parent_cannot_both_be_subscribed() {
    let client = worker_db().await;
    run(&client, TABLES, "pr_a").await;
    run(&client, LATER, "pr_a").await;
    run(&client, TABLES, "pr_b").await;
    run(&client, "SELECT pgpipe.subscribe('{t}')", "pr_a").await;
    run(&client, "SELECT pgpipe.subscribe('{t}_us')", "pr_b").await;
    let refused = |sql: String| {
        let client = &client;
        async move {
            let e = client
                .batch_execute(&sql)
                .await
                .expect_err("should be refused");
            describe(&e)
        }
    };
    for (sql, partition) in [
        ("SELECT pgpipe.subscribe('pr_a_us')", "pr_a_us"),
        (
            "SELECT pgpipe.subscribe('pr_a_asia_1', channel => 'x')",
            "pr_a_asia_1",
        ),
        (
            "SELECT pgpipe.subscribe('pr_a_asia', mode => 'wal')",
            "pr_a_asia",
        ),
    ] {
        let e = refused(sql.into()).await;
        assert!(
            e.contains(&format!(
                "cannot subscribe public.{partition}: it is a partition of public.pr_a, which is subscribed (SQLSTATE 55000)"
            )) && e.contains("SELECT pgpipe.unsubscribe('public.pr_a');"),
            "{sql}: {e}"
        );
    }
    for sql in [
        "SELECT pgpipe.subscribe('pr_b')",
        "SELECT pgpipe.subscribe('pr_b', mode => 'wal')",
    ] {
        let e = refused(sql.into()).await;
        assert!(
            e.contains(
                "cannot subscribe public.pr_b: its partition public.pr_b_us is subscribed (SQLSTATE 55000)"
            ) && e.contains("SELECT pgpipe.unsubscribe('public.pr_b_us');"),
            "{sql}: {e}"
        );
    }
    // Attaching a subscribed table under a subscribed one is refused the same way, in
    // WAL mode too (where no trigger name collides), and leaves both as they were.
    run(
        &client,
        "CREATE TABLE {t}_sa (id int NOT NULL, region text NOT NULL, name text, total numeric(10,2), PRIMARY KEY (id, region))",
        "pr_a",
    )
    .await;
    // A transaction of its own: the other test of this file may be creating the slot,
    // which waits for every transaction that wrote (as the README says).
    run(
        &client,
        "SELECT pgpipe.subscribe('{t}_sa', mode => 'wal')",
        "pr_a",
    )
    .await;
    let e = refused("ALTER TABLE pr_a ATTACH PARTITION pr_a_sa FOR VALUES IN ('sa')".into()).await;
    assert!(
        e.contains("cannot make public.pr_a_sa a partition of public.pr_a: both are subscribed (SQLSTATE 55000)")
            && e.contains("SELECT pgpipe.unsubscribe('public.pr_a_sa');"),
        "{e}"
    );
    let attached = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'pr_a_sa'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(attached, 0, "the ATTACH was rolled back");
    run(
        &client,
        "SELECT pgpipe.unsubscribe('{t}_sa'); DROP TABLE {t}_sa",
        "pr_a",
    )
    .await;
    // Nothing changed; subscribing the same table again still works, and once the
    // partition is unsubscribed, its parent can be.
    let subscribed: Vec<String> = client
        .query(
            "SELECT \"table\"::text FROM pgpipe.subscriptions WHERE \"table\"::text LIKE 'pr\\_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(subscribed, ["pr_a", "pr_b_us"]);
    run(
        &client,
        "SELECT pgpipe.subscribe('{t}', channel => 'pr_a2')",
        "pr_a",
    )
    .await;
    run(
        &client,
        "SELECT pgpipe.unsubscribe('{t}_us'); SELECT pgpipe.subscribe('{t}')",
        "pr_b",
    )
    .await;
    run(&client, "INSERT INTO {t} VALUES (1, 'us', 'x', 1)", "pr_b").await;
    let b = events(&client, "pr_b").await;
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].2, "pr_b");
}
