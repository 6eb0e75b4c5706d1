//! Journey: one forwarder writes the same changes in three formats — CloudEvents in
//! structured mode to one webhook, CloudEvents in binary mode to another and to NATS
//! JetStream, Debezium change events to a file — and each is read back by what a user of
//! that format would use: the official CloudEvents SDK (`cloudevents-sdk`) parses the
//! CloudEvents, Debezium's `before`/`after`/`op` rebuild the table. A format an adapter
//! cannot send (binary mode with batches) is refused at start, naming the key and the fix.

use std::collections::BTreeMap;
use std::time::Duration;

use cloudevents::{AttributesReader, Data};
use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply, Request, TempNats};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn header_map<'a>(headers: impl IntoIterator<Item = (&'a String, &'a String)>) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

fn data_json(event: &cloudevents::Event) -> Value {
    match event.data() {
        Some(Data::Json(v)) => v.clone(),
        Some(Data::Binary(b)) => serde_json::from_slice(b).unwrap(),
        Some(Data::String(s)) => serde_json::from_str(s).unwrap(),
        None => Value::Null,
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// A queued event: id, operation, payload, key.
type Queued = (String, String, Value, Value);

/// What every CloudEvent of the journey must say about queue event `queued`.
fn check_cloudevent(ce: &cloudevents::Event, queued: &Queued, db_name: &str) {
    let (id, operation, payload, key) = queued;
    assert_eq!(ce.id(), id);
    assert_eq!(ce.ty(), format!("dev.pgpipe.{}", operation.to_lowercase()));
    assert!(
        ce.source().ends_with(&format!("/{db_name}")) && ce.source().starts_with("postgres://"),
        "source names the database: {}",
        ce.source()
    );
    assert!(
        !ce.source().contains("pgpipe_forwarder@"),
        "no user name in the source"
    );
    assert_eq!(ce.subject(), Some("public.orders"));
    assert!(ce.time().is_some());
    assert_eq!(
        ce.extension("pgpipechannel").map(|e| e.to_string()),
        Some("orders".to_string())
    );
    assert_eq!(&data_json(ce), payload, "data is the payload");
    // The Partitioning extension carries the ordering key. In binary mode the value is
    // percent-encoded as the HTTP binding asks (`"` is %22); cloudevents-sdk 0.9 hands
    // header values over without decoding them, so the test decodes.
    let partitionkey = ce.extension("partitionkey").map(|e| e.to_string());
    let partitionkey = percent_decode(&partitionkey.expect("partitionkey"));
    let partitionkey: Value = serde_json::from_str(&partitionkey).unwrap();
    assert_eq!(&partitionkey, key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_and_debezium_read_back_by_their_own_tools() {
    let db = test_db("output_formats").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric); \
         SELECT pgpipe.subscribe('orders');",
    )
    .await;
    let receiver = HttpReceiver::start(|_, _| Reply::status(204)).await;
    let nats = TempNats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let debezium_file = dir.path().join("orders.debezium.jsonl");
    let config = dir.path().join("pgpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "channels: [orders]\nadapters: []\n\
             webhooks:\n\
             - {{name: structured, url: '{}', format: cloudevents}}\n\
             - {{name: binary, url: '{}', format: cloudevents_binary}}\n\
             natss:\n- {{name: ce, url: '{}', format: cloudevents_binary}}\n\
             files:\n- {{name: dbz, path: '{}', format: debezium}}\n",
            receiver.url("/structured"),
            receiver.url("/binary"),
            nats.url(),
            debezium_file.display()
        ),
    )
    .unwrap();
    let fwd = Forwarder::spawn(
        &[
            "--config",
            config.to_str().unwrap(),
            "listen",
            "--db",
            &db.url(),
        ],
        &[],
    );
    db.execute("INSERT INTO orders VALUES (1, 'new', 10.5), (2, 'new', 3)")
        .await;
    db.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        .await;
    db.execute("DELETE FROM orders WHERE id = 2").await;

    let by_path = |path: &str| -> Vec<Request> {
        receiver
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    };
    let all_arrived = wait_until(WAIT, async || {
        by_path("/structured").len() >= 4
            && by_path("/binary").len() >= 4
            && nats.stream_count("PGPIPE").await >= 4
            && std::fs::read_to_string(&debezium_file).is_ok_and(|t| t.lines().count() >= 4)
    })
    .await;
    assert!(
        all_arrived,
        "every adapter got 4 events\n{}",
        fwd.stderr_text()
    );

    let queued: Vec<Queued> = db
        .query(
            "SELECT id::text, operation, payload, key FROM pgpipe.events WHERE channel = 'orders' ORDER BY id",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(queued.len(), 4);

    // Structured mode: the whole CloudEvent is the body, parsed by the SDK's serde.
    // Webhooks deliver keys in parallel (per-key order only): match events by id.
    let queued_by_id = |id: &str| -> &Queued {
        queued
            .iter()
            .find(|q| q.0 == id)
            .unwrap_or_else(|| panic!("{id} is queued"))
    };
    assert_eq!(by_path("/structured").len(), 4);
    assert_eq!(by_path("/binary").len(), 4);
    for req in by_path("/structured") {
        assert_eq!(
            req.header("content-type"),
            Some("application/cloudevents+json")
        );
        let ce: cloudevents::Event = serde_json::from_slice(&req.body)
            .unwrap_or_else(|e| panic!("the SDK parses a structured CloudEvent: {e}: {req:?}"));
        check_cloudevent(&ce, queued_by_id(ce.id()), db.name());
    }
    // Binary mode: attributes in ce-* headers, parsed by the SDK's HTTP binding.
    for req in by_path("/binary") {
        assert_eq!(req.header("content-type"), Some("application/json"));
        let headers = header_map(req.headers.iter().map(|(k, v)| (k, v)));
        let ce = cloudevents::binding::http::to_event(&headers, req.body.clone())
            .unwrap_or_else(|e| panic!("the SDK parses a binary CloudEvent: {e}: {req:?}"));
        check_cloudevent(&ce, queued_by_id(ce.id()), db.name());
    }
    // NATS binary mode uses the same `ce-` headers (NATS protocol binding), so the SDK's
    // header mapping reads them too; JetStream still deduplicates on Nats-Msg-Id.
    let messages = nats.stream_messages("PGPIPE").await;
    assert_eq!(messages.len(), 4);
    for (m, q) in messages.iter().zip(&queued) {
        assert_eq!(m.header("Nats-Msg-Id"), Some(q.0.as_str()));
        let ce_headers: BTreeMap<String, String> = m
            .headers
            .iter()
            .filter(|(k, _)| {
                k.to_ascii_lowercase().starts_with("ce-") || k.eq_ignore_ascii_case("content-type")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let ce = cloudevents::binding::http::to_event(&header_map(&ce_headers), m.payload.clone())
            .unwrap_or_else(|e| panic!("the SDK parses the NATS message's CloudEvent: {e}: {m:?}"));
        check_cloudevent(&ce, q, db.name());
    }

    // Debezium: applying before/after by op rebuilds the table.
    let lines = std::fs::read_to_string(&debezium_file).unwrap();
    let changes: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<&str> = changes.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "c", "u", "d"]);
    let mut table: BTreeMap<i64, Value> = BTreeMap::new();
    for (change, q) in changes.iter().zip(&queued) {
        assert_eq!(change["source"]["connector"], "postgresql");
        assert_eq!(change["source"]["db"], db.name());
        assert_eq!(change["source"]["table"], "orders");
        assert_eq!(change["source"]["pgpipe_id"], q.0.as_str());
        assert!(change["ts_ms"].as_i64().unwrap() > 0);
        match change["op"].as_str().unwrap() {
            "c" | "u" => {
                let after = &change["after"];
                table.insert(after["id"].as_i64().unwrap(), after.clone());
            }
            "d" => {
                table.remove(&change["before"]["id"].as_i64().unwrap());
                assert!(change["after"].is_null());
            }
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(changes[2]["before"]["status"], "new");
    let rebuilt: Vec<Value> = table.into_values().collect();
    assert_eq!(
        rebuilt,
        vec![json!({"id": 1, "status": "paid", "total": 10.5})]
    );
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success(), "{}", fwd.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_with_batches_is_refused_at_start() {
    let db = test_db("output_formats_refused").await;
    let fwd = Forwarder::listen(&db.url())
        .channel("orders")
        .adapter("webhook")
        .flag("-u", "http://127.0.0.1:9/hook")
        .env("PGPIPE_WEBHOOK_FORMAT", "cloudevents_binary")
        .env("PGPIPE_WEBHOOK_BATCH_SIZE", "10")
        .spawn();
    let status = fwd.wait_exit(WAIT).await;
    assert!(!status.success());
    let err = fwd.stderr_text();
    assert!(
        err.contains("webhook.format: cloudevents_binary carries one event per request")
            && err.contains("batch_size: 1"),
        "{err}"
    );
    let fwd = Forwarder::listen(&db.url())
        .channel("orders")
        .env("PGPIPE_WEBHOOK_FORMAT", "protobuf")
        .spawn();
    assert!(!fwd.wait_exit(WAIT).await.success());
    let err = fwd.stderr_text();
    assert!(
        err.contains("webhook.format") && err.contains("cloudevents"),
        "{err}"
    );
}
