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
pub mod stdout;
pub mod webhook;

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
}

/// Builds the adapters named in `config.adapters`.
pub fn build(config: &Config) -> Result<Vec<Box<dyn Adapter>>, Error> {
    config
        .adapters
        .iter()
        .map(|name| -> Result<Box<dyn Adapter>, Error> {
            match name.as_str() {
                "stdout" => Ok(Box::new(stdout::Stdout::new(tokio::io::stdout()))),
                "webhook" => Ok(Box::new(webhook::Webhook::new(
                    "webhook",
                    &config.webhook,
                    &config.database_url,
                )?)),
                other => Err(Error::Config(format!(
                    "adapter {other:?} is not available in this build (available: stdout, webhook)"
                ))),
            }
        })
        .collect()
}
