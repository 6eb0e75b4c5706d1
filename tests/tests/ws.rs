//! Journey: a WebSocket client follows changes (all channels, or one), answers the
//! server's pings and stays; a client that never answers is dropped; with a token
//! configured, clients without it get 401.

use std::time::Duration;

use futures_util::StreamExt;
use pgpipe_tests::http::{http_addr, http_get, http_request};
use pgpipe_tests::{test_db, wait_until, Forwarder, TestDb};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const WAIT: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscribed_table(hint: &str) -> TestDb {
    let db = test_db(hint).await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    db
}

/// The next text frame as JSON, answering pings meanwhile (tungstenite does that while
/// reading). Counts the pings seen.
async fn next_event(ws: &mut Ws, pings: &mut usize) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("valid frame");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON event"),
            Message::Ping(_) => *pings += 1,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ws_clients_active(addr: std::net::SocketAddr) -> f64 {
    http_get(addr, "/metrics")
        .await
        .body
        .lines()
        .find_map(|l| l.strip_prefix("pgpipe_ws_clients_active "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pgpipe_ws_clients_active in /metrics")
}

#[tokio::test]
async fn events_arrive_as_text_frames_and_silent_clients_are_dropped() {
    let db = subscribed_table("ws_happy").await;
    let url = db.url();
    // It reads `other` too (nothing is written there): /ws/{channel} serves only the
    // channels the forwarder reads.
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .channel("other")
        .adapter("ws")
        .flag("--sse-addr", "127.0.0.1:0")
        .flag("--ws-ping-interval", "200ms")
        .env("PGPIPE_WEBSOCKET_PONG_TIMEOUT", "1s")
        .spawn();
    let addr = http_addr(&fwd, "http").await;

    let (mut all, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect /ws");
    let (mut one, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/t"))
        .await
        .expect("connect /ws/t");
    let (mut other, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/other"))
        .await
        .expect("connect /ws/other");
    // Connects and then never reads: it never answers a ping.
    let (silent, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect the silent client");
    assert!(wait_until(WAIT, async || ws_clients_active(addr).await == 4.0).await);

    db.execute("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .await;
    let mut pings = 0;
    for row in [1, 2] {
        let event = next_event(&mut all, &mut pings).await;
        assert_eq!(event["channel"], "t");
        assert_eq!(event["payload"]["row"]["id"], row);
        assert_eq!(next_event(&mut one, &mut pings).await["id"], event["id"]);
    }

    // Keep reading (and so answering pings) for a while: the readers stay, the silent
    // client is dropped once it has been quiet for the pong timeout.
    let stay = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < stay {
        for ws in [&mut all, &mut one, &mut other] {
            if let Ok(Some(Ok(Message::Ping(_)))) =
                tokio::time::timeout(Duration::from_millis(50), ws.next()).await
            {
                pings += 1;
            }
        }
    }
    assert!(pings >= 3, "the server pings every 200ms, saw {pings}");
    assert!(
        wait_until(WAIT, async || ws_clients_active(addr).await == 3.0).await,
        "the silent client is dropped, the others stay"
    );
    drop(silent);

    db.execute("INSERT INTO t VALUES (3)").await;
    assert_eq!(
        next_event(&mut all, &mut pings).await["payload"]["row"]["id"],
        3
    );
    assert_eq!(
        next_event(&mut one, &mut pings).await["payload"]["row"]["id"],
        3
    );
    // /ws/other saw pings only.
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, other.next()).await {
        assert!(matches!(msg, Ok(Message::Ping(_))), "{msg:?}");
    }

    // SIGTERM: clients get a close frame and the forwarder exits 0.
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match all.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection is closed");
}

#[tokio::test]
async fn a_token_is_required_when_configured() {
    let db = subscribed_table("ws_auth").await;
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("ws")
        .adapter("sse")
        .flag("--sse-addr", "127.0.0.1:0")
        .flag("--auth-token", "s3cret token")
        .spawn();
    let addr = http_addr(&fwd, "http").await;

    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let mut wrong = format!("ws://{addr}/ws").into_client_request().unwrap();
    wrong
        .headers_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    match tokio_tungstenite::connect_async(wrong).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(http_get(addr, "/events").await.status, 401);
    assert_eq!(http_get(addr, "/events?token=nope").await.status, 401);

    let mut with_header = format!("ws://{addr}/ws").into_client_request().unwrap();
    with_header
        .headers_mut()
        .insert("authorization", "Bearer s3cret token".parse().unwrap());
    let (mut by_header, _) = tokio_tungstenite::connect_async(with_header)
        .await
        .expect("the header token is accepted");
    let (mut by_query, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/t?token=s3cret%20token"))
            .await
            .expect("the query token is accepted");
    db.execute("INSERT INTO t VALUES (1)").await;
    let mut pings = 0;
    assert_eq!(
        next_event(&mut by_header, &mut pings).await["payload"]["row"]["id"],
        1
    );
    assert_eq!(
        next_event(&mut by_query, &mut pings).await["payload"]["row"]["id"],
        1
    );

    // Health and metrics stay open; the token never shows in the logs.
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    let sse = http_request(
        addr,
        "OPTIONS",
        "/events",
        &[
            ("Origin", "https://x.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
    )
    .await;
    assert_eq!(sse.status, 204, "preflights need no token");
    assert!(
        !fwd.stderr_text().contains("s3cret"),
        "the token is not logged"
    );
}
