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

/// A detector wired to adapters through the bus.
pub struct Pipeline {
    detector: Box<dyn Detector>,
    adapters: Vec<Box<dyn Adapter>>,
    max_in_flight: usize,
    live_buffer: usize,
    shutdown_timeout: Duration,
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
        }
    }

    /// Runs until `cancel` fires (then drains and returns Ok) or a part fails.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        // Our own token, so a failing adapter stops this pipeline, not the caller's others.
        let cancel = cancel.child_token();
        let mut bus = Bus::new();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut adapters = JoinSet::new();
        let mut durable = 0;
        for adapter in self.adapters {
            let name = adapter.name().to_string();
            let is_durable = adapter.durable();
            let capacity = if is_durable {
                self.max_in_flight
            } else {
                self.live_buffer
            };
            let input = bus.add_output(&name, is_durable, capacity);
            let acker = is_durable.then(|| {
                durable += 1;
                Acker::new(durable - 1, ack_tx.clone())
            });
            let task = adapter.run(input, acker, cancel.clone());
            adapters.spawn(async move { (name, task.await) });
        }
        drop(ack_tx);
        let bus = Arc::new(bus);
        let io = DetectorIo {
            bus: bus.clone(),
            acks: ack_rx,
            durable_adapters: durable,
        };
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
        cancel.cancel();
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

/// Builds the pipeline `config` describes and runs it until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), Error> {
    let adapters = adapter::build(&config)?;
    let detector = detector::build(&config).await?;
    Pipeline::new(
        detector,
        adapters,
        config.detector.max_in_flight,
        config.bus.buffer_size,
        config.shutdown_timeout,
    )
    .run(cancel)
    .await
}
