//! Journey: a table's owner captures only the big orders with
//! `subscribe(..., "where" => 'total > 100')`, in trigger mode and in WAL mode (REPLICA
//! IDENTITY FULL): the same workload — inserts that match and do not, NULLs, updates
//! within, into, out of and outside the filter, a key change, deletes that match and do
//! not — gives the same events in both modes (operation, row, old, key), with
//! Postgres's publication semantics: an UPDATE into the filter is an INSERT of the new
//! row, one out of it a DELETE of the old row. `operations` applies to those resulting
//! operations; a snapshot queues only matching rows; `pgpipe.subscriptions` shows the
//! filter; subscribing again without one captures every row again. A renamed filtered
//! column: capture, the view and a snapshot follow the new name. pg_dump of a database
//! with a filtered subscription restores into a fresh one (the filter is stored as
//! text), whose restored triggers keep filtering.
//!
//! Failure that matters: an invalid filter or an unknown column is refused with
//! Postgres's own message naming the filter and the table; a user-defined function in
//! the filter, and text that tries to end the statement, are refused; WAL mode with a
//! filter on a column outside the default replica identity is refused with the fix; a
//! role that does not own the table cannot subscribe it with a filter. The previous
//! subscription holds after each refusal. A snapshot that has only the stored text to
//! filter by, which names a column renamed since, is refused saying to subscribe again.

use std::time::Duration;

use pgpipe_tests::{describe, wait_until, TempPg};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

/// The worker serves database `postgres` (the default `pgpipe.database`).
async fn connect(user: &str) -> Client {
    static CREATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let pg = TempPg::shared();
    let url =
        pg.url("postgres")
            .replacen("postgres://postgres@", &format!("postgres://{user}@"), 1);
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {}", describe(&e)));
    tokio::spawn(connection);
    if user == "postgres" {
        let _guard = CREATE.lock().await;
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pgpipe")
            .await
            .expect("create extension");
    }
    client
}

async fn ok(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

/// Runs `sql` and expects SQLSTATE `code` with every one of `words` in the message,
/// detail or hint.
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
        assert!(text.contains(word), "{sql}\n-> {text}\nlacks: {word}");
    }
}

