//! Journey: a consumer follows a table whose schema changes. Columns are added,
//! renamed (inside a transaction that also writes rows), retyped and dropped, the table
//! is renamed and finally dropped; each command arrives as an event with operation
//! `DDL` (source `ddl`), the command and the new column list, on the table's channel, in
//! order with the table's data changes — in trigger mode and in WAL mode.
//!
//! Failure that matters: dropping the subscribed table. Its capture is removed (no
//! subscription left), a NOTICE says so, and the last event on the channel is the
//! `DROP TABLE` one, after every change made before it.

use std::time::Duration;

use futures_util::StreamExt;
use pgpipe_tests::{describe, wait_until, TempPg};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// A connection to database `postgres` (the one the worker serves) whose NOTICEs are
/// collected.
async fn connect() -> (Client, mpsc::UnboundedReceiver<String>) {
    let pg = TempPg::shared();
    let (client, mut connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_string());
            }
        }
    });
    // The tests of this file run at once: one creates the extension.
    for sql in [
        "SELECT pg_advisory_lock(16)",
        "CREATE EXTENSION IF NOT EXISTS pgpipe",
        "SELECT pg_advisory_unlock(16)",
    ] {
        client.batch_execute(sql).await.expect(sql);
    }
    (client, rx)
}

async fn ok(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

/// Everything the consumer has not read yet, in delivery order: (operation, payload,
/// source).
async fn drain(client: &Client, consumer: &str) -> Vec<(String, Value, String)> {
    let mut events = Vec::new();
    loop {
        let page = client
            .query(
                "SELECT position, operation, payload, source FROM pgpipe.read($1, NULL, 100)",
                &[&consumer],
            )
            .await
            .unwrap_or_else(|e| panic!("read: {}", describe(&e)));
        let position: String = page.last().expect("a row").get(0);
        let before = events.len();
        for row in &page {
            if let Some(operation) = row.get::<_, Option<String>>(1) {
                events.push((operation, row.get(2), row.get(3)));
            }
        }
        client
            .execute("SELECT pgpipe.ack($1, $2)", &[&consumer, &position])
            .await
            .unwrap();
        if events.len() == before {
            return events;
        }
    }
}

fn columns(payload: &Value) -> Vec<String> {
    payload["columns"]
        .as_array()
        .unwrap_or_else(|| panic!("no columns: {payload}"))
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["name"].as_str().unwrap(),
                c["type"].as_str().unwrap()
            )
        })
        .collect()
}

async fn journey(mode: &str) {
    let (client, mut notices) = connect().await;
    let t = format!("ddl_{mode}");
    if mode == "wal" {
        ok(&client, "SELECT pgpipe.ensure_slot()").await;
    }
    ok(
        &client,
        &format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, a text);
             SELECT pgpipe.register_consumer('{t}', ARRAY['{t}']);
             SELECT pgpipe.subscribe('{t}', mode => '{mode}');"
        ),
    )
    .await;
    for sql in [
        format!("INSERT INTO {t} VALUES (1, 'x')"),
        format!("ALTER TABLE {t} ADD COLUMN b int"),
        format!(
            "BEGIN; INSERT INTO {t} VALUES (2, 'y', 2); ALTER TABLE {t} RENAME COLUMN a TO a2; \
             UPDATE {t} SET b = 3 WHERE id = 2; COMMIT;"
        ),
        format!("ALTER TABLE {t} ALTER COLUMN b TYPE bigint"),
        format!("ALTER TABLE {t} DROP COLUMN b"),
        format!("ALTER TABLE {t} RENAME TO {t}_renamed"),
        format!("INSERT INTO {t}_renamed VALUES (3, 'z')"),
    ] {
        ok(&client, &sql).await;
    }
    while notices.try_recv().is_ok() {}
    ok(&client, &format!("DROP TABLE {t}_renamed")).await;
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(
        notice.contains(&format!("{t}_renamed was subscribed on channel '{t}'"))
            && notice.contains("capture is removed"),
        "the DROP's NOTICE: {notice:?}"
    );
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpipe.subscription WHERE channel = $1",
            &[&t],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the dropped table's subscription is gone");

    let mut events = Vec::new();
    let all_there = wait_until(Duration::from_secs(20), async || {
        events.extend(drain(&client, &t).await);
        events.len() >= 10
    })
    .await;
    let summary: Vec<String> = events
        .iter()
        .map(|(op, p, _)| format!("{op} {}", p["table"]))
        .collect();
    assert!(all_there, "{mode}: events so far: {summary:?}");
    let ops: Vec<&str> = events.iter().map(|(op, ..)| op.as_str()).collect();
    assert_eq!(
        ops,
        ["INSERT", "DDL", "INSERT", "DDL", "UPDATE", "DDL", "DDL", "DDL", "INSERT", "DDL"],
        "{mode}: {summary:?}"
    );
    let data_source = if mode == "wal" { "wal" } else { "trigger" };
    for (op, payload, source) in &events {
        if op == "DDL" {
            assert_eq!(source, "ddl", "{payload}");
            assert_eq!(payload["op"], "DDL");
            assert_eq!(payload["schema"], "public");
        } else {
            assert_eq!(source, data_source, "{payload}");
        }
    }
    let p = |n: usize| &events[n].1;
    assert_eq!(p(0)["row"], json!({"id": 1, "a": "x"}));
    assert_eq!(p(1)["command"], "ALTER TABLE");
    assert_eq!(columns(p(1)), ["id integer", "a text", "b integer"]);
    assert_eq!(p(1)["primary_key"], json!(["id"]));
    assert_eq!(p(2)["row"], json!({"id": 2, "a": "y", "b": 2}));
    assert_eq!(
        columns(p(3)),
        ["id integer", "a2 text", "b integer"],
        "renamed"
    );
    assert_eq!(p(4)["row"], json!({"id": 2, "a2": "y", "b": 3}));
    assert_eq!(
        columns(p(5)),
        ["id integer", "a2 text", "b bigint"],
        "retyped"
    );
    assert_eq!(columns(p(6)), ["id integer", "a2 text"], "dropped");
    assert_eq!(p(7)["table"], format!("{t}_renamed"), "the table renamed");
    assert_eq!(p(8)["row"], json!({"id": 3, "a2": "z"}));
    assert_eq!(p(9)["command"], "DROP TABLE");
    assert_eq!(p(9)["table"], format!("{t}_renamed"));
    assert!(p(9)["columns"].is_null());
}

#[tokio::test]
async fn schema_changes_arrive_in_order_in_trigger_mode() {
    journey("trigger").await;
}

#[tokio::test]
async fn schema_changes_arrive_in_order_in_wal_mode() {
    journey("wal").await;
}
