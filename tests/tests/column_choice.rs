//! Journey: a table's owner keeps a column (a card number) out of the stream with
//! `subscribe(..., exclude_columns => ARRAY['card'])`, or names the columns to capture
//! with `columns => ARRAY[...]`, in trigger mode and in WAL mode: both modes queue the
//! same events, the left-out column appears nowhere in the queue (not in `row`, `old`,
//! `key` or `unchanged_toast`), `pgpipe.subscriptions` shows the choice, and subscribing
//! again without one captures every column again.
//!
//! Failure that matters: an unknown column, both lists at once and leaving out a
//! primary-key column (the event's key) are refused, naming the column; nothing changes.

use std::time::Duration;

use pgpipe_tests::{describe, wait_until, TempPg};
use serde_json::{json, Value};
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

/// (operation, payload without "table", key) of a channel's events, in queue order.
async fn events(client: &Client, channel: &str) -> Vec<(String, Value, Option<Value>)> {
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

const WRITES: &str = "
    INSERT INTO {t} VALUES (1, 'Ada', '4111-1111-1111-1111', 'ada@example.com', 10.50),
                           (2, 'Bob', '5500-0000-0000-0004', 'bob@example.com', 7);
    UPDATE {t} SET name = 'Ada L.', card = '4111-2222-2222-2222' WHERE id = 1;
    UPDATE {t} SET card = '5500-9999-9999-9999' WHERE id = 2;
    UPDATE {t} SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g) WHERE id = 1;
    UPDATE {t} SET name = 'Ada' WHERE id = 1;
    DELETE FROM {t} WHERE id = 2;";

#[tokio::test]
async fn left_out_columns_never_reach_the_queue_in_either_mode() {
    let client = worker_db().await;
    client
        .batch_execute(
            "CREATE TABLE cust_trg (id int PRIMARY KEY, name text, card text, email text, total numeric(10,2), big text);
             CREATE TABLE cust_wal (LIKE cust_trg INCLUDING ALL);
             ALTER TABLE cust_trg ALTER big SET STORAGE EXTERNAL;
             ALTER TABLE cust_wal ALTER big SET STORAGE EXTERNAL;
             SELECT pgpipe.subscribe('cust_trg', exclude_columns => ARRAY['card', 'big']);",
        )
        .await
        .unwrap();
    // Its own transaction: the first WAL subscription may create the slot.
    client
        .batch_execute("SELECT pgpipe.subscribe('cust_wal', mode => 'wal', exclude_columns => ARRAY['card', 'big'])")
        .await
        .unwrap_or_else(|e| panic!("subscribe cust_wal: {}", describe(&e)));
    let shown: Vec<(String, Option<Vec<String>>)> = client
        .query(
            "SELECT \"table\"::text, columns FROM pgpipe.subscriptions WHERE \"table\"::text LIKE 'cust_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let chosen = Some(vec![
        "id".to_string(),
        "name".into(),
        "email".into(),
        "total".into(),
    ]);
    assert_eq!(
        shown,
        vec![
            ("cust_trg".into(), chosen.clone()),
            ("cust_wal".into(), chosen)
        ]
    );

    for table in ["cust_trg", "cust_wal"] {
        client
            .batch_execute(&WRITES.replace("{t}", table))
            .await
            .unwrap_or_else(|e| panic!("writes on {table}: {}", describe(&e)));
    }
    let trigger = events(&client, "cust_trg").await;
    assert_eq!(trigger.len(), 7, "{trigger:#?}");
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "cust_wal").await.len() >= trigger.len()
    })
    .await;
    let wal = events(&client, "cust_wal").await;
    assert!(arrived, "WAL events: {wal:#?}");

    let ada: Value = serde_json::from_str(
        r#"{"id": 1, "name": "Ada", "email": "ada@example.com", "total": 10.50}"#,
    )
    .unwrap();
    assert_eq!(trigger[0].1["row"], ada, "only the chosen columns");
    assert_eq!(trigger[0].2, Some(json!({"id": 1})));
    // An UPDATE of only a left-out column is still an UPDATE (the row may have changed).
    assert_eq!(trigger[3].0, "UPDATE");
    // Default identity: in WAL mode `old` (and a DELETE's row) is the key, as always;
    // otherwise rows and keys of both modes are equal.
    for (n, (t, w)) in trigger.iter().zip(&wal).enumerate() {
        assert_eq!(t.0, w.0, "event {n}: operation");
        if t.0 == "DELETE" {
            assert_eq!(w.1["row"], json!({"id": 2}), "event {n}: row");
        } else {
            assert_eq!(t.1["row"], w.1["row"], "event {n}: row");
        }
        assert_eq!(t.2, w.2, "event {n}: key");
        // The left-out TOASTed column is not named as unchanged either.
        assert_eq!(w.1.get("unchanged_toast"), None, "event {n}: {w:?}");
    }

    // Nowhere in the queue: not a card number, not the TOASTed column's name.
    let leaked: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpipe.events
             WHERE channel IN ('cust_trg', 'cust_wal')
               AND (payload::text ~ '4111|5500|\"card\"|\"big\"' OR key::text ~ 'card|big')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "a left-out column reached the queue");

    // columns => names the columns instead; subscribing again without a choice brings
    // every column back, in both modes.
    // Each statement commits on its own: a WAL-mode change is shaped by the subscription
    // it was committed under (subscribe waits for the worker before changing it).
    for (table, mode) in [("cust_trg", "trigger"), ("cust_wal", "wal")] {
        for sql in [
            format!("SELECT pgpipe.subscribe('{table}', mode => '{mode}', columns => ARRAY['id', 'email'])"),
            format!("INSERT INTO {table} (id, name, card, email) VALUES (3, 'Cy', '4111-3333', 'cy@example.com')"),
            format!("SELECT pgpipe.subscribe('{table}', mode => '{mode}')"),
            format!("INSERT INTO {table} (id, name, card, email) VALUES (4, 'Di', '4111-4444', 'di@example.com')"),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        }
    }
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(&client, "cust_wal").await.len() >= 9
    })
    .await;
    assert!(arrived, "{:#?}", events(&client, "cust_wal").await);
    for channel in ["cust_trg", "cust_wal"] {
        let got = events(&client, channel).await;
        assert_eq!(
            got[7].1["row"],
            json!({"id": 3, "email": "cy@example.com"}),
            "{channel}"
        );
        assert_eq!(
            got[8].1["row"],
            json!({"id": 4, "name": "Di", "card": "4111-4444", "email": "di@example.com", "total": null, "big": null}),
            "{channel}: every column again"
        );
    }
    let columns: Option<Vec<String>> = client
        .query_one(
            "SELECT columns FROM pgpipe.subscriptions WHERE \"table\" = 'cust_trg'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, None, "no choice: every column");
}

