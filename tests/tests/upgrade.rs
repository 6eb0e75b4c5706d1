//! Journey: a database created with pgpipe 0.1.0 (`CREATE EXTENSION pgpipe VERSION
//! '0.1.0'`, the released install script in `sql/upgrade/`) keeps working when the 0.2.0
//! library is loaded, and `ALTER EXTENSION pgpipe UPDATE` brings it to 0.2.0 with
//! everything kept: queued events, consumers and their positions, dead letters,
//! subscriptions (trigger and WAL mode). Afterwards a forwarder resumes the old consumer
//! where it stood, trigger capture goes through the native trigger, the WAL changes made
//! while the worker waited are captured, and least privilege holds (PUBLIC has nothing).
//!
//! Failure that matters: the library is newer than the schema. The background worker
//! sees the old version, says so (`waiting_for_upgrade` and the command to run) and
//! leaves the slot alone until the update; a forwarder started against the old schema
//! exits 1 naming both versions and `ALTER EXTENSION pgpipe UPDATE`.
//!
//! Structural: the catalog of a database updated from 0.1.0 equals a fresh 0.2.0 install
//! (`pg_dump --schema-only --binary-upgrade`, which lists the extension's own objects,
//! normalised and compared object by object), so a SQL change without its section in
//! `sql/upgrade/pgpipe--0.1.0--0.2.0.sql` fails here, naming the object.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pgpipe_tests::{describe, wait_until, Forwarder, PgOptions, TempPg, DEFAULT_PG_BIN};
use tokio_postgres::Client;

/// The version the released install script creates, and the one this tree installs.
const OLD: &str = "0.1.0";
const NEW: &str = "0.2.0";

fn pg_bin() -> PathBuf {
    PathBuf::from(std::env::var("PGPIPE_PG_BIN").unwrap_or_else(|_| DEFAULT_PG_BIN.into()))
}

/// Fails with what to do when `make install` has not copied `sql/upgrade/` yet.
fn require_upgrade_scripts() {
    let output = Command::new(pg_bin().join("pg_config"))
        .arg("--sharedir")
        .output()
        .expect("run pg_config --sharedir");
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("extension");
    for script in [
        format!("pgpipe--{OLD}.sql"),
        format!("pgpipe--{OLD}--{NEW}.sql"),
    ] {
        assert!(
            dir.join(&script).is_file(),
            "{} is missing: run `make install`, which copies sql/upgrade/ into the extension directory",
            dir.join(&script).display()
        );
    }
}

async fn execute(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

async fn text(client: &Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)))
        .get(0)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)))
        .get(0)
}

async fn worker_state(client: &Client) -> (String, Option<String>) {
    let row = client
        .query_one("SELECT worker_state, last_error FROM pgpipe.status()", &[])
        .await
        .unwrap_or_else(|e| panic!("pgpipe.status()\n-> {}", describe(&e)));
    (row.get(0), row.get(1))
}

/// What 0.1.0 users had: a trigger-mode and a WAL-mode subscription, events, a consumer
/// that acknowledged two of three `orders` events, and a dead letter.
const AT_0_1_0: &str = "
    CREATE TABLE orders (id int PRIMARY KEY, status text);
    SELECT pgpipe.subscribe('orders');
    INSERT INTO orders VALUES (1, 'new'), (2, 'new');
    UPDATE orders SET status = 'paid' WHERE id = 1;
    SELECT pgpipe.emit('billing', '{\"invoice\": 7}');
";

