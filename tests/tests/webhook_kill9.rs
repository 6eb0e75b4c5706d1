//! Journey: a webhook endpoint that fails at random while the forwarder is killed with
//! `kill -9` and restarted several times. Every committed event arrives at least once,
//! with its original id; repeats stay within the in-flight window of each kill.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply};

const EVENTS: i32 = 300;
const MAX_IN_FLIGHT: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_across_kill_9_and_a_flaky_endpoint() {
    let db = test_db("webhook_kill9").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    // A quarter of the answers are errors (500 or 429), some answers are slow.
    let receiver = HttpReceiver::start(|_, _| match fastrand_u8() % 8 {
        0 => Reply::status(500),
        1 => Reply::status(429).header("Retry-After", "0"),
        2 => Reply::status(200).delayed(Duration::from_millis(30)),
        _ => Reply::status(200),
    })
    .await;
    let url = db.url();
    let hook = receiver.url("/in");
    let in_flight = MAX_IN_FLIGHT.to_string();
    let listen = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--retries", "50")
        .flag("--max-in-flight", &in_flight)
        .flag("--batch-size", "20");
    let env = [
        ("PGPIPE_WEBHOOK_BACKOFF_BASE", "10ms"),
        ("PGPIPE_WEBHOOK_BACKOFF_CAP", "50ms"),
    ];

    let writer_db = db.clone();
    let writes = tokio::spawn(async move {
        let client = writer_db.client().await;
        for i in 0..EVENTS {
            client
                .execute("INSERT INTO t VALUES ($1)", &[&i])
                .await
                .unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
    });
    let kills = 4;
    for round in 0..kills {
        let fwd = listen.clone().envs(&env).spawn();
        tokio::time::sleep(Duration::from_millis(
            200 + 100 * round + u64::from(fastrand_u8()),
        ))
        .await;
        fwd.kill9();
        fwd.wait_exit(Duration::from_secs(10)).await;
    }
    writes.await.unwrap();
    let fwd = listen.clone().envs(&env).spawn();

    // Retention may already have dropped acknowledged events from pgpipe.events, so the
    // committed set is the table's rows; each must arrive under one event id only.
    let committed: HashSet<i64> = (0..i64::from(EVENTS)).collect();
    let delivered = || -> HashMap<i64, (HashSet<String>, usize)> {
        let mut ok: HashMap<i64, (HashSet<String>, usize)> = HashMap::new();
        for r in receiver.requests().iter().filter(|r| r.status == 200) {
            let event = r.json();
            let entry = ok
                .entry(event["payload"]["row"]["id"].as_i64().unwrap())
                .or_default();
            entry.0.insert(event["id"].as_str().unwrap().to_string());
            entry.1 += 1;
        }
        ok
    };
    let all = wait_until(Duration::from_secs(40), async || {
        let d = delivered();
        committed.iter().all(|id| d.contains_key(id))
    })
    .await;
    let d = delivered();
    let missing: Vec<_> = committed.iter().filter(|id| !d.contains_key(*id)).collect();
    assert!(
        all,
        "committed events never arrived: {missing:?}\n{}",
        fwd.stderr_text()
    );
    assert_eq!(
        d.len(),
        committed.len(),
        "no event for a row that was never written"
    );
    for (row, (ids, _)) in &d {
        assert_eq!(
            ids.len(),
            1,
            "row {row} arrived under several event ids: {ids:?}"
        );
    }
    // Repeated successful deliveries come only from events in flight at a kill.
    let repeats: usize = d.values().map(|(_, n)| n - 1).sum();
    assert!(
        repeats <= kills as usize * MAX_IN_FLIGHT,
        "{repeats} repeats"
    );
    let db_letters = db
        .query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(
        db_letters.get::<_, i64>(0),
        0,
        "nothing exhausted 50 attempts"
    );
    eprintln!(
        "{} events, {} requests in all, {repeats} repeated deliveries, {} kills",
        committed.len(),
        receiver.requests().len(),
        kills
    );
}

/// Rows updated several times, delivered with 16 requests in flight by a receiver that
/// answers 500/502/503/429 or takes 20 ms at random, with kill -9s: every change arrives
/// under one event id, and each row's changes first arrive in commit order (one lane per
/// key; while the capture paths give no key, one lane for the channel, which orders them
/// too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_lanes_keep_each_rows_order_across_kill_9() {
    const ROWS: i32 = 40;
    const VERSIONS: i32 = 5;
    let db = test_db("webhook_lanes_kill9").await;
    db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); SELECT pgpipe.subscribe('t');",
    )
    .await;
    let receiver = HttpReceiver::start(|_, _| match fastrand_u8() % 10 {
        0 => Reply::status(500),
        1 => Reply::status(502),
        2 => Reply::status(503),
        3 => Reply::status(429).header("Retry-After", "0"),
        4 => Reply::status(200).delayed(Duration::from_millis(20)),
        _ => Reply::status(200),
    })
    .await;
    let url = db.url();
    let hook = receiver.url("/in");
    let in_flight = MAX_IN_FLIGHT.to_string();
    let listen = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--retries", "50")
        .flag("--max-in-flight", &in_flight);
    let env = [
        ("PGPIPE_WEBHOOK_BACKOFF_BASE", "10ms"),
        ("PGPIPE_WEBHOOK_BACKOFF_CAP", "50ms"),
        ("PGPIPE_WEBHOOK_CONCURRENCY", "16"),
        ("PGPIPE_WEBHOOK_ORDERING", "key"),
    ];
    let writer_db = db.clone();
    let writes = tokio::spawn(async move {
        let client = writer_db.client().await;
        for v in 0..VERSIONS {
            for id in 0..ROWS {
                let sql = if v == 0 {
                    "INSERT INTO t VALUES ($1, $2)"
                } else {
                    "UPDATE t SET v = $2 WHERE id = $1"
                };
                client.execute(sql, &[&id, &v]).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let kills = 3;
    for round in 0..kills {
        let fwd = listen.clone().envs(&env).spawn();
        tokio::time::sleep(Duration::from_millis(
            300 + 100 * round + u64::from(fastrand_u8()),
        ))
        .await;
        fwd.kill9();
        fwd.wait_exit(Duration::from_secs(10)).await;
    }
    writes.await.unwrap();
    let fwd = listen.clone().envs(&env).spawn();

    // (row, v) -> event ids, and per row the versions in order of first arrival.
    let seen = || {
        let mut ids: HashMap<(i64, i64), HashSet<String>> = HashMap::new();
        let mut first: HashMap<i64, Vec<i64>> = HashMap::new();
        for r in receiver.requests().iter().filter(|r| r.status == 200) {
            let e = r.json();
            let row = e["payload"]["row"]["id"].as_i64().unwrap();
            let v = e["payload"]["row"]["v"].as_i64().unwrap();
            let known = ids.contains_key(&(row, v));
            ids.entry((row, v))
                .or_default()
                .insert(e["id"].as_str().unwrap().to_string());
            if !known {
                first.entry(row).or_default().push(v);
            }
        }
        (ids, first)
    };
    let total = (ROWS * VERSIONS) as usize;
    let all = wait_until(Duration::from_secs(60), async || seen().0.len() == total).await;
    let (ids, first) = seen();
    assert!(
        all,
        "{} of {total} changes arrived\n{}",
        ids.len(),
        fwd.stderr_text()
    );
    for ((row, v), ids) in &ids {
        assert_eq!(
            ids.len(),
            1,
            "row {row} v{v} arrived under several ids: {ids:?}"
        );
    }
    for (row, versions) in &first {
        assert_eq!(
            *versions,
            (0..i64::from(VERSIONS)).collect::<Vec<_>>(),
            "row {row}: its changes in commit order"
        );
    }
    let letters = db
        .query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(letters.get::<_, i64>(0), 0, "nothing dead-lettered");
    eprintln!(
        "{total} changes, {} requests, {kills} kills",
        receiver.requests().len()
    );
}

/// A cheap random byte (the test crate has no RNG dependency).
fn fastrand_u8() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    (h.finish() & 0xff) as u8
}
