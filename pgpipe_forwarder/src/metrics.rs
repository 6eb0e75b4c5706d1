//! Prometheus metrics: one registry for the process (with the tracing subscriber, the only
//! global state), exposed by the HTTP server at `/metrics` in the Prometheus text format.
//!
//! Detectors and adapters record through the plain functions below
//! (`metrics::delivered("webhook", 1)`); they never touch the registry. [`METRICS`] lists
//! every metric's name and help text: the README's table is checked against it.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Name and help text of every metric pgpipe exports, in exposition order.
pub const METRICS: &[(&str, &str)] = &[
    (
        "pgpipe_events_received_total",
        "Events the detector handed to the bus.",
    ),
    (
        "pgpipe_events_delivered_total",
        "Events an adapter delivered (for sse and ws: frames queued to a connected client).",
    ),
    (
        "pgpipe_events_dropped_total",
        "Events a live adapter (sse, ws) dropped because it or one of its clients fell behind, or that were still buffered for a client when it went away.",
    ),
    (
        "pgpipe_delivery_errors_total",
        "Failed delivery attempts per adapter.",
    ),
    (
        "pgpipe_webhook_retries_total",
        "Webhook deliveries retried after a failed attempt.",
    ),
    (
        "pgpipe_delivery_duration_seconds",
        "Time an adapter took to deliver an event or batch.",
    ),
    (
        "pgpipe_end_to_end_latency_seconds",
        "Time from an event's capture (created_at) to its delivery.",
    ),
    (
        "pgpipe_queue_lag_events",
        "Committed queue events the forwarder's consumer has not acknowledged yet.",
    ),
    (
        "pgpipe_queue_stale_consumers",
        "Consumers of the forwarder's role that acknowledged nothing for pgpipe.consumer_stale_after (they hold retention).",
    ),
    (
        "pgpipe_dead_letters_total",
        "Events written to pgpipe.dead_letters after exhausting their retries.",
    ),
    (
        "pgpipe_sse_clients_active",
        "Connected Server-Sent Events clients.",
    ),
    ("pgpipe_ws_clients_active", "Connected WebSocket clients."),
    (
        "pgpipe_file_rotations_total",
        "Rotations of the file adapter's output file.",
    ),
    (
        "pgpipe_exec_restarts_total",
        "Restarts of the exec adapter's command.",
    ),
];

/// The process's metrics.
struct Metrics {
    registry: Registry,
    received: IntCounter,
    delivered: IntCounterVec,
    dropped: IntCounterVec,
    errors: IntCounterVec,
    webhook_retries: IntCounter,
    duration: HistogramVec,
    latency: Histogram,
    queue_lag: IntGauge,
    stale_consumers: IntGauge,
    dead_letters: IntCounter,
    sse_clients: IntGauge,
    ws_clients: IntGauge,
    file_rotations: IntCounter,
    exec_restarts: IntCounter,
}

fn help(name: &str) -> &'static str {
    METRICS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, h)| *h)
}

/// Latency buckets from 1 ms to about 33 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets")
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str| {
            let c = IntCounter::new(name, help(name)).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter_vec = |name: &str| {
            let c = IntCounterVec::new(Opts::new(name, help(name)), &["adapter"])
                .expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge = |name: &str| {
            let g = IntGauge::new(name, help(name)).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "pgpipe_delivery_duration_seconds",
                help("pgpipe_delivery_duration_seconds"),
            )
            .buckets(latency_buckets()),
            &["adapter"],
        )
        .expect("valid metric");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "pgpipe_end_to_end_latency_seconds",
                help("pgpipe_end_to_end_latency_seconds"),
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let m = Metrics {
            received: counter("pgpipe_events_received_total"),
            delivered: counter_vec("pgpipe_events_delivered_total"),
            dropped: counter_vec("pgpipe_events_dropped_total"),
            errors: counter_vec("pgpipe_delivery_errors_total"),
            webhook_retries: counter("pgpipe_webhook_retries_total"),
            duration: duration.clone(),
            latency: latency.clone(),
            queue_lag: gauge("pgpipe_queue_lag_events"),
            stale_consumers: gauge("pgpipe_queue_stale_consumers"),
            dead_letters: counter("pgpipe_dead_letters_total"),
            sse_clients: gauge("pgpipe_sse_clients_active"),
            ws_clients: gauge("pgpipe_ws_clients_active"),
            file_rotations: counter("pgpipe_file_rotations_total"),
            exec_restarts: counter("pgpipe_exec_restarts_total"),
            registry,
        };
        m.registry
            .register(Box::new(duration))
            .expect("unique metric");
        m.registry.register(Box::new(latency)).expect("unique");
        m
    }
}

