//! Journey: the replication slot behind WAL mode is lost — invalidated by
//! `max_slot_wal_keep_size` while the worker is stuck, or dropped by someone. pgpipe never
//! recreates it behind the user's back (that would hide a gap): `pgpipe.status()` and the
//! server log say what happened and what to do, a new WAL subscription is refused with the
//! same advice, and `pgpipe.recreate_slot()` starts capturing again.

use std::time::Duration;

use pgpipe_tests::{describe, wait_until, PgOptions, TempPg};
use tokio_postgres::{Client, NoTls};

async fn connect(pg: &TempPg) -> Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    client
}

async fn status(client: &Client) -> (String, String, Option<String>) {
    let row = client
        .query_one(
            "SELECT worker_state, slot_status, detail FROM pgpipe.status()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn queued(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pgpipe.events WHERE channel = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn set(client: &Client, setting: &str) {
    client
        .batch_execute(&format!("ALTER SYSTEM {setting}"))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_lost_slot_is_reported_and_recreated_only_on_request() {
    let pg = TempPg::start_dedicated(
        PgOptions::new()
            .conf("pgpipe.database = 'postgres'")
            .conf("pgpipe.poll_interval = '50ms'")
            .conf("max_slot_wal_keep_size = '1MB'"),
    )
    .await;
    let client = connect(&pg).await;
    client
        .batch_execute(
            "CREATE EXTENSION pgpipe;
             CREATE TABLE t (id int PRIMARY KEY);
             CREATE TABLE u (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT pgpipe.subscribe('t', mode => 'wal')")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), async || queued(&client).await == 1).await);

    // The worker gets stuck (never advances the slot) while WAL piles up past
    // max_slot_wal_keep_size: the checkpoint invalidates the slot.
    set(&client, "SET pgpipe.debug_no_advance = on").await;
    for i in 2..5 {
        client
            .batch_execute(&format!(
                "INSERT INTO t VALUES ({i}); SELECT pg_switch_wal(); CHECKPOINT;"
            ))
            .await
            .unwrap();
    }
    let invalidated = wait_until(Duration::from_secs(20), async || {
        status(&client).await.0 == "slot_invalidated"
    })
    .await;
    let (state, slot_status, detail) = status(&client).await;
    assert!(
        invalidated,
        "state {state}, slot {slot_status}\n{}",
        pg.log_contents()
    );
    assert_eq!(slot_status, "invalidated");
    assert!(detail
        .unwrap_or_default()
        .contains("pgpipe.recreate_slot()"));
    assert!(
        pg.log_contents().contains("was invalidated"),
        "the worker logs it"
    );
    set(&client, "RESET pgpipe.debug_no_advance").await;

    // Not recreated silently: a new WAL subscription is refused with the way out.
    let err = client
        .batch_execute("SELECT pgpipe.subscribe('u', mode => 'wal')")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "55000", "{}", describe(&err));
    assert!(db.hint().unwrap_or("").contains("pgpipe.recreate_slot()"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&client).await.0, "slot_invalidated");

    // Explicitly recreated: capture resumes (the gap stays a gap).
    client
        .batch_execute("SELECT pgpipe.recreate_slot()")
        .await
        .unwrap_or_else(|e| panic!("recreate_slot: {}", describe(&e)));
    client
        .batch_execute("INSERT INTO t VALUES (10)")
        .await
        .unwrap();
    let resumed = wait_until(Duration::from_secs(10), async || {
        client
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = 't' AND payload->'row'->>'id' = '10'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(resumed, "capture resumed after recreate_slot");
    assert_eq!(status(&client).await.0, "streaming");

    // Someone drops the slot: reported as missing, not recreated.
    let dropped = wait_until(Duration::from_secs(10), async || {
        client
            .batch_execute("SELECT pg_drop_replication_slot('pgpipe')")
            .await
            .is_ok()
    })
    .await;
    assert!(
        dropped,
        "drop the slot (it is busy only while the worker reads it)"
    );
    let missing = wait_until(Duration::from_secs(10), async || {
        status(&client).await.0 == "slot_missing"
    })
    .await;
    let (state, slot_status, _) = status(&client).await;
    assert!(missing, "state {state}");
    assert_eq!(slot_status, "missing");
    client
        .batch_execute("INSERT INTO t VALUES (11)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot appeared by itself");
    client
        .batch_execute("SELECT pgpipe.recreate_slot()")
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), async || status(&client).await.0
            == "streaming")
        .await
    );
}
