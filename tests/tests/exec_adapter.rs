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
    let fwd = Forwarder::spawn(
        &[
            "listen",
            "--db",
            &url,
            "-c",
            "t",
            "-a",
            "exec",
            "--exec-command",
            &command,
        ],
        &[
            ("PGPIPE_EXEC_BACKOFF_BASE", "100ms"),
            ("PGPIPE_EXEC_BACKOFF_CAP", "200ms"),
        ],
    );
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
