//! The one delivery driver of the durable adapters (webhook, file, pg_table, stdout).
//!
//! An adapter implements [`Sink`]: deliver one batch, and say how a failure ends
//! ([`Failure`]). The driver owns everything around it:
//! - batching: it waits for one event, then takes what is already queued, up to the
//!   sink's batch size;
//! - parallel lanes (`Policy::concurrency` > 1, for sinks that [`Sink::fork`]): up to that
//!   many batches in flight, at most one per lane (a channel and key by default, see
//!   [`lanes`]), so a key's events keep their order and a key retrying holds back only
//!   itself;
//! - retry: a retryable failure is tried again after exponential backoff with full jitter
//!   (never below the floor), or after the server's `Retry-After`; after `max_attempts`
//!   (when the sink has a budget) the batch is dead-lettered;
//! - verdicts: a batch the destination refuses is dead-lettered (`pgpipe.dead_letters`),
//!   then acknowledged; a batch holding one refused event is tried one event at a time to
//!   find it;
//! - acknowledgements, in order: after delivery, or after the sink's flush for sinks that
//!   make writes durable later (`file.fsync: interval`); with lanes, over the contiguous
//!   prefix of finished events only;
//! - parking on shutdown: a sink still failing when shutdown starts stops retrying, its
//!   events stay unacknowledged (the next run reads them again), and its input is drained
//!   so the pipeline is not held up;
//! - metrics and health of the adapter ([`Report`]).

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetters;
use super::Adapter;
use crate::ack::Acker;
use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::Delivery;
use crate::health::Component;
use crate::metrics;

mod lanes;
pub use lanes::{Lanes, Ordering};

