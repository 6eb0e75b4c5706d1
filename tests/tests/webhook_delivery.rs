//! Journey: events are POSTed to a webhook, signed so that a Standard Webhooks library
//! (the `standardwebhooks` crate, not ours) verifies them, in order, with the event id as
//! idempotency key. A 503 is retried (honouring Retry-After) until it succeeds; a 400 is
//! not retried: the event goes to `pgpipe.dead_letters` at once, the rest keep flowing,
//! and `pgpipe dlq replay`, with `listen`'s own flags, delivers it signed once the
//! endpoint accepts it. A misconfigured receiver (401, 403, 404) is retried past the
//! attempt budget and dead-letters nothing.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply, Request};

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn verify(req: &Request) {
    let mut headers = http::HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    standardwebhooks::Webhook::new(KEY)
        .unwrap()
        .verify(&req.body, &headers)
        .unwrap_or_else(|e| panic!("signature rejected: {e:?}: {req:?}"));
}

fn pgpipe(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(Forwarder::binary_path())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run pgpipe");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_ordered_retried_and_dead_lettered() {
    let db = test_db("webhook_delivery").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, reject bool NOT NULL DEFAULT false); SELECT pgpipe.subscribe('t');")
        .await;
    let accept_all = Arc::new(AtomicBool::new(false));
    let accept = accept_all.clone();
    let receiver = HttpReceiver::start(move |req, n| {
        if accept.load(Ordering::SeqCst) {
            return Reply::status(200);
        }
        if req.json()["payload"]["row"]["reject"] == true {
            return Reply::status(400);
        }
        // The second request (event 2's first attempt) is turned away once.
        if n == 1 {
            return Reply::status(503).header("Retry-After", "1");
        }
        Reply::status(204)
    })
    .await;
    let url = db.url();
    let hook = receiver.url("/hook");
    // One lane per channel: this journey checks the order across rows (keys).
    let env = [
        ("PGPIPE_WEBHOOK_ORDERING", "channel"),
        ("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms"),
        ("PGPIPE_WEBHOOK_BACKOFF_CAP", "200ms"),
    ];
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--signing-key", KEY)
        .flag("--retries", "3")
        .envs(&env)
        .spawn();
    for i in 1..=3 {
        db.execute(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    db.execute("INSERT INTO t VALUES (4, true)").await;
    db.execute("INSERT INTO t VALUES (5)").await;

    let delivered = wait_until(WAIT, async || {
        receiver
            .requests()
            .iter()
            .filter(|r| r.json()["payload"]["row"]["id"] == 5)
            .count()
            == 1
    })
    .await;
    assert!(
        delivered,
        "event 5 arrived: {:?}",
        receiver.requests().len()
    );
    let requests = receiver.requests();
    // 1, 2 (503), 2 again after Retry-After, 3, 4 (400), 5: in order, one attempt for 4.
    let rows: Vec<i64> = requests
        .iter()
        .map(|r| r.json()["payload"]["row"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, [1, 2, 2, 3, 4, 5], "order and retries");
    for req in &requests {
        verify(req);
        let id = req.json()["id"].as_str().unwrap().to_string();
        assert_eq!(req.method, "POST");
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert!(req.header("user-agent").unwrap().starts_with("pgpipe/"));
        assert_eq!(req.header("idempotency-key"), Some(id.as_str()));
        assert_eq!(req.header("x-pgpipe-event-id"), Some(id.as_str()));
        assert_eq!(req.header("webhook-id"), Some(id.as_str()));
        assert_eq!(req.header("x-pgpipe-channel"), Some("t"));
        let sig = req.header("x-pgpipe-signature").unwrap();
        assert!(sig.starts_with("sha256=") && sig.len() == 71, "{sig}");
    }
    assert_eq!(
        requests[1].header("idempotency-key"),
        requests[2].header("idempotency-key")
    );

    let letters = db
        .query("SELECT adapter, error, attempts, event->'payload'->'row'->>'id' FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].get::<_, String>(0), "webhook");
    assert!(
        letters[0].get::<_, String>(1).contains("HTTP 400"),
        "{}",
        letters[0].get::<_, String>(1)
    );
    assert_eq!(letters[0].get::<_, i32>(2), 1, "a 400 is not retried");
    assert_eq!(letters[0].get::<_, String>(3), "4");

    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());

    let (code, out, err) = pgpipe(&["dlq", "list", "--db", &db.admin_url()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ID") && out.contains("webhook") && out.contains("HTTP 400"),
        "{out}"
    );

    // The endpoint is fixed: replay, given the very flags `listen` had (no env, no config
    // file), delivers the dead letter signed as `listen` signs, and removes it.
    accept_all.store(true, Ordering::SeqCst);
    let (code, out, err) = pgpipe(
        &[
            "dlq",
            "replay",
            "--db",
            &db.admin_url(),
            "-u",
            &hook,
            "--signing-key",
            KEY,
            "--retries",
            "3",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("webhook: 1 delivered"), "{out}");
    let last = receiver.requests().pop().unwrap();
    verify(&last);
    let sig = last.header("x-pgpipe-signature").unwrap_or_default();
    assert!(sig.starts_with("sha256=") && sig.len() == 71, "{sig}");
    assert_eq!(last.json()["payload"]["row"]["id"], 4);
    let (_, out, _) = pgpipe(&["dlq", "list", "--db", &db.admin_url()], &[]);
    assert_eq!(out, "no dead letters\n");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_named_and_dead_lettered_after_the_retries() {
    let db = test_db("webhook_unreachable").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hook = format!("http://127.0.0.1:{port}/hook");
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--retries", "2")
        .env("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_CAP", "100ms")
        .spawn();
    db.execute("INSERT INTO t VALUES (1)").await;
    fwd.wait_for_stderr("endpoint unreachable", WAIT).await;
    let letters = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
            .await
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(
        letters,
        "dead-lettered after 2 attempts: {}",
        fwd.stderr_text()
    );
    let row = db
        .query_one("SELECT error, attempts FROM pgpipe.dead_letters", &[])
        .await;
    let error: String = row.get(0);
    assert!(
        error.contains(&format!("POST {hook}: endpoint unreachable")),
        "{error}"
    );
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    assert_eq!(row.get::<_, i32>(1), 2);

    let (code, out, _) = pgpipe(&["dlq", "list", "--db", &db.admin_url(), "--json"], &[]);
    assert_eq!(code, 0);
    let letter: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(letter["adapter"], "webhook");
    assert_eq!(letter["event"]["payload"]["row"]["id"], 1);
    let (_, out, _) = pgpipe(
        &[
            "dlq",
            "purge",
            "--db",
            &db.admin_url(),
            "--older-than",
            "1h",
        ],
        &[],
    );
    assert_eq!(out, "purged 0 dead letter(s)\n");
    let (_, out, _) = pgpipe(
        &[
            "dlq",
            "purge",
            "--db",
            &db.admin_url(),
            "--adapter",
            "webhook",
        ],
        &[],
    );
    assert_eq!(out, "purged 1 dead letter(s)\n");
}

#[tokio::test]
async fn several_adapters_of_a_kind_from_the_config_file_each_deliver_everything() {
    let db = test_db("webhook_listed").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let main = HttpReceiver::start(|_, _| Reply::status(200)).await;
    let batched = HttpReceiver::start(|_, _| Reply::status(200)).await;
    let refusing = HttpReceiver::start(|_, _| Reply::status(410)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "channels: [t]\nadapters: [webhook]\nwebhook:\n  url: {}\n\
             webhooks:\n  - name: bulk\n    url: {}\n    batch_size: 50\n\
             \x20 - name: gone\n    url: {}\n\
             files:\n  - name: copy\n    path: {}\n",
            main.url("/main"),
            batched.url("/bulk"),
            refusing.url("/gone"),
            dir.path().join("copy.jsonl").display()
        ),
    )
    .unwrap();
    let url = db.url();
    let _fwd = Forwarder::spawn(
        &["--config", config.to_str().unwrap(), "listen", "--db", &url],
        &[],
    );
    db.execute("INSERT INTO t SELECT generate_series(1, 10)")
        .await;
    let done = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
            .await
            .get::<_, i64>(0)
            == 10
            && main.requests().len() == 10
    })
    .await;
    assert!(done, "main: {}", main.requests().len());
    // The batched entry gets JSON arrays holding all ten events, in order.
    let rows: Vec<i64> = batched
        .requests()
        .iter()
        .flat_map(|r| r.json().as_array().unwrap().clone())
        .map(|e| e["payload"]["row"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, (1..=10).collect::<Vec<_>>());
    assert!(batched.requests()[0]
        .header("x-pgpipe-batch-size")
        .is_some());
    let adapters = db
        .query("SELECT DISTINCT adapter FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(adapters.len(), 1);
    assert_eq!(adapters[0].get::<_, String>(0), "webhook:gone");
    let copied = std::fs::read_to_string(dir.path().join("copy.jsonl")).unwrap();
    assert_eq!(
        copied.lines().count(),
        10,
        "the listed file adapter got every event"
    );
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_and_is_dead_lettered() {
    let db = test_db("webhook_hanging").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let receiver =
        HttpReceiver::start(|_, _| Reply::status(200).delayed(Duration::from_secs(30))).await;
    let hook = receiver.url("/hang");
    let url = db.url();
    let _fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--retries", "2")
        .env("PGPIPE_WEBHOOK_TIMEOUT", "300ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_CAP", "100ms")
        .spawn();
    db.execute("INSERT INTO t VALUES (1)").await;
    let letters = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
            .await
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(letters, "dead-lettered after two timeouts");
    let error: String = db
        .query_one("SELECT error FROM pgpipe.dead_letters", &[])
        .await
        .get(0);
    assert!(error.contains("no answer within 300ms"), "{error}");
    assert_eq!(receiver.requests().len(), 2);
}

#[tokio::test]
async fn without_the_extension_a_rejected_event_is_held_not_dropped() {
    let db = pgpipe_tests::TempPg::shared()
        .database_without_extension("webhook_no_ext")
        .await;
    let receiver = HttpReceiver::start(|_, _| Reply::status(400)).await;
    let hook = receiver.url("/in");
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("plain")
        .adapter("webhook")
        .flag("-u", &hook)
        .env("PGPIPE_WEBHOOK_BACKOFF_CAP", "100ms")
        .env("PGPIPE_WEBHOOK_BACKOFF_BASE", "50ms")
        .spawn();
    fwd.wait_for_stderr("detector chosen automatically", WAIT)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.execute("SELECT pg_notify('plain', '{\"op\": \"PING\"}')")
        .await;
    let log = fwd
        .wait_for_stderr("pgpipe.dead_letters does not exist", WAIT)
        .await;
    assert!(log.contains("CREATE EXTENSION pgpipe"), "{log}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1, "a 400 is not retried");
    assert!(
        fwd.try_exit_status().is_none(),
        "the forwarder keeps running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_receiver_dead_letters_nothing_and_gets_everything_once_fixed() {
    let db = test_db("webhook_misconfigured").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    // A wrong secret (401), then a wrong path (404) and a missing grant (403), for well
    // over --retries attempts each; then the operator fixes it.
    let receiver = HttpReceiver::start(|_, n| match n {
        0..=5 => Reply::status(401),
        6..=9 => Reply::status(404),
        10..=13 => Reply::status(403),
        _ => Reply::status(200),
    })
    .await;
    let url = db.url();
    let hook = receiver.url("/hook");
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .adapter("webhook")
        .flag("-u", &hook)
        .flag("--retries", "2")
        .envs(&[
            ("PGPIPE_WEBHOOK_ORDERING", "channel"),
            ("PGPIPE_WEBHOOK_BACKOFF_BASE", "20ms"),
            ("PGPIPE_WEBHOOK_BACKOFF_CAP", "50ms"),
        ])
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await;
    let delivered = || {
        receiver
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.json()["payload"]["row"]["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let all = wait_until(WAIT, async || delivered().len() == 5).await;
    assert!(all, "delivered {:?}\n{}", delivered(), fwd.stderr_text());
    assert_eq!(delivered(), [1, 2, 3, 4, 5], "in order, once each");
    let letters = db
        .query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
        .await;
    assert_eq!(
        letters.get::<_, i64>(0),
        0,
        "a misconfiguration is no verdict on the events"
    );
    let log = fwd.stderr_text();
    assert!(
        log.contains("check webhook.url"),
        "the 404 names the key to check"
    );
    assert!(log.contains("credentials"), "the 401 names what to check");
}