/// (operation, row, old, key) of a channel's change events, in queue order.
async fn events(client: &Client, channel: &str) -> Vec<(String, Value, Value, Option<Value>)> {
    client
        .query(
            "SELECT operation, payload -> 'row', payload -> 'old', key FROM pgpipe.events
             WHERE channel = $1 AND operation <> 'READ' ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Events of both tables once the WAL ones are all there: (trigger, wal).
async fn both(
    client: &Client,
    prefix: &str,
    expected: usize,
) -> [Vec<(String, Value, Value, Option<Value>)>; 2] {
    let trg = format!("{prefix}_trg");
    let wal = format!("{prefix}_wal");
    let arrived = wait_until(Duration::from_secs(20), async || {
        events(client, &wal).await.len() >= expected
    })
    .await;
    let got = [events(client, &trg).await, events(client, &wal).await];
    assert!(arrived, "WAL events: {:#?}", got[1]);
    got
}

/// Each statement commits on its own (as writers do).
const WORKLOAD: &[&str] = &[
    "INSERT INTO {t} VALUES (1, 'new', 150)",  // matches: INSERT
    "INSERT INTO {t} VALUES (2, 'new', 50)",   // does not
    "INSERT INTO {t} VALUES (3, 'new', NULL)", // NULL: does not
    "UPDATE {t} SET status = 'paid' WHERE id = 1", // within: UPDATE
    "UPDATE {t} SET total = 200 WHERE id = 2", // into: INSERT
    "UPDATE {t} SET total = 10 WHERE id = 1",  // out of: DELETE (old row)
    "UPDATE {t} SET status = 'x' WHERE id = 3", // outside (NULL to NULL)
    "UPDATE {t} SET total = 500 WHERE id = 3", // NULL into: INSERT
    "UPDATE {t} SET total = NULL WHERE id = 2", // out of, to NULL: DELETE
    "DELETE FROM {t} WHERE id = 3",            // matches: DELETE
    "DELETE FROM {t} WHERE id = 1",            // does not
    "INSERT INTO {t} VALUES (4, 'a', 101), (5, 'b', 100)", // one of two
    "UPDATE {t} SET id = 6 WHERE id = 4",      // within, key change
];

#[tokio::test]
async fn both_modes_capture_the_same_filtered_events() {
    let client = connect("postgres").await;
    ok(
        &client,
        "CREATE TABLE rf_trg (id int PRIMARY KEY, status text, total numeric);
         CREATE TABLE rf_wal (LIKE rf_trg INCLUDING ALL);
         SELECT pgpipe.subscribe('rf_trg', \"where\" => 'total > 100');",
    )
    .await;
    // Its own transaction: the first WAL subscription may create the slot.
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_wal', mode => 'wal', replica_identity_full => true, \"where\" => 'total > 100')",
    )
    .await;
    let shown: Vec<(String, Option<String>)> = client
        .query(
            "SELECT \"table\"::text, \"where\" FROM pgpipe.subscriptions WHERE \"table\"::text IN ('rf_trg', 'rf_wal') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let printed = Some("(total > (100)::numeric)".to_string());
    assert_eq!(
        shown,
        vec![
            ("rf_trg".into(), printed.clone()),
            ("rf_wal".into(), printed)
        ]
    );

    for table in ["rf_trg", "rf_wal"] {
        for sql in WORKLOAD {
            ok(&client, &sql.replace("{t}", table)).await;
        }
    }
    let [trg, wal] = both(&client, "rf", 9).await;
    let row =
        |id: i32, status: &str, total: Value| json!({"id": id, "status": status, "total": total});
    let key = |id: i32| Some(json!({ "id": id }));
    let expected = vec![
        (
            "INSERT".to_string(),
            row(1, "new", json!(150)),
            Value::Null,
            key(1),
        ),
        (
            "UPDATE".into(),
            row(1, "paid", json!(150)),
            row(1, "new", json!(150)),
            key(1),
        ),
        (
            "INSERT".into(),
            row(2, "new", json!(200)),
            Value::Null,
            key(2),
        ),
        (
            "DELETE".into(),
            row(1, "paid", json!(150)),
            Value::Null,
            key(1),
        ),
        (
            "INSERT".into(),
            row(3, "x", json!(500)),
            Value::Null,
            key(3),
        ),
        (
            "DELETE".into(),
            row(2, "new", json!(200)),
            Value::Null,
            key(2),
        ),
        (
            "DELETE".into(),
            row(3, "x", json!(500)),
            Value::Null,
            key(3),
        ),
        (
            "INSERT".into(),
            row(4, "a", json!(101)),
            Value::Null,
            key(4),
        ),
        (
            "UPDATE".into(),
            row(6, "a", json!(101)),
            row(4, "a", json!(101)),
            key(6),
        ),
    ];
    assert_eq!(trg, expected, "trigger mode");
    assert_eq!(wal, trg, "WAL mode gives what trigger mode gives");

    // A snapshot of a filtered subscription queues only the matching rows: of 2
    // (NULL), 5 (100) and 6 (101), only 6.
    ok(
        &client,
        "SELECT pgpipe.snapshot('rf_trg'); SELECT pgpipe.snapshot('rf_wal');",
    )
    .await;
    let done = wait_until(Duration::from_secs(20), async || {
        client
            .query_one(
                "SELECT count(*) = 0 FROM pgpipe.snapshots WHERE \"table\" IN ('public.rf_trg', 'public.rf_wal') AND state <> 'done'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(done, "both snapshots finish");
    for channel in ["rf_trg", "rf_wal"] {
        let reads: Vec<Value> = client
            .query(
                "SELECT payload -> 'row' FROM pgpipe.events WHERE channel = $1 AND operation = 'READ' ORDER BY id",
                &[&channel],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            reads,
            vec![row(6, "a", json!(101))],
            "{channel}: READ events"
        );
    }

    // operations => '{INSERT}': a row entering the filter (inserted or updated into it)
    // is captured; leaving it or changing within it is not.
    for (table, mode) in [("rf_trg", "trigger"), ("rf_wal", "wal")] {
        ok(
            &client,
            &format!(
                "SELECT pgpipe.subscribe('{table}', mode => '{mode}', operations => ARRAY['INSERT'], \"where\" => 'total > 100')"
            ),
        )
        .await;
        for sql in [
            "INSERT INTO {t} VALUES (7, 'z', 300)",
            "UPDATE {t} SET total = 1 WHERE id = 7",
            "UPDATE {t} SET total = 999 WHERE id = 7",
            "UPDATE {t} SET status = 'q' WHERE id = 7",
            "DELETE FROM {t} WHERE id = 7",
        ] {
            ok(&client, &sql.replace("{t}", table)).await;
        }
    }
    let [trg, wal] = both(&client, "rf", 11).await;
    assert_eq!(
        trg[9..],
        [
            (
                "INSERT".to_string(),
                row(7, "z", json!(300)),
                Value::Null,
                key(7)
            ),
            (
                "INSERT".into(),
                row(7, "z", json!(999)),
                Value::Null,
                key(7)
            ),
        ],
        "trigger mode, INSERT only"
    );
    assert_eq!(wal, trg, "WAL mode, INSERT only");

    // With a column choice: a DELETE out of the filter carries the chosen columns of the
    // old row. TRUNCATE has no rows and is not filtered.
    for (table, mode) in [("rf_trg", "trigger"), ("rf_wal", "wal")] {
        ok(
            &client,
            &format!(
                "SELECT pgpipe.subscribe('{table}', mode => '{mode}', columns => ARRAY['id', 'total'], \"where\" => 'total > 100')"
            ),
        )
        .await;
        ok(
            &client,
            &format!("UPDATE {table} SET total = 5 WHERE id = 6"),
        )
        .await;
        ok(&client, &format!("TRUNCATE {table}")).await;
    }
    let [trg, wal] = both(&client, "rf", 13).await;
    assert_eq!(
        trg[11],
        (
            "DELETE".to_string(),
            json!({"id": 6, "total": 101}),
            Value::Null,
            key(6)
        ),
        "trigger mode, columns and filter"
    );
    assert_eq!(trg[12].0, "TRUNCATE");
    assert_eq!(wal, trg, "WAL mode, columns and filter");

    // Subscribing again without a filter captures every row again, and leaves no filter
    // behind (no WHEN trigger, the publication's entry without WHERE).
    for (table, mode) in [("rf_trg", "trigger"), ("rf_wal", "wal")] {
        ok(
            &client,
            &format!("SELECT pgpipe.subscribe('{table}', mode => '{mode}')"),
        )
        .await;
        ok(
            &client,
            &format!("INSERT INTO {table} VALUES (8, 'small', 1)"),
        )
        .await;
    }
    let [trg, wal] = both(&client, "rf", 14).await;
    assert_eq!(
        trg[13],
        (
            "INSERT".to_string(),
            row(8, "small", json!(1)),
            Value::Null,
            key(8)
        )
    );
    assert_eq!(wal, trg);
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('rf_trg'::regclass, 'rf_wal'::regclass)
                       AND tgname LIKE 'pgpipe%' AND tgqual IS NOT NULL)
                  + (SELECT count(*) FROM pg_publication_rel WHERE prrelid = 'rf_wal'::regclass AND prqual IS NOT NULL)
                  + (SELECT count(*) FROM pgpipe.subscriptions WHERE \"where\" IS NOT NULL AND \"table\"::text IN ('rf_trg', 'rf_wal'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no filter left behind");
}

#[tokio::test]
async fn bad_filters_are_refused_naming_the_filter_and_the_table() {
    let client = connect("postgres").await;
    ok(
        &client,
        "CREATE TABLE rf_bad (id int PRIMARY KEY, total numeric, note text);
         CREATE FUNCTION rf_is_big(numeric) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1 > 100';
         SELECT pgpipe.subscribe('rf_bad', \"where\" => 'total > 10');",
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'totl > 100')",
        "42703",
        &[
            "row filter \"totl > 100\" of table public.rf_bad is not valid: column \"totl\" does not exist",
            "A row filter may use the table's columns",
        ],
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'total >')",
        "42601",
        &[
            "row filter \"total >\" of table public.rf_bad is not valid",
            "syntax error",
        ],
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'total')",
        "42804",
        &["of table public.rf_bad is not valid", "boolean"],
    )
    .await;
    // User code is refused, as Postgres refuses it in a publication's filter (names
    // resolve in pg_catalog: unqualified, the function is not even found).
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'public.rf_is_big(total)')",
        "0A000",
        &[
            "row filter \"public.rf_is_big(total)\" of table public.rf_bad is not valid",
            "User-defined",
            "no user-defined functions",
        ],
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'rf_is_big(total)')",
        "42883",
        &["function rf_is_big(numeric) does not exist"],
    )
    .await;
    // Text that tries to end the statement (and run another one as pgpipe's owner).
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'true); DROP TABLE rf_bad; --')",
        "42601",
        &["it contains a \";\""],
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'true) WITH (publish = ''insert'') --')",
        "42601",
        &["its parentheses do not match"],
    )
    .await;
    // Quoted parentheses are no parentheses.
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'note <> '')(''')",
    )
    .await;
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'total > 10')",
    )
    .await;

    // WAL mode: a filter on a column outside the replica identity would make Postgres
    // refuse every UPDATE and DELETE of the table.
    refused(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', mode => 'wal', \"where\" => 'total > 10')",
        "55000",
        &[
            "row filter \"total > 10\" of table public.rf_bad uses column total outside the replica identity",
            "replica_identity_full => true",
            "primary-key columns only",
        ],
    )
    .await;
    // A filter on the key is fine under the default identity.
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', mode => 'wal', \"where\" => 'id > 10')",
    )
    .await;
    ok(&client, "UPDATE rf_bad SET total = 1").await;
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_bad', \"where\" => 'total > 10')",
    )
    .await;

    // Only the table's owner subscribes it, with a filter too.
    ok(
        &client,
        "CREATE ROLE rf_mallory LOGIN;
         GRANT pgpipe_producer, pgpipe_consumer TO rf_mallory;
         CREATE SCHEMA rf_mallory AUTHORIZATION rf_mallory;",
    )
    .await;
    let mallory = connect("rf_mallory").await;
    refused(
        &mallory,
        "SELECT pgpipe.subscribe('public.rf_bad', \"where\" => 'true')",
        "42501",
        &["must be the owner of table public.rf_bad to subscribe it"],
    )
    .await;

    // The table is still there and the first filter holds.
    ok(&client, "INSERT INTO rf_bad VALUES (1, 5), (2, 50)").await;
    let got: Vec<Value> = events(&client, "rf_bad")
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(got, vec![json!({"id": 2, "total": 50, "note": null})]);
    let shown: String = client
        .query_one(
            "SELECT \"where\" FROM pgpipe.subscriptions WHERE \"table\" = 'rf_bad'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "(total > (10)::numeric)");
}

