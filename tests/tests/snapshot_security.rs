//! Journey: a table's owner starts, watches (`pgpipe.snapshots`) and cancels a snapshot;
//! the worker reads an untrusted owner's table as that owner, never as a superuser.
//!
//! Failure that matters: an attacker — a login role that owns only its own schema, with
//! the producer role — may not snapshot or cancel the snapshot of a table it does not
//! own, nor see its progress; its own table's cast to json, which the worker's
//! `to_jsonb` runs, tries `ALTER ROLE ... SUPERUSER` and is refused, running as the
//! attacker with a pinned search_path. A table that is not subscribed, a table without a
//! primary key and a database the worker does not serve are refused, naming the fix.

use std::time::Duration;

use pgpipe_tests::{describe, test_db, wait_until, TempPg};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

/// The worker serves database `postgres` (the default `pgpipe.database`) of this test
/// process's own cluster.
async fn worker_db() -> Client {
    connect("postgres").await
}

async fn connect(user: &str) -> Client {
    let pg = TempPg::shared();
    let url =
        pg.url("postgres")
            .replacen("postgres://postgres@", &format!("postgres://{user}@"), 1);
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {}", describe(&e)));
    tokio::spawn(connection);
    if user == "postgres" {
        client
            // The tests of this file run at once: one creates the extension.
            .batch_execute("SELECT pg_advisory_lock(16)")
            .await
            .expect("lock");
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pgpipe")
            .await
            .expect("create extension");
        client
            .batch_execute("SELECT pg_advisory_unlock(16)")
            .await
            .expect("unlock");
    }
    client
}

/// Runs `sql` and expects SQLSTATE `code` with every one of `words` in the message,
/// detail or hint.
async fn refused(client: &Client, sql: &str, code: &str, words: &[&str]) {
    let error = match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql}\n-> succeeded; it must be refused"),
        Err(e) => e,
    };
    let text = describe(&error);
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}\n-> not a server error: {text}"));
    assert_eq!(db.code().code(), code, "{sql}\n-> {text}");
    for word in words {
        assert!(
            text.contains(word),
            "{sql}\n-> {text}\nshould mention {word:?}"
        );
    }
}