#[tokio::test]
async fn a_database_created_at_0_1_0_is_updated_with_its_events_consumers_and_dead_letters() {
    require_upgrade_scripts();
    // The worker serves `postgres` of a cluster of its own, created at 0.1.0.
    let pg = TempPg::start_dedicated(
        PgOptions::new()
            .conf("pgpipe.database = 'postgres'")
            .conf("pgpipe.poll_interval = '50ms'"),
    )
    .await;
    let db = pg.client("postgres").await;
    execute(&db, &format!("CREATE EXTENSION pgpipe VERSION '{OLD}'")).await;
    assert_eq!(
        text(
            &db,
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'"
        )
        .await,
        OLD
    );
    execute(&db, AT_0_1_0).await;
    // WAL mode creates the slot, so it runs in a transaction of its own.
    execute(&db, "CREATE TABLE wal_t (id int PRIMARY KEY, v text)").await;
    execute(&db, "SELECT pgpipe.subscribe('wal_t', mode => 'wal')").await;

    // The new library's worker does not touch the old schema: it waits and says why.
    let waiting = wait_until(Duration::from_secs(15), async || {
        worker_state(&db).await.0 == "waiting_for_upgrade"
    })
    .await;
    let (state, error) = worker_state(&db).await;
    assert!(waiting, "worker state {state}, last_error {error:?}");
    let error = error.unwrap_or_default();
    assert!(
        error.contains(&format!("at version {OLD}"))
            && error.contains("ALTER EXTENSION pgpipe UPDATE"),
        "{error}"
    );
    assert!(pg.log_contents().contains("ALTER EXTENSION pgpipe UPDATE"));
    // Written while the worker waits: queued from the slot after the update.
    execute(&db, "INSERT INTO wal_t VALUES (1, 'while waiting')").await;

    // The 0.1.0 consumer API: read the three `orders` events, acknowledge two.
    execute(
        &db,
        "SELECT pgpipe.register_consumer('old_fwd', ARRAY['orders'])",
    )
    .await;
    let rows = db
        .query("SELECT position, id FROM pgpipe.read('old_fwd')", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "three orders events at 0.1.0");
    let acked: String = rows[1].get(0);
    let third: uuid::Uuid = rows[2].get(1);
    db.execute("SELECT pgpipe.ack('old_fwd', $1)", &[&acked])
        .await
        .unwrap();
    execute(
        &db,
        "SELECT pgpipe.dead_letter(to_jsonb(e), 'webhook', 'HTTP 400', 1)
         FROM pgpipe.events e WHERE e.channel = 'billing'",
    )
    .await;
    let events_before: Vec<uuid::Uuid> = db
        .query("SELECT id FROM pgpipe.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // A 0.2.0 forwarder on the 0.1.0 schema stops at once and names the command.
    let early = Forwarder::listen(&pg.url("postgres"))
        .channel("orders")
        .flag("--consumer", "old_fwd")
        .spawn();
    assert_eq!(
        early.wait_exit(Duration::from_secs(20)).await.code(),
        Some(1)
    );
    let stderr = early.stderr_text();
    assert!(
        stderr.contains(&format!("at version {OLD}"))
            && stderr.contains("ALTER EXTENSION pgpipe UPDATE"),
        "{stderr}"
    );

    execute(&db, "ALTER EXTENSION pgpipe UPDATE").await;
    assert_eq!(
        text(
            &db,
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'"
        )
        .await,
        NEW
    );

    // Kept: every event, the consumer's position, the dead letter, both subscriptions.
    let events_after: Vec<uuid::Uuid> = db
        .query(
            "SELECT id FROM pgpipe.events WHERE id = ANY ($1) ORDER BY id",
            &[&events_before],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events_after, events_before);
    assert_eq!(
        text(&db, "SELECT pgpipe.consumer_position('old_fwd')").await,
        acked
    );
    assert_eq!(
        text(
            &db,
            "SELECT owner::regrole::text FROM pgpipe.consumers WHERE name = 'old_fwd'"
        )
        .await,
        "postgres",
        "a 0.1.0 consumer belongs to the extension's owner"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM pgpipe.dead_letters WHERE channel = 'billing' AND error = 'HTTP 400'").await,
        1
    );
    assert_eq!(
        text(&db, "SELECT string_agg(\"table\" || ':' || mode, ',' ORDER BY \"table\"::text) FROM pgpipe.subscriptions").await,
        "orders:trigger,wal_t:wal"
    );
    assert_eq!(
        text(&db, "SELECT string_agg(channel || '=' || relid::regclass::text, ',' ORDER BY channel) FROM pgpipe.channel_sources").await,
        "orders=orders,wal_t=wal_t",
        "the channels' tables are known, so who may read them is decided by those tables"
    );

    // The worker goes on by itself and queues the WAL change made while it waited.
    let captured = wait_until(Duration::from_secs(15), async || {
        count(
            &db,
            "SELECT count(*) FROM pgpipe.events WHERE channel = 'wal_t' AND source = 'wal'",
        )
        .await
            == 1
    })
    .await;
    let (state, error) = worker_state(&db).await;
    assert!(
        captured,
        "WAL change not captured: worker {state}, {error:?}"
    );
    assert_eq!(state, "streaming");
    assert_eq!(
        error, None,
        "the waiting message is gone once the worker streams"
    );

    // The old consumer resumes where it stood: the third event, then a new capture, which
    // goes through the native trigger now.
    assert_eq!(
        text(&db, "SELECT l.lanname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang WHERE t.tgrelid = 'orders'::regclass AND t.tgname = 'pgpipe_capture'").await,
        "c"
    );
    // Least privilege: PUBLIC lost the schema and every function; a role with
    // pgpipe_consumer and SELECT on the table reads it as in a fresh install. Its
    // consumer is registered before the old one acknowledges the rest, so retention
    // keeps the events it reads below (otherwise a rotation in between may drop them).
    execute(
        &db,
        "CREATE ROLE upgrade_stranger LOGIN;
         CREATE ROLE upgrade_reader LOGIN IN ROLE pgpipe_consumer;
         GRANT SELECT ON orders TO upgrade_reader;",
    )
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'pgpipe' AND a.grantee = 0").await
            + count(&db, "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a WHERE p.pronamespace = 'pgpipe'::regnamespace AND a.grantee = 0").await,
        0,
        "PUBLIC holds no right on schema pgpipe or its functions"
    );
    let stranger = pg_client_as(&pg, "upgrade_stranger").await;
    let reader = pg_client_as(&pg, "upgrade_reader").await;
    execute(
        &reader,
        "SELECT pgpipe.register_consumer('reader', ARRAY['orders'])",
    )
    .await;
    let fwd = Forwarder::listen(&pg.url("postgres"))
        .channel("orders")
        .flag("--consumer", "old_fwd")
        .spawn();
    execute(&db, "INSERT INTO orders VALUES (3, 'after the update')").await;
    let events = fwd.wait_for_events(2, Duration::from_secs(20)).await;
    assert_eq!(
        events[0]["id"],
        third.to_string(),
        "the unacknowledged event first"
    );
    assert_eq!(events[1]["payload"]["row"]["status"], "after the update");
    assert_eq!(events[1]["source"], "trigger");
    fwd.sigterm();
    assert!(fwd.wait_exit(Duration::from_secs(10)).await.success());

    let refused = stranger
        .batch_execute("SELECT pgpipe.register_consumer('mine', ARRAY['orders'])")
        .await
        .expect_err("a role without pgpipe_consumer is refused");
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("42501"),
        "{}",
        describe(&refused)
    );
    // Read batch after batch: a transaction still open elsewhere (the worker's) can end
    // the first batch early; the position carries the rest.
    let mut read_events = 0;
    let mut after: Option<String> = None;
    let _all_read = wait_until(Duration::from_secs(15), async || {
        let rows = reader
            .query(
                "SELECT channel, position FROM pgpipe.read('reader', $1)",
                &[&after],
            )
            .await
            .unwrap();
        for row in &rows {
            if row.get::<_, Option<String>>(0).as_deref() == Some("orders") {
                read_events += 1;
            }
            after = row.get(1);
        }
        read_events >= 4
    })
    .await;
    assert_eq!(read_events, 4);
    let refused = reader
        .batch_execute("SELECT * FROM pgpipe.read('old_fwd')")
        .await
        .expect_err("another role's consumer is refused");
    assert!(
        describe(&refused).contains("belongs to role postgres"),
        "{}",
        describe(&refused)
    );
}

