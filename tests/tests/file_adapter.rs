//! Journey: events are appended to a JSON-lines file that rotates by size, keeping N old
//! files. A path that cannot be written fails loudly and loses nothing: events stay
//! unacknowledged and are written once the path works. A slow webhook next to the file
//! adapter holds it back by at most the in-flight window.

use std::path::Path;
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
        .collect()
}

fn row_ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["payload"]["row"]["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn rotates_by_size_keeping_n_files() {
    let db = test_db("file_rotation").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, pad text); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let url = db.url();
    let _fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("file")
        .flag("--file-path", path.to_str().unwrap())
        .flag("--file-max-size", "2000")
        .flag("--file-max-files", "2")
        .spawn();
    db.execute("INSERT INTO t SELECT i, repeat('x', 200) FROM generate_series(1, 40) i")
        .await;
    let files = [
        path.clone(),
        dir.path().join("events.jsonl.1"),
        dir.path().join("events.jsonl.2"),
    ];
    let done = wait_until(WAIT, async || {
        row_ids(&lines(&files[0])).last() == Some(&40)
    })
    .await;
    assert!(done, "the last event reached the file");
    assert!(
        !dir.path().join("events.jsonl.3").exists(),
        "only 2 rotated files kept"
    );
    // Oldest file first: consecutive ids, each file within the size limit.
    let mut all = Vec::new();
    for f in files.iter().rev() {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(size <= 2000 && size > 0, "{} is {size} bytes", f.display());
        all.extend(row_ids(&lines(f)));
    }
    let first = all[0];
    assert_eq!(all, (first..=40).collect::<Vec<_>>(), "in order, no gap");
}

#[tokio::test]
async fn an_unwritable_path_fails_loudly_and_loses_nothing() {
    let db = test_db("file_unwritable").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    // The directory does not exist yet (root ignores permission bits, so use that).
    let sub = dir.path().join("later");
    let path = sub.join("events.jsonl");
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("file")
        .flag("--file-path", path.to_str().unwrap())
        .env("PGPIPE_FILE_BACKOFF_BASE", "100ms")
        .env("PGPIPE_FILE_BACKOFF_CAP", "300ms")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await;
    let log = fwd.wait_for_stderr("cannot write events", WAIT).await;
    assert!(
        log.contains(&format!("open {}", path.display())),
        "the path is named: {log}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.execute("INSERT INTO t SELECT generate_series(6, 8)")
        .await;
    std::fs::create_dir(&sub).unwrap();
    let done = wait_until(WAIT, async || lines(&path).len() >= 8).await;
    assert!(
        done,
        "everything written once the path works: {:?}",
        lines(&path).len()
    );
    assert_eq!(row_ids(&lines(&path)), (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_slow_webhook_holds_the_file_back_by_at_most_the_in_flight_window() {
    let db = test_db("file_slow_webhook").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    // The webhook hangs on every request.
    let receiver =
        HttpReceiver::start(|_, _| Reply::status(200).delayed(Duration::from_secs(60))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let url = db.url();
    let hook = receiver.url("/slow");
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .adapter("file")
        .flag("-u", &hook)
        // One request at a time: the webhook is stuck on the first event.
        .env("PGPIPE_WEBHOOK_ORDERING", "channel")
        .flag("--file-path", path.to_str().unwrap())
        .flag("--max-in-flight", "20")
        .flag("--batch-size", "10")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await;
    let filled = wait_until(WAIT, async || lines(&path).len() == 20).await;
    assert!(
        filled,
        "the file got the whole window: {}",
        lines(&path).len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lines(&path).len(),
        20,
        "and no more while the webhook is stuck"
    );
    assert_eq!(
        receiver.requests().len(),
        1,
        "the webhook is still on its first event"
    );
    fwd.kill9();
}

#[tokio::test]
async fn interval_fsync_acknowledges_and_a_clean_stop_repeats_nothing() {
    let db = test_db("file_fsync_interval").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let url = db.url();
    let listen = Forwarder::listen(&url)
        .channel("t")
        .adapter("file")
        .flag("--file-path", path.to_str().unwrap());
    let env = [
        ("PGPIPE_FILE_FSYNC", "interval"),
        ("PGPIPE_FILE_FSYNC_INTERVAL", "200ms"),
    ];
    let fwd = listen.clone().envs(&env).spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await;
    assert!(wait_until(WAIT, async || lines(&path).len() == 100).await);
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
    // Everything was acknowledged after its fsync: a restart repeats nothing.
    let again = listen.clone().envs(&env).spawn();
    db.execute("INSERT INTO t VALUES (101)").await;
    assert!(wait_until(WAIT, async || lines(&path).len() >= 101).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        row_ids(&lines(&path)),
        (1..=101).collect::<Vec<_>>(),
        "{}",
        again.stderr_text()
    );
}