async fn ok(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

async fn state(client: &Client, table: &str) -> Option<(String, i64, i64)> {
    client
        .query_opt(
            "SELECT state, rows, chunks FROM pgpipe.snapshots WHERE \"table\" = $1 \
             ORDER BY id DESC LIMIT 1",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("read pgpipe.snapshots: {}", describe(&e)))
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

/// The attacker's objects, created as the attacker (`{r}` = its role and schema).
const ATTACKER_SQL: &str = r#"
    CREATE TABLE {r}.seen (who text, is_super bool, search_path text, escalation text);
    CREATE TYPE {r}.mood AS ENUM ('calm', 'sly');
    CREATE FUNCTION {r}.mood_json(m {r}.mood) RETURNS json LANGUAGE plpgsql AS $$
    DECLARE
        outcome text := 'succeeded';
    BEGIN
        BEGIN
            EXECUTE format('ALTER ROLE %I SUPERUSER', current_user);
        EXCEPTION WHEN OTHERS THEN
            outcome := SQLSTATE || ' ' || SQLERRM;
        END;
        INSERT INTO {r}.seen VALUES (current_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            current_setting('search_path'), outcome);
        RETURN to_json('mood:' || m::text);
    END $$;
    CREATE CAST ({r}.mood AS json) WITH FUNCTION {r}.mood_json({r}.mood);
    CREATE TABLE {r}.t (id int PRIMARY KEY, m {r}.mood);
    INSERT INTO {r}.t VALUES (1, 'sly'), (2, 'calm');
"#;

#[tokio::test]
async fn attacker_is_refused_and_its_code_runs_as_itself() {
    let admin = worker_db().await;
    let r = "mallory_snap";
    ok(
        &admin,
        &format!(
            "CREATE TABLE snap_owned (id int PRIMARY KEY, secret text);
             INSERT INTO snap_owned SELECT g, 'card ' || g FROM generate_series(1, 10) g;
             SELECT pgpipe.subscribe('snap_owned');
             CREATE ROLE {r} LOGIN;
             GRANT pgpipe_producer, pgpipe_consumer TO {r};
             CREATE SCHEMA {r} AUTHORIZATION {r};
             SET ROLE {r};
             {}
             RESET ROLE;",
            ATTACKER_SQL.replace("{r}", r)
        ),
    )
    .await;
    let mallory = connect(r).await;
    refused(
        &mallory,
        "SELECT pgpipe.snapshot('public.snap_owned')",
        "42501",
        &[
            "must be the owner of table",
            "snap_owned",
            "Run it as postgres",
        ],
    )
    .await;
    ok(&admin, "SELECT pgpipe.cancel_snapshot('snap_owned')").await;
    ok(&admin, "SELECT pgpipe.snapshot('snap_owned')").await;
    refused(
        &mallory,
        "SELECT pgpipe.cancel_snapshot('public.snap_owned')",
        "42501",
        &["must be the owner of table", "snap_owned"],
    )
    .await;
    let done = wait_until(Duration::from_secs(20), async || {
        state(&admin, "public.snap_owned")
            .await
            .is_some_and(|s| s.0 == "done")
    })
    .await;
    assert!(
        done,
        "snapshot of snap_owned: {:?}",
        state(&admin, "public.snap_owned").await
    );
    assert_eq!(state(&admin, "public.snap_owned").await.unwrap().1, 10);
    // Progress of a table it may not SELECT is not shown to it.
    let visible: i64 = mallory
        .query_one(
            "SELECT count(*) FROM pgpipe.snapshots WHERE \"table\" LIKE '%snap_owned'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("mallory reads pgpipe.snapshots: {}", describe(&e)))
        .get(0);
    assert_eq!(visible, 0, "the attacker sees another table's snapshot");

    // Its own table: the worker's to_jsonb runs the cast as the attacker.
    let channel = format!("{r}.t");
    ok(
        &mallory,
        &format!("SELECT pgpipe.subscribe('{r}.t', snapshot => true)"),
    )
    .await;
    let arrived = wait_until(Duration::from_secs(20), async || {
        state(&mallory, &channel)
            .await
            .is_some_and(|s| s.0 == "done")
    })
    .await;
    assert!(
        arrived,
        "attacker's snapshot: {:?}",
        state(&admin, &channel).await
    );
    let payloads: Vec<Value> = admin
        .query(
            "SELECT payload FROM pgpipe.events WHERE channel = $1 AND operation = 'READ' ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let moods: Vec<&Value> = payloads.iter().map(|p| &p["row"]["m"]).collect();
    assert_eq!(
        moods,
        ["mood:sly", "mood:calm"],
        "the cast's values, in key order"
    );
    let seen: Vec<(String, bool, String, String)> = admin
        .query(
            &format!("SELECT who, is_super, search_path, escalation FROM {r}.seen"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(seen.len(), 2, "the cast ran once per row: {seen:?}");
    for (who, is_super, search_path, escalation) in &seen {
        assert_eq!(who, r, "the cast ran as {who}, not as the table's owner");
        assert!(!is_super, "the cast ran with superuser rights");
        assert_eq!(search_path, "pg_catalog, pg_temp", "search_path not pinned");
        assert!(
            escalation.starts_with("42501"),
            "ALTER ROLE ... SUPERUSER: {escalation}"
        );
    }
    let is_super: bool = admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&r])
        .await
        .unwrap()
        .get(0);
    assert!(!is_super, "{r} became superuser");
}

#[tokio::test]
async fn refusals_name_the_fix_and_a_snapshot_can_be_cancelled() {
    let admin = worker_db().await;
    ok(
        &admin,
        "CREATE TABLE snap_unsubscribed (id int PRIMARY KEY);
         CREATE TABLE snap_keyless (v int);
         SELECT pgpipe.subscribe('snap_keyless');
         CREATE TABLE snap_big (id int PRIMARY KEY, v text);
         INSERT INTO snap_big SELECT g, md5(g::text) FROM generate_series(1, 50000) g;",
    )
    .await;
    refused(
        &admin,
        "SELECT pgpipe.snapshot('snap_unsubscribed')",
        "55000",
        &["is not subscribed", "snapshot => true"],
    )
    .await;
    refused(
        &admin,
        "SELECT pgpipe.snapshot('snap_keyless')",
        "55000",
        &["has no primary key", "ADD PRIMARY KEY"],
    )
    .await;
    let other = test_db("snap_other").await;
    other
        .execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    refused(
        &other.client().await,
        "SELECT pgpipe.snapshot('t')",
        "55000",
        &["serves database", "pgpipe.database"],
    )
    .await;

    // Started twice: one snapshot. The default rate (10,000 rows/s) leaves time to cancel.
    ok(
        &admin,
        "SELECT pgpipe.subscribe('snap_big', snapshot => true)",
    )
    .await;
    let first: i64 = admin
        .query_one("SELECT pgpipe.snapshot('snap_big')", &[])
        .await
        .unwrap()
        .get(0);
    let again: i64 = admin
        .query_one("SELECT pgpipe.snapshot('snap_big')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, again, "a second snapshot() joins the running one");
    let snapshots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pgpipe.snapshots WHERE \"table\" = 'public.snap_big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 1);
    let running = wait_until(Duration::from_secs(20), async || {
        state(&admin, "public.snap_big")
            .await
            .is_some_and(|s| s.2 >= 2)
    })
    .await;
    assert!(running, "{:?}", state(&admin, "public.snap_big").await);
    let cancelled: bool = admin
        .query_one("SELECT pgpipe.cancel_snapshot('snap_big')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    let (st, rows, _) = state(&admin, "public.snap_big").await.unwrap();
    assert_eq!(st, "cancelled");
    assert!(rows < 50000, "cancelled after {rows} rows");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reads: i64 = admin
        .query_one(
            "SELECT count(*) FROM pgpipe.events WHERE channel = 'snap_big' AND operation = 'READ'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reads, rows, "no READ event after the cancel");
    let cancelled_again: bool = admin
        .query_one("SELECT pgpipe.cancel_snapshot('snap_big')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!cancelled_again, "nothing left to cancel");
}