async fn pg_client_as(pg: &TempPg, role: &str) -> Client {
    let url =
        pg.url("postgres")
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {}", describe(&e)));
    tokio::spawn(connection);
    client
}

/// The catalog of one database as `pg_dump --schema-only --binary-upgrade` prints it
/// (unlike a plain dump, it includes an extension's member objects), by object: the
/// `-- Name: ...; Type: ...; Schema: ...` header, e.g. `FUNCTION pgpipe.read(text, text,
/// integer)`, to its statements. What differs between two equal schemas is left out:
/// oids, relfilenodes, frozen xids, the columns a table dropped, the dump's random key.
fn catalog(pg: &TempPg, dbname: &str) -> BTreeMap<String, Vec<String>> {
    let output = Command::new(pg_bin().join("pg_dump"))
        .args(["--schema-only", "--binary-upgrade"])
        .args([
            "-h",
            pg.host(),
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            dbname,
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        output.status.success(),
        "pg_dump {dbname}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    normalise(&String::from_utf8_lossy(&output.stdout))
}

fn normalise(dump: &str) -> BTreeMap<String, Vec<String>> {
    let mut objects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut key = String::from("(preamble)");
    let mut lines = dump.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            // "read(text, ...); Type: FUNCTION; Schema: pgpipe; Owner: postgres"
            let parts: Vec<&str> = header.split("; ").collect();
            let field = |name: &str| {
                parts
                    .iter()
                    .find_map(|p| p.strip_prefix(name))
                    .unwrap_or("")
                    .to_string()
            };
            key = format!("{} {}.{}", field("Type: "), field("Schema: "), parts[0]);
            continue;
        }
        // Physical bookkeeping (frozen xids, dropped columns' attributes): one statement.
        if line.starts_with("UPDATE pg_catalog.") {
            let mut statement_end = line.trim_end().ends_with(';');
            while !statement_end {
                statement_end = lines.next().is_none_or(|l| l.trim_end().ends_with(';'));
            }
            continue;
        }
        if line.starts_with("--")
            || line.trim().is_empty()
            || line.contains("binary_upgrade_set_next_")
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict")
            || line.contains("........pg.dropped.")
        {
            continue;
        }
        let mut line = line.to_string();
        // The oids of the extension's configuration tables; compared by name separately.
        if let Some(at) = line.find("binary_upgrade_create_empty_extension(") {
            line.truncate(at);
            line.push_str("binary_upgrade_create_empty_extension(...)");
        }
        let object = objects.entry(key.clone()).or_default();
        // A dropped last column leaves a comma behind on the one before it.
        if line.starts_with(')') {
            if let Some(previous) = object.last_mut() {
                if let Some(stripped) = previous.strip_suffix(',') {
                    *previous = stripped.to_string();
                }
            }
        }
        object.push(line);
    }
    objects
}

