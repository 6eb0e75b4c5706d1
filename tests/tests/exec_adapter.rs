//! Journey: events are fed as JSON lines to a long-lived command. The command dies; it is
//! restarted with backoff, its stderr shows in pgpipe's log, and the event whose write
//! failed is written again to the new command.

use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_crashed_command_is_restarted_and_gets_the_failed_event_again() {
    let db = test_db("exec_restart").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mark = dir.path().join("started");
    // First run: close stdin (writes now fail), complain, die. Later runs: append lines.
    let command = format!(
        "if [ -f {m} ]; then cat >> {o}; else touch {m}; echo 'first run: giving up' >&2; \
         exec 0<&-; sleep 1; exit 3; fi",
        m = mark.display(),
        o = out.display()
    );
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("exec")
        .flag("--exec-command", &command)
        .env("PGPIPE_EXEC_BACKOFF_BASE", "100ms")
        .env("PGPIPE_EXEC_BACKOFF_CAP", "200ms")
        .spawn();
    fwd.wait_for_stderr("first run: giving up", WAIT).await;
    db.execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await;
    let read = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"]["row"]["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let done = wait_until(WAIT, async || read().len() >= 5).await;
    assert!(
        done,
        "all events reach the restarted command: {:?}\n{}",
        read(),
        fwd.stderr_text()
    );
    assert_eq!(read(), [1, 2, 3, 4, 5]);
    let log = fwd.stderr_text();
    assert!(log.contains("write to the command failed"), "{log}");
    assert!(log.contains("command exited"), "{log}");
    assert!(log.contains("exec"), "{log}");
}

fn row_ids(path: &std::path::Path) -> Vec<i64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"]["row"]["id"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_command_that_reads_ahead_and_exits_loses_nothing() {
    let db = test_db("exec_read_ahead").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    // awk reads a whole buffer from the pipe, handles 3 lines and exits: the lines it read
    // but never handled must reach the next command.
    let command = format!(
        "awk '{{ print; fflush() }} NR == 3 {{ exit }}' >> {}",
        out.display()
    );
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("exec")
        .flag("--exec-command", &command)
        .env("PGPIPE_EXEC_BACKOFF_BASE", "50ms")
        .env("PGPIPE_EXEC_BACKOFF_CAP", "100ms")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 12)")
        .await;
    let done = wait_until(WAIT, async || {
        let mut ids = row_ids(&out);
        ids.sort();
        ids.dedup();
        ids.len() == 12
    })
    .await;
    let ids = row_ids(&out);
    assert!(
        done,
        "every event handled by some command: {ids:?}\n{}",
        fwd.stderr_text()
    );
    let mut first_seen = Vec::new();
    for id in &ids {
        if !first_seen.contains(id) {
            first_seen.push(*id);
        }
    }
    assert_eq!(
        first_seen,
        (1..=12).collect::<Vec<_>>(),
        "in order, repeats allowed: {ids:?}"
    );
}

#[tokio::test]
async fn a_line_that_kills_every_command_is_dead_lettered() {
    let db = test_db("exec_poison").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let command = format!(
        "while read -r l; do case \"$l\" in *'\"row\":{{\"id\":4}}'*) exit 9;; esac; \
         echo \"$l\" >> {}; done",
        out.display()
    );
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("exec")
        .flag("--exec-command", &command)
        .env("PGPIPE_EXEC_BACKOFF_BASE", "50ms")
        .env("PGPIPE_EXEC_BACKOFF_CAP", "100ms")
        .env("PGPIPE_EXEC_MAX_ATTEMPTS", "3")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 6)")
        .await;
    let done = wait_until(WAIT, async || row_ids(&out).contains(&6)).await;
    assert!(done, "{:?}\n{}", row_ids(&out), fwd.stderr_text());
    let mut ids = row_ids(&out);
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids,
        [1, 2, 3, 5, 6],
        "all but the poison line (repeats allowed)"
    );
    let letter = db
        .query_one(
            "SELECT adapter, attempts, event->'payload'->'row'->>'id' FROM pgpipe.dead_letters",
            &[],
        )
        .await;
    assert_eq!(letter.get::<_, String>(0), "exec");
    assert_eq!(letter.get::<_, i32>(1), 3);
    assert_eq!(letter.get::<_, String>(2), "4");
}

#[tokio::test]
async fn a_command_that_cannot_run_holds_the_events_and_dead_letters_none() {
    let db = test_db("exec_not_found").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = db.url();
    // A typo in the command: sh exits 127 ("not found") every time, far more often than
    // exec.max_attempts.
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("exec")
        .flag("--exec-command", "no-such-pgpipe-command --json")
        .env("PGPIPE_EXEC_BACKOFF_BASE", "20ms")
        .env("PGPIPE_EXEC_BACKOFF_CAP", "50ms")
        .env("PGPIPE_EXEC_MAX_ATTEMPTS", "2")
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 3)")
        .await;
    let reason = "the command cannot run (sh exit status 127: command not found); fix \
                  exec.command (--exec-command); events wait and are not dead-lettered";
    let retried = wait_until(WAIT, async || {
        fwd.stderr_text().matches(reason).count() >= 6
    })
    .await;
    assert!(retried, "{}", fwd.stderr_text());
    assert!(
        fwd.stderr_text().contains("not found"),
        "sh's own message is logged"
    );
    let letters = db
        .query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(letters.get::<_, i64>(0), 0, "nothing is dead-lettered");
    let pending = db
        .query_one(
            "SELECT sum(pending_events)::int FROM pgpipe.consumer_lag",
            &[],
        )
        .await;
    assert_eq!(
        pending.get::<_, i32>(0),
        3,
        "the events wait unacknowledged"
    );
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());

    // The command fixed: the waiting events arrive.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("exec")
        .flag("--exec-command", format!("cat >> {}", out.display()))
        .spawn();
    let done = wait_until(WAIT, async || row_ids(&out).len() >= 3).await;
    assert!(done, "{:?}\n{}", row_ids(&out), fwd.stderr_text());
    assert_eq!(row_ids(&out), [1, 2, 3]);
}