/// How one delivery of a batch failed.
#[derive(Debug)]
pub enum Failure {
    /// Worth trying again (network, timeout, 429/5xx, a lost connection, a full disk).
    Retry {
        /// What went wrong.
        error: String,
        /// How long the destination asked us to wait (`Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    /// The destination refuses everything until an operator fixes it (a wrong URL or
    /// credentials): retried with backoff like [`Failure::Retry`], but never counted
    /// against `max_attempts`, so a misconfiguration does not dead-letter the queue.
    Hold {
        /// What went wrong, and what to check.
        error: String,
        /// How long the destination asked us to wait (`Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    /// The destination refuses the whole batch for good: dead-letter every event.
    Reject {
        /// Why.
        error: String,
    },
    /// The destination refuses some event of the batch: the driver delivers the rest of
    /// the batch one event at a time and dead-letters each refused one.
    BadEvent {
        /// Why.
        error: String,
    },
    /// The adapter cannot go on (its output is gone): the pipeline stops.
    Fatal(Error),
}

impl Failure {
    /// A retryable failure without a server hint.
    pub fn retry(error: impl Into<String>) -> Failure {
        Failure::Retry {
            error: error.into(),
            retry_after: None,
        }
    }
}

/// The part of a durable adapter that is its own: delivering a batch.
pub trait Sink: Send + 'static {
    /// Delivers `batch` (in order) once. The driver retries, dead-letters and acknowledges.
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>>;

    /// Called before each retry wait, for the adapter's own log line and metrics.
    fn retrying(&mut self, error: &str, attempt: u32, delay: Duration) {
        let _ = (error, attempt, delay);
    }

    /// For sinks whose deliveries become durable later: how often to [`Sink::flush`].
    /// `None` (the default): a delivered batch is acknowledged at once.
    fn flush_interval(&self) -> Option<Duration> {
        None
    }

    /// Makes every delivered batch durable; `true` on success (see [`Sink::flush_interval`]).
    fn flush(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    /// Logged once when the adapter starts (where it delivers to).
    fn started(&self) {}

    /// Another sink delivering to the same destination, for one more lane (see
    /// [`Policy::concurrency`]); it may share connections with this one. `None` (the
    /// default): the sink delivers one batch at a time.
    fn fork(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}

/// Retry settings of one adapter.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Most events per [`Sink::deliver`] call.
    pub batch_size: usize,
    /// Attempts per batch before it is dead-lettered; `None` retries until it works (the
    /// operator can fix a disk or a table; nothing is dropped meanwhile).
    pub max_attempts: Option<u32>,
    /// Waits between attempts.
    pub backoff: Backoff,
    /// Most batches in flight at once (lanes); 1 delivers one batch at a time. More need
    /// a sink that can [`Sink::fork`] and has no [`Sink::flush_interval`].
    pub concurrency: usize,
    /// Which events keep their relative order when batches are delivered in parallel.
    pub ordering: Ordering,
}

/// Shortest wait between two attempts (the original's floor).
pub const BACKOFF_FLOOR: Duration = Duration::from_millis(100);

impl Policy {
    /// Batches of `batch_size`, backoff from `base` to `cap` (never below
    /// [`BACKOFF_FLOOR`]), `max_attempts` attempts.
    pub fn new(
        batch_size: usize,
        base: Duration,
        cap: Duration,
        max_attempts: Option<u32>,
    ) -> Self {
        Policy {
            batch_size: batch_size.max(1),
            max_attempts: max_attempts.map(|n| n.max(1)),
            backoff: Backoff::new(base, cap).with_floor(BACKOFF_FLOOR),
            concurrency: 1,
            ordering: Ordering::Key,
        }
    }

    /// Delivers up to `concurrency` batches at once, keeping `ordering`.
    pub fn parallel(mut self, concurrency: usize, ordering: Ordering) -> Self {
        self.concurrency = concurrency.max(1);
        self.ordering = ordering;
        self
    }
}

/// A durable adapter: a [`Sink`] run by the driver.
pub struct Durable<S> {
    sink: S,
    policy: Policy,
    ctx: Context,
}

/// What every lane of one adapter shares.
struct Context {
    name: String,
    max_attempts: Option<u32>,
    dead_letters: Option<tokio::sync::Mutex<DeadLetters>>,
    report: Report,
}

/// One sink instance with its own retry state: a lane worker.
struct Worker<S> {
    sink: S,
    backoff: Backoff,
}

impl<S: Sink> Durable<S> {
    /// Adapter `name` delivering with `sink` as `policy` says; refused events go to
    /// `dead_letters` (a sink that never refuses may have none).
    pub fn new(name: &str, sink: S, policy: Policy, dead_letters: Option<DeadLetters>) -> Self {
        Durable {
            sink,
            ctx: Context {
                name: name.to_string(),
                max_attempts: policy.max_attempts,
                dead_letters: dead_letters.map(tokio::sync::Mutex::new),
                report: Report::new(name),
            },
            policy,
        }
    }
}

impl<S: Sink> Adapter for Durable<S> {
    fn name(&self) -> &str {
        &self.ctx.name
    }

    fn durable(&self) -> bool {
        true
    }

    fn set_health(&mut self, health: Component) {
        self.ctx.report.set_health(health);
    }

    fn run(
        self: Box<Self>,
        input: mpsc::Receiver<Delivery>,
        acker: Acker,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.drive(input, acker, cancel))
    }
}

/// How one batch ended.
enum Outcome {
    /// Delivered or dead-lettered, every event.
    Done,
    /// Shutdown came first: park.
    Shutdown,
}

impl<S: Sink> Durable<S> {
    async fn drive(
        self,
        input: mpsc::Receiver<Delivery>,
        acker: Acker,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        self.sink.started();
        let Durable { sink, policy, ctx } = self;
        let mut workers = Vec::new();
        // Lanes only for sinks whose deliveries are durable when `deliver` returns: a
        // flushed sink acknowledges a prefix at flush time, which one lane guarantees.
        if policy.concurrency > 1 && sink.flush_interval().is_none() {
            while workers.len() + 1 < policy.concurrency {
                match sink.fork() {
                    Some(fork) => workers.push(Worker::new(fork, &policy)),
                    None => break,
                }
            }
        }
        let first = Worker::new(sink, &policy);
        if workers.is_empty() {
            sequential(first, &policy, &ctx, input, acker, cancel).await
        } else {
            workers.push(first);
            tracing::info!(component = "adapter", adapter = %ctx.name, lanes = workers.len(),
                ordering = ?policy.ordering, "delivering in parallel, in order per lane");
            parallel(workers, &policy, &ctx, input, acker, cancel).await
        }
    }
}

impl<S: Sink> Worker<S> {
    fn new(sink: S, policy: &Policy) -> Worker<S> {
        Worker {
            sink,
            backoff: policy.backoff.clone(),
        }
    }
}

/// One batch at a time, acknowledged in order (and after the sink's flush, if it has one).
async fn sequential<S: Sink>(
    mut worker: Worker<S>,
    policy: &Policy,
    ctx: &Context,
    mut input: mpsc::Receiver<Delivery>,
    acker: Acker,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let flush_every = worker.sink.flush_interval();
    // Delivered, not yet flushed: the last such event's seq.
    let mut unflushed: Option<u64> = None;
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let next = match (unflushed, flush_every) {
            (Some(seq), Some(every)) => tokio::select! {
                batch = next_batch(&mut input, policy.batch_size) => batch,
                _ = tokio::time::sleep_until(last_flush + every) => {
                    if worker.sink.flush().await {
                        acker.finished(seq);
                        unflushed = None;
                    }
                    last_flush = tokio::time::Instant::now();
                    continue;
                }
            },
            _ => next_batch(&mut input, policy.batch_size).await,
        };
        let Some(batch) = next else { break };
        match deliver(&mut worker, ctx, &batch, Some(&acker), &cancel).await? {
            Outcome::Shutdown => {
                tracing::warn!(component = "adapter", adapter = %ctx.name,
                    "shutting down while retrying: undelivered events stay queued");
                park(&mut input).await;
                return Ok(());
            }
            Outcome::Done => {}
        }
        let last = batch.last().map_or(0, |d| d.seq);
        match flush_every {
            None => acker.finished(last),
            Some(every) if last_flush.elapsed() >= every => {
                if worker.sink.flush().await {
                    acker.finished(last);
                    unflushed = None;
                } else {
                    unflushed = Some(last);
                }
                last_flush = tokio::time::Instant::now();
            }
            Some(_) => unflushed = Some(last),
        }
    }
    if let Some(seq) = unflushed {
        if worker.sink.flush().await {
            acker.finished(seq);
        }
    }
    Ok(())
}

