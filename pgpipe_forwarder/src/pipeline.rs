//! The pipeline: one detector, the bus, the adapters, and shutdown in the right order.
//!
//! Shutdown: the token fires → the detector stops reading and waits for in-flight events
//! to be acknowledged (adapters keep draining meanwhile), writes its last position and
//! returns → the bus is dropped, closing every adapter's input → adapters finish.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ack::Acker;
use crate::adapter::{self, Adapter};
use crate::bus::Bus;
use crate::config::Config;
use crate::detector::{self, Detector, DetectorIo};
use crate::error::Error;
use crate::health::{Health, Status};
use crate::server::{self, HttpSettings, HttpState};

/// A detector wired to adapters through the bus.
pub struct Pipeline {
    detector: Box<dyn Detector>,
    adapters: Vec<Box<dyn Adapter>>,
    max_in_flight: usize,
    live_buffer: usize,
    shutdown_timeout: Duration,
    health: Health,
}

impl Pipeline {
    /// A pipeline from its parts. Durable adapters get a channel of `max_in_flight`
    /// (which the detector never exceeds), live ones `live_buffer`.
    pub fn new(
        detector: Box<dyn Detector>,
        adapters: Vec<Box<dyn Adapter>>,
        max_in_flight: usize,
        live_buffer: usize,
        shutdown_timeout: Duration,
    ) -> Self {
        Pipeline {
            detector,
            adapters,
            max_in_flight,
            live_buffer,
            shutdown_timeout,
            health: Health::new(),
        }
    }

    /// Reports the detector's, the bus's and every adapter's state to `health` (the HTTP
    /// server's `/healthz`); without it they go to a checker nobody reads.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Runs until `cancel` fires (then drains and returns Ok) or a part fails.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        // Our own token, so a failing adapter stops this pipeline, not the caller's others.
        let cancel = cancel.child_token();
        let mut bus = Bus::new();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut adapters = JoinSet::new();
        let mut durable = 0;
        let health = self.health.clone();
        let bus_health = health.component("bus", Status::Up);
        for mut adapter in self.adapters {
            let name = adapter.name().to_string();
            let adapter_health = health.component(&name, Status::Up);
            adapter.set_health(adapter_health.clone());
            let is_durable = adapter.durable();
            let capacity = if is_durable {
                self.max_in_flight
            } else {
                self.live_buffer
            };
            let input = bus.add_output(&name, is_durable, capacity, adapter.route());
            let acker = if is_durable {
                durable += 1;
                Acker::new(durable - 1, ack_tx.clone())
            } else {
                Acker::live()
            };
            let task = adapter.run(input, acker, cancel.clone());
            adapters.spawn(async move {
                let result = task.await;
                match &result {
                    Err(e) => adapter_health.down(e.to_string()),
                    Ok(()) => adapter_health.down("stopped"),
                }
                (name, result)
            });
        }
        // Held until the detector returns: with no durable adapter no acker holds a
        // sender, and a closed ack channel would read as a dead pipeline.
        let ack_keepalive = ack_tx;
        let bus = Arc::new(bus);
        let detector_health = health.component(
            "detector",
            if self.detector.reports_health() {
                Status::Down("connecting".into())
            } else {
                Status::Up
            },
        );
        let io = DetectorIo {
            bus: bus.clone(),
            acks: ack_rx,
            durable_adapters: durable,
            health: detector_health.clone(),
        };
        health.set_running(true);
        let mut detector = tokio::spawn(self.detector.run(io, cancel.clone()));

        let mut failure: Option<Error> = None;
        let detector_result = loop {
            tokio::select! {
                result = &mut detector => break result,
                Some(joined) = adapters.join_next() => {
                    let err = match joined {
                        Ok((name, Ok(()))) => Error::Adapter { adapter: name, reason: "stopped unexpectedly".into() },
                        Ok((_, Err(e))) => e,
                        Err(join) => Error::Adapter { adapter: "?".into(), reason: join.to_string() },
                    };
                    tracing::error!(component = "pipeline", error = %err, "adapter failed; shutting down");
                    failure.get_or_insert(err);
                    cancel.cancel();
                }
            }
        };
        match detector_result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(join) => {
                failure.get_or_insert(Error::DetectorDisconnected {
                    detector: "?".into(),
                    reason: join.to_string(),
                });
            }
        }
        drop(ack_keepalive);
        cancel.cancel();
        health.set_running(false);
        match &failure {
            Some(e) => detector_health.down(e.to_string()),
            None => detector_health.down("stopped"),
        }
        bus_health.down("stopped");
        drop(bus);
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while let Some(joined) = adapters.join_next().await {
                if let Ok((name, Err(e))) = joined {
                    tracing::warn!(component = "pipeline", adapter = %name, error = %e, "adapter failed while draining");
                }
            }
        })
        .await;
        if drained.is_err() {
            adapters.abort_all();
            failure.get_or_insert(Error::ShutdownTimeout(self.shutdown_timeout));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Builds the pipeline `config` describes and runs it until `cancel` fires, with the HTTP
/// server (sse, ws, `/healthz`, `/metrics`) when the configuration asks for one.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), Error> {
    let hubs = adapter::live::Hubs::new(&config);
    let adapters = adapter::build_with_hubs(&config, &hubs)?;
    let detector = detector::build(&config).await?;
    let health = Health::new();
    // The server stops after the pipeline drained, so /healthz answers during shutdown.
    let http_cancel = CancellationToken::new();
    let state = HttpState::new(
        health.clone(),
        hubs.sse.clone(),
        hubs.ws.clone(),
        HttpSettings::new(&config),
        http_cancel.clone(),
    );
    let servers = server::start(&config, &state, http_cancel.clone()).await?;
    let result = Pipeline::new(
        detector,
        adapters,
        config.detector.max_in_flight,
        config.bus.buffer_size,
        config.shutdown_timeout,
    )
    .with_health(health)
    .run(cancel)
    .await;
    http_cancel.cancel();
    for (_, task) in servers {
        if tokio::time::timeout(config.shutdown_timeout, task)
            .await
            .is_err()
        {
            tracing::warn!(
                component = "server",
                "HTTP connections did not close in time"
            );
        }
    }
    result
}