fn get() -> &'static Metrics {
    static METRICS_REGISTRY: OnceLock<Metrics> = OnceLock::new();
    METRICS_REGISTRY.get_or_init(Metrics::new)
}

/// Makes `adapter`'s labelled series appear (at 0) before its first event, so dashboards
/// and alerts see every configured adapter.
pub fn register_adapter(adapter: &str) {
    let m = get();
    m.delivered.with_label_values(&[adapter]);
    m.dropped.with_label_values(&[adapter]);
    m.errors.with_label_values(&[adapter]);
    m.duration.with_label_values(&[adapter]);
}

/// `n` events entered the bus.
pub fn received(n: u64) {
    get().received.inc_by(n);
}

/// `adapter` delivered `n` events.
pub fn delivered(adapter: &str, n: u64) {
    get().delivered.with_label_values(&[adapter]).inc_by(n);
}

/// `adapter` dropped `n` events (a live adapter or client fell behind).
pub fn dropped(adapter: &str, n: u64) {
    get().dropped.with_label_values(&[adapter]).inc_by(n);
}

/// Events `adapter` dropped so far (for tests).
#[cfg(test)]
pub fn dropped_count(adapter: &str) -> u64 {
    get().dropped.with_label_values(&[adapter]).get()
}

/// One delivery attempt of `adapter` failed.
pub fn delivery_error(adapter: &str) {
    get().errors.with_label_values(&[adapter]).inc();
}

/// A webhook delivery is being retried.
pub fn webhook_retry() {
    get().webhook_retries.inc();
}

/// `adapter` took `took` to deliver an event or a batch.
pub fn delivery_duration(adapter: &str, took: Duration) {
    get()
        .duration
        .with_label_values(&[adapter])
        .observe(took.as_secs_f64());
}

/// An event captured at `created_at` was delivered now.
pub fn end_to_end(created_at: DateTime<Utc>) {
    let age = (Utc::now() - created_at).num_microseconds().unwrap_or(0);
    // Clocks of Postgres and the forwarder may disagree slightly: never negative.
    get().latency.observe(age.max(0) as f64 / 1e6);
}

/// The consumer's unacknowledged committed events, as last measured.
pub fn queue_lag(events: i64) {
    get().queue_lag.set(events);
}

/// How many stale consumers `pgpipe.status()` names.
pub fn stale_consumers(n: usize) {
    get()
        .stale_consumers
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// `n` events were dead-lettered.
pub fn dead_letters(n: u64) {
    get().dead_letters.inc_by(n);
}

/// A file rotation happened.
pub fn file_rotation() {
    get().file_rotations.inc();
}

/// The exec adapter restarted its command.
pub fn exec_restart() {
    get().exec_restarts.inc();
}

/// Which live client gauge a [`ClientGuard`] counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
}

/// Counts one connected client while it lives.
#[derive(Debug)]
pub struct ClientGuard(ClientKind);

impl ClientGuard {
    /// Counts a newly connected client.
    pub fn new(kind: ClientKind) -> ClientGuard {
        gauge_of(kind).inc();
        ClientGuard(kind)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        gauge_of(self.0).dec();
    }
}

fn gauge_of(kind: ClientKind) -> &'static IntGauge {
    match kind {
        ClientKind::Sse => &get().sse_clients,
        ClientKind::Ws => &get().ws_clients,
    }
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let families = get().registry.gather();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("encoding to memory cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_help() {
        register_adapter("stdout");
        received(1);
        delivery_duration("stdout", Duration::from_millis(3));
        end_to_end(Utc::now());
        let text = render();
        for (name, help) in METRICS {
            assert!(
                text.contains(&format!("# HELP {name} {help}\n")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("pgpipe_events_delivered_total{adapter=\"stdout\"} 0"));
    }

    #[test]
    fn the_readme_documents_every_metric_with_its_help() {
        let readme = include_str!("../../README.md");
        for (name, help) in METRICS {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}")))
                .unwrap_or_else(|| panic!("README has no row for {name}"));
            assert!(
                row.ends_with(&format!("| {help} |")),
                "README row of {name}: {row}"
            );
        }
    }
}
