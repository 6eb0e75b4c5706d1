//! Journey: events are copied into a table created from `pgpipe init --adapter pg_table`,
//! in batches, idempotently. A row the table refuses (a CHECK constraint) is isolated and
//! dead-lettered; the rest of its batch goes in and delivery goes on.

use std::process::Command;
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, FORWARDER_ROLE};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn rows_arrive_and_a_constraint_violation_is_dead_lettered() {
    let db = test_db("pg_table").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let out = Command::new(Forwarder::binary_path())
        .args(["init", "--adapter", "pg_table", "--pg-table-name", "copy"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ddl = String::from_utf8(out.stdout).unwrap();
    db.execute(&ddl).await;
    db.execute("ALTER TABLE copy ADD CONSTRAINT not_13 CHECK (payload->'row'->>'id' <> '13')")
        .await;
    // What the forwarder's role needs for the pg_table adapter (README).
    db.execute(&format!("GRANT INSERT ON copy TO {FORWARDER_ROLE}"))
        .await;

    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("pg_table")
        .flag("--pg-table-name", "copy")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 20)")
        .await;
    db.execute("INSERT INTO t VALUES (21)").await;
    let done = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM copy", &[])
            .await
            .get::<_, i64>(0)
            == 20
    })
    .await;
    assert!(done, "20 of 21 rows inserted: {}", fwd.stderr_text());
    let letters = db
        .query(
            "SELECT adapter, error, event->'payload'->'row'->>'id' FROM pgpipe.dead_letters",
            &[],
        )
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].get::<_, String>(0), "pg_table");
    assert!(
        letters[0].get::<_, String>(1).contains("not_13"),
        "{}",
        letters[0].get::<_, String>(1)
    );
    assert_eq!(letters[0].get::<_, String>(2), "13");
    // The copy holds the events' own ids and columns.
    let same = db
        .query_one(
            "SELECT count(*) FROM copy c JOIN pgpipe.events e USING (id) \
             WHERE c.channel = e.channel AND c.operation = e.operation AND c.payload = e.payload \
               AND c.source = e.source AND c.created_at = e.created_at",
            &[],
        )
        .await;
    assert_eq!(same.get::<_, i64>(0), 20);

    // The adapter's connection is killed: it reconnects and loses nothing.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE 'INSERT INTO \"copy\"%'",
    )
    .await;
    for i in 22..=30 {
        db.execute(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    let done = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM copy", &[])
            .await
            .get::<_, i64>(0)
            == 29
    })
    .await;
    assert!(done, "29 rows after the reconnect: {}", fwd.stderr_text());
}

#[tokio::test]
async fn events_go_to_a_table_in_another_database() {
    let db = test_db("pg_table_source").await;
    let target = test_db("pg_table_target").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    target
        .execute(
            "CREATE SCHEMA audit; CREATE TABLE audit.events (id uuid PRIMARY KEY, channel text, \
             operation text, payload jsonb, source text, created_at timestamptz);",
        )
        .await;
    target
        .execute(&format!(
            "GRANT USAGE ON SCHEMA audit TO {FORWARDER_ROLE}; GRANT INSERT ON audit.events TO {FORWARDER_ROLE};"
        ))
        .await;
    let url = db.url();
    let target_url = target.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("pg_table")
        .flag("--pg-table-url", &target_url)
        .flag("--pg-table-name", "audit.events")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await;
    let done = wait_until(WAIT, async || {
        target
            .query_one("SELECT count(*) FROM audit.events", &[])
            .await
            .get::<_, i64>(0)
            == 50
    })
    .await;
    assert!(done, "{}", fwd.stderr_text());
    // Redelivery is harmless: the same rows again change nothing.
    fwd.kill9();
    let again = Forwarder::listen(&url)
        .channel("t")
        .adapter("pg_table")
        .flag("--pg-table-url", &target_url)
        .flag("--pg-table-name", "audit.events")
        .spawn();
    db.execute("INSERT INTO t VALUES (51)").await;
    let done = wait_until(WAIT, async || {
        target
            .query_one("SELECT count(*) FROM audit.events", &[])
            .await
            .get::<_, i64>(0)
            == 51
    })
    .await;
    assert!(done, "{}", again.stderr_text());
}
