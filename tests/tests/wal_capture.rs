//! Journey: a table subscribed with `mode => 'wal'` is captured by the background worker
//! from the WAL, and its events are indistinguishable from trigger-captured ones except by
//! `source`: the same writes on a table with many column types give equal payloads in
//! both modes. Unchanged TOASTed values are filled from the old image (REPLICA IDENTITY
//! FULL) or listed in `payload.unchanged_toast`, never a silent null.
//!
//! Failure that matters: a table WAL capture cannot handle (no primary key or replica
//! identity), or a database the worker does not serve, is refused with an error saying
//! what to do, and nothing is half-installed.

use std::time::Duration;

use pgpipe_tests::{describe, test_db, wait_until, PgOptions, TempPg};
use serde_json::Value;
use tokio_postgres::Client;

/// The worker serves database `postgres` (the default `pgpipe.database`) of this test
/// process's own cluster.
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

const COLUMNS: &str = "
    id    int4 PRIMARY KEY,
    i2    int2, i8 int8, num numeric(12,4), f4 real, f8 double precision, b bool,
    t     text, vc varchar(20), ch char(5), jb jsonb, js json, u uuid,
    d     date, ts timestamp, tstz timestamptz, iv interval, by bytea,
    ai    int[], at text[], m mood, big text";

