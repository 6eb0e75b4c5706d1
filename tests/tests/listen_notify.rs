//! Journey: a user without the extension (managed Postgres) runs `pgpipe listen` against
//! plain LISTEN/NOTIFY: the forwarder picks the `listen_notify` detector by itself, the
//! trigger `pgpipe init --detector listen_notify` prints delivers row changes (large rows
//! as a flagged key reference instead of failing the writer), arbitrary NOTIFY payloads
//! follow the payload rule, and after its connection is killed (`pg_terminate_backend`)
//! the forwarder reports itself down on `/healthz`, reconnects and listens again.

use std::process::Command;
use std::time::Duration;

use pgpipe_tests::http::{http_addr, http_get};
use pgpipe_tests::{wait_until, Forwarder, TempPg};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// Runs `pgpipe <args>` to completion and returns its stdout.
fn pgpipe_output(args: &[&str]) -> String {
    let out = Command::new(Forwarder::binary_path())
        .args(args)
        .output()
        .expect("run pgpipe");
    assert!(
        out.status.success(),
        "pgpipe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn trigger_changes_and_payload_rule_through_stdout() {
    let db = TempPg::shared()
        .database_without_extension("listen_notify")
        .await;
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, note text, total numeric(10,2))")
        .await;
    db.execute(&pgpipe_output(&[
        "init",
        "--table",
        "orders",
        "--detector",
        "listen_notify",
    ]))
    .await;

    let url = db.url();
    // No --detector: without the extension, listen_notify is chosen (and logged).
    let fwd = Forwarder::listen(&url)
        .channel("pgpipe:orders")
        .channel("Raw.Channel")
        .spawn();
    let log = fwd.wait_for_stderr("listening", WAIT).await;
    assert!(
        log.contains("detector chosen automatically") && log.contains("listen_notify"),
        "{log}"
    );

    db.execute(
        "INSERT INTO orders VALUES (1, 'hi', 10.50);
         UPDATE orders SET note = repeat('x', 9000) WHERE id = 1;
         DELETE FROM orders;",
    )
    .await;
    for payload in [
        r#"{"op": "CREATED", "n": 1}"#,
        r#"{"op": "", "n": 2}"#,
        r#"{"n": 3}"#,
        "plain text",
        "",
        "[1, 2]",
    ] {
        let sql = format!(
            "SELECT pg_notify('Raw.Channel', '{}')",
            payload.replace('\'', "''")
        );
        db.execute(&sql).await;
    }
    let events = fwd.wait_for_events(9, WAIT).await;
    assert_eq!(events.len(), 9, "{events:#?}");
    for e in &events {
        assert_eq!(e["source"], "listen_notify");
        let id: uuid::Uuid = e["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(id.get_version_num(), 7);
    }

    let insert: Value = serde_json::from_str(
        r#"{"op": "INSERT", "schema": "public", "table": "orders",
            "row": {"id": 1, "note": "hi", "total": 10.50}, "old": null}"#,
    )
    .unwrap();
    assert_eq!(events[0]["channel"], "pgpipe:orders");
    assert_eq!(events[0]["operation"], "INSERT");
    assert_eq!(events[0]["payload"], insert);
    // Over NOTIFY's 8000-byte limit: the key only, flagged, and the writer's UPDATE worked.
    assert_eq!(events[1]["operation"], "UPDATE");
    assert_eq!(
        events[1]["payload"],
        json!({"op": "UPDATE", "schema": "public", "table": "orders",
               "row": {"id": 1}, "old": {"id": 1}, "truncated": true})
    );
    assert_eq!(events[2]["operation"], "DELETE");
    assert_eq!(events[2]["payload"]["truncated"], json!(true));
    // The table's primary key, looked up once: also for payloads cut to the key.
    for e in &events[..3] {
        assert_eq!(e["key"], json!({"id": 1}), "{e}");
    }
    // Notifications that are no table change have no key.
    for e in &events[3..] {
        assert_eq!(e["key"], Value::Null, "{e}");
    }

    let raw: Vec<(&str, Value)> = events[3..]
        .iter()
        .map(|e| {
            assert_eq!(e["channel"], "Raw.Channel", "channel names keep their case");
            (e["operation"].as_str().unwrap(), e["payload"].clone())
        })
        .collect();
    assert_eq!(
        raw,
        vec![
            ("CREATED", json!({"op": "CREATED", "n": 1})),
            ("NOTIFY", json!({"op": "", "n": 2})),
            ("NOTIFY", json!({"n": 3})),
            ("NOTIFY", json!("plain text")),
            ("NOTIFY", json!("")),
            ("NOTIFY", json!("[1, 2]")),
        ]
    );
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn reconnects_after_its_backend_is_terminated() {
    let db = TempPg::shared()
        .database_without_extension("listen_notify_reconnect")
        .await;
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .detector("listen_notify")
        .channel("jobs")
        .flag("--metrics-addr", "127.0.0.1:0")
        .env("PGPIPE_DETECTOR_BACKOFF_BASE", "100ms")
        .env("PGPIPE_DETECTOR_BACKOFF_CAP", "300ms")
        .spawn();
    fwd.wait_for_stderr("listening", WAIT).await;
    let addr = http_addr(&fwd, "metrics").await;
    assert!(
        wait_until(WAIT, async || http_get(addr, "/healthz").await.status
            == 200)
        .await
    );
    db.execute("NOTIFY jobs, 'one'").await;
    fwd.wait_for_events(1, WAIT).await;

    // Keep it out while we look: the database refuses connections, then its backend dies.
    let admin = db.cluster().client("postgres").await;
    let name = db.name().replace('"', "\"\"");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    let killed = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND query ILIKE 'LISTEN%'",
            &[&db.name()],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1, "the forwarder's LISTEN connection");
    let down = wait_until(WAIT, async || {
        let r = http_get(addr, "/healthz").await;
        r.status == 503
            && serde_json::from_str::<Value>(&r.body)
                .is_ok_and(|b| b["components"]["detector"] == "down")
    })
    .await;
    assert!(
        down,
        "health is down while disconnected:\n{}",
        fwd.stderr_text()
    );
    // The log line may reach our stderr reader a moment after health turns down.
    assert!(
        wait_until(WAIT, async || fwd
            .stderr_text()
            .contains("LISTEN connection lost"))
        .await,
        "the lost connection is logged:\n{}",
        fwd.stderr_text()
    );

    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let relistened = wait_until(WAIT, async || {
        fwd.stderr_text().matches("listening").count() >= 2
    })
    .await;
    assert!(
        relistened,
        "re-LISTEN after the kill:\n{}",
        fwd.stderr_text()
    );
    assert!(
        wait_until(WAIT, async || http_get(addr, "/healthz").await.status
            == 200)
        .await
    );

    db.execute("NOTIFY jobs, 'two'").await;
    let events = fwd.wait_for_events(2, WAIT).await;
    assert_eq!(events[1]["payload"], json!("two"));
    assert_eq!(events[1]["channel"], "jobs");
}
