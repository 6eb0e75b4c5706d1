//! Journey: one forwarder reads two channels and sends orders to one webhook and payment
//! INSERTs to another (each adapter entry lists its own `channels` and `operations`).
//! Events no adapter gets are still acknowledged, so the consumer's lag drops to 0 and a
//! restarted forwarder sends nothing twice. A route naming a channel the forwarder does
//! not read is refused at start, naming the key and the fix.

use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply, Request};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_and_payments_go_to_their_own_webhooks() {
    let db = test_db("routes").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total int); \
         CREATE TABLE payments (id int PRIMARY KEY, state text); \
         SELECT pgpipe.subscribe('orders'); SELECT pgpipe.subscribe('payments');",
    )
    .await;
    let receiver = HttpReceiver::start(|_, _| Reply::status(204)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "channels: [orders, payments]\nadapters: []\n\
             webhooks:\n\
             - {{name: orders, url: '{}', channels: [orders]}}\n\
             - {{name: payments, url: '{}', channels: [payments], operations: [insert]}}\n",
            receiver.url("/orders"),
            receiver.url("/payments"),
        ),
    )
    .unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "listen",
        "--db",
        &db.url(),
    ];
    let fwd = Forwarder::spawn(&args, &[]);
    db.execute("INSERT INTO orders VALUES (1, 10), (2, 20)")
        .await;
    db.execute("INSERT INTO payments VALUES (1, 'new')").await;
    db.execute("UPDATE payments SET state = 'settled' WHERE id = 1")
        .await;
    db.execute("UPDATE orders SET total = 11 WHERE id = 1")
        .await;
    db.execute("DELETE FROM payments WHERE id = 1").await;

    let at = |path: &str| -> Vec<Request> {
        receiver
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    };
    let arrived = wait_until(WAIT, async || {
        at("/orders").len() >= 3 && !at("/payments").is_empty()
    })
    .await;
    assert!(
        arrived,
        "both webhooks got their events\n{}",
        fwd.stderr_text()
    );
    // The UPDATE and DELETE of payments go nowhere; still the consumer moves past them.
    let lag_zero = wait_until(WAIT, async || {
        let row = db
            .query_one(
                "SELECT coalesce(sum(pending_events), -1)::int8 FROM pgpipe.consumer_lag",
                &[],
            )
            .await;
        row.get::<_, i64>(0) == 0
    })
    .await;
    assert!(
        lag_zero,
        "every event is acknowledged\n{}",
        fwd.stderr_text()
    );

    let summary = |reqs: Vec<Request>| -> Vec<(String, String)> {
        reqs.iter()
            .map(|r| {
                let e = r.json();
                (
                    e["channel"].as_str().unwrap().to_string(),
                    e["operation"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // Different keys are delivered in parallel: compare what arrived, in any order.
    let mut orders = summary(at("/orders"));
    orders.sort();
    assert_eq!(
        orders,
        [
            ("orders", "INSERT"),
            ("orders", "INSERT"),
            ("orders", "UPDATE")
        ]
        .map(|(c, o)| (c.to_string(), o.to_string()))
    );
    assert_eq!(
        summary(at("/payments")),
        [("payments".to_string(), "INSERT".to_string())]
    );

    // A restarted forwarder starts after everything it acknowledged: only the new row.
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
    let fwd = Forwarder::spawn(&args, &[]);
    db.execute("INSERT INTO payments VALUES (2, 'new')").await;
    let second = wait_until(WAIT, async || at("/payments").len() >= 2).await;
    assert!(second, "{}", fwd.stderr_text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(at("/orders").len(), 3, "nothing sent twice");
    assert_eq!(at("/payments").len(), 2, "nothing sent twice");
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_a_channel_the_forwarder_does_not_read_is_refused() {
    let db = test_db("routes_refused").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpipe.yaml");
    std::fs::write(
        &config,
        "channels: [orders]\nadapters: []\n\
         webhooks:\n- {name: refunds, url: 'http://127.0.0.1:9/r', channels: [refunds]}\n",
    )
    .unwrap();
    let fwd = Forwarder::spawn(
        &[
            "--config",
            config.to_str().unwrap(),
            "listen",
            "--db",
            &db.url(),
        ],
        &[],
    );
    assert!(!fwd.wait_exit(WAIT).await.success());
    let err = fwd.stderr_text();
    assert!(
        err.contains("webhooks[0].channels: channel \"refunds\" is not one this forwarder reads")
            && err.contains("add it to channels"),
        "{err}"
    );
}