const WRITES: &str = "
    INSERT INTO {t} VALUES
      (1, 32767, 9007199254740993, 12345678.1234, 1.1, 2.718281828459045, true,
       'héllo \"quoted\" \\ back', 'varchar', 'ab', '{\"k\": [1, 2.50, null], \"z\": {\"a\": true}}',
       '{\"b\": 1,  \"a\" : [1,2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+02', '1 year 2 mons 3 days 04:05:06.7',
       '\\xdeadbeef', '{1,NULL,3}', '{a,\"b c\",NULL}', 'happy', 'short'),
      (2, NULL, NULL, NULL, 'NaN', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      (3, -1, -1, -0.0001, -0, 1e300, false, '', '', '', 'null', 'null', NULL,
       'infinity', '-infinity', 'infinity', '-1 day', '\\x', '{}', '{}', 'sad',
       (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g));
    UPDATE {t} SET t = 'changed', num = num * 2, jb = jb || '{\"new\": 1}' WHERE id = 1;
    UPDATE {t} SET i2 = 7 WHERE id = 3;
    UPDATE {t} SET id = 4 WHERE id = 2;
    DELETE FROM {t} WHERE id = 1;
    TRUNCATE {t};";

/// The rich table without the types only `to_jsonb` converts (arrays, json, an enum):
/// both capture modes then convert every column themselves (`capture::json`).
const BUILTIN_COLUMNS: &str = "
    id    int4 PRIMARY KEY,
    i2    int2, i8 int8, num numeric(12,4), f4 real, f8 double precision, b bool,
    t     text, vc varchar(20), ch char(5), jb jsonb, u uuid,
    d     date, ts timestamp, tstz timestamptz, iv interval, by bytea, big text";

const BUILTIN_WRITES: &str = "
    INSERT INTO {t} VALUES
      (1, 32767, 9007199254740993, 12345678.1234, 1.1, 2.718281828459045, true,
       'héllo \"quoted\" \\ back', 'varchar', 'ab', '{\"k\": [1, 2.50, null], \"z\": {\"a\": true}}',
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+02', '1 year 2 mons 3 days 04:05:06.7',
       '\\xdeadbeef', 'short'),
      (2, NULL, NULL, NULL, 'NaN', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL),
      (3, -1, -1, -0.0001, -0, 1e300, false, '', '', '', '\"s\"', NULL,
       'infinity', '-infinity', 'infinity', '-1 day', '\\x',
       (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g));
    UPDATE {t} SET t = 'changed', num = num * 2, jb = jb || '{\"new\": 1}' WHERE id = 1;
    UPDATE {t} SET i2 = 7, jb = '5' WHERE id = 3;
    UPDATE {t} SET id = 4 WHERE id = 2;
    DELETE FROM {t} WHERE id = 1;
    TRUNCATE {t};";

/// (operation, payload without "table", key) of an event.
type Event = (String, Value, Option<Value>);

/// A channel's events, in queue order.
async fn events(client: &Client, channel: &str) -> Vec<Event> {
    client
        .query(
            "SELECT operation, payload - 'table', key FROM pgpipe.events WHERE channel = $1 ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The events of a trigger-mode channel (`count` of them) and, once the worker has queued
/// them, of a WAL-mode channel fed the same writes: equal one by one.
async fn same_events(
    client: &Client,
    trigger_channel: &str,
    wal_channel: &str,
    count: usize,
) -> (Vec<Event>, Vec<Event>) {
    let trigger = events(client, trigger_channel).await;
    assert_eq!(trigger.len(), count, "trigger events: {trigger:#?}");
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(client, wal_channel).await.len() >= trigger.len()
    })
    .await;
    let wal = events(client, wal_channel).await;
    assert!(arrived, "WAL events did not arrive: {wal:#?}");
    assert_eq!(wal.len(), trigger.len());
    for (n, (t, w)) in trigger.iter().zip(&wal).enumerate() {
        assert_eq!(t, w, "event {n} differs between trigger and WAL capture");
    }
    (trigger, wal)
}

#[tokio::test]
async fn trigger_and_wal_capture_give_identical_payloads() {
    let client = worker_db().await;
    client
        .batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE rich_trg ({COLUMNS});
             CREATE TABLE rich_wal ({COLUMNS});
             ALTER TABLE rich_trg REPLICA IDENTITY FULL;
             ALTER TABLE rich_wal REPLICA IDENTITY FULL;
             SELECT pgpipe.subscribe('rich_trg');"
        ))
        .await
        .unwrap();
    // The first WAL subscription creates the slot: a transaction of its own.
    let channel: String = client
        .query_one("SELECT pgpipe.subscribe('rich_wal', mode => 'wal')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(channel, "rich_wal");
    for table in ["rich_trg", "rich_wal"] {
        client
            .batch_execute(&WRITES.replace("{t}", table))
            .await
            .unwrap_or_else(|e| panic!("writes on {table}: {}", describe(&e)));
    }

    let (trigger, _) = same_events(&client, "rich_trg", "rich_wal", 8).await;
    // The key is the primary key (not REPLICA IDENTITY FULL's every column): the new
    // row's, the old row's for DELETE (id 2 became 4), none for TRUNCATE.
    let keys: Vec<Option<Value>> = trigger.iter().map(|(_, _, k)| k.clone()).collect();
    let id = |n: i32| Some(serde_json::json!({ "id": n }));
    assert_eq!(
        keys,
        vec![id(1), id(2), id(3), id(1), id(3), id(4), id(1), None]
    );
    let sources: Vec<String> = client
        .query(
            "SELECT DISTINCT source || ':' || (lsn IS NOT NULL)::text FROM pgpipe.events WHERE channel = 'rich_wal'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sources, vec!["wal:true".to_string()]);

    // A composite primary key, captured by both modes, and a table without one.
    client
        .batch_execute(
            "CREATE TABLE lines_trg (order_id int, sku text, qty int, PRIMARY KEY (sku, order_id));
             CREATE TABLE lines_wal (LIKE lines_trg INCLUDING ALL);
             CREATE TABLE nokey_wal (v text);
             ALTER TABLE nokey_wal REPLICA IDENTITY FULL;
             SELECT pgpipe.subscribe('lines_trg');
             SELECT pgpipe.subscribe('lines_wal', mode => 'wal');
             SELECT pgpipe.subscribe('nokey_wal', mode => 'wal');
             INSERT INTO lines_trg VALUES (7, 'a-1', 2);
             INSERT INTO lines_wal VALUES (7, 'a-1', 2);
             DELETE FROM lines_trg;
             DELETE FROM lines_wal;
             INSERT INTO nokey_wal VALUES ('x');",
        )
        .await
        .unwrap();
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "lines_wal").await.len() == 2
            && events(&client, "nokey_wal").await.len() == 1
    })
    .await;
    assert!(
        arrived,
        "lines_wal: {:#?}",
        events(&client, "lines_wal").await
    );
    let line_key = Some(serde_json::json!({"order_id": 7, "sku": "a-1"}));
    for channel in ["lines_trg", "lines_wal"] {
        let keys: Vec<Option<Value>> = events(&client, channel)
            .await
            .into_iter()
            .map(|e| e.2)
            .collect();
        assert_eq!(keys, vec![line_key.clone(), line_key.clone()], "{channel}");
    }
    assert_eq!(
        events(&client, "nokey_wal").await[0].2,
        None,
        "no primary key, no key"
    );

    // Without REPLICA IDENTITY FULL the old image is the key, and an unchanged TOASTed
    // value cannot be filled: it is left out and named.
    client
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
             SELECT pgpipe.subscribe('docs', mode => 'wal');
             INSERT INTO docs VALUES (1, 'a', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g));
             UPDATE docs SET title = 'b' WHERE id = 1;",
        )
        .await
        .unwrap();
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "docs").await.len() == 2
    })
    .await;
    assert!(arrived, "docs events: {:#?}", events(&client, "docs").await);
    let (_, update, key) = &events(&client, "docs").await[1];
    assert_eq!(
        key,
        &Some(serde_json::json!({"id": 1})),
        "key under the default identity"
    );
    assert_eq!(update["row"], serde_json::json!({"id": 1, "title": "b"}));
    assert_eq!(update["old"], serde_json::json!({"id": 1}));
    assert_eq!(update["unchanged_toast"], serde_json::json!(["body"]));

    let status = client
        .query_one(
            "SELECT worker_state, slot_name, slot_status, lag_bytes IS NOT NULL, detail FROM pgpipe.status()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status.get::<_, String>(0), "streaming");
    assert_eq!(status.get::<_, String>(1), "pgpipe");
    assert_eq!(status.get::<_, String>(2), "reserved");
    assert!(status.get::<_, bool>(3));
    assert_eq!(status.get::<_, Option<String>>(4), None);
}