/// Several batches at once, one per lane at most (see [`lanes`]): each worker delivers one
/// batch (retrying it as long as it takes) while the others go on; the acknowledgement
/// watermark moves over the contiguous prefix of finished events.
async fn parallel<S: Sink>(
    mut idle: Vec<Worker<S>>,
    policy: &Policy,
    ctx: &Context,
    mut input: mpsc::Receiver<Delivery>,
    acker: Acker,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut lanes = Lanes::new(policy.ordering);
    let mut running = FuturesUnordered::new();
    let mut input_open = true;
    let mut parking = false;
    loop {
        while !parking && !idle.is_empty() {
            let Some(batch) = lanes.take_batch(policy.batch_size) else {
                break;
            };
            let Some(mut worker) = idle.pop() else { break };
            let cancel = &cancel;
            running.push(async move {
                let outcome = deliver(&mut worker, ctx, &batch.events, None, cancel).await;
                (worker, batch, outcome)
            });
        }
        if running.is_empty() && (parking || (!input_open && lanes.unfinished() == 0)) {
            break;
        }
        tokio::select! {
            next = input.recv(), if input_open && !parking => match next {
                Some(d) => {
                    lanes.push(d);
                    while let Ok(d) = input.try_recv() {
                        lanes.push(d);
                    }
                }
                None => input_open = false,
            },
            Some((worker, batch, outcome)) = running.next() => {
                idle.push(worker);
                match outcome? {
                    Outcome::Done => {
                        if let Some(seq) = lanes.finish(&batch) {
                            acker.finished(seq);
                        }
                    }
                    // The other lanes finish what they are sending, then the input parks.
                    Outcome::Shutdown => parking = true,
                }
            }
            // Nothing to wait for (cannot happen with events left: idle workers took them).
            else => break,
        }
    }
    if parking {
        tracing::warn!(component = "adapter", adapter = %ctx.name, unfinished = lanes.unfinished(),
            "shutting down while retrying: undelivered events stay queued");
        park(&mut input).await;
    }
    Ok(())
}

/// Delivers `batch` (retrying, isolating a refused event, dead-lettering). With `early`,
/// events finished on the way (isolated one by one, dead-lettered) are acknowledged at
/// once; the caller acknowledges the batch.
async fn deliver<S: Sink>(
    worker: &mut Worker<S>,
    ctx: &Context,
    batch: &[Delivery],
    early: Option<&Acker>,
    cancel: &CancellationToken,
) -> Result<Outcome, Error> {
    let mut rest = batch;
    let mut one_by_one = false;
    worker.backoff.reset();
    let mut attempt = 0;
    // Attempts answered with Failure::Hold, which never use up the budget.
    let mut refused_all = 0;
    while !rest.is_empty() {
        let chunk = if one_by_one { &rest[..1] } else { rest };
        attempt += 1;
        let started = Instant::now();
        let failure = match worker.sink.deliver(chunk).await {
            Ok(()) => {
                ctx.report.delivered(chunk, started);
                if let (true, Some(acker)) = (one_by_one, early) {
                    acker.finished(chunk[0].seq);
                }
                rest = &rest[chunk.len()..];
                attempt = 0;
                refused_all = 0;
                worker.backoff.reset();
                continue;
            }
            Err(failure) => failure,
        };
        // What is left is a verdict on the chunk: dead-letter it, then go on.
        let held = matches!(failure, Failure::Hold { .. });
        let verdict = match failure {
            Failure::Fatal(e) => {
                ctx.report.failed(&e.to_string());
                return Err(e);
            }
            Failure::BadEvent { error } if chunk.len() > 1 => {
                tracing::warn!(component = "adapter", adapter = %ctx.name, error,
                    events = chunk.len(), "batch refused; delivering one by one to find the bad event");
                one_by_one = true;
                attempt = 0;
                refused_all = 0;
                continue;
            }
            Failure::BadEvent { error } | Failure::Reject { error } => {
                ctx.report.failed(&error);
                error
            }
            Failure::Retry { error, retry_after } | Failure::Hold { error, retry_after } => {
                ctx.report.failed(&error);
                if held {
                    // Not a failure of this batch: the destination refused everything.
                    refused_all += 1;
                }
                if !held
                    && ctx
                        .max_attempts
                        .is_some_and(|max| attempt - refused_all >= max)
                {
                    format!("{error} (gave up after {} attempts)", attempt - refused_all)
                } else {
                    let delay = match retry_after {
                        Some(d) => d.max(BACKOFF_FLOOR),
                        None => worker.backoff.next_delay(),
                    };
                    worker.sink.retrying(&error, attempt, delay);
                    if !sleep_or_cancel(delay, cancel).await {
                        return Ok(Outcome::Shutdown);
                    }
                    continue;
                }
            }
        };
        if !dead_letter(ctx, chunk, &verdict, attempt, early, cancel).await? {
            return Ok(Outcome::Shutdown);
        }
        rest = &rest[chunk.len()..];
        attempt = 0;
        refused_all = 0;
    }
    Ok(Outcome::Done)
}

