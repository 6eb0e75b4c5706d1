//! Journey: the forwarder is stopped and started again, cleanly or with `kill -9`, and a
//! second instance waits as a hot standby. Nothing committed is lost; after a clean stop
//! nothing repeats (and logs no warning); after `kill -9` only unacknowledged in-flight
//! events repeat, with their original ids.

use std::collections::HashMap;
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_clean_restart_continues_where_it_stopped() {
    let db = test_db("clean_restart").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = db.url();
    let listen = Forwarder::listen(&url).channel("t");

    db.execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await;
    let first = listen.spawn();
    first.wait_for_events(100, WAIT).await;
    first.sigterm();
    assert!(
        first.wait_exit(WAIT).await.success(),
        "exit 0 on SIGTERM: {}",
        first.stderr_text()
    );
    // A clean stop is not a warning (the log would page someone).
    let stop_log = first.stderr_text();
    assert!(
        !stop_log.contains(" WARN ") && stop_log.contains("stopped"),
        "a clean stop logs no warnings: {stop_log}"
    );

    // Written while no forwarder runs.
    db.execute("INSERT INTO t SELECT generate_series(101, 150)")
        .await;
    let second = listen.spawn();
    let events = second.wait_for_events(50, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events_after = second.stdout_json();
    assert_eq!(events_after.len(), 50, "only the new events, none repeated");
    let rows: Vec<i64> = events
        .iter()
        .map(|e| e["payload"]["row"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, (101..=150).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_writes_loses_nothing_and_repeats_only_in_flight_events() {
    let db = test_db("kill9").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = db.url();
    let max_in_flight = 50;
    let listen = Forwarder::listen(&url)
        .channel("t")
        .flag("--max-in-flight", "50")
        .flag("--batch-size", "20");

    let writer_db = db.clone();
    let writes = tokio::spawn(async move {
        let client = writer_db.client().await;
        for i in 0..300 {
            client
                .execute("INSERT INTO t VALUES ($1)", &[&i])
                .await
                .unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut all: Vec<Value> = Vec::new();
    for _ in 0..3 {
        let fwd = listen.spawn();
        // Kill it mid-stream; once the writer is done there may be nothing left for it
        // (the previous run acknowledged everything), so do not wait for 20 then.
        let busy = wait_until(WAIT, async || {
            fwd.stdout_json().len() >= 20 || writes.is_finished()
        })
        .await;
        assert!(busy, "{}", fwd.stderr_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
        fwd.kill9();
        fwd.wait_exit(WAIT).await;
        all.extend(fwd.stdout_json());
    }
    writes.await.unwrap();
    let last = listen.spawn();
    let delivered_ids = |extra: &[Value]| {
        let mut set: std::collections::HashSet<String> = ids(&all).into_iter().collect();
        set.extend(ids(extra));
        set
    };
    assert!(
        wait_until(WAIT, async || delivered_ids(&last.stdout_json()).len()
            >= 300)
        .await,
        "every committed event arrives: {} of 300",
        delivered_ids(&last.stdout_json()).len()
    );
    all.extend(last.stdout_json());

    // Retention may already have removed delivered events from the queue, so the
    // writer's rows are the reference.
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for event in &all {
        by_id
            .entry(event["id"].as_str().unwrap().to_string())
            .or_default()
            .push(event);
    }
    let rows: std::collections::BTreeSet<i64> = all
        .iter()
        .map(|e| e["payload"]["row"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, (0..300).collect(), "every committed row delivered");
    assert_eq!(by_id.len(), 300, "one id per committed row");
    let mut repeated = 0;
    for copies in by_id.values() {
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "a repeat differs from the original: {copies:#?}"
        );
        repeated += copies.len() - 1;
    }
    assert!(
        repeated <= 3 * max_in_flight,
        "{repeated} repeats: more than three kills' in-flight windows"
    );
}

#[tokio::test]
async fn a_second_forwarder_stands_by_and_takes_over() {
    let db = test_db("standby").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = db.url();
    let listen = Forwarder::listen(&url).channel("t");
    let active = listen.spawn();
    active
        .wait_for_stderr("reading the pgpipe queue", WAIT)
        .await;
    let standby = listen
        .clone()
        .env("PGPIPE_DETECTOR_BACKOFF_BASE", "200ms")
        .spawn();
    standby.wait_for_stderr("stands by", WAIT).await;

    db.execute("INSERT INTO t VALUES (1)").await;
    active.wait_for_events(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        standby.stdout_lines().is_empty(),
        "the standby must not deliver"
    );

    active.kill9();
    db.execute("INSERT INTO t VALUES (2)").await;
    let events = standby.wait_for_events(1, WAIT).await;
    assert_eq!(events.last().unwrap()["payload"]["row"]["id"], 2);
}