#[tokio::test]
async fn wal_mode_refuses_what_it_cannot_capture() {
    let client = worker_db().await;
    client
        .batch_execute("CREATE TABLE no_key (v text)")
        .await
        .unwrap();
    let err = client
        .batch_execute("SELECT pgpipe.subscribe('no_key', mode => 'wal')")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "55000", "{}", describe(&err));
    assert!(db_err
        .message()
        .contains("no primary key or replica identity"));
    assert!(db_err
        .hint()
        .unwrap_or("")
        .contains("replica_identity_full => true"));
    let subscribed: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpipe.subscription WHERE relid = 'no_key'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(subscribed, 0, "nothing half-installed");

    // The explicit opt-in sets REPLICA IDENTITY FULL.
    client
        .batch_execute(
            "SELECT pgpipe.subscribe('no_key', mode => 'wal', replica_identity_full => true)",
        )
        .await
        .unwrap();
    let full: bool = client
        .query_one(
            "SELECT relreplident = 'f' FROM pg_class WHERE oid = 'no_key'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(full, "REPLICA IDENTITY FULL");

    // A database the worker does not serve.
    let other = test_db("wal_other_db").await;
    other.execute("CREATE TABLE t (id int PRIMARY KEY)").await;
    let err = other
        .client()
        .await
        .batch_execute("SELECT pgpipe.subscribe('t', mode => 'wal')")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "55000");
    assert!(
        db_err.message().contains("serves database"),
        "{}",
        describe(&err)
    );
    assert!(db_err.hint().unwrap_or("").contains("pgpipe.database"));
}

#[tokio::test]
async fn emit_through_the_wal_keeps_commit_order_with_wal_captures() {
    let client = worker_db().await;
    client
        .batch_execute("CREATE TABLE acct (id int PRIMARY KEY, balance numeric)")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pgpipe.subscribe('acct', mode => 'wal')")
        .await
        .unwrap();
    client
        .batch_execute("SET pgpipe.emit_mode = 'wal'")
        .await
        .unwrap();
    let tx = client.simple_query("BEGIN").await;
    assert!(tx.is_ok());
    client
        .batch_execute("INSERT INTO acct VALUES (1, 10.50)")
        .await
        .unwrap();
    let id: Option<uuid::Uuid> = client
        .query_one(
            "SELECT pgpipe.emit('acct', '{\"note\": 1.50}', 'OPENED', key => '{\"id\": 1}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, None, "the worker mints the id");
    client
        .batch_execute("UPDATE acct SET balance = 20 WHERE id = 1; COMMIT;")
        .await
        .unwrap();

    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "acct").await.len() == 3
    })
    .await;
    let got = events(&client, "acct").await;
    assert!(arrived, "acct events: {got:#?}");
    let ops: Vec<&str> = got.iter().map(|(op, ..)| op.as_str()).collect();
    assert_eq!(
        ops,
        ["INSERT", "OPENED", "UPDATE"],
        "statement order within the transaction"
    );
    assert_eq!(
        got[1].1.to_string(),
        r#"{"note":1.50}"#,
        "payload as emitted, digits kept"
    );
    let keys: Vec<Option<Value>> = got.iter().map(|e| e.2.clone()).collect();
    let key = Some(serde_json::json!({"id": 1}));
    assert_eq!(
        keys,
        vec![key.clone(), key.clone(), key],
        "emit's key travels through the WAL"
    );
    let row = client
        .query_one(
            "SELECT source, lsn IS NOT NULL FROM pgpipe.events WHERE channel = 'acct' AND operation = 'OPENED'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "emit");
    assert!(row.get::<_, bool>(1));

    // Where no slot would ever read the message, emit refuses instead of losing it.
    let other = test_db("wal_emit_other").await;
    let err = other
        .client()
        .await
        .batch_execute("SET pgpipe.emit_mode = 'wal'; SELECT pgpipe.emit('x', '{}')")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "55000", "{}", describe(&err));
}