/// The first difference between two catalogs, readably: which object exists in only one
/// of them, or the first differing statement of an object in both.
fn first_difference(
    fresh: &BTreeMap<String, Vec<String>>,
    updated: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    let mut differing = Vec::new();
    let mut first = None;
    for name in fresh
        .keys()
        .chain(updated.keys().filter(|k| !fresh.contains_key(*k)))
    {
        let (a, b) = (fresh.get(name), updated.get(name));
        if a == b {
            continue;
        }
        differing.push(name.clone());
        if first.is_some() {
            continue;
        }
        first = Some(match (a, b) {
            (Some(a), None) => format!(
                "{name} is in a fresh {NEW} install but not in a database updated from {OLD}:\n  {}",
                a.join("\n  ")
            ),
            (None, Some(b)) => format!(
                "{name} is in a database updated from {OLD} but not in a fresh {NEW} install:\n  {}",
                b.join("\n  ")
            ),
            (Some(a), Some(b)) => {
                let at = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                format!(
                    "{name} differs from line {} on:\n  fresh {NEW} install: {}\n  updated from {OLD}:  {}",
                    at + 1,
                    a.get(at).map_or("(nothing)", String::as_str),
                    b.get(at).map_or("(nothing)", String::as_str),
                )
            }
            (None, None) => unreachable!("the name comes from one of the maps"),
        });
    }
    first.map(|first| {
        format!(
            "{first}\n\nAll differing objects: {}\nAdd what is missing to sql/upgrade/pgpipe--{OLD}--{NEW}.sql (see its header).",
            differing.join(", ")
        )
    })
}

