//! Journey: an operator asks `pgpipe status` how delivery is going: consumers, their lag,
//! subscriptions, dead letters and the worker, as a table and as JSON.

use std::time::Duration;

use pgpipe_tests::{test_db, Forwarder};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn status_shows_consumers_lag_and_subscriptions() {
    let db = test_db("status").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY); SELECT pgpipe.subscribe('orders');
         SELECT pgpipe.register_consumer('audit', ARRAY['orders']);
         INSERT INTO orders SELECT generate_series(1, 3);",
    )
    .await;
    // The operator's view: every consumer (a forwarder's role sees its own).
    let url = db.admin_url();

    let json = Forwarder::spawn(&["status", "--db", &url, "--json"], &[]);
    assert!(
        json.wait_exit(WAIT).await.success(),
        "{}",
        json.stderr_text()
    );
    let report: serde_json::Value = serde_json::from_str(&json.stdout_lines().join("\n")).unwrap();
    let audit = report["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "audit")
        .expect("the audit consumer");
    assert_eq!(audit["pending_events"], 3);
    assert_eq!(audit["channels"], serde_json::json!(["orders"]));
    assert_eq!(report["subscriptions"][0]["channel"], "orders");
    assert_eq!(report["subscriptions"][0]["mode"], "trigger");
    assert!(report["dead_letters"].is_array(), "{report}");

    let table = Forwarder::spawn(&["status", "--db", &url], &[]);
    assert!(
        table.wait_exit(WAIT).await.success(),
        "{}",
        table.stderr_text()
    );
    let text = table.stdout_lines().join("\n");
    assert!(text.contains("Consumers"), "{text}");
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("audit "))
        .unwrap_or_else(|| panic!("a row for audit:\n{text}"));
    assert!(
        row.split_whitespace().nth(2) == Some("3"),
        "lag 3 in {row:?}"
    );
    assert!(
        text.contains("Subscriptions") && text.contains("orders"),
        "{text}"
    );

    let missing = Forwarder::spawn(&["status"], &[("PGPIPE_DATABASE_URL", "")]);
    assert!(!missing.wait_exit(WAIT).await.success());
    assert!(missing.stderr_text().contains("no database URL"));
}