/// Dead-letters (and with `early` acknowledges) every event of `chunk`; `false` on
/// shutdown. A sink without dead letters that gives up on an event fails the adapter.
async fn dead_letter(
    ctx: &Context,
    chunk: &[Delivery],
    error: &str,
    attempts: u32,
    early: Option<&Acker>,
    cancel: &CancellationToken,
) -> Result<bool, Error> {
    let Some(dead_letters) = ctx.dead_letters.as_ref() else {
        return Err(Error::Adapter {
            adapter: ctx.name.clone(),
            reason: error.to_string(),
        });
    };
    // One connection writes the adapter's dead letters; lanes take turns.
    let mut dead_letters = dead_letters.lock().await;
    for delivery in chunk {
        if !dead_letters
            .record(&delivery.event, error, attempts, cancel)
            .await
        {
            return Ok(false);
        }
        if let Some(acker) = early {
            acker.finished(delivery.seq);
        }
    }
    Ok(true)
}

/// Waits `delay`, unless shutdown starts first. Returns `false` on shutdown.
pub async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Consumes `input` until the bus closes it, acknowledging nothing.
///
/// A durable adapter that is still failing when shutdown starts calls this instead of
/// retrying on: the events it holds stay unacknowledged, so the next run reads them again,
/// and the pipeline is not kept waiting for a delivery that cannot happen now.
pub async fn park(input: &mut mpsc::Receiver<Delivery>) {
    while input.recv().await.is_some() {}
}

/// Takes the next batch: waits for one event, then adds what is already queued, up to
/// `max` events in all. `None` when the input is closed and empty.
pub async fn next_batch(input: &mut mpsc::Receiver<Delivery>, max: usize) -> Option<Vec<Delivery>> {
    let first = input.recv().await?;
    let mut batch = Vec::with_capacity(max.clamp(1, 64));
    batch.push(first);
    while batch.len() < max {
        match input.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Metrics and health reporting of one durable adapter.
#[derive(Debug, Clone)]
pub struct Report {
    adapter: String,
    health: Option<Component>,
}

impl Report {
    /// Reporting for adapter `adapter`; its metric series appear at once.
    pub fn new(adapter: &str) -> Report {
        metrics::register_adapter(adapter);
        Report {
            adapter: adapter.to_string(),
            health: None,
        }
    }

    /// Reports health to `health` from now on.
    pub fn set_health(&mut self, health: Component) {
        self.health = Some(health);
    }

    /// `batch` was delivered; delivery started at `started`.
    pub fn delivered(&self, batch: &[Delivery], started: Instant) {
        metrics::delivered(&self.adapter, batch.len() as u64);
        metrics::delivery_duration(&self.adapter, started.elapsed());
        for d in batch {
            metrics::end_to_end(d.event.created_at);
        }
        if let Some(h) = &self.health {
            h.up();
        }
    }

    /// `n` events were delivered (when the events themselves are no longer at hand).
    pub fn delivered_count(&self, n: usize, started: Instant) {
        metrics::delivered(&self.adapter, n as u64);
        metrics::delivery_duration(&self.adapter, started.elapsed());
        if let Some(h) = &self.health {
            h.up();
        }
    }

    /// A delivery attempt failed for `reason` (the adapter is down until one succeeds).
    pub fn failed(&self, reason: &str) {
        metrics::delivery_error(&self.adapter);
        if let Some(h) = &self.health {
            h.down(reason.to_string());
        }
    }
}
