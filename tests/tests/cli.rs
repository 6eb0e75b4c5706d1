//! Journey: a user sets pgpipe up from the command line — `pgpipe init` prints SQL that
//! subscribes the table, a `pgpipe.yaml` plus `PGPIPE_*` environment configure `listen` —
//! and every mistake (missing URL, bad channel, unknown config key, no extension,
//! unreachable database) stops it at once with exit code 1 and the problem named.

use std::process::Command;
use std::time::Duration;

use pgpipe_tests::{test_db, Forwarder, TempPg};

const WAIT: Duration = Duration::from_secs(20);

fn pgpipe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(Forwarder::binary_path())
        .args(args)
        .output()
        .expect("run pgpipe");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn init_sql_and_a_config_file_set_up_a_working_forwarder() {
    let db = test_db("cli_init").await;
    db.execute(r#"CREATE SCHEMA shop; CREATE TABLE shop."Orders" (id int PRIMARY KEY);"#)
        .await;
    let (code, sql, stderr) =
        pgpipe(&["init", "--table", "shop.Orders", "--channel", "shop:orders"]);
    assert_eq!(code, 0, "{stderr}");
    db.execute(&sql).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpipe.yaml");
    // The original pgpipe's keys; the URL comes from the environment.
    std::fs::write(
        &config,
        "channels: [\"shop:orders\"]\nadapters: [stdout]\ndetector:\n  poll_interval: 20ms\n",
    )
    .unwrap();
    let url = db.url();
    let config = config.to_str().unwrap();
    let fwd = Forwarder::spawn(
        &["--config", config, "listen"],
        &[("PGPIPE_DATABASE_URL", &url)],
    );
    db.execute(r#"INSERT INTO shop."Orders" VALUES (7)"#).await;
    let events = fwd.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["channel"], "shop:orders");
    assert_eq!(events[0]["payload"]["schema"], "shop");
    assert_eq!(events[0]["payload"]["table"], "Orders");

    // Any name Postgres accepts, as written: a schema with '-', a table with a space, and
    // (in double quotes) one with a dot and a double quote.
    db.execute(
        r#"CREATE SCHEMA "my-shop"; CREATE TABLE "my-shop"."Order Items" (id int PRIMARY KEY);
           CREATE TABLE "my-shop"."v1.""x""" (id int PRIMARY KEY);"#,
    )
    .await;
    for (table, channel) in [
        ("my-shop.Order Items", "shop:items"),
        (r#""my-shop"."v1.""x""""#, "shop:x"),
    ] {
        let (code, sql, stderr) = pgpipe(&["init", "--table", table, "--channel", channel]);
        assert_eq!(code, 0, "{table}: {stderr}");
        db.execute(&sql).await;
    }
    let subscribed: Vec<String> = db
        .query(
            r#"SELECT "table"::text || '=' || channel FROM pgpipe.subscriptions WHERE channel LIKE 'shop:%' ORDER BY channel"#,
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        subscribed,
        [
            r#""my-shop"."Order Items"=shop:items"#,
            r#"shop."Orders"=shop:orders"#,
            r#""my-shop"."v1.""x"""=shop:x"#,
        ]
    );
}

#[tokio::test]
async fn mistakes_fail_fast_with_the_problem_named() {
    let plain = TempPg::shared()
        .database_without_extension("cli_noext")
        .await;
    let plain_url = plain.url();
    let dir = tempfile::tempdir().unwrap();
    let bad_config = dir.path().join("pgpipe.yaml");
    std::fs::write(&bad_config, "database_url: postgres://x/y\nchanels: [a]\n").unwrap();
    let bad_config = bad_config.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["listen", "-c", "orders"], "no database URL"),
        (
            vec!["listen", "--db", "postgres://127.0.0.1:1/x"],
            "no channels",
        ),
        (
            vec![
                "listen",
                "--db",
                "postgres://127.0.0.1:1/x",
                "-c",
                "has space",
            ],
            "invalid channel name \"has space\"",
        ),
        (
            vec!["--config", bad_config, "listen"],
            "unknown key \"chanels\"",
        ),
        (
            vec!["--config", "/nonexistent/pgpipe.yaml", "listen"],
            "/nonexistent/pgpipe.yaml",
        ),
        (
            vec![
                "listen",
                "--db",
                "postgres://127.0.0.1:1/x",
                "-c",
                "a",
                "--adapter",
                "smtp",
            ],
            "invalid value 'smtp'",
        ),
        (
            vec!["listen", "--db", "postgres://127.0.0.1:1/x", "-c", "a"],
            "connect to postgres at 127.0.0.1:1",
        ),
        (
            vec![
                "listen",
                "--db",
                "postgres://127.0.0.1:1/x?sslmode=sometimes",
                "-c",
                "a",
            ],
            "sslmode",
        ),
        (
            vec![
                "listen",
                "--db",
                &plain_url,
                "-c",
                "a",
                "--detector",
                "queue",
            ],
            "the pgpipe extension is not installed",
        ),
        (
            vec!["init", "--table", "shop.orders.x"],
            "invalid table name",
        ),
        (
            vec!["init", "--table", "my-shop.Order Items"],
            "pass --channel NAME, e.g. --channel Order_Items",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = pgpipe(&args);
        assert_eq!(code, 1, "pgpipe {args:?} should exit 1; stderr: {stderr}");
        assert!(
            stderr.contains(expected),
            "pgpipe {args:?}: expected {expected:?} in\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "pgpipe {args:?} panicked:\n{stderr}"
        );
    }
}
