//! Journey: a consumer LISTENing on `pgpipe_wakeup` is woken soon after captured events
//! commit, by the background worker's NOTIFY — writers never NOTIFY themselves, and a
//! burst of commits is coalesced into a few notifications.
//!
//! Failure that matters: a rolled-back transaction wakes nobody, and a writer in a
//! database the worker does not serve is told so (`mark_wakeup()` is false; the forwarder
//! polls there).

use std::time::Duration;

use pgpipe_tests::{test_db, TempPg};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

/// A connection to the worker's database whose notifications land in a channel.
async fn listener(pg: &TempPg) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect to postgres");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

async fn drain(
    rx: &mut mpsc::UnboundedReceiver<Notification>,
    wait: Duration,
) -> Vec<Notification> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(n)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got.push(n);
    }
    got
}

#[tokio::test]
async fn commits_wake_listeners_through_one_coalesced_worker_notify() {
    let pg = TempPg::shared();
    let (client, mut rx) = listener(pg).await;
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pgpipe;
             CREATE TABLE orders (id int PRIMARY KEY);
             SELECT pgpipe.subscribe('orders');
             LISTEN pgpipe_wakeup;",
        )
        .await
        .unwrap();
    let worker_pid: i32 = client
        .query_one("SELECT worker_pid FROM pgpipe.status()", &[])
        .await
        .unwrap()
        .get(0);
    // Whatever the setup itself caused.
    drain(&mut rx, Duration::from_millis(300)).await;

    let (writer, _writer_rx) = listener(pg).await;
    writer
        .batch_execute("INSERT INTO orders VALUES (1)")
        .await
        .unwrap();
    let woken = drain(&mut rx, Duration::from_millis(500)).await;
    assert!(!woken.is_empty(), "a commit wakes the listener");
    assert!(
        woken
            .iter()
            .all(|n| n.process_id() == worker_pid && n.channel() == "pgpipe_wakeup"),
        "sent by the worker (pid {worker_pid}), not by the writer: {woken:?}"
    );

    // A burst of 300 commits: a handful of NOTIFYs, not 300.
    let start = tokio::time::Instant::now();
    for i in 2..302 {
        writer
            .execute("INSERT INTO orders VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let elapsed = start.elapsed();
    let burst = drain(&mut rx, Duration::from_millis(500)).await;
    assert!(!burst.is_empty(), "the burst wakes the listener");
    // One per pgpipe.notify_min_interval (5 ms) at most, plus the last.
    let bound = (elapsed.as_millis() / 5) as usize + 2;
    assert!(
        burst.len() <= bound.min(299),
        "{} NOTIFYs for 300 commits in {elapsed:?}",
        burst.len()
    );

    // A rolled-back capture wakes nobody.
    writer
        .batch_execute("BEGIN; INSERT INTO orders VALUES (1000); ROLLBACK;")
        .await
        .unwrap();
    let after_rollback = drain(&mut rx, Duration::from_millis(400)).await;
    assert!(
        after_rollback.is_empty(),
        "no wake-up for a rollback: {after_rollback:?}"
    );

    // Another database: NOTIFY does not cross databases, so capture there does not
    // bother the worker, and says so.
    let other = test_db("wakeup_other").await;
    let marked: bool = other
        .client()
        .await
        .query_one("SELECT pgpipe.mark_wakeup()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!marked, "the worker serves database postgres only");
}
