//! Journey: the forwarder's HTTP surface faces an unauthenticated client (the default has
//! no token). It streams only the channels the forwarder reads, survives a crowd of
//! resuming clients without taking Postgres's connections, warns when it listens beyond
//! loopback without a token, and with a token tells strangers up/down but no error text.

use std::time::Duration;

use pgpipe_tests::http::{http_addr, http_get, http_request, SseClient};
use pgpipe_tests::{test_db, wait_until, Forwarder, TestDb, FORWARDER_ROLE};

const WAIT: Duration = Duration::from_secs(20);

async fn orders_and_secrets(hint: &str) -> TestDb {
    let db = test_db(hint).await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY); SELECT pgpipe.subscribe('orders');
         CREATE TABLE secrets (id int PRIMARY KEY, card text); SELECT pgpipe.subscribe('secrets');
         SELECT pgpipe.rotate();",
    )
    .await;
    db
}

fn start(db: &TestDb, extra: &[(&str, &str)]) -> Forwarder {
    extra
        .iter()
        .fold(
            Forwarder::listen(&db.url())
                .channel("orders")
                .adapter("sse")
                .adapter("ws")
                .flag("--sse-addr", "127.0.0.1:0"),
            |l, (flag, value)| l.flag(flag, *value),
        )
        .spawn()
}

#[tokio::test]
async fn only_the_forwarders_channels_and_a_crowd_of_resumes_shares_two_connections() {
    let db = orders_and_secrets("http_channels").await;
    let fwd = start(&db, &[]);
    let addr = http_addr(&fwd, "http").await;

    // A channel the forwarder does not read: 404, for SSE and WebSocket alike, whatever
    // Last-Event-ID says (the queue would have replayed it before).
    db.execute("INSERT INTO secrets VALUES (1, '4111'); INSERT INTO orders VALUES (1)")
        .await;
    let secret_id: String = db
        .query_one(
            "SELECT id::text FROM pgpipe.events WHERE channel = 'secrets'",
            &[],
        )
        .await
        .get(0);
    let sse = http_request(
        addr,
        "GET",
        "/events/secrets",
        &[("Last-Event-ID", &secret_id)],
    )
    .await;
    assert_eq!(sse.status, 404, "{}", sse.body);
    assert!(sse.body.contains("does not read channel"), "{}", sse.body);
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/secrets")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("/ws/secrets must be a 404, got {other:?}"),
    }

    // 60 clients resume at once after a restart (so from the queue, not memory): every
    // one gets what it missed, and the replays share a couple of connections.
    for i in 2..=5 {
        db.execute(&format!("INSERT INTO orders VALUES ({i})"))
            .await;
    }
    let first: String = db
        .query_one(
            "SELECT id::text FROM pgpipe.events WHERE channel = 'orders' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .get(0);
    assert!(
        wait_until(WAIT, async || {
            db.query_one(
                "SELECT coalesce(sum(pending_events), 1)::bigint FROM pgpipe.consumer_lag",
                &[],
            )
            .await
            .get::<_, i64>(0)
                == 0
        })
        .await,
        "the forwarder caught up"
    );
    fwd.kill9();
    let fwd = start(&db, &[]);
    let addr = http_addr(&fwd, "http").await;
    let watcher = db.clone();
    let most_connections = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..100 {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&FORWARDER_ROLE],
                )
                .await
                .get(0);
            most = most.max(n);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    });
    let clients = (0..60).map(|_| {
        let first = first.clone();
        tokio::spawn(async move {
            let mut client =
                SseClient::connect(addr, "/events/orders", &[("Last-Event-ID", &first)]).await;
            client.events(4, WAIT).await.len()
        })
    });
    for client in clients {
        assert_eq!(
            client.await.unwrap(),
            4,
            "each resuming client gets the 4 events it missed"
        );
    }
    let most = most_connections.await.unwrap();
    // The detector's connection, its dead-letter writer's and at most two replay
    // connections; before, one connection per resuming client.
    assert!(
        most <= 5,
        "the forwarder held {most} connections during 60 replays"
    );
}

#[tokio::test]
async fn a_token_hides_error_texts_and_open_addresses_are_warned_about() {
    let db = orders_and_secrets("http_token").await;
    // Listening on every address without a token: said at start.
    let open = Forwarder::listen(&db.url())
        .channel("orders")
        .adapter("sse")
        .flag("--sse-addr", "0.0.0.0:0")
        .spawn();
    open.wait_for_stderr("open to anyone", WAIT).await;
    drop(open);

    // With a token and a component down (a webhook nobody answers), /healthz tells an
    // unauthenticated caller up/down only; the token holder gets the reason.
    let fwd = Forwarder::listen(&db.url())
        .channel("orders")
        .adapter("sse")
        .adapter("webhook")
        .flag("--url", "http://127.0.0.1:9/hook?api_key=hunter2")
        .flag("--sse-addr", "127.0.0.1:0")
        .flag("--auth-token", "s3cret")
        .env("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_CAP", "100ms")
        .spawn();
    let addr = http_addr(&fwd, "http").await;
    db.execute("INSERT INTO orders VALUES (1)").await;
    let mut down = None;
    assert!(
        wait_until(WAIT, async || {
            let r = http_request(
                addr,
                "GET",
                "/healthz",
                &[("Authorization", "Bearer s3cret")],
            )
            .await;
            let ok = r.status == 503;
            down = Some(r.body);
            ok
        })
        .await,
        "the webhook goes down"
    );
    let insider = down.unwrap();
    assert!(
        insider.contains("errors"),
        "the token holder sees why: {insider}"
    );
    let stranger = http_get(addr, "/healthz").await;
    assert_eq!(stranger.status, 503);
    assert!(stranger.body.contains("\"down\""), "{}", stranger.body);
    assert!(
        !stranger.body.contains("errors") && !stranger.body.contains("127.0.0.1"),
        "{}",
        stranger.body
    );
}
