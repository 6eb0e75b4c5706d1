//! Journey: an untrusted login role that owns only its own schema captures its own table
//! whose column type has a cast to json — the cast function runs while the row is turned
//! into the event's payload. It runs as that role (the writer), never with pgpipe's or a
//! superuser's rights, and the event is queued all the same.
//!
//! Failure that matters: the cast function tries `ALTER ROLE ... SUPERUSER`; it is refused
//! and the role is not a superuser afterwards (the PL/pgSQL trigger before issue 11 was
//! SECURITY DEFINER and granted it).
//!
//! Each capture mode is one test calling [`escalation_attempt`] with its mode; the WAL
//! mode (`mode => 'wal'`, converted by the background worker as the table's owner) is
//! added beside the trigger one.

use std::time::Duration;

use pgpipe_tests::{describe, test_db, wait_until, TestDb};
use tokio_postgres::{Client, NoTls};

const WAIT: Duration = Duration::from_secs(20);

/// What the cast function saw.
#[derive(Debug, PartialEq)]
struct Seen {
    current_user: String,
    session_user: String,
    was_superuser: bool,
    /// SQLSTATE of the refused `ALTER ROLE ... SUPERUSER`, or "granted".
    escalation: String,
}

async fn connect_as(db: &TestDb, role: &str) -> Client {
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        db.cluster().port(),
        db.name()
    );
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {}", describe(&e)));
    tokio::spawn(connection);
    client
}

/// The attacker's journey in capture mode `mode`; returns what its cast function saw.
async fn escalation_attempt(db: &TestDb, mode: &str) -> Vec<Seen> {
    // Roles are cluster-wide and the cluster is shared: one role per test database.
    let role = format!("attacker_{}", db.name());
    db.execute(&format!(
        "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEROLE;
         CREATE SCHEMA {role} AUTHORIZATION {role};
         -- The most an untrusted role is given: capture of its own tables.
         GRANT pgpipe_producer TO {role};"
    ))
    .await;
    let attacker = connect_as(db, &role).await;
    let setup = format!(
        "CREATE TABLE {role}.seen (
             current_user_name text, session_user_name text, was_superuser bool, escalation text);
         CREATE TYPE {role}.tag AS ENUM ('a', 'b');
         -- Called by to_jsonb for every value of type tag: whoever converts the row runs it.
         CREATE FUNCTION {role}.tag_to_json(t {role}.tag) RETURNS json
         LANGUAGE plpgsql AS $$
         DECLARE
             outcome text := 'granted';
         BEGIN
             BEGIN
                 EXECUTE format('ALTER ROLE %I SUPERUSER', current_user);
             EXCEPTION WHEN OTHERS THEN
                 outcome := SQLSTATE;
             END;
             INSERT INTO {role}.seen
             SELECT current_user, session_user, r.rolsuper, outcome
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
             RETURN pg_catalog.to_json(t::text);
         END $$;
         CREATE CAST ({role}.tag AS json) WITH FUNCTION {role}.tag_to_json({role}.tag);
         CREATE TABLE {role}.things (id int PRIMARY KEY, tag {role}.tag);
         SELECT pgpipe.subscribe('{role}.things', mode => '{mode}');
         INSERT INTO {role}.things VALUES (1, 'b');"
    );
    attacker
        .batch_execute(&setup)
        .await
        .unwrap_or_else(|e| panic!("the attacker's journey failed: {}", describe(&e)));

    // The event is queued (WAL mode: once the worker has read it).
    let channel = format!("{role}.things");
    let queued = wait_until(WAIT, async || {
        let row = db
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = $1",
                &[&channel],
            )
            .await;
        row.get::<_, i64>(0) == 1
    })
    .await;
    assert!(queued, "the attacker's row was not queued in {mode} mode");
    let payload: serde_json::Value = db
        .query_one(
            "SELECT payload FROM pgpipe.events WHERE channel = $1",
            &[&channel],
        )
        .await
        .get(0);
    assert_eq!(payload["row"], serde_json::json!({"id": 1, "tag": "b"}));

    let still_plain: bool = db
        .query_one(
            "SELECT NOT rolsuper FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .get(0);
    assert!(still_plain, "{role} became a superuser in {mode} mode");

    db.query(
        &format!(
            "SELECT current_user_name, session_user_name, was_superuser, escalation FROM {role}.seen"
        ),
        &[],
    )
    .await
    .into_iter()
    .map(|row| Seen {
        current_user: row.get(0),
        session_user: row.get(1),
        was_superuser: row.get(2),
        escalation: row.get(3),
    })
    .collect()
}

#[tokio::test]
async fn trigger_capture_runs_the_writers_cast_as_the_writer() {
    let db = test_db("capture_security").await;
    let role = format!("attacker_{}", db.name());
    let seen = escalation_attempt(&db, "trigger").await;
    assert!(!seen.is_empty(), "the cast function never ran");
    for s in &seen {
        assert_eq!(
            s,
            &Seen {
                current_user: role.clone(),
                session_user: role.clone(),
                was_superuser: false,
                // insufficient_privilege
                escalation: "42501".into(),
            }
        );
    }
}
