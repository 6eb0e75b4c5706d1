//! Adapters deliver events somewhere. Each lives in its own module; this one holds the
//! trait and the factory that builds the configured set.

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::Acker;
use crate::config::Config;
use crate::error::Error;
use crate::event::Delivery;
use crate::route::Route;

pub mod dead_letter;
pub mod durable;
pub mod registry;

/// Declares each adapter folder's module and lists its kinds in [`KINDS`].
macro_rules! kinds {
    ($($module:ident: $($kind:ident),+;)*) => {
        $(pub mod $module;)*

        /// Every adapter kind, in the order `--help` and the error texts list them.
        pub const KINDS: &[&registry::Kind] = &[$($(&$module::$kind),+),*];
    };
}

// The registry of adapter kinds: one line per adapter folder (see CONTRIBUTING.md).
kinds! {
    stdout: KIND;
    webhook: KIND;
    live: SSE, WS;
    file: KIND;
    exec: KIND;
    pg_table: KIND;
    nats: KIND;
}

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

    /// The events this adapter gets (its section's `channels` and `operations`).
    fn route(&self) -> Route {
        Route::all()
    }
}

/// An adapter with the route its section configures.
struct Routed {
    inner: Box<dyn Adapter>,
    route: Route,
}

impl Adapter for Routed {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn durable(&self) -> bool {
        self.inner.durable()
    }

    fn run(
        self: Box<Self>,
        input: mpsc::Receiver<Delivery>,
        acker: Acker,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        self.inner.run(input, acker, cancel)
    }

    fn set_health(&mut self, health: crate::health::Component) {
        self.inner.set_health(health);
    }

    fn route(&self) -> Route {
        self.route.clone()
    }
}

/// `adapter` restricted to `route`.
pub fn routed(adapter: Box<dyn Adapter>, route: Route) -> Box<dyn Adapter> {
    if route.is_all() {
        adapter
    } else {
        Box::new(Routed {
            inner: adapter,
            route,
        })
    }
}

/// The adapters to run: those in `config.adapters`, then `<kind>:<name>` per list entry.
pub fn names(config: &Config) -> Vec<String> {
    registry::configured(config)
}

/// Builds the configured adapters, the live ones (sse, ws) feeding `hubs`.
pub fn build_with_hubs(config: &Config, hubs: &live::Hubs) -> Result<Vec<Box<dyn Adapter>>, Error> {
    let build = registry::Build {
        config,
        hubs: Some(hubs),
    };
    names(config)
        .iter()
        .map(|name| registry::build(&build, name))
        .collect()
}

/// Builds one adapter by name, as configured in `config` (`pgpipe dlq replay`).
pub fn build_one(config: &Config, name: &str) -> Result<Box<dyn Adapter>, Error> {
    registry::build(&registry::Build { config, hubs: None }, name)
}