/// The extension's configuration tables (pg_dump dumps their rows) and filters.
async fn config_tables(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT c::regclass::text || coalesce(' WHERE ' || nullif(f, ''), '')
             FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(c, f)
             WHERE e.extname = 'pgpipe' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn the_catalog_updated_from_0_1_0_equals_a_fresh_install() {
    require_upgrade_scripts();
    let pg = TempPg::shared();
    let fresh = pg.database_without_extension("catalog_fresh").await;
    let updated = pg.database_without_extension("catalog_updated").await;
    let fresh_client = fresh.client().await;
    let updated_client = updated.client().await;
    execute(&fresh_client, "CREATE EXTENSION pgpipe").await;
    execute(
        &updated_client,
        &format!(
            "CREATE EXTENSION pgpipe VERSION '{OLD}'; ALTER EXTENSION pgpipe UPDATE TO '{NEW}'"
        ),
    )
    .await;
    assert_eq!(
        text(
            &updated_client,
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'"
        )
        .await,
        NEW
    );
    assert_eq!(
        text(
            &fresh_client,
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpipe'"
        )
        .await,
        NEW,
        "pgpipe.control's default_version is the crate version"
    );

    let fresh_catalog = catalog(pg, fresh.name());
    let updated_catalog = catalog(pg, updated.name());
    assert!(
        fresh_catalog
            .keys()
            .any(|k| k.starts_with("FUNCTION pgpipe.read(")),
        "the dump lists the extension's objects: {:?}",
        fresh_catalog.keys().collect::<Vec<_>>()
    );
    if let Some(difference) = first_difference(&fresh_catalog, &updated_catalog) {
        panic!("{difference}");
    }
    assert_eq!(
        config_tables(&updated_client).await,
        config_tables(&fresh_client).await,
        "pg_extension_config_dump: the same tables keep their rows in pg_dump"
    );
}

#[test]
fn a_difference_is_reported_by_object_and_line() {
    let fresh = normalise(
        "-- Name: lag(text); Type: FUNCTION; Schema: pgpipe; Owner: postgres\n\
         CREATE FUNCTION pgpipe.lag(consumer text) RETURNS bigint\n\
         \x20   LANGUAGE sql STABLE\n\
         -- Name: t; Type: TABLE; Schema: pgpipe; Owner: postgres\n\
         SELECT pg_catalog.binary_upgrade_set_next_heap_pg_class_oid('1'::pg_catalog.oid);\n\
         CREATE TABLE pgpipe.t (\n    a int\n);\n",
    );
    let updated = normalise(
        "-- Name: lag(text); Type: FUNCTION; Schema: pgpipe; Owner: postgres\n\
         CREATE FUNCTION pgpipe.lag(consumer text) RETURNS bigint\n\
         \x20   LANGUAGE sql VOLATILE\n\
         -- Name: t; Type: TABLE; Schema: pgpipe; Owner: postgres\n\
         SELECT pg_catalog.binary_upgrade_set_next_heap_pg_class_oid('2'::pg_catalog.oid);\n\
         CREATE TABLE pgpipe.t (\n    a int,\n    \"........pg.dropped.2........\" integer\n);\n\
         UPDATE pg_catalog.pg_class\nSET relfrozenxid = '9'\nWHERE oid = '2';\n",
    );
    assert_eq!(fresh["TABLE pgpipe.t"], updated["TABLE pgpipe.t"]);
    let report = first_difference(&fresh, &updated).expect("they differ");
    assert!(
        report.starts_with("FUNCTION pgpipe.lag(text) differs from line 2 on:"),
        "{report}"
    );
    assert!(report.contains("LANGUAGE sql VOLATILE"), "{report}");
    assert!(first_difference(&fresh, &fresh).is_none());
}
