//! Journey: a browser-style client follows changes over Server-Sent Events, drops its
//! connection and comes back with `Last-Event-ID` (to the same forwarder, and to a
//! restarted one), getting exactly what it missed; and a client that stops reading does
//! not hold anyone else up.

use std::time::Duration;

use pgpipe_tests::http::{http_addr, http_get, http_request, SseClient, SseFrame};
use pgpipe_tests::{test_db, wait_until, Forwarder, TestDb};

const WAIT: Duration = Duration::from_secs(20);

async fn subscribed_table(hint: &str) -> TestDb {
    let db = test_db(hint).await;
    // Partitions first: rows that land in the default partition are removed by the
    // forwarder's first retention run once acknowledged, and replay reads the queue.
    db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); SELECT pgpipe.subscribe('t'); \
         SELECT pgpipe.rotate();",
    )
    .await;
    db
}

fn start(db: &TestDb, env: &[(&str, &str)]) -> Forwarder {
    let url = db.url();
    Forwarder::listen(&url)
        .channel("t")
        .adapter("sse")
        .flag("--sse-addr", "127.0.0.1:0")
        .envs(env)
        .spawn()
}

/// The queue's event ids for rows `from..=to` of table t, in row order.
async fn ids_of_rows(db: &TestDb, from: i32, to: i32) -> Vec<String> {
    db.query(
        "SELECT id::text FROM pgpipe.events WHERE channel = 't' \
         AND (payload->'row'->>'id')::int BETWEEN $1 AND $2 ORDER BY (payload->'row'->>'id')::int",
        &[&from, &to],
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn ids(frames: &[SseFrame]) -> Vec<String> {
    frames.iter().map(|f| f.id.clone().unwrap()).collect()
}

#[tokio::test]
async fn frames_heartbeats_and_an_exact_resume() {
    let db = subscribed_table("sse_resume").await;
    let fwd = start(&db, &[("PGPIPE_SSE_HEARTBEAT_INTERVAL", "300ms")]);
    let addr = http_addr(&fwd, "http").await;

    let mut client = SseClient::connect(addr, "/events", &[]).await;
    assert_eq!(client.status, 200);
    assert!(client
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(client.header("x-accel-buffering"), Some("no"));

    for i in 1..=3 {
        db.execute(&format!("INSERT INTO t VALUES ({i}, 'v{i}')"))
            .await;
    }
    let first = client.events(3, WAIT).await;
    for (frame, row) in first.iter().zip(1..) {
        let event = frame.json();
        assert_eq!(
            frame.id.as_deref(),
            event["id"].as_str(),
            "id: is the event id"
        );
        assert_eq!(frame.event.as_deref(), Some("t"), "event: is the channel");
        assert_eq!(event["payload"]["row"]["id"], row);
    }
    assert_eq!(ids(&first), ids_of_rows(&db, 1, 3).await);

    // Idle: heartbeat comments keep the stream alive.
    let beat = client
        .next_frame(Duration::from_secs(3))
        .await
        .expect("a heartbeat");
    assert!(beat.id.is_none() && !beat.comments.is_empty(), "{beat:?}");

    // Disconnect after event 2, miss 3..=6, come back with Last-Event-ID.
    drop(client);
    for i in 4..=6 {
        db.execute(&format!("INSERT INTO t VALUES ({i}, 'v{i}')"))
            .await;
    }
    let last_seen = first[1].id.clone().unwrap();
    let mut resumed = SseClient::connect(addr, "/events", &[("Last-Event-ID", &last_seen)]).await;
    db.execute("INSERT INTO t VALUES (7, 'v7')").await;
    let got = resumed.events(5, WAIT).await;
    assert_eq!(
        ids(&got),
        ids_of_rows(&db, 3, 7).await,
        "missed events, then live, in order"
    );
    assert!(
        resumed
            .next_event(Duration::from_millis(800))
            .await
            .is_none(),
        "nothing repeated at the seam"
    );

    // The per-channel stream filters; the query form of Last-Event-ID works too.
    let mut one =
        SseClient::connect(addr, &format!("/events/t?lastEventId={last_seen}"), &[]).await;
    assert_eq!(
        ids(&one.events(5, WAIT).await),
        ids_of_rows(&db, 3, 7).await
    );
    let mut other = SseClient::connect(addr, "/events/other", &[]).await;
    db.execute("INSERT INTO t VALUES (8, 'v8')").await;
    assert_eq!(
        ids(&one.events(1, WAIT).await),
        ids_of_rows(&db, 8, 8).await
    );
    assert!(other.next_event(Duration::from_millis(500)).await.is_none());

    // CORS preflight.
    let preflight = http_request(
        addr,
        "OPTIONS",
        "/events",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "last-event-id"),
        ],
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase()
        .contains("last-event-id"));

    // SIGTERM with clients connected: their streams end and the forwarder exits 0.
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
    assert!(
        one.next_frame(Duration::from_secs(5)).await.is_none(),
        "stream ended"
    );
}

#[tokio::test]
async fn a_restarted_forwarder_replays_from_the_queue() {
    let db = subscribed_table("sse_restart").await;
    let fwd = start(&db, &[]);
    let addr = http_addr(&fwd, "http").await;
    let mut client = SseClient::connect(addr, "/events/t", &[]).await;
    db.execute("INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (2, 'b');")
        .await;
    let seen = client.events(1, WAIT).await;
    drop(client);
    fwd.kill9();

    // Written while the forwarder is down.
    for i in 3..=5 {
        db.execute(&format!("INSERT INTO t VALUES ({i}, 'x')"))
            .await;
    }
    let fwd = start(&db, &[]);
    let addr = http_addr(&fwd, "http").await;
    let last_seen = seen[0].id.clone().unwrap();
    let mut resumed = SseClient::connect(addr, "/events/t", &[("Last-Event-ID", &last_seen)]).await;
    db.execute("INSERT INTO t VALUES (6, 'live')").await;
    let got = resumed.events(5, WAIT).await;
    assert_eq!(ids(&got), ids_of_rows(&db, 2, 6).await);
    assert!(
        resumed
            .next_event(Duration::from_millis(800))
            .await
            .is_none(),
        "nothing repeated at the seam"
    );

    // An id the queue does not know: a comment says so and the live stream follows.
    let mut unknown = SseClient::connect(
        addr,
        "/events/t",
        &[("Last-Event-ID", "00000000-0000-7000-8000-000000000000")],
    )
    .await;
    let mut comments = Vec::new();
    while let Some(frame) = unknown.next_frame(Duration::from_millis(500)).await {
        comments.extend(frame.comments);
    }
    assert!(
        comments.iter().any(|c| c.contains("replay unavailable")),
        "{comments:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_delay_the_others() {
    let db = subscribed_table("sse_stalled").await;
    // Small batches and per-client buffers (sse.client_buffer) so the test is quick.
    let fwd = start(
        &db,
        &[
            ("PGPIPE_SSE_CLIENT_BUFFER", "500"),
            ("PGPIPE_DETECTOR_BATCH_SIZE", "100"),
        ],
    );
    let addr = http_addr(&fwd, "http").await;

    // Connects, then never reads again: its socket buffers and then its queue fill up.
    let stalled = SseClient::connect(addr, "/events", &[]).await;
    let mut reader = SseClient::connect(addr, "/events", &[]).await;

    // 16 MB in 40 transactions: more than the stalled client's socket buffers and queue
    // hold, at a pace a reading client keeps up with.
    const ROWS: i32 = 4000;
    const PER_TX: i32 = 100;
    let started = std::time::Instant::now();
    let writer_db = db.clone();
    let writer = tokio::spawn(async move {
        let client = writer_db.client().await;
        for first in (1..=ROWS).step_by(PER_TX as usize) {
            let sql = format!(
                "INSERT INTO t SELECT g, repeat('x', 4000) FROM generate_series({first}, {}) g",
                first + PER_TX - 1
            );
            client.batch_execute(&sql).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let got = reader.events(ROWS as usize, Duration::from_secs(60)).await;
    writer.await.unwrap();
    assert_eq!(got.len(), ROWS as usize);
    assert_eq!(got.last().unwrap().json()["payload"]["row"]["id"], ROWS);
    eprintln!("reader got {ROWS} events in {:?}", started.elapsed());

    let dropped_counted = wait_until(WAIT, async || {
        let metrics = http_get(addr, "/metrics").await.body;
        metrics.lines().any(|l| {
            l.starts_with("pgpipe_events_dropped_total{adapter=\"sse\"}")
                && l.split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<f64>().ok())
                    > Some(0.0)
        })
    })
    .await;
    assert!(dropped_counted, "drops of the stalled client are counted");
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    drop(stalled);
}

#[tokio::test]
async fn idle_connections_close_and_streams_with_heartbeats_stay() {
    use tokio::io::AsyncReadExt;
    let db = subscribed_table("sse_idle").await;
    let fwd = start(
        &db,
        &[
            ("PGPIPE_SSE_IDLE_TIMEOUT", "1s"),
            ("PGPIPE_SSE_READ_TIMEOUT", "10s"),
            ("PGPIPE_SSE_HEARTBEAT_INTERVAL", "300ms"),
        ],
    );
    let addr = http_addr(&fwd, "http").await;
    let mut stream = SseClient::connect(addr, "/events", &[]).await;
    // Connected, sends nothing: closed after sse.idle_timeout.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // The stream outlived it on heartbeats and still delivers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.execute("INSERT INTO t VALUES (1, 'still here')").await;
    let got = stream.events(1, WAIT).await;
    assert_eq!(got[0].json()["payload"]["row"]["v"], "still here");
}
