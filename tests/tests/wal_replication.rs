//! Journey: on a Postgres without the extension, a user points `pgpipe listen --detector
//! wal` at a publication and gets every INSERT, UPDATE, DELETE and TRUNCATE on stdout with
//! values typed exactly as Postgres' own `to_jsonb` types them (the extension's capture
//! uses the same rules), unchanged TOASTed values filled in or named, never faked. A
//! server without `wal_level = logical` is refused with the fix; WAL-only flags are
//! refused for other detectors. For the same writes, the `wal` detector's payloads equal
//! the extension's.

use std::time::Duration;

use pgpipe_tests::{test_db, Forwarder, PgOptions, TempPg, TestDb};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// A slot name unique to the test database (slots are cluster-wide).
fn slot_for(db: &TestDb) -> String {
    let mut name = format!("s_{}", db.name());
    name.truncate(63);
    name
}

async fn drop_slot(db: &TestDb, slot: &str) {
    db.query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await;
}

/// `to_jsonb` of the row with `id`, computed by Postgres in a UTC session.
async fn to_jsonb(db: &TestDb, table: &str, id: i32) -> Value {
    let client = db.client().await;
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    client
        .query_one(
            &format!("SELECT to_jsonb(x) FROM {table} x WHERE id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

fn spawn_wal(db: &TestDb, slot: &str, extra: &[&str]) -> Forwarder {
    // Replication takes the REPLICATION attribute, which the queue's forwarder role lacks.
    let listen = Forwarder::listen(&db.admin_url())
        .detector("wal")
        .flag("--publication", "pub")
        .flag("--slot", slot)
        .env("PGPIPE_DETECTOR_STATUS_INTERVAL", "200ms");
    extra.iter().fold(listen, |l, arg| l.arg(arg)).spawn()
}

#[tokio::test]
async fn typed_changes_from_a_database_without_the_extension() {
    let db = TempPg::shared()
        .database_without_extension("wal_typed")
        .await;
    db.execute(
        r#"CREATE TYPE mood AS ENUM ('sad', 'happy');
           CREATE DOMAIN posint AS int CHECK (VALUE > 0);
           CREATE TYPE pair AS (a int, b text, c numeric[], d jsonb);
           CREATE TABLE typed (
               id int PRIMARY KEY, i2 smallint, i8 bigint, num numeric(12,2), f4 real,
               f8 double precision, fbig double precision, ftiny double precision,
               fnan double precision, finf real, b bool, j json, jb jsonb, ts timestamp,
               tstz timestamptz, d date, t text, u uuid, o oid, ia int[], ta text[],
               tsa timestamptz[], iv interval, e mood, dom posint, doms posint[],
               boxes box[], nul text, pr pair, prs pair[]);
           CREATE PUBLICATION pub FOR TABLE typed;"#,
    )
    .await;
    let slot = slot_for(&db);
    let fwd = spawn_wal(&db, &slot, &["--tx-metadata"]);
    fwd.wait_for_stderr("replicating", WAIT).await;

    db.execute(
        r#"INSERT INTO typed VALUES (1, 7, 9007199254740993, 10.50, 0.1, 2.5, 1e300, 1.5e-7,
               'NaN', '-Infinity', true, '{"b": 1, "a": [1, 2.50, 1e2]}', '{"k": {"n": 1.0}}',
               '2026-11-27 02:14:52.123456', '2026-11-27 02:14:52.123456+00', '2026-11-27',
               'it''s "quoted"', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 42,
               '{{1,2},{3,NULL}}', '{"a b","{x}",NULL,"NULL"}', '{"2026-11-27 00:00:00+00"}',
               '1 day 02:03:04', 'happy', 5, '{1,2}', '{(1,2),(3,4);(5,6),(7,8)}', NULL,
               ROW(1, 'x, "y"', '{1.50,NULL}', '{"k": 1}'), ARRAY[ROW(2, '', NULL, NULL)::pair])"#,
    )
    .await;
    let inserted = to_jsonb(&db, "typed", 1).await;
    db.execute("UPDATE typed SET t = 'changed', num = 11 WHERE id = 1")
        .await;
    let updated = to_jsonb(&db, "typed", 1).await;
    db.execute("DELETE FROM typed WHERE id = 1").await;
    db.execute("INSERT INTO typed (id) VALUES (2), (3)").await;
    db.execute("TRUNCATE typed").await;

    let events = fwd.wait_for_events(6, WAIT).await;
    assert_eq!(events.len(), 6, "{events:#?}");
    for e in &events {
        assert_eq!(e["source"], "wal_replication");
        assert_eq!(e["channel"], "pgpipe:typed");
        let id: uuid::Uuid = e["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert!(e["transaction"]["xid"].as_u64().unwrap() > 0, "{e}");
        assert!(e["transaction"]["commit_time"].is_string(), "{e}");
    }
    let ops: Vec<&str> = events
        .iter()
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        ["INSERT", "UPDATE", "DELETE", "INSERT", "INSERT", "TRUNCATE"]
    );

    // Exactly what to_jsonb gives: numbers as numeric prints them (1e300 in full, 10.50
    // with its zero), NaN/Infinity and oid as strings, ISO timestamps, nested arrays,
    // composites as objects.
    let insert = &events[0]["payload"];
    assert_eq!(insert["op"], "INSERT");
    assert_eq!(insert["schema"], "public");
    assert_eq!(insert["table"], "typed");
    assert_eq!(insert["row"], inserted, "row typed as to_jsonb types it");
    assert_eq!(insert["old"], Value::Null);
    assert_eq!(
        serde_json::to_string(&insert["row"]["num"]).unwrap(),
        "10.50"
    );
    assert_eq!(
        insert["row"]["tstz"],
        json!("2026-11-27T02:14:52.123456+00:00")
    );
    assert_eq!(insert["row"]["fnan"], json!("NaN"));

    let update = &events[1]["payload"];
    assert_eq!(update["row"], updated);
    assert_eq!(
        update["old"],
        json!({"id": 1}),
        "default identity: the key only"
    );
    assert_eq!(events[1]["transaction"]["seq"], json!(1));

    assert_eq!(
        events[2]["payload"]["row"],
        json!({"id": 1}),
        "DELETE: the key"
    );
    for e in &events[..3] {
        assert_eq!(e["key"], json!({"id": 1}), "{e}");
    }
    assert_eq!(events[5]["key"], Value::Null, "TRUNCATE has no key");
    assert_eq!(events[3]["transaction"]["seq"], json!(1));
    assert_eq!(events[4]["transaction"]["seq"], json!(2));
    assert_eq!(
        events[3]["transaction"]["xid"], events[4]["transaction"]["xid"],
        "one statement, one transaction"
    );
    assert_eq!(
        events[5]["payload"],
        json!({"op": "TRUNCATE", "schema": "public", "table": "typed", "row": null, "old": null})
    );

    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());
    drop_slot(&db, &slot).await;
}

#[tokio::test]
async fn unchanged_toast_is_filled_or_named_never_faked() {
    let db = TempPg::shared()
        .database_without_extension("wal_toast")
        .await;
    db.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         CREATE PUBLICATION pub FOR TABLE docs;",
    )
    .await;
    let slot = slot_for(&db);
    let fwd = spawn_wal(&db, &slot, &["--tx-markers"]);
    fwd.wait_for_stderr("replicating", WAIT).await;
    db.execute("INSERT INTO docs VALUES (1, repeat('a', 10000), 0)")
        .await;
    db.execute("UPDATE docs SET n = 1").await;
    db.execute("ALTER TABLE docs REPLICA IDENTITY FULL").await;
    db.execute("UPDATE docs SET n = 2").await;

    // Three transactions, each BEGIN, change, COMMIT.
    let events = fwd.wait_for_events(9, WAIT).await;
    let ops: Vec<&str> = events
        .iter()
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        ["BEGIN", "INSERT", "COMMIT", "BEGIN", "UPDATE", "COMMIT", "BEGIN", "UPDATE", "COMMIT"]
    );
    assert_eq!(events[0]["channel"], "pgpipe:_txn");
    assert_eq!(events[2]["payload"]["event_count"], json!(1));
    assert_eq!(
        events[1]["payload"]["row"]["body"].as_str().unwrap().len(),
        10000
    );

    let first = &events[4]["payload"];
    assert_eq!(
        first["row"],
        json!({"id": 1, "n": 1}),
        "body left out: {first}"
    );
    assert_eq!(first["unchanged_toast"], json!(["body"]));

    let second = &events[7]["payload"];
    assert!(second.get("unchanged_toast").is_none(), "{second}");
    assert_eq!(second["row"]["n"], json!(2));
    assert_eq!(
        second["row"]["body"].as_str().map(str::len),
        Some(10000),
        "filled from the old row"
    );
    assert_eq!(second["old"]["n"], json!(1));

    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());
    drop_slot(&db, &slot).await;
}

