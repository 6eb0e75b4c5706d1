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
/// Every adapter gets an [`Acker`]: durable adapters report every event they finished
/// (delivered, or dead-lettered) to it, in order — most through the delivery driver
/// ([`durable::Durable`]), which does it for them; live adapters get one whose
/// acknowledgements count at once, and may drop events.
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
        acker: Acker,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>>;

    /// Receives the adapter's health handle before [`Adapter::run`]; the pipeline marks
    /// the adapter up at start and down when it fails. Adapters that can tell more (a
    /// webhook endpoint failing) keep the handle and report with it.
    fn set_health(&mut self, _health: crate::health::Component) {}
}

/// The adapters to run: those in `config.adapters`, then `<kind>:<name>` per entry of the
/// `webhooks`, `files`, `execs` and `pg_tables` lists.
pub fn names(config: &Config) -> Vec<String> {
    let listed = |kind: &str, names: Vec<&str>| -> Vec<String> {
        names.iter().map(|n| format!("{kind}:{n}")).collect()
    };
    let mut all = config.adapters.clone();
    all.extend(listed(
        "webhook",
        config.webhooks.iter().map(|w| w.name.as_str()).collect(),
    ));
    all.extend(listed(
        "file",
        config.files.iter().map(|f| f.name.as_str()).collect(),
    ));
    all.extend(listed(
        "exec",
        config.execs.iter().map(|e| e.name.as_str()).collect(),
    ));
    all.extend(listed(
        "pg_table",
        config.pg_tables.iter().map(|p| p.name.as_str()).collect(),
    ));
    all
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
    if let Some((kind, listed)) = name.split_once(':') {
        let missing = |list: &str| {
            Error::Config(format!(
                "adapter {name:?}: no {list} entry is named {listed:?}"
            ))
        };
        let db = &config.database_url;
        return match kind {
            "webhook" => {
                let c = config.webhooks.iter().find(|c| c.name == listed);
                let c = c.ok_or_else(|| missing("webhooks"))?;
                Ok(Box::new(webhook::Webhook::adapter(name, c, db)?))
            }
            "file" => {
                let c = config.files.iter().find(|c| c.name == listed);
                let c = c.ok_or_else(|| missing("files"))?;
                Ok(Box::new(file::FileAdapter::adapter(name, c)?))
            }
            "exec" => {
                let c = config.execs.iter().find(|c| c.name == listed);
                let c = c.ok_or_else(|| missing("execs"))?;
                let grace = config.shutdown_timeout / 2;
                Ok(Box::new(exec::Exec::new(name, c, db, grace)))
            }
            "pg_table" => {
                let c = config.pg_tables.iter().find(|c| c.name == listed);
                let c = c.ok_or_else(|| missing("pg_tables"))?;
                Ok(Box::new(pg_table::PgTable::adapter(name, c, db)))
            }
            _ => Err(Error::Config(format!(
                "adapter {name:?}: unknown kind {kind:?} (webhook, file, exec or pg_table)"
            ))),
        };
    }
    match name {
        "stdout" => Ok(Box::new(stdout::Stdout::adapter(tokio::io::stdout()))),
        "file" => Ok(Box::new(file::FileAdapter::adapter("file", &config.file)?)),
        "exec" => Ok(Box::new(exec::Exec::new(
            "exec",
            &config.exec,
            &config.database_url,
            config.shutdown_timeout / 2,
        ))),
        "pg_table" => Ok(Box::new(pg_table::PgTable::adapter(
            "pg_table",
            &config.pg_table,
            &config.database_url,
        ))),
        "webhook" => Ok(Box::new(webhook::Webhook::adapter(
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
