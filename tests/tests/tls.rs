//! Journey: a managed-Postgres-like server that only accepts TLS. The forwarder connects
//! with `sslmode=verify-full` and the server's CA; without TLS it is refused, and the
//! error says so.

use std::time::Duration;

use pgpipe_tests::{Forwarder, PgOptions, TempPg};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_forwarder_reads_over_verified_tls_and_plain_connections_are_refused() {
    let pg = TempPg::start_dedicated(PgOptions::new().tls(true)).await;
    let db = pg.database("tls").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;

    let url = db.tls_url();
    let fwd = Forwarder::listen(&url).channel("t").spawn();
    db.execute("INSERT INTO t VALUES (1)").await;
    let events = fwd.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["payload"]["row"]["id"], 1);
    let encrypted = db
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'pgpipe'",
            &[],
        )
        .await;
    assert_eq!(
        encrypted.get::<_, Option<bool>>(0),
        Some(true),
        "the forwarder's session uses TLS"
    );

    let plain = db.url_with("sslmode=disable");
    let refused = Forwarder::listen(&plain).channel("t").spawn();
    let status = refused.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1));
    let stderr = refused.stderr_text();
    assert!(
        stderr.contains("connect to postgres") && stderr.contains("no encryption"),
        "{stderr}"
    );
}
