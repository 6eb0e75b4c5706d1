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
    // The webhook's health flips while it retries: ask until a stranger sees it down.
    let mut stranger = http_get(addr, "/healthz").await;
    assert!(
        wait_until(WAIT, async || {
            stranger = http_get(addr, "/healthz").await;
            stranger.status == 503
        })
        .await,
        "a stranger sees the forwarder down too"
    );
    assert!(stranger.body.contains("\"down\""), "{}", stranger.body);
    assert!(
        !stranger.body.contains("errors") && !stranger.body.contains("127.0.0.1"),
        "{}",
        stranger.body
    );
}

/// A receiver that answers every POST with a 500 announcing a 1.5 GiB body and streams
/// it until the forwarder hangs up; returns its address, the number of requests and the
/// most body bytes one response got out.
async fn flooding_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let most_sent = Arc::new(AtomicU64::new(0));
    let (r, m) = (requests.clone(), most_sent.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (r, m) = (r.clone(), m.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut request = Vec::new();
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n\
                            content-length: 1610612736\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0u64;
                while sent < 1_610_612_736 {
                    if socket.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                }
                m.fetch_max(sent, Ordering::SeqCst);
            });
        }
    });
    (addr, requests, most_sent)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_receiver_cannot_fill_the_forwarders_memory_nor_learn_its_secrets() {
    use std::sync::atomic::Ordering;
    let db = orders_and_secrets("http_flood").await;
    let (receiver, requests, most_sent) = flooding_receiver().await;
    let fwd = Forwarder::listen(&db.url())
        .channel("orders")
        .adapter("webhook")
        .flag("--url", format!("http://{receiver}/hook?api_key=hunter2"))
        .flag("--metrics-addr", "127.0.0.1:0")
        .env("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_CAP", "100ms")
        .spawn();
    let metrics = http_addr(&fwd, "metrics").await;
    db.execute("INSERT INTO orders VALUES (1)").await;
    // It retries (so it stopped reading the first answer) and its memory stays small.
    assert!(
        wait_until(WAIT, async || requests.load(Ordering::SeqCst) >= 3).await,
        "the forwarder retried the 500s"
    );
    let rss = rss_bytes(fwd.pid());
    assert!(rss < 200 << 20, "the forwarder's RSS is {rss} bytes");
    let sent = most_sent.load(Ordering::SeqCst);
    assert!(
        sent < 256 << 20,
        "one answer got {sent} bytes out before the forwarder hung up"
    );
    // The URL's query never shows: not in health, not in the log.
    let health = http_get(metrics, "/healthz").await;
    assert!(!health.body.contains("hunter2"), "{}", health.body);
    let log = fwd.stderr_text();
    assert!(
        log.contains("api_key=***"),
        "the log names the URL, masked: {log}"
    );
    assert!(!log.contains("hunter2"), "{log}");
}
