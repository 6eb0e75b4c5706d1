//! The library without the binary and without Postgres: a memory detector and a memory
//! sink run through [`Pipeline`], to pin down the acknowledgement flow (positions are
//! released only after delivery, in order, within the in-flight window) and the shutdown
//! order (the detector drains, then the adapters; a failing adapter parks).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use pgpipe_forwarder::{sleep_until_opt, Error, Event, Pipeline};
use pgpipe_forwarder::{Adapter, Delivery, Detector, DetectorIo, Durable, Failure, Policy, Sink};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most events in flight: smaller than the number of events, so flow control is exercised.
const WINDOW: usize = 4;

fn event(n: usize) -> Event {
    Event {
        id: Uuid::now_v7(),
        channel: "memory".into(),
        operation: "INSERT".into(),
        payload: serde_json::json!({ "n": n }).into(),
        key: None,
        source: "trigger".into(),
        created_at: Utc::now(),
        transaction: None,
    }
}

/// Hands out `count` events; position `n` follows event `n`. Records what it released.
struct MemoryDetector {
    count: usize,
    released: Arc<Mutex<Vec<u64>>>,
    shutdown_timeout: Duration,
}

impl Detector for MemoryDetector {
    fn name(&self) -> &str {
        "memory"
    }

    fn run(
        self: Box<Self>,
        io: DetectorIo,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            let (bus, _health, mut window) =
                io.split::<u64>("memory", WINDOW, Duration::from_secs(60));
            let mut next = 0;
            let mut deadline = None;
            loop {
                while deadline.is_none() && window.room() > 0 && next < self.count {
                    next += 1;
                    let seq = window.push_event(next as u64);
                    bus.publish(&Delivery {
                        seq,
                        event: Arc::new(event(next)),
                    })?;
                }
                assert!(window.in_flight() <= WINDOW as u64, "window overrun");
                if let Some(position) = window.take_releasable() {
                    self.released.lock().unwrap().push(position);
                }
                if deadline.is_some() && window.in_flight() == 0 {
                    return Ok(());
                }
                tokio::select! {
                    _ = cancel.cancelled(), if deadline.is_none() => {
                        deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                    }
                    _ = sleep_until_opt(deadline) => return Ok(()),
                    acked = window.acked() => acked?,
                }
            }
        })
    }
}

/// Records delivered events' `n`; fails once for the batch holding `fail_once`, and
/// always from `fail_from` on.
struct MemorySink {
    delivered: Arc<Mutex<Vec<u64>>>,
    fail_once: Option<u64>,
    fail_from: Option<u64>,
}

impl Sink for MemorySink {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let ns: Vec<u64> = batch
                .iter()
                .map(|d| d.event.payload.value()["n"].as_u64().unwrap())
                .collect();
            if let Some(n) = self.fail_once.filter(|n| ns.contains(n)) {
                self.fail_once = None;
                return Err(Failure::retry(format!("event {n} fails once")));
            }
            if self.fail_from.is_some_and(|f| ns.iter().any(|n| *n >= f)) {
                return Err(Failure::retry("the destination is down"));
            }
            self.delivered.lock().unwrap().extend(ns);
            Ok(())
        })
    }
}

struct Run {
    delivered: Arc<Mutex<Vec<u64>>>,
    released: Arc<Mutex<Vec<u64>>>,
    cancel: CancellationToken,
    pipeline: tokio::task::JoinHandle<Result<(), Error>>,
}

fn start(count: usize, batch: usize, fail_once: Option<u64>, fail_from: Option<u64>) -> Run {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let released = Arc::new(Mutex::new(Vec::new()));
    let detector = MemoryDetector {
        count,
        released: released.clone(),
        shutdown_timeout: Duration::from_millis(300),
    };
    let sink = MemorySink {
        delivered: delivered.clone(),
        fail_once,
        fail_from,
    };
    let policy = Policy::new(
        batch,
        Duration::from_millis(1),
        Duration::from_millis(2),
        None,
    );
    let adapter: Box<dyn Adapter> = Box::new(Durable::new("memory", sink, policy, None));
    let pipeline = Pipeline::new(
        Box::new(detector),
        vec![adapter],
        WINDOW,
        16,
        Duration::from_secs(5),
    );
    let cancel = CancellationToken::new();
    let pipeline = tokio::spawn(pipeline.run(cancel.clone()));
    Run {
        delivered,
        released,
        cancel,
        pipeline,
    }
}

async fn wait_delivered(run: &Run, n: usize) {
    for _ in 0..500 {
        if run.delivered.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("delivered: {:?}", run.delivered.lock().unwrap());
}

#[tokio::test]
async fn positions_are_released_in_order_after_delivery() {
    let run = start(10, 3, Some(5), None);
    wait_delivered(&run, 10).await;
    run.cancel.cancel();
    run.pipeline.await.unwrap().unwrap();
    let delivered = run.delivered.lock().unwrap().clone();
    assert_eq!(
        delivered,
        (1..=10).collect::<Vec<_>>(),
        "once each, in order"
    );
    let released = run.released.lock().unwrap().clone();
    assert!(released.windows(2).all(|w| w[0] < w[1]), "{released:?}");
    assert_eq!(released.last(), Some(&10), "the last position is released");
}

#[tokio::test]
async fn a_failing_adapter_parks_on_shutdown_and_holds_the_position() {
    // One event per batch, so event 4 is never in a batch with the failing 5.
    let run = start(10, 1, None, Some(5));
    wait_delivered(&run, 4).await;
    run.cancel.cancel();
    let finished = tokio::time::timeout(Duration::from_secs(3), run.pipeline).await;
    finished
        .expect("shutdown is not held up by a failing adapter")
        .unwrap()
        .unwrap();
    assert_eq!(*run.delivered.lock().unwrap(), [1, 2, 3, 4]);
    // Nothing past the undelivered event 5 is released: the next run reads it again.
    assert_eq!(run.released.lock().unwrap().last(), Some(&4));
}