/// Any role may call `pg_logical_emit_message()`: only messages with pgpipe's secret key
/// in the prefix (sent by `pgpipe.emit()` under `emit_mode = 'wal'`) become events, and
/// even those only with a valid channel name. The rest are skipped with a WARNING that
/// does not show the key.
#[tokio::test]
async fn forged_logical_messages_never_become_events() {
    let client = worker_db().await;
    client
        .batch_execute(
            "CREATE TABLE forged (id int PRIMARY KEY);
             CREATE ROLE forger LOGIN;",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT pgpipe.subscribe('forged', mode => 'wal')")
        .await
        .unwrap();
    let key: String = client
        .query_one("SELECT key FROM pgpipe.wal_message_key", &[])
        .await
        .unwrap()
        .get(0);
    let forged = r#"{"channel": "forged", "operation": "FORGED", "payload": {}}"#;
    client
        .batch_execute(&format!(
            "SET ROLE forger;
             SELECT pg_logical_emit_message(true, 'pgpipe', '{forged}');
             SELECT pg_logical_emit_message(true, 'pgpipe:guess', '{forged}');
             SELECT pg_logical_emit_message(false, 'pgpipe:{key}', '{forged}');
             RESET ROLE;
             SELECT pg_logical_emit_message(true, 'pgpipe:{key}',
                 '{{\"channel\": \"bad\\nname\", \"operation\": \"FORGED\", \"payload\": {{}}}}');
             SELECT pg_logical_emit_message(true, 'pgpipe:{key}x', '{forged}');
             SET pgpipe.emit_mode = 'wal';
             SELECT pgpipe.emit('forged', '{{\"real\": true}}', 'REAL');
             RESET pgpipe.emit_mode;
             INSERT INTO forged VALUES (1);"
        ))
        .await
        .unwrap_or_else(|e| panic!("emit: {}", describe(&e)));
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "forged").await.len() >= 2
    })
    .await;
    let got = events(&client, "forged").await;
    assert!(arrived, "forged events: {got:#?}");
    let ops: Vec<&str> = got.iter().map(|(op, ..)| op.as_str()).collect();
    assert_eq!(
        ops,
        ["REAL", "INSERT"],
        "only pgpipe.emit's message and the change"
    );
    let bad: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpipe.events WHERE operation = 'FORGED'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
    let log = TempPg::shared().log_contents();
    let warnings = log
        .lines()
        .filter(|l| l.contains("skipped a logical decoding message"))
        .count();
    assert!(warnings >= 5, "a WARNING per skipped message:\n{log}");
    assert!(!log.contains(&key), "the key appears in the server log");
}

/// Changes that carry a replication origin, as a logical replication subscriber's apply
/// worker writes them into a subscribed table, are queued as any other (with pgoutput's
/// Origin message in their transaction): a table fed by replication is captured too.
#[tokio::test]
async fn changes_with_a_replication_origin_are_captured() {
    let client = worker_db().await;
    client
        .batch_execute("CREATE TABLE replicated (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pgpipe.subscribe('replicated', mode => 'wal')")
        .await
        .unwrap();
    // As an apply worker does: a session origin, and the remote commit's LSN and time.
    // (One statement per call: batch_execute runs a batch as one transaction.)
    for statement in [
        "SELECT pg_replication_origin_create('pgpipe_test_subscriber')",
        "SELECT pg_replication_origin_session_setup('pgpipe_test_subscriber')",
        "BEGIN",
        "SELECT pg_replication_origin_xact_setup('0/1234', now())",
        "INSERT INTO replicated VALUES (1, 'a'), (2, 'b')",
        "COMMIT",
        "UPDATE replicated SET v = 'c' WHERE id = 1",
        "DELETE FROM replicated WHERE id = 2",
        "SELECT pg_replication_origin_session_reset()",
        "INSERT INTO replicated VALUES (3, 'local')",
    ] {
        client.batch_execute(statement).await.unwrap();
    }
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "replicated").await.len() >= 5
    })
    .await;
    let got = events(&client, "replicated").await;
    assert!(arrived, "replicated events: {got:#?}");
    let ops: Vec<(&str, Value)> = got
        .iter()
        .map(|(op, _, key)| (op.as_str(), key.clone().unwrap_or(Value::Null)))
        .collect();
    assert_eq!(
        ops,
        [
            ("INSERT", serde_json::json!({"id": 1})),
            ("INSERT", serde_json::json!({"id": 2})),
            ("UPDATE", serde_json::json!({"id": 1})),
            ("DELETE", serde_json::json!({"id": 2})),
            ("INSERT", serde_json::json!({"id": 3})),
        ],
        "every change with an origin, once, in commit order"
    );
}

