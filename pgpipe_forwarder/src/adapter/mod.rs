//! Adapters deliver events somewhere. Each lives in its own module; this one holds the
//! trait and the factory that builds the configured set.

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::Acker;
use crate::config::Config;
use crate::error::Error;
use crate::event::Delivery;

pub mod dead_letter;
pub mod durable;
pub mod exec;
pub mod file;
pub mod live;
pub mod pg_table;
pub mod sse;
pub mod stdout;
pub mod webhook;
pub mod ws;

/// A destination for events.
///
/// Durable adapters report every event they finished (delivered, or dead-lettered) to the
/// [`Acker`], in order; live adapters get no acker and may drop events.
pub trait Adapter: Send {
    /// Name used in logs, metrics and health.
    fn name(&self) -> &str;

    /// Whether the source position waits for this adapter's acknowledgements.
    fn durable(&self) -> bool;

    /// Delivers events from `input` until it closes (the bus is dropped on shutdown after
    /// the detector stopped), then returns. `cancel` fires when shutdown starts; durable
    /// adapters keep draining their input, live ones may stop.
    fn run(
        self: Box<Self>,
        input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>>;

    /// Receives the adapter's health handle before [`Adapter::run`]; the pipeline marks
    /// the adapter up at start and down when it fails. Adapters that can tell more (a
    /// webhook endpoint failing) keep the handle and report with it.
    fn set_health(&mut self, _health: crate::health::Component) {}
}

/// Prefix of the adapters built from the `webhooks` list: `webhook:<name>`.
pub const LISTED_WEBHOOK_PREFIX: &str = "webhook:";

/// The adapters to run: those in `config.adapters`, then `webhook:<name>` per `webhooks`
/// entry.
pub fn names(config: &Config) -> Vec<String> {
    let listed = config
        .webhooks
        .iter()
        .map(|w| format!("{LISTED_WEBHOOK_PREFIX}{}", w.name));
    config.adapters.iter().cloned().chain(listed).collect()
}

/// Builds the adapters [`names`] lists.
pub fn build(config: &Config) -> Result<Vec<Box<dyn Adapter>>, Error> {
    names(config)
        .iter()
        .map(|name| build_one(config, name))
        .collect()
}

/// Builds the adapters named in `config.adapters`, the live ones (sse, ws) feeding `hubs`.
pub fn build_with_hubs(config: &Config, hubs: &live::Hubs) -> Result<Vec<Box<dyn Adapter>>, Error> {
    names(config)
        .iter()
        .map(|name| match (name.as_str(), hubs.get(name)) {
            ("sse" | "ws", Some(hub)) => {
                Ok(Box::new(live::LiveAdapter::new(hub)) as Box<dyn Adapter>)
            }
            _ => build_one(config, name),
        })
        .collect()
}

/// Builds one adapter by name, as configured in `config` (also used by `pgpipe dlq replay`).
pub fn build_one(config: &Config, name: &str) -> Result<Box<dyn Adapter>, Error> {
    if let Some(listed) = name.strip_prefix(LISTED_WEBHOOK_PREFIX) {
        let Some(hook) = config.webhooks.iter().find(|w| w.name == listed) else {
            return Err(Error::Config(format!(
                "adapter {name:?}: no webhooks entry is named {listed:?}"
            )));
        };
        return Ok(Box::new(webhook::Webhook::new(
            name,
            hook,
            &config.database_url,
        )?));
    }
    match name {
        "stdout" => Ok(Box::new(stdout::Stdout::new(tokio::io::stdout()))),
        "file" => Ok(Box::new(file::FileAdapter::new(
            "file",
            &config.file,
            config.file.backoff_base,
            config.file.backoff_cap,
        )?)),
        "exec" => Ok(Box::new(exec::Exec::new(
            "exec",
            &config.exec,
            &config.database_url,
            config.shutdown_timeout / 2,
        ))),
        "pg_table" => Ok(Box::new(pg_table::PgTable::new(
            "pg_table",
            &config.pg_table,
            &config.database_url,
        ))),
        "webhook" => Ok(Box::new(webhook::Webhook::new(
            "webhook",
            &config.webhook,
            &config.database_url,
        )?)),
        other => Err(Error::Config(format!(
            "adapter {other:?} is not available in this build \
                     (available: stdout, webhook, file, exec, pg_table)"
        ))),
    }
}