#[tokio::test]
async fn misconfiguration_is_refused_with_the_fix() {
    // WAL-only settings with another detector fail before connecting.
    let fwd = Forwarder::listen("postgres://nobody@127.0.0.1:1/x")
        .channel("a")
        .flag("--publication", "p")
        .spawn();
    assert_eq!(fwd.wait_exit(WAIT).await.code(), Some(1));
    assert!(
        fwd.stderr_text()
            .contains("only works with the wal detector"),
        "{}",
        fwd.stderr_text()
    );

    let pg = TempPg::start_dedicated(PgOptions::new().conf("wal_level = replica")).await;
    let db = pg.database_without_extension("wal_replica").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let fwd = spawn_wal(&db, "s_replica", &[]);
    assert_eq!(fwd.wait_exit(WAIT).await.code(), Some(1));
    let stderr = fwd.stderr_text();
    assert!(stderr.contains("wal_level = replica"), "{stderr}");
    assert!(
        stderr.contains("ALTER SYSTEM SET wal_level = logical") && stderr.contains("restart"),
        "{stderr}"
    );
    // The extension on that server: no WARNING about "subscriptions" (Postgres' own, for
    // the publication pgpipe creates), nothing at all; trigger mode works, and WAL mode
    // is refused naming wal_level and trigger mode.
    let psql = std::path::PathBuf::from(
        std::env::var("PGPIPE_PG_BIN").unwrap_or_else(|_| pgpipe_tests::DEFAULT_PG_BIN.into()),
    )
    .join("psql");
    let out = std::process::Command::new(psql)
        .args([db.url().as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg("CREATE EXTENSION pgpipe")
        .output()
        .expect("run psql");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said, "",
        "CREATE EXTENSION on wal_level = replica says nothing"
    );
    db.execute("SELECT pgpipe.subscribe('t'); INSERT INTO t VALUES (1)")
        .await;
    let queued = db
        .query_one(
            "SELECT count(*) FROM pgpipe.events WHERE channel = 't'",
            &[],
        )
        .await;
    assert_eq!(queued.get::<_, i64>(0), 1, "trigger mode works");
    let refused = db
        .client()
        .await
        .batch_execute("SELECT pgpipe.subscribe('t', mode => 'wal')")
        .await
        .expect_err("WAL mode needs wal_level = logical");
    let refused = pgpipe_tests::describe(&refused);
    assert!(
        refused.contains("mode 'wal' needs wal_level = logical (it is replica)")
            && refused.contains("or use mode => 'trigger'"),
        "{refused}"
    );

    // A publication that does not exist is named, with how to create it.
    let db = TempPg::shared()
        .database_without_extension("wal_no_pub")
        .await;
    let fwd = spawn_wal(&db, &slot_for(&db), &[]);
    assert_eq!(fwd.wait_exit(WAIT).await.code(), Some(1));
    let stderr = fwd.stderr_text();
    assert!(
        stderr.contains("publication \"pub\" does not exist") && stderr.contains("--all-tables"),
        "{stderr}"
    );
}

#[tokio::test]
async fn payloads_equal_the_extension_capture() {
    let db = test_db("wal_vs_extension").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric(10,2), paid bool,
                              meta jsonb, tags text[], at timestamptz, score float8);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         SELECT pgpipe.subscribe('orders');
         CREATE PUBLICATION pub FOR TABLE orders;",
    )
    .await;
    let slot = slot_for(&db);
    let wal = spawn_wal(&db, &slot, &[]);
    wal.wait_for_stderr("replicating", WAIT).await;
    let url = db.url();
    let queue = Forwarder::listen(&url).channel("orders").spawn();

    db.execute(
        r#"SET TimeZone = 'UTC';
           INSERT INTO orders VALUES (1, 'new', 10.50, false, '{"k": [1, 2.50]}', '{a,NULL}',
                                      '2026-11-27 02:14:52.5+00', 1e-7);
           UPDATE orders SET status = 'paid', paid = true, score = 'NaN' WHERE id = 1;
           DELETE FROM orders WHERE id = 1;
           TRUNCATE orders;"#,
    )
    .await;
    let from_wal = wal.wait_for_events(4, WAIT).await;
    let from_extension = queue.wait_for_events(4, WAIT).await;
    for (w, x) in from_wal.iter().zip(&from_extension) {
        assert_eq!(w["operation"], x["operation"]);
        assert_eq!(w["payload"], x["payload"], "same change, same payload");
        assert_eq!(w["source"], "wal_replication");
        // The primary key, not REPLICA IDENTITY FULL's every column.
        assert_eq!(w["key"], x["key"], "same change, same key");
    }
    let keys: Vec<&Value> = from_wal.iter().map(|e| &e["key"]).collect();
    let id = json!({"id": 1});
    assert_eq!(keys, [&id, &id, &id, &Value::Null]);

    wal.sigterm();
    queue.sigterm();
    assert!(wal.wait_exit(WAIT).await.success());
    drop_slot(&db, &slot).await;
}

