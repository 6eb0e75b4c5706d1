//! Journey: many writers commit and roll back interleaved transactions of different
//! lengths while the forwarder reads and is restarted. Ids are minted before commit, so
//! commit order differs from id order; the snapshot-based consumer API must still deliver
//! every committed change exactly once and no rolled-back one.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, TestDb};
use serde_json::Value;

const WRITERS: i32 = 8;
const TRANSACTIONS_PER_WRITER: i32 = 25;

/// A tiny deterministic generator, so a failing run can be reproduced.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Runs one writer; returns the `(writer, n)` pairs it committed.
async fn writer(db: TestDb, writer: i32) -> Vec<(i64, i64)> {
    let mut client = db.client().await;
    let mut rng = Lcg(writer as u64 + 1);
    let mut committed = Vec::new();
    let mut n = 0;
    for t in 0..TRANSACTIONS_PER_WRITER {
        let tx = client.transaction().await.unwrap();
        let mut rows = Vec::new();
        for _ in 0..=rng.below(4) {
            n += 1;
            tx.execute(
                "INSERT INTO ledger (writer, n) VALUES ($1, $2)",
                &[&writer, &n],
            )
            .await
            .unwrap();
            rows.push((i64::from(writer), i64::from(n)));
            // Interleave with the other writers; every 7th transaction stays open long
            // enough for many later ones to commit (and be read) before it.
            let pause = if t % 7 == 3 {
                400 + rng.below(400)
            } else {
                rng.below(15)
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        if rng.below(5) == 0 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.extend(rows);
        }
    }
    committed
}

fn delivered(events: &[Value]) -> Vec<(i64, i64)> {
    events
        .iter()
        .map(|e| {
            let row = &e["payload"]["row"];
            (row["writer"].as_i64().unwrap(), row["n"].as_i64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_commits_arrive_exactly_once_across_a_restart() {
    let db = test_db("concurrent").await;
    db.execute(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, writer int NOT NULL, n int NOT NULL);
         SELECT pgpipe.subscribe('ledger');",
    )
    .await;
    let url = db.url();
    // Small pages and frequent polls make the reader cross many batch and page boundaries.
    let listen = Forwarder::listen(&url)
        .channel("ledger")
        .flag("--batch-size", "7")
        .flag("--poll-interval", "10ms");
    let first = listen.spawn();

    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| tokio::spawn(writer(db.clone(), w)))
        .collect();

    // Restart the forwarder cleanly while the writers are busy.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.sigterm();
    assert!(
        first.wait_exit(Duration::from_secs(10)).await.success(),
        "{}",
        first.stderr_text()
    );
    let second = listen.spawn();

    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    let expected: BTreeSet<(i64, i64)> = committed.iter().copied().collect();
    assert_eq!(expected.len(), committed.len());
    assert!(
        expected.len() > 100,
        "the workload should commit plenty: {}",
        expected.len()
    );

    let all_events = || {
        let mut events = first.stdout_json();
        events.extend(second.stdout_json());
        events
    };
    let arrived = wait_until(Duration::from_secs(30), async || {
        all_events().len() >= expected.len()
    })
    .await;
    // Give a late duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = all_events();
    let got = delivered(&events);

    let mut seen: HashMap<(i64, i64), usize> = HashMap::new();
    for pair in &got {
        *seen.entry(*pair).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    let missing: Vec<_> = expected.iter().filter(|p| !seen.contains_key(p)).collect();
    let unexpected: Vec<_> = seen.keys().filter(|p| !expected.contains(p)).collect();
    assert!(
        arrived && missing.is_empty(),
        "missing {} of {}: {missing:?}",
        missing.len(),
        expected.len()
    );
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    assert!(
        unexpected.is_empty(),
        "rolled back but delivered: {unexpected:?}"
    );

    // Each writer's changes arrive in the order it made them.
    let mut last: HashMap<i64, i64> = HashMap::new();
    for (w, n) in got {
        let prev = last.insert(w, n).unwrap_or(0);
        assert!(n > prev, "writer {w}: {n} after {prev}");
    }
}
