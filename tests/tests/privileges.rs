//! Journey: an owner captures tables into pgpipe and a forwarder's role with only the
//! documented grant (`pgpipe_consumer` and SELECT on the tables it streams) delivers them;
//! an attacker — a login role that owns only its own schema, even when it holds the
//! consumer and producer roles — can read nothing it may not SELECT, sabotage no one
//! else's consumer, forge no events and hold no retention silently. Every refusal names
//! what is missing and the grant that fixes it.

use std::time::Duration;

use pgpipe_tests::{describe, test_db, wait_until, Forwarder, TestDb};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(15);

/// Runs `sql` and expects SQLSTATE `code` with every one of `words` in the message, detail
/// or hint (the refusal says what is missing and what fixes it).
async fn refused(client: &Client, sql: &str, code: &str, words: &[&str]) {
    let error = match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql}\n-> succeeded; it must be refused"),
        Err(e) => e,
    };
    let text = describe(&error);
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}\n-> not a server error: {text}"));
    assert_eq!(db.code().code(), code, "{sql}\n-> {text}");
    for word in words {
        assert!(
            text.contains(word),
            "{sql}\n-> {text}\nshould mention {word:?}"
        );
    }
}

async fn ok(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

/// Roles are cluster-wide and the cluster is shared by the tests: names carry the
/// database's so that tests never meet.
fn role(db: &TestDb, name: &str) -> String {
    format!("{name}_{}", db.name())
}

async fn setup(db: &TestDb) -> (String, String, String) {
    let fwd = role(db, "fwd");
    let mallory = role(db, "mallory");
    let nobody = role(db, "nobody");
    db.execute(&format!(
        "CREATE TABLE secrets (id int PRIMARY KEY, card text);
         CREATE TABLE orders (id int PRIMARY KEY, total int);
         SELECT pgpipe.subscribe('secrets');
         SELECT pgpipe.subscribe('orders');
         CREATE ROLE \"{fwd}\" LOGIN;
         GRANT pgpipe_consumer TO \"{fwd}\";
         GRANT SELECT ON orders TO \"{fwd}\";
         CREATE ROLE \"{mallory}\" LOGIN;
         CREATE SCHEMA mallory AUTHORIZATION \"{mallory}\";
         GRANT pgpipe_consumer, pgpipe_producer TO \"{mallory}\";
         CREATE ROLE \"{nobody}\" LOGIN;"
    ))
    .await;
    (fwd, mallory, nobody)
}

#[tokio::test]
async fn a_least_privilege_forwarder_delivers_and_an_attacker_is_refused() {
    let db = test_db("privileges").await;
    let (fwd, mallory, nobody) = setup(&db).await;

    // Happy path: the forwarder runs as the consumer role with SELECT on orders only.
    let forwarder = Forwarder::spawn(
        &[
            "listen",
            "--db",
            &db.url_as(&fwd),
            "-c",
            "orders",
            "--consumer",
            "shop",
        ],
        &[],
    );
    db.execute("INSERT INTO orders VALUES (1, 10); INSERT INTO secrets VALUES (1, '4111')")
        .await;
    let events = forwarder.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["channel"], "orders", "{events:#?}");
    assert_eq!(events[0]["payload"]["row"]["total"], 10);
    assert!(
        wait_until(WAIT, async || {
            db.query_one(
                "SELECT acked_at IS NOT NULL FROM pgpipe.consumers WHERE name = 'shop'",
                &[],
            )
            .await
            .get::<_, bool>(0)
        })
        .await,
        "the forwarder's role acknowledges its consumer"
    );
    let owner: String = db
        .query_one(
            "SELECT owner::regrole::text FROM pgpipe.consumer_lag WHERE name = 'shop'",
            &[],
        )
        .await
        .get(0);
    assert_eq!(
        owner.trim_matches('"'),
        fwd,
        "the consumer belongs to the role that registered it"
    );

    // A role without any pgpipe role sees nothing at all.
    let outsider = db.client_as(&nobody).await;
    refused(
        &outsider,
        "SELECT * FROM pgpipe.read('shop')",
        "42501",
        &["schema pgpipe"],
    )
    .await;
    refused(
        &outsider,
        "SELECT pgpipe.emit('orders', '{}')",
        "42501",
        &["schema pgpipe"],
    )
    .await;
    refused(
        &outsider,
        "SELECT * FROM pgpipe.events",
        "42501",
        &["schema pgpipe"],
    )
    .await;

    let m = db.client_as(&mallory).await;
    // Reading what it may not SELECT: not with "all channels", not by naming the channel,
    // not through the SSE replay function, not from the tables.
    refused(
        &m,
        "SELECT pgpipe.register_consumer('spy')",
        "42501",
        &["only pgpipe_admin", "ARRAY["],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.register_consumer('spy', ARRAY['secrets'])",
        "42501",
        &["secrets", "may not SELECT", "GRANT SELECT"],
    )
    .await;
    let first_id: uuid::Uuid = db
        .query_one("SELECT id FROM pgpipe.events ORDER BY id LIMIT 1", &[])
        .await
        .get(0);
    refused(
        &m,
        &format!("SELECT * FROM pgpipe.events_after('{first_id}')"),
        "42501",
        &["only pgpipe_admin"],
    )
    .await;
    refused(
        &m,
        &format!("SELECT * FROM pgpipe.events_after('{first_id}', ARRAY['secrets'])"),
        "42501",
        &["secrets", "may not SELECT"],
    )
    .await;
    refused(
        &m,
        "SELECT * FROM pgpipe.events",
        "42501",
        &["permission denied", "events"],
    )
    .await;
    refused(
        &m,
        "SELECT * FROM pgpipe.consumers",
        "42501",
        &["permission denied", "consumers"],
    )
    .await;

    // Another role's consumer: not read, re-channelled, acked, claimed or dropped.
    refused(
        &m,
        "SELECT * FROM pgpipe.read('shop')",
        "42501",
        &["belongs to role", &fwd, "--consumer"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.register_consumer('shop', ARRAY['nothing'])",
        "42501",
        &["belongs to role"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.ack('shop', '1:1://')",
        "42501",
        &["belongs to role"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.try_claim_consumer('shop')",
        "42501",
        &["belongs to role"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.drop_consumer('shop')",
        "42501",
        &["belongs to role"],
    )
    .await;
    let channels: Vec<String> = db
        .query_one(
            "SELECT channels FROM pgpipe.consumers WHERE name = 'shop'",
            &[],
        )
        .await
        .get(0);
    assert_eq!(
        channels,
        ["orders"],
        "the consumer's channels are untouched"
    );
    // The lease is not an advisory lock anyone could squat: holding the old key does not
    // keep the owner's forwarder from its consumer.
    ok(
        &m,
        "SELECT pg_advisory_lock(hashtextextended('pgpipe.consumer:shop', 0))",
    )
    .await;
    drop(forwarder);
    let f = db.client_as(&fwd).await;
    assert!(
        wait_until(WAIT, async || {
            f.query_one("SELECT pgpipe.try_claim_consumer('shop')", &[])
                .await
                .unwrap()
                .get::<_, bool>(0)
        })
        .await,
        "the owner takes its consumer's lease once its forwarder is gone"
    );
    // consumer_lag shows a role its own consumers only.
    let seen: i64 = m
        .query_one("SELECT count(*) FROM pgpipe.consumer_lag", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "mallory sees no one else's consumer");

    // Capture of a table it does not own: neither removed nor changed, by any helper.
    refused(
        &m,
        "SELECT pgpipe.drop_capture_triggers('public.secrets')",
        "42501",
        &["permission denied", "drop_capture_triggers"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.unsubscribe('public.secrets')",
        "42501",
        &["must be the owner", "secrets"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.subscribe('public.secrets', channel => 'leak')",
        "42501",
        &["must be the owner"],
    )
    .await;
    let triggers: i64 = db
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'secrets'::regclass AND tgname LIKE 'pgpipe%'", &[])
        .await
        .get(0);
    assert_eq!(triggers, 2, "the capture triggers are still there");

    // Forging: no events on another table's channel, neither by emit nor by subscribing
    // its own table to that channel; no WAL slot; no dead letter it did not earn.
    refused(
        &m,
        "SELECT pgpipe.emit('orders', '{\"id\": 99}', 'INSERT')",
        "42501",
        &["orders", "INSERT, UPDATE or DELETE", "GRANT INSERT"],
    )
    .await;
    ok(&m, "CREATE TABLE mallory.t (id int PRIMARY KEY)").await;
    refused(
        &m,
        "SELECT pgpipe.subscribe('mallory.t', channel => 'orders')",
        "42501",
        &["orders", "another channel"],
    )
    .await;
    refused(
        &m,
        "SELECT pgpipe.subscribe('mallory.t', mode => 'wal')",
        "42501",
        &["REPLICATION", "pgpipe_admin"],
    )
    .await;
    ok(&m, "SELECT pgpipe.subscribe('mallory.t')").await;
    ok(&m, "SELECT pgpipe.emit('mallory-notes', '{\"hello\": 1}')").await;
    refused(
        &m,
        "SELECT pgpipe.dead_letter('{\"id\": \"0193f1c2-7b1a-7c3e-9f00-1a2b3c4d5e6f\", \"channel\": \"orders\"}', 'webhook', 'x', 1)",
        "42501",
        &["not in pgpipe.events"],
    )
    .await;
    let secret_id: uuid::Uuid = db
        .query_one(
            "SELECT id FROM pgpipe.events WHERE channel = 'secrets'",
            &[],
        )
        .await
        .get(0);
    refused(
        &m,
        &format!("SELECT pgpipe.dead_letter('{{\"id\": \"{secret_id}\", \"channel\": \"x\"}}', 'webhook', 'x', 1)"),
        "42501",
        &["secrets", "may not SELECT"],
    )
    .await;
    // A dead letter of an event it may read holds the queue's payload, not the caller's.
    let own_id: uuid::Uuid = db
        .query_one(
            "SELECT id FROM pgpipe.events WHERE channel = 'mallory-notes'",
            &[],
        )
        .await
        .get(0);
    ok(
        &m,
        &format!(
            "SELECT pgpipe.dead_letter('{{\"id\": \"{own_id}\", \"channel\": \"orders\", \"payload\": {{\"forged\": true}}}}', 'webhook', 'x', 1)"
        ),
    )
    .await;
    let stored = db
        .query_one(
            "SELECT channel, event->'payload' FROM pgpipe.dead_letters WHERE event_id = $1",
            &[&own_id],
        )
        .await;
    assert_eq!(stored.get::<_, String>(0), "mallory-notes");
    assert_eq!(
        stored.get::<_, serde_json::Value>(1),
        serde_json::json!({"hello": 1})
    );
    refused(
        &m,
        "SELECT * FROM pgpipe.dead_letters",
        "42501",
        &["permission denied", "dead_letters"],
    )
    .await;

    // Retention is the admin's: no huge partitions, no rotate.
    refused(
        &m,
        "SET pgpipe.partition_xids = 2147483647",
        "42501",
        &["permission denied", "partition_xids"],
    )
    .await;
    refused(
        &m,
        "SELECT * FROM pgpipe.rotate()",
        "42501",
        &["permission denied", "rotate"],
    )
    .await;
}

#[tokio::test]
async fn a_table_subscribed_later_does_not_leak_through_an_old_consumer() {
    let db = test_db("privileges_later").await;
    let (_fwd, mallory, _nobody) = setup(&db).await;
    let m = db.client_as(&mallory).await;
    // An emit-only channel is readable by every consumer role...
    ok(
        &m,
        "SELECT pgpipe.register_consumer('notes', ARRAY['notes'])",
    )
    .await;
    db.execute("SELECT pgpipe.emit('notes', '{\"n\": 1}')")
        .await;
    let rows = m
        .query(
            "SELECT id FROM pgpipe.read('notes') WHERE id IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the emitted event is readable");
    // ...until the owner puts a table it may not SELECT on that channel: from then on
    // the consumer is refused, loudly, instead of leaking the table's rows.
    db.execute(
        "CREATE TABLE payroll (id int PRIMARY KEY, salary int);
         SELECT pgpipe.subscribe('payroll', channel => 'notes');
         INSERT INTO payroll VALUES (1, 100000);",
    )
    .await;
    refused(
        &m,
        "SELECT * FROM pgpipe.read('notes')",
        "42501",
        &["payroll", "may not SELECT", "GRANT SELECT"],
    )
    .await;
    // Unsubscribing the table does not reopen the channel: its rows are still queued.
    db.execute("SELECT pgpipe.unsubscribe('payroll')").await;
    refused(
        &m,
        "SELECT * FROM pgpipe.read('notes')",
        "42501",
        &["payroll"],
    )
    .await;
    // A grant does.
    db.execute(&format!("GRANT SELECT ON payroll TO \"{mallory}\""))
        .await;
    let rows = m
        .query(
            "SELECT id FROM pgpipe.read('notes') WHERE id IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        2,
        "both events once the role may SELECT the table"
    );
    // Row-level security that hides rows from the role closes it again.
    db.execute("ALTER TABLE payroll ENABLE ROW LEVEL SECURITY")
        .await;
    refused(
        &m,
        "SELECT * FROM pgpipe.read('notes')",
        "42501",
        &["row-level security"],
    )
    .await;
}

#[tokio::test]
async fn a_consumer_that_stops_acknowledging_is_reported() {
    let db = test_db("privileges_stale").await;
    let (fwd, _mallory, _nobody) = setup(&db).await;
    let f = db.client_as(&fwd).await;
    ok(
        &f,
        "SELECT pgpipe.register_consumer('forgotten', ARRAY['orders'])",
    )
    .await;
    db.execute(&format!(
        "ALTER DATABASE \"{}\" SET pgpipe.consumer_stale_after = 1",
        db.name()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let admin = db.client().await;
    let stale: bool = admin
        .query_one(
            "SELECT stale AND holds_retention FROM pgpipe.consumer_lag WHERE name = 'forgotten'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stale, "consumer_lag marks it stale and holding retention");
    let status: Vec<String> = admin
        .query_one("SELECT stale_consumers FROM pgpipe.status()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, ["forgotten"], "pgpipe.status() names it");
    // rotate() warns (the worker runs it every pgpipe.rotate_interval).
    let (notices_tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    let (client, mut connection) = tokio_postgres::connect(&db.admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) = stream.next().await {
            let _ = notices_tx.send(format!("{} HINT: {}", n.message(), n.hint().unwrap_or("")));
        }
    });
    client
        .batch_execute("SELECT * FROM pgpipe.rotate()")
        .await
        .unwrap();
    let warning = tokio::time::timeout(WAIT, notices.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        warning.contains("'forgotten'")
            && warning.contains("holds queue retention")
            && warning.contains("drop_consumer"),
        "{warning}"
    );
}