#[tokio::test]
async fn replicates_over_verified_tls() {
    let pg = TempPg::start_dedicated(PgOptions::new().tls(true)).await;
    let db = pg.database_without_extension("wal_tls").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")
        .await;
    let ca = pg.ca_cert_path().display().to_string();
    let listen = |url: &str| {
        Forwarder::listen(url)
            .detector("wal")
            .flag("--publication", "pub")
            .flag("--slot", "s_tls")
    };

    // The replication client verifies DNS names only: verify-full by IP is refused up
    // front, naming the way out.
    let url = db.url_with(&format!("sslmode=verify-full&sslrootcert={ca}"));
    let fwd = listen(&url).spawn();
    assert_eq!(fwd.wait_exit(WAIT).await.code(), Some(1));
    assert!(
        fwd.stderr_text().contains("use sslmode=verify-ca"),
        "{}",
        fwd.stderr_text()
    );

    let url = db.url_with(&format!("sslmode=verify-ca&sslrootcert={ca}"));
    let fwd = listen(&url).spawn();
    fwd.wait_for_stderr("replicating", WAIT).await;
    db.execute("INSERT INTO t VALUES (1)").await;
    let events = fwd.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["payload"]["row"], json!({"id": 1}));
    fwd.sigterm();
    assert!(fwd.wait_exit(WAIT).await.success());
}
