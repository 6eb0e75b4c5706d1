//! Journey: an operator scrapes `/metrics` and probes `/healthz` and `/readyz` on the
//! standalone `--metrics-addr` server; Postgres goes away and comes back while they watch.

use std::time::Duration;

use pgpipe_tests::http::{http_addr, http_get};
use pgpipe_tests::{wait_until, Forwarder, PgOptions, StopMode, TempPg};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Every metric the README documents.
const METRICS: &[&str] = &[
    "pgpipe_events_received_total",
    "pgpipe_events_delivered_total",
    "pgpipe_events_dropped_total",
    "pgpipe_delivery_errors_total",
    "pgpipe_webhook_retries_total",
    "pgpipe_delivery_duration_seconds",
    "pgpipe_end_to_end_latency_seconds",
    "pgpipe_queue_lag_events",
    "pgpipe_queue_stale_consumers",
    "pgpipe_dead_letters_total",
    "pgpipe_sse_clients_active",
    "pgpipe_ws_clients_active",
    "pgpipe_file_rotations_total",
    "pgpipe_exec_restarts_total",
];

/// Parses the exposition with a parser we did not write, after checking every line is
/// a comment or `name{labels} value`.
fn scrape(text: &str) -> prometheus_parse::Scrape {
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(
            value == "+Inf" || value == "NaN" || value.parse::<f64>().is_ok(),
            "bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric}: not a single value: {other:?}"),
        })
}

async fn health(addr: std::net::SocketAddr) -> (u16, Value) {
    let r = http_get(addr, "/healthz").await;
    let body = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body));
    (r.status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_health_follows_postgres() {
    let pg = TempPg::start_dedicated(PgOptions::new()).await;
    let db = pg.database("health").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("t")
        .flag("--metrics-addr", "127.0.0.1:0")
        .env("PGPIPE_DETECTOR_BACKOFF_BASE", "200ms")
        .env("PGPIPE_DETECTOR_BACKOFF_CAP", "500ms")
        .spawn();
    let addr = http_addr(&fwd, "metrics").await;

    // The server answers before the pipeline has registered its parts (no part yet: 200,
    // "up"), so wait for the detector to be up.
    assert!(
        wait_until(WAIT, async || {
            let (code, body) = health(addr).await;
            code == 200 && body["components"]["detector"] == "up"
        })
        .await
    );
    let (_, body) = health(addr).await;
    assert_eq!(body["status"], "up");
    for part in ["detector", "bus", "stdout"] {
        assert_eq!(body["components"][part], "up", "{body}");
    }
    assert_eq!(http_get(addr, "/readyz").await.status, 200);

    // A second forwarder for the same consumer is a hot standby: healthy, not ready.
    let standby = Forwarder::listen(&url)
        .channel("t")
        .flag("--metrics-addr", "127.0.0.1:0")
        .spawn();
    let standby_addr = http_addr(&standby, "metrics").await;
    assert!(
        wait_until(WAIT, async || health(standby_addr).await.1["components"]
            ["detector"]
            == "standby")
        .await
    );
    assert_eq!(health(standby_addr).await.0, 200);
    assert_eq!(http_get(standby_addr, "/readyz").await.status, 503);
    drop(standby);

    db.execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await;
    fwd.wait_for_events(5, WAIT).await;
    let metrics = http_get(addr, "/metrics").await;
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let s = scrape(&metrics.body);
    for name in METRICS {
        assert!(
            s.docs.contains_key(*name) && !s.docs[*name].is_empty(),
            "{name} has a help text:\n{}",
            metrics.body
        );
    }
    let delivered = value(
        &s,
        "pgpipe_events_delivered_total",
        &[("adapter", "stdout")],
    );
    assert_eq!(delivered, Some(5.0), "{}", metrics.body);
    assert_eq!(value(&s, "pgpipe_events_received_total", &[]), Some(5.0));
    assert_eq!(value(&s, "pgpipe_queue_lag_events", &[]), Some(0.0));
    let latency = s
        .samples
        .iter()
        .find(|x| x.metric == "pgpipe_end_to_end_latency_seconds")
        .expect("latency histogram");
    assert!(
        matches!(&latency.value, prometheus_parse::Value::Histogram(b) if b.last().unwrap().count == 5.0)
    );

    // Postgres goes away: the detector is down, /healthz says so with 503.
    pg.stop(StopMode::Fast).await;
    assert!(
        wait_until(WAIT, async || health(addr).await.0 == 503).await,
        "503 while Postgres is down"
    );
    let (_, body) = health(addr).await;
    assert_eq!(body["status"], "down");
    assert_eq!(body["components"]["detector"], "down");
    assert!(body["errors"]["detector"].is_string(), "{body}");
    assert_eq!(http_get(addr, "/readyz").await.status, 503);
    // /metrics still answers.
    assert_eq!(http_get(addr, "/metrics").await.status, 200);

    // And comes back.
    pg.start().await;
    assert!(
        wait_until(WAIT, async || health(addr).await.0 == 200).await,
        "200 again once Postgres is back"
    );
    db.execute("INSERT INTO t VALUES (6)").await;
    let events = fwd.wait_for_events(6, WAIT).await;
    assert_eq!(events[5]["payload"]["row"]["id"], 6);
}
