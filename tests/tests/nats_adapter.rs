//! Journey: events published to NATS JetStream by the nats adapter, against a real
//! `nats-server -js` of the test's own (TempNats), read back with async-nats.
//!
//! - happy path: the stream PGPIPE is created (subjects `pgpipe.>`), each event lands on
//!   `pgpipe.<channel>` with `Nats-Msg-Id` = the event id and the event JSON as body, and
//!   a durable pull consumer of a third-party client reads and acks them; the token never
//!   shows in the log;
//! - a user and password in the URL log in, and the log (at debug) shows them masked;
//! - TLS (`tls://`) with `nats.tls_ca_file`; without the CA the certificate is refused
//!   and the events wait;
//! - a subject template and an event over the server's `max_payload`: dead-lettered, the
//!   rest flows;
//! - `kill -9` of the forwarder three times under writes: the stream holds every
//!   committed row exactly once (JetStream dropped the redeliveries by `Nats-Msg-Id`);
//! - nats-server killed and restarted mid-stream: nothing lost, nothing twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use pgpipe_tests::{
    test_db, wait_until, Forwarder, HttpReceiver, Listen, NatsOptions, Reply, TempNats,
};

const WAIT: Duration = Duration::from_secs(30);

/// Fast retries and reconnects for the tests.
const FAST: [(&str, &str); 3] = [
    ("PGPIPE_NATS_BACKOFF_BASE", "100ms"),
    ("PGPIPE_NATS_BACKOFF_CAP", "500ms"),
    ("PGPIPE_NATS_ACK_TIMEOUT", "2s"),
];

