//! Journey: capture runs the table owner's code with the owner's rights, never pgpipe's.
//! The attacker is a login role that owns only its own schema: its enum has a cast to
//! json whose function records who runs it and tries `ALTER ROLE ... SUPERUSER`, and its
//! domain has a CHECK calling a function that does the same (the WAL worker runs a
//! type's input function to read a value back). Its table is subscribed and written.
//!
//! Failure that matters (WAL mode): the background worker converts values with
//! `to_jsonb` and input functions; as the bootstrap superuser that made the attacker a
//! superuser. Now the functions run as the table's owner inside a security-restricted
//! operation (search_path pinned), the role stays a plain role, and the event is still
//! queued with the cast's value.

use std::time::Duration;

use pgpipe_tests::{describe, wait_until, TempPg};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

/// The worker serves database `postgres` (the default `pgpipe.database`) of this test
/// process's own cluster.
async fn worker_db() -> Client {
    let pg = TempPg::shared();
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pgpipe")
        .await
        .expect("create extension");
    client
}

/// The attacker's objects, created as the attacker (`{r}` = its role and schema).
const ATTACKER_SQL: &str = r#"
    CREATE TABLE {r}.seen (via text, who text, is_super bool, search_path text, escalation text);
    CREATE FUNCTION {r}.spy(via text) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        outcome text := 'succeeded';
    BEGIN
        BEGIN
            EXECUTE format('ALTER ROLE %I SUPERUSER', current_user);
        EXCEPTION WHEN OTHERS THEN
            outcome := SQLSTATE || ' ' || SQLERRM;
        END;
        INSERT INTO {r}.seen VALUES (via, current_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            current_setting('search_path'), outcome);
    END $$;
    CREATE TYPE {r}.mood AS ENUM ('calm', 'sly');
    CREATE FUNCTION {r}.mood_json(m {r}.mood) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM {r}.spy('cast');
        RETURN to_json('mood:' || m::text);
    END $$;
    CREATE CAST ({r}.mood AS json) WITH FUNCTION {r}.mood_json({r}.mood);
    CREATE FUNCTION {r}.note_ok(v text) RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM {r}.spy('input');
        RETURN true;
    END $$;
    CREATE DOMAIN {r}.note AS text CHECK ({r}.note_ok(VALUE));
    CREATE TABLE {r}.t (id int PRIMARY KEY, m {r}.mood, n {r}.note);
"#;

#[tokio::test]
async fn wal_worker_converts_values_as_the_table_owner_never_as_superuser() {
    let admin = worker_db().await;
    let r = "mallory_wal";
    admin
        .batch_execute(&format!(
            "CREATE ROLE {r} LOGIN;
             CREATE SCHEMA {r} AUTHORIZATION {r};
             SET ROLE {r};
             {}
             RESET ROLE;",
            ATTACKER_SQL.replace("{r}", r)
        ))
        .await
        .unwrap_or_else(|e| panic!("attacker setup: {}", describe(&e)));
    // The first WAL subscription creates the slot: a transaction of its own.
    admin
        .batch_execute(&format!("SELECT pgpipe.subscribe('{r}.t', mode => 'wal')"))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {}", describe(&e)));
    // The domain's CHECK runs on the writer's INSERT too: start from an empty record.
    admin
        .batch_execute(&format!(
            "SET ROLE {r};
             INSERT INTO {r}.t VALUES (1, 'sly', 'hello');
             DELETE FROM {r}.seen;
             RESET ROLE;"
        ))
        .await
        .unwrap_or_else(|e| panic!("write: {}", describe(&e)));

    let channel = format!("{r}.t");
    let arrived = wait_until(Duration::from_secs(20), async || {
        admin
            .query_one(
                "SELECT count(*) FROM pgpipe.events WHERE channel = $1",
                &[&channel],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
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
    assert!(arrived, "the WAL event did not arrive; worker: {status}");

    let payload: Value = admin
        .query_one(
            "SELECT payload FROM pgpipe.events WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        payload["row"]["m"], "mood:sly",
        "the cast's value: {payload}"
    );
    assert_eq!(payload["row"]["n"], "hello");
    assert_eq!(payload["op"], "INSERT");

    let seen: Vec<(String, String, bool, String, String)> = admin
        .query(
            &format!(
                "SELECT via, who, is_super, search_path, escalation FROM {r}.seen ORDER BY via"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect();
    let vias: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        vias,
        ["cast", "input"],
        "the worker ran the cast (to_jsonb) and the domain's CHECK (input) once each: {seen:#?}"
    );
    for (via, who, is_super, search_path, escalation) in &seen {
        assert_eq!(who, r, "{via} ran as {who}, not as the table owner");
        assert!(!is_super, "{via} ran with superuser rights");
        assert_eq!(
            search_path, "pg_catalog, pg_temp",
            "{via}: search_path not pinned"
        );
        assert!(
            escalation.starts_with("42501"),
            "{via}: ALTER ROLE ... SUPERUSER was not refused: {escalation}"
        );
    }
    let is_super: bool = admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&r])
        .await
        .unwrap()
        .get(0);
    assert!(!is_super, "{r} became superuser");
    admin
        .batch_execute(&format!("SELECT pgpipe.unsubscribe('{r}.t')"))
        .await
        .unwrap();
}