/// Snapshots `table` and waits until that is done: the rows of the READ events on its
/// channel (the table's name).
async fn snapshot_rows(client: &Client, table: &str) -> Vec<Value> {
    ok(client, &format!("SELECT pgpipe.snapshot('{table}')")).await;
    let done = wait_until(Duration::from_secs(20), async || {
        client
            .query_one(
                "SELECT count(*) = 0 FROM pgpipe.snapshots WHERE \"table\" = 'public.' || $1::text AND state <> 'done'",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let states: Vec<(String, Option<String>)> = client
        .query(
            "SELECT state, error FROM pgpipe.snapshots WHERE \"table\" = 'public.' || $1::text",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(done, "the snapshot of {table} finishes: {states:?}");
    client
        .query(
            "SELECT payload -> 'row' FROM pgpipe.events WHERE channel = $1 AND operation = 'READ' ORDER BY id",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A filtered column renamed after subscribing: capture, `pgpipe.subscriptions."where"`
/// and a snapshot all follow it, in both modes (they read the filter from the triggers'
/// WHEN clause or the publication, which Postgres keeps current, not from the text
/// pgpipe stored at subscribe).
#[tokio::test]
async fn a_renamed_filtered_column_stays_filtered_on() {
    let client = connect("postgres").await;
    for (table, mode) in [("rf_ren_trg", "trigger"), ("rf_ren_wal", "wal")] {
        ok(
            &client,
            &format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, total numeric);
                 INSERT INTO {table} VALUES (1, 150), (2, 50);"
            ),
        )
        .await;
        ok(
            &client,
            &format!(
                "SELECT pgpipe.subscribe('{table}', mode => '{mode}', replica_identity_full => {wal},
                                         operations => '{{INSERT}}', \"where\" => 'total > 100')",
                wal = mode == "wal"
            ),
        )
        .await;
        ok(
            &client,
            &format!("ALTER TABLE {table} RENAME COLUMN total TO amount"),
        )
        .await;
        ok(
            &client,
            &format!("INSERT INTO {table} VALUES (3, 300), (4, 40)"),
        )
        .await;
        let found = client
            .query_one(
                "SELECT v.\"where\", s.row_filter FROM pgpipe.subscriptions v
                 JOIN pgpipe.subscription s ON s.relid = v.\"table\"
                 WHERE v.\"table\" = $1::text::regclass",
                &[&table],
            )
            .await
            .unwrap();
        let filter: (String, String) = (found.get(0), found.get(1));
        assert_eq!(
            filter,
            (
                "(amount > (100)::numeric)".to_string(),
                "(total > (100)::numeric)".to_string()
            ),
            "{mode} mode: the view shows the live filter, the stored text is the one of subscribe"
        );
    }
    // (The rename itself is a DDL event on the channel.)
    let inserted = async |channel: &str| -> Vec<Value> {
        client
            .query(
                "SELECT payload -> 'row' FROM pgpipe.events WHERE channel = $1 AND operation = 'INSERT' ORDER BY id",
                &[&channel],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let arrived = wait_until(Duration::from_secs(20), async || {
        !inserted("rf_ren_wal").await.is_empty()
    })
    .await;
    assert!(arrived, "the WAL event arrives");
    for table in ["rf_ren_trg", "rf_ren_wal"] {
        let captured = inserted(table).await;
        assert_eq!(
            captured,
            vec![json!({"id": 3, "amount": 300})],
            "{table}: only the matching row after the rename"
        );
        assert_eq!(
            snapshot_rows(&client, table).await,
            vec![
                json!({"id": 1, "amount": 150}),
                json!({"id": 3, "amount": 300})
            ],
            "{table}: the snapshot reads the matching rows by the new column name"
        );
    }

    // Trigger mode capturing TRUNCATE alone has no row trigger to read the filter from,
    // only the text stored at subscribe: after the rename a snapshot is refused, saying
    // to subscribe again.
    ok(
        &client,
        "CREATE TABLE rf_ren_trunc (id int PRIMARY KEY, total numeric);
         INSERT INTO rf_ren_trunc VALUES (1, 150), (2, 50);
         SELECT pgpipe.subscribe('rf_ren_trunc', operations => '{TRUNCATE}', \"where\" => 'total > 100');",
    )
    .await;
    ok(
        &client,
        "ALTER TABLE rf_ren_trunc RENAME COLUMN total TO amount",
    )
    .await;
    refused(
        &client,
        "SELECT pgpipe.snapshot('rf_ren_trunc')",
        "55000",
        &[
            "row filter of table public.rf_ren_trunc no longer fits",
            "column \"total\" does not exist",
            "subscribe the table again",
        ],
    )
    .await;
    ok(
        &client,
        "SELECT pgpipe.subscribe('rf_ren_trunc', operations => '{TRUNCATE}', \"where\" => 'amount > 100')",
    )
    .await;
    assert_eq!(
        snapshot_rows(&client, "rf_ren_trunc").await,
        vec![json!({"id": 1, "amount": 150})],
        "subscribed again, the snapshot reads the matching rows"
    );
}

/// Runs one of the cluster's Postgres programs; panics with its stderr when it fails;
/// its stderr.
fn pg_tool(program: &str, args: &[&str]) -> String {
    let bin = std::path::PathBuf::from(
        std::env::var("PGPIPE_PG_BIN").unwrap_or_else(|_| pgpipe_tests::DEFAULT_PG_BIN.into()),
    );
    let pg = TempPg::shared();
    let output = std::process::Command::new(bin.join(program))
        .args([
            "-h",
            pg.host(),
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// pg_dump dumps pgpipe.subscription's rows (an extension configuration table): a
/// database with a filtered subscription restores into a fresh one (the filter is SQL
/// text, not a pg_node_tree, which COPY cannot read back), and the restored triggers
/// keep filtering. COPY of the table round-trips as well.
#[tokio::test]
async fn a_filtered_subscription_survives_pg_dump_and_restore() {
    let pg = TempPg::shared();
    let source = pg.database_without_extension("rf_dump_source").await;
    let target = pg.database_without_extension("rf_dump_target").await;
    let client = source.client().await;
    ok(
        &client,
        "CREATE EXTENSION pgpipe;
         CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric);
         SELECT pgpipe.subscribe('orders', \"where\" => 'total > 100 AND status <> ''void''');",
    )
    .await;
    let stored: String = client
        .query_one("SELECT row_filter FROM pgpipe.subscription", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored,
        "((total > (100)::numeric) AND (status <> 'void'::text))"
    );

    // COPY out and back in (what a restore of the table's rows does).
    let file = std::env::temp_dir().join(format!("{}.copy", source.name()));
    let file = file.to_str().unwrap();
    ok(
        &client,
        &format!(
            "COPY pgpipe.subscription TO '{file}';
             CREATE TEMP TABLE copied (LIKE pgpipe.subscription);
             COPY copied FROM '{file}';"
        ),
    )
    .await;
    let _ = std::fs::remove_file(file);
    let same: bool = client
        .query_one(
            "SELECT (SELECT array_agg(c::text) FROM copied c) = (SELECT array_agg(s::text) FROM pgpipe.subscription s)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same, "COPY TO and FROM round-trip pgpipe.subscription");

    let dump = std::env::temp_dir().join(format!("{}.sql", source.name()));
    let dump = dump.to_str().unwrap();
    pg_tool("pg_dump", &["-f", dump, source.name()]);
    // The one error: CREATE EXTENSION has made pgpipe's publication already (it is
    // not an extension member, so the dump has it too); its table entries follow.
    let errors = pg_tool("psql", &["-X", "-q", "-f", dump, "-d", target.name()]);
    let _ = std::fs::remove_file(dump);
    let unexpected: Vec<&str> = errors
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("publication \"pgpipe\" already exists"))
        .collect();
    assert!(unexpected.is_empty(), "the restore: {errors}");

    let restored = target.client().await;
    let found = restored
        .query_one("SELECT channel, row_filter FROM pgpipe.subscription", &[])
        .await
        .unwrap();
    let row: (String, Option<String>) = (found.get(0), found.get(1));
    assert_eq!(
        row,
        ("orders".to_string(), Some(stored.clone())),
        "the restored row"
    );
    ok(
        &restored,
        "INSERT INTO orders VALUES (1, 'new', 150), (2, 'new', 50), (3, 'void', 500)",
    )
    .await;
    let captured: Vec<Value> = events(&restored, "orders")
        .await
        .into_iter()
        .map(|(_, row, _, _)| row)
        .collect();
    assert_eq!(
        captured,
        vec![json!({"id": 1, "status": "new", "total": 150})],
        "the restored triggers keep filtering"
    );
}