fn listen(db_url: &str, nats: &TempNats) -> Listen {
    Forwarder::listen(db_url)
        .channel("t")
        .adapter("nats")
        .flag("--nats-url", nats.url())
        .envs(&FAST)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_on_pgpipe_channel_with_their_id_as_msg_id() {
    let token = "nats-t0ken-do-not-log";
    let nats = TempNats::start_with(NatsOptions {
        token: Some(token.into()),
        ..NatsOptions::default()
    })
    .await;
    let db = test_db("nats_happy").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, note text); SELECT pgpipe.subscribe('t');")
        .await;
    let fwd = listen(&db.url(), &nats)
        .env("PGPIPE_NATS_TOKEN", token)
        .spawn();
    db.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        .await;
    db.execute("UPDATE t SET note = 'bb' WHERE id = 2").await;
    db.execute("DELETE FROM t WHERE id = 3").await;

    let arrived = wait_until(WAIT, async || nats.stream_count("PGPIPE").await == 5).await;
    assert!(arrived, "5 events in PGPIPE\n{}", fwd.stderr_text());

    let js = nats.jetstream().await;
    let mut stream = js.get_stream("PGPIPE").await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, vec!["pgpipe.>".to_string()]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));

    let queued = db
        .query(
            "SELECT id::text, operation, payload->'row'->>'id' FROM pgpipe.events \
             WHERE channel = 't' ORDER BY id",
            &[],
        )
        .await;
    let messages = nats.stream_messages("PGPIPE").await;
    assert_eq!(messages.len(), queued.len());
    for (m, row) in messages.iter().zip(&queued) {
        let body = m.json();
        let id: String = row.get(0);
        assert_eq!(m.subject, "pgpipe.t");
        assert_eq!(m.header("Nats-Msg-Id"), Some(id.as_str()), "{m:?}");
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["channel"], "t");
        assert_eq!(body["operation"], row.get::<_, String>(1).as_str());
        assert_eq!(m.header("Pgpipe-Operation"), body["operation"].as_str());
        assert_eq!(m.header("Pgpipe-Channel"), Some("t"));
        assert_eq!(m.header("Content-Type"), Some("application/json"));
        assert_eq!(
            body["payload"]["row"]["id"].to_string(),
            row.get::<_, String>(2)
        );
        assert_eq!(body["source"], "trigger");
    }
    let ops: Vec<_> = messages
        .iter()
        .map(|m| m.json()["operation"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["INSERT", "INSERT", "INSERT", "UPDATE", "DELETE"]);

    // A consumer of its own, as a downstream service would read the stream.
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("downstream".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(5)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut read = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        let id = m
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .to_string();
        m.ack().await.unwrap();
        read.push(id);
    }
    let stored: Vec<_> = messages
        .iter()
        .map(|m| m.header("Nats-Msg-Id").unwrap().to_string())
        .collect();
    assert_eq!(
        read, stored,
        "the consumer reads the events in stream order"
    );

    // The stream is deleted under the running forwarder: the next event finds no stream
    // for its subject, which is retried (not dead-lettered) and the stream created again.
    js.delete_stream("PGPIPE").await.unwrap();
    db.execute("INSERT INTO t VALUES (4, 'd')").await;
    let again = wait_until(WAIT, async || nats.stream_count("PGPIPE").await == 1).await;
    assert!(again, "the stream is created again\n{}", fwd.stderr_text());
    let after = nats.stream_messages("PGPIPE").await;
    assert_eq!(after[0].json()["payload"]["row"]["id"].to_string(), "4");

    // The token is a secret: not in the log.
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
    assert!(!fwd.stderr_text().contains(token), "{}", fwd.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_password_in_the_url_log_in_and_stay_secret() {
    let password = "pw-in-the-url-s3cret";
    let nats = TempNats::start_with(NatsOptions {
        user: Some(("pgpipe".into(), password.into())),
        ..NatsOptions::default()
    })
    .await;
    let db = test_db("nats_userinfo").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = format!("nats://pgpipe:{password}@127.0.0.1:{}", nats.port());
    let fwd = Forwarder::listen(&db.url())
        .channel("t")
        .adapter("nats")
        .flag("--nats-url", url)
        .flag("--log-level", "debug")
        .envs(&FAST)
        .spawn();
    db.execute("INSERT INTO t VALUES (1)").await;
    let arrived = wait_until(WAIT, async || nats.stream_count("PGPIPE").await == 1).await;
    assert!(arrived, "1 event in PGPIPE\n{}", fwd.stderr_text());
    fwd.sigterm();
    fwd.wait_exit(WAIT).await;
    let log = fwd.stderr_text();
    assert!(!log.contains(password), "{log}");
    assert!(log.contains("nats://***@127.0.0.1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_ca_file_publishes_and_without_it_is_refused() {
    let nats = TempNats::start_with(NatsOptions {
        tls: true,
        ..NatsOptions::default()
    })
    .await;
    let db = test_db("nats_tls").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let tls_url = format!("tls://127.0.0.1:{}", nats.port());
    // Without the CA the server's certificate is not trusted: retried, named, nothing acked.
    let untrusted = Forwarder::listen(&db.url())
        .channel("t")
        .adapter("nats")
        .flag("--nats-url", &tls_url)
        .envs(&FAST)
        .spawn();
    db.execute("INSERT INTO t VALUES (1)").await;
    let log = untrusted.wait_for_stderr("retrying the batch", WAIT).await;
    assert!(log.contains("invalid peer certificate"), "{log}");
    untrusted.sigterm();
    untrusted.wait_exit(WAIT).await;
    let ca = nats.ca_cert_path();
    let fwd = Forwarder::listen(&db.url())
        .channel("t")
        .adapter("nats")
        .flag("--nats-url", &tls_url)
        .env("PGPIPE_NATS_TLS_CA_FILE", ca.to_str().unwrap())
        .envs(&FAST)
        .spawn();
    db.execute("INSERT INTO t VALUES (2)").await;
    let arrived = wait_until(WAIT, async || nats.stream_count("PGPIPE").await == 2).await;
    assert!(arrived, "both events over TLS\n{}", fwd.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_template_and_an_event_over_max_payload_is_dead_lettered() {
    let nats = TempNats::start_with(NatsOptions {
        config: vec!["max_payload: 2048".into()],
        ..NatsOptions::default()
    })
    .await;
    let db = test_db("nats_refused").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, note text); SELECT pgpipe.subscribe('t');")
        .await;
    let fwd = listen(&db.url(), &nats)
        .flag("--nats-subject", "cdc.{channel}.{operation}")
        .flag("--nats-stream", "CDC")
        .spawn();
    db.execute("INSERT INTO t VALUES (1, 'small')").await;
    db.execute("INSERT INTO t VALUES (2, repeat('x', 5000))")
        .await;
    db.execute("INSERT INTO t VALUES (3, 'small')").await;
    db.execute("UPDATE t SET note = 'smaller' WHERE id = 1")
        .await;

    let arrived = wait_until(WAIT, async || nats.stream_count("CDC").await == 3).await;
    assert!(arrived, "3 events in CDC\n{}", fwd.stderr_text());
    let messages = nats.stream_messages("CDC").await;
    let subjects: Vec<_> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["cdc.t.INSERT", "cdc.t.INSERT", "cdc.t.UPDATE"]);
    let rows: Vec<_> = messages
        .iter()
        .map(|m| m.json()["payload"]["row"]["id"].to_string())
        .collect();
    assert_eq!(rows, ["1", "3", "1"]);
    let mut info = nats.jetstream().await.get_stream("CDC").await.unwrap();
    assert_eq!(
        info.info().await.unwrap().config.subjects,
        vec!["cdc.>".to_string()]
    );

    let letters = wait_until(WAIT, async || {
        db.query_one("SELECT count(*) FROM pgpipe.dead_letters", &[])
            .await
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(
        letters,
        "the big event is dead-lettered\n{}",
        fwd.stderr_text()
    );
    let letter = db
        .query_one(
            "SELECT adapter, error, event->'payload'->'row'->>'id' FROM pgpipe.dead_letters",
            &[],
        )
        .await;
    assert_eq!(letter.get::<_, String>(0), "nats");
    let error: String = letter.get(1);
    assert!(error.contains("max_payload"), "{error}");
    assert!(error.contains("cdc.t.INSERT"), "{error}");
    assert_eq!(letter.get::<_, String>(2), "2");
}

/// Rows inserted by the writer, [`KILL_ROWS_PER_COMMIT`] per transaction.
const KILL_ROWS: i32 = 1500;
/// Rows per INSERT: the forwarder always has a batch in flight, so a kill often falls
/// between JetStream's acks and pgpipe's, and the next run redelivers.
const KILL_ROWS_PER_COMMIT: i32 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_forwarder_under_writes_stores_every_row_exactly_once() {
    let nats = TempNats::start().await;
    let db = test_db("nats_kill9").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let listen = listen(&db.url(), &nats)
        .flag("--max-in-flight", "200")
        .env("PGPIPE_NATS_MAX_PENDING", "50");

    // First a run whose acknowledgements are held back by a webhook that always fails:
    // everything it published to JetStream is unacknowledged in pgpipe when it is killed,
    // so the next run publishes all of it again, and JetStream must drop every one.
    let down = HttpReceiver::start(|_, _| Reply::status(503)).await;
    let held = listen
        .clone()
        .adapter("webhook")
        .flag("-u", down.url("/in"))
        .spawn();
    db.execute("INSERT INTO t SELECT generate_series(-50, -1)")
        .await;
    let published = wait_until(WAIT, async || nats.stream_count("PGPIPE").await == 50).await;
    assert!(published, "50 events published\n{}", held.stderr_text());
    held.kill9();
    held.wait_exit(WAIT).await;

    let writer_db = db.clone();
    let writes = tokio::spawn(async move {
        let client = writer_db.client().await;
        for from in (0..KILL_ROWS).step_by(KILL_ROWS_PER_COMMIT as usize) {
            let to = from + KILL_ROWS_PER_COMMIT - 1;
            client
                .execute(
                    "INSERT INTO t SELECT generate_series($1::int, $2::int)",
                    &[&from, &to],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let kills = 3;
    let mut logs = String::new();
    for round in 0..kills {
        let fwd = listen.clone().spawn();
        // Each run publishes some events (JetStream acks them) before it dies.
        let started = nats.stream_count("PGPIPE").await;
        let published = wait_until(Duration::from_secs(10), async || {
            nats.stream_count("PGPIPE").await > started + 20
        })
        .await;
        if !published {
            eprintln!("round {round}: fewer than 20 events published before the kill");
        }
        tokio::time::sleep(Duration::from_millis(30 + 55 * round)).await;
        fwd.kill9();
        fwd.wait_exit(WAIT).await;
        logs.push_str(&fwd.stderr_text());
    }
    writes.await.unwrap();
    let fwd = listen.clone().spawn();

    let committed: i64 = db.query_one("SELECT count(*) FROM t", &[]).await.get(0);
    assert_eq!(committed, i64::from(KILL_ROWS) + 50);
    let all = wait_until(Duration::from_secs(60), async || {
        nats.stream_count("PGPIPE").await >= committed as u64
    })
    .await;
    // Give a late duplicate time to show (there must be none).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = nats.stream_messages("PGPIPE").await;
    logs.push_str(&fwd.stderr_text());
    assert!(
        all,
        "{} of {committed} rows in the stream\n{logs}",
        messages.len()
    );
    let ids: HashSet<&str> = messages
        .iter()
        .map(|m| m.header("Nats-Msg-Id").unwrap())
        .collect();
    let mut rows: HashMap<i64, usize> = HashMap::new();
    for m in &messages {
        let body = m.json();
        assert_eq!(m.header("Nats-Msg-Id"), body["id"].as_str());
        *rows
            .entry(body["payload"]["row"]["id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(ids.len() as i64, committed, "unique ids = committed rows");
    assert_eq!(messages.len(), ids.len(), "total messages = unique ids");
    assert_eq!(rows.len() as i64, committed, "every row once");
    assert!(rows.values().all(|n| *n == 1), "no row twice");
    let deduplicated = logs.matches("deduplicated by Nats-Msg-Id").count();
    assert!(
        deduplicated >= 1,
        "the held-back run's 50 events were published again and dropped\n{logs}"
    );
    let dropped: usize = logs
        .split("duplicates=")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(dropped >= 50, "{dropped} redeliveries dropped\n{logs}");
    eprintln!(
        "{committed} rows committed, {} messages in PGPIPE, {} unique ids, {} kills, \
         {dropped} redelivered events dropped by JetStream in {deduplicated} batches",
        messages.len(),
        ids.len(),
        kills + 1
    );
}

const RESTART_ROWS: i32 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_stream_loses_nothing() {
    let nats = TempNats::start().await;
    let db = test_db("nats_restart").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let fwd = listen(&db.url(), &nats).spawn();

    let writer_db = db.clone();
    let writes = tokio::spawn(async move {
        let client = writer_db.client().await;
        for i in 0..RESTART_ROWS {
            client
                .execute("INSERT INTO t VALUES ($1)", &[&i])
                .await
                .unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    });
    let some = wait_until(WAIT, async || nats.stream_count("PGPIPE").await >= 50).await;
    assert!(
        some,
        "events flow before the restart\n{}",
        fwd.stderr_text()
    );
    // A crash of the server, and writes going on while it is down.
    nats.kill9().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.start_again().await;
    writes.await.unwrap();

    let all = wait_until(Duration::from_secs(60), async || {
        nats.stream_count("PGPIPE").await >= RESTART_ROWS as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = nats.stream_messages("PGPIPE").await;
    assert!(
        all,
        "{} of {RESTART_ROWS} rows in the stream\n{}",
        messages.len(),
        fwd.stderr_text()
    );
    let mut rows: HashMap<i64, usize> = HashMap::new();
    for m in &messages {
        *rows
            .entry(m.json()["payload"]["row"]["id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(rows.len(), RESTART_ROWS as usize, "every row");
    assert_eq!(messages.len(), RESTART_ROWS as usize, "each once");
    let log = fwd.stderr_text();
    assert!(log.contains("disconnected from NATS"), "{log}");
    eprintln!(
        "{RESTART_ROWS} rows, {} messages after a nats-server kill -9 and restart",
        messages.len()
    );
}