/// Tables of Postgres's own types only, whose rows both modes convert column by column
/// (no `to_jsonb`): the trigger's and the worker's payloads are still equal.
#[tokio::test]
async fn both_modes_convert_builtin_types_alike() {
    let client = worker_db().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE builtin_trg ({BUILTIN_COLUMNS});
             CREATE TABLE builtin_wal ({BUILTIN_COLUMNS});
             ALTER TABLE builtin_trg REPLICA IDENTITY FULL;
             ALTER TABLE builtin_wal REPLICA IDENTITY FULL;
             SELECT pgpipe.subscribe('builtin_trg');"
        ))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pgpipe.subscribe('builtin_wal', mode => 'wal')")
        .await
        .unwrap();
    for table in ["builtin_trg", "builtin_wal"] {
        client
            .batch_execute(&BUILTIN_WRITES.replace("{t}", table))
            .await
            .unwrap_or_else(|e| panic!("writes on {table}: {}", describe(&e)));
    }
    let (_, wal) = same_events(&client, "builtin_trg", "builtin_wal", 8).await;
    // And both are what to_jsonb gives: the inserted rows, as to_jsonb of the same rows
    // in a table of the same columns.
    let inserts = BUILTIN_WRITES.split(';').next().unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE builtin_ref ({BUILTIN_COLUMNS}); {}",
            inserts.replace("{t}", "builtin_ref")
        ))
        .await
        .unwrap();
    let expected: Vec<Value> = client
        .query("SELECT to_jsonb(r) FROM builtin_ref r ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let inserted: Vec<Value> = wal[..3].iter().map(|(_, p, _)| p["row"].clone()).collect();
    assert_eq!(inserted, expected);
}

/// The first WAL subscription inside a transaction that has already written is refused at
/// once with what to do, even while another session is creating the slot (that creator
/// waits for this transaction to end: waiting for it in turn was a deadlock error).
#[tokio::test]
async fn a_writing_transaction_is_told_to_subscribe_first() {
    let pg = TempPg::start_dedicated(PgOptions::new().conf("pgpipe.database = 'postgres'")).await;
    let writer = pg.client("postgres").await;
    writer
        .batch_execute(
            "CREATE EXTENSION pgpipe;
             CREATE TABLE t (id int PRIMARY KEY);
             CREATE TABLE other (v int);",
        )
        .await
        .unwrap();
    writer
        .batch_execute("BEGIN; INSERT INTO other VALUES (1);")
        .await
        .unwrap();
    // A creator: its slot becomes consistent only once the writer's transaction ends.
    let creator = pg.client("postgres").await;
    let creating = tokio::spawn(async move {
        creator
            .query_one("SELECT pgpipe.ensure_slot()::text", &[])
            .await
            .map(|row| row.get::<_, String>(0))
    });
    let observer = pg.client("postgres").await;
    let waiting = wait_until(Duration::from_secs(10), async || {
        observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE query LIKE '%ensure_slot%' AND wait_event IS NOT NULL AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(waiting, "the creator waits for the writer's transaction");
    let err = writer
        .batch_execute("SELECT pgpipe.subscribe('t', mode => 'wal')")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "25001", "{}", describe(&err));
    assert!(db_err
        .message()
        .contains("before this transaction writes anything"));
    assert!(db_err
        .hint()
        .unwrap_or("")
        .contains("in a transaction of its own"));
    writer.batch_execute("ROLLBACK").await.unwrap();
    let created = creating.await.unwrap().expect("the creator gets its slot");
    assert!(!created.is_empty());
    // In a transaction of its own, the subscription goes through.
    writer
        .batch_execute("SELECT pgpipe.subscribe('t', mode => 'wal')")
        .await
        .unwrap();
}