#[tokio::test]
async fn a_bad_column_choice_is_refused_naming_the_column() {
    let client = worker_db().await;
    client
        .batch_execute(
            "CREATE TABLE acct_choice (id int, region text, secret text, PRIMARY KEY (id, region));
             SELECT pgpipe.subscribe('acct_choice', exclude_columns => ARRAY['secret']);",
        )
        .await
        .unwrap();
    for (sql, code, needle) in [
        (
            "SELECT pgpipe.subscribe('acct_choice', columns => ARRAY['id', 'region', 'nope'])",
            "42703",
            "column nope of table public.acct_choice does not exist",
        ),
        (
            "SELECT pgpipe.subscribe('acct_choice', exclude_columns => ARRAY['region'])",
            "22023",
            "primary-key column region of table public.acct_choice cannot be left out",
        ),
        (
            "SELECT pgpipe.subscribe('acct_choice', columns => ARRAY['id'], exclude_columns => ARRAY['secret'])",
            "22023",
            "pass columns or exclude_columns, not both",
        ),
        (
            "SELECT pgpipe.subscribe('acct_choice', columns => ARRAY[]::text[])",
            "22023",
            "no column of table public.acct_choice would be captured",
        ),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let db_err = err.as_db_error().expect("a server error");
        assert_eq!(db_err.code().code(), code, "{sql}: {}", describe(&err));
        assert!(describe(&err).contains(needle), "{sql}: {}", describe(&err));
    }
    // The unknown column's hint lists the real ones.
    let err = client
        .batch_execute("SELECT pgpipe.subscribe('acct_choice', columns => ARRAY['nope'])")
        .await
        .unwrap_err();
    assert!(
        describe(&err).contains("id, region, secret"),
        "{}",
        describe(&err)
    );
    // Nothing changed: the first choice holds.
    client
        .batch_execute("INSERT INTO acct_choice VALUES (1, 'eu', 'hidden')")
        .await
        .unwrap();
    let got = events(&client, "acct_choice").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["row"], json!({"id": 1, "region": "eu"}));
    assert_eq!(got[0].2, Some(json!({"id": 1, "region": "eu"})));
}
