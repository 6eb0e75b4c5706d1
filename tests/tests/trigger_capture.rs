//! Journey: a user subscribes a table and watches every kind of change arrive on the
//! forwarder's stdout, in the documented envelope; bad input to the SQL API is refused
//! with an error that names the problem.

use std::time::Duration;

use pgpipe_tests::{describe, test_db, Forwarder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn envelope_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schema/event.schema.json"
    ))
    .expect("schema/event.schema.json");
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("a valid JSON Schema")
}

#[tokio::test]
async fn every_operation_arrives_in_the_envelope() {
    let db = test_db("capture").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric(10,2), paid bool, meta jsonb, tags text[]);
         SELECT pgpipe.subscribe('orders');
         CREATE TABLE notes (body text);
         SELECT pgpipe.subscribe('notes');",
    )
    .await;
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("orders")
        .channel("billing")
        .channel("notes")
        .spawn();

    db.execute(
        r#"INSERT INTO orders VALUES (1, 'new', 10.50, false, '{"k": "v"}', '{a,b}');
           UPDATE orders SET status = 'paid', paid = true WHERE id = 1;
           DELETE FROM orders WHERE id = 1;
           TRUNCATE orders;
           SELECT pgpipe.emit('billing', '{"invoice": 7}', 'INVOICED', '{"invoice_id": 7}');
           SELECT pgpipe.emit('billing', '{"note": 1}');
           INSERT INTO notes VALUES ('no primary key');"#,
    )
    .await;
    let events = fwd.wait_for_events(7, WAIT).await;
    assert_eq!(events.len(), 7, "exactly the seven changes: {events:#?}");

    let schema = envelope_schema();
    for event in &events {
        if let Err(e) = schema.validate(event) {
            panic!("event does not match schema/event.schema.json: {e}\n{event:#}");
        }
        let id: uuid::Uuid = event["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(id.get_version_num(), 7, "UUIDv7: {id}");
        chrono::DateTime::parse_from_rfc3339(event["created_at"].as_str().unwrap()).unwrap();
        assert!(event["transaction"]["xid"].as_u64().unwrap() > 0);
    }
    // One transaction, so one xid, and ids in capture order.
    let xids: Vec<&Value> = events.iter().map(|e| &e["transaction"]["xid"]).collect();
    assert!(xids.windows(2).all(|w| w[0] == w[1]), "{xids:?}");
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");

    // Parsed from text so that numeric 10.50 keeps its scale, as pgpipe delivers it.
    let row: Value = serde_json::from_str(
        r#"{"id": 1, "status": "new", "total": 10.50, "paid": false, "meta": {"k": "v"}, "tags": ["a", "b"]}"#,
    )
    .unwrap();
    let mut paid = row.clone();
    paid["status"] = json!("paid");
    paid["paid"] = json!(true);
    let key = json!({"id": 1});
    let expect = [
        (
            "orders",
            "INSERT",
            "trigger",
            json!({"op": "INSERT", "schema": "public", "table": "orders", "row": row, "old": null}),
            key.clone(),
        ),
        (
            "orders",
            "UPDATE",
            "trigger",
            json!({"op": "UPDATE", "schema": "public", "table": "orders", "row": paid, "old": row}),
            key.clone(),
        ),
        (
            "orders",
            "DELETE",
            "trigger",
            json!({"op": "DELETE", "schema": "public", "table": "orders", "row": paid, "old": null}),
            key,
        ),
        (
            "orders",
            "TRUNCATE",
            "trigger",
            json!({"op": "TRUNCATE", "schema": "public", "table": "orders", "row": null, "old": null}),
            Value::Null,
        ),
        (
            "billing",
            "INVOICED",
            "emit",
            json!({"invoice": 7}),
            json!({"invoice_id": 7}),
        ),
        ("billing", "EMIT", "emit", json!({"note": 1}), Value::Null),
        (
            "notes",
            "INSERT",
            "trigger",
            json!({"op": "INSERT", "schema": "public", "table": "notes", "row": {"body": "no primary key"}, "old": null}),
            Value::Null,
        ),
    ];
    for (event, (channel, operation, source, payload, key)) in events.iter().zip(expect) {
        assert_eq!(event["channel"], channel, "{event:#}");
        assert_eq!(event["operation"], operation, "{event:#}");
        assert_eq!(event["source"], source, "{event:#}");
        assert_eq!(event["payload"], payload, "{event:#}");
        // Always present: null when there is no key.
        assert_eq!(event.get("key"), Some(&key), "{event:#}");
    }
    // Numbers stay numbers in the JSON text itself, not only after parsing.
    let line = &fwd.stdout_lines()[0];
    assert!(line.contains(r#""total":10.50"#), "{line}");
}

#[tokio::test]
async fn bad_input_is_refused_with_the_problem_named() {
    let db = test_db("bad_input").await;
    db.execute(
        "CREATE TABLE items (id int PRIMARY KEY); CREATE VIEW items_view AS SELECT * FROM items;",
    )
    .await;
    let client = db.client().await;
    let cases = [
        (
            "SELECT pgpipe.subscribe('no_such_table')",
            "relation \"no_such_table\" does not exist",
        ),
        (
            "SELECT pgpipe.subscribe('items_view')",
            "items_view is not a table",
        ),
        (
            "SELECT pgpipe.subscribe('items', operations => ARRAY['INSERT', 'MERGE'])",
            "unknown operation 'MERGE'",
        ),
        (
            "SELECT pgpipe.subscribe('items', 'has space')",
            "invalid channel name 'has space'",
        ),
        (
            "SELECT pgpipe.subscribe('items', mode => 'logical')",
            "unknown mode 'logical'",
        ),
        ("SELECT pgpipe.emit('', '{}')", "invalid channel name ''"),
        (
            "SELECT pgpipe.emit('x', '{}', key => '[1]')",
            "key must be a JSON object or NULL, not a JSON array",
        ),
        (
            "SELECT * FROM pgpipe.read('nobody')",
            "consumer 'nobody' does not exist",
        ),
        (
            "SELECT pgpipe.register_consumer('c'); SELECT pgpipe.ack('c', '1:1:/x/y')",
            "invalid position",
        ),
    ];
    for (sql, expected) in cases {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let message = describe(&err);
        assert!(
            message.contains(expected),
            "{sql}: expected {expected:?} in {message:?}"
        );
    }

    // Subscribing twice is idempotent: one subscription, one trigger, the new options win.
    client
        .batch_execute(
            "SELECT pgpipe.subscribe('items'); SELECT pgpipe.subscribe('items', 'stock');",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgpipe.subscriptions), (SELECT channel FROM pgpipe.subscriptions),
                    (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass AND tgname = 'pgpipe_capture')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            row.get::<_, i64>(2)
        ),
        (1, "stock".into(), 1)
    );
}
