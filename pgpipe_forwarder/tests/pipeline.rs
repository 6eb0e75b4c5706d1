//! The library without the binary and without Postgres: a memory detector and a memory
//! sink run through [`Pipeline`], to pin down the acknowledgement flow (positions are
//! released only after delivery, in order, within the in-flight window) and the shutdown
//! order (the detector drains, then the adapters; a failing adapter parks).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use pgpipe_forwarder::{sleep_until_opt, Error, Event, Pipeline};
use pgpipe_forwarder::{
    Adapter, Delivery, Detector, DetectorIo, Durable, Failure, Ordering, Policy, Sink,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most events in flight: smaller than the number of events, so flow control is exercised.
const WINDOW: usize = 4;

/// Event `n`; with `keys`, its key is `{"k": n % keys}`.
fn event(n: usize, keys: Option<usize>) -> Event {
    Event {
        id: Uuid::now_v7(),
        channel: "memory".into(),
        operation: "INSERT".into(),
        payload: serde_json::json!({ "n": n }).into(),
        key: keys.map(|k| serde_json::json!({ "k": n % k })),
        source: "trigger".into(),
        created_at: Utc::now(),
        transaction: None,
    }
}

/// Hands out `count` events; position `n` follows event `n`. Records what it released.
struct MemoryDetector {
    count: usize,
    window: usize,
    keys: Option<usize>,
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
                io.split::<u64>("memory", self.window, Duration::from_secs(60));
            let mut next = 0;
            let mut deadline = None;
            loop {
                while deadline.is_none() && window.room() > 0 && next < self.count {
                    next += 1;
                    let seq = window.push_event(next as u64);
                    bus.publish(&Delivery {
                        seq,
                        event: Arc::new(event(next, self.keys)),
                    })?;
                }
                assert!(window.in_flight() <= self.window as u64, "window overrun");
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
        window: WINDOW,
        keys: None,
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

/// A sink with lanes: its forks share what they record. Each delivery takes a little time
/// so that lanes overlap; key 0 fails while `key0_down` is set.
#[derive(Clone)]
struct LaneSink {
    log: Arc<Mutex<LaneLog>>,
    key0_down: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct LaneLog {
    /// (n, key) in delivery order.
    delivered: Vec<(u64, u64)>,
    in_flight_per_key: std::collections::HashMap<u64, usize>,
    in_flight: usize,
    most_in_flight: usize,
    most_in_flight_per_key: usize,
}

impl Sink for LaneSink {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let items: Vec<(u64, u64)> = batch
                .iter()
                .map(|d| {
                    let n = d.event.payload.value()["n"].as_u64().unwrap();
                    let k = d.event.key.as_ref().unwrap()["k"].as_u64().unwrap();
                    (n, k)
                })
                .collect();
            let mut keys: Vec<u64> = items.iter().map(|(_, k)| *k).collect();
            keys.sort_unstable();
            keys.dedup();
            {
                let mut log = self.log.lock().unwrap();
                log.in_flight += 1;
                log.most_in_flight = log.most_in_flight.max(log.in_flight);
                for k in &keys {
                    let c = log.in_flight_per_key.entry(*k).or_default();
                    *c += 1;
                    let c = *c;
                    log.most_in_flight_per_key = log.most_in_flight_per_key.max(c);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            let fail =
                keys.contains(&0) && self.key0_down.load(std::sync::atomic::Ordering::SeqCst);
            let mut log = self.log.lock().unwrap();
            log.in_flight -= 1;
            for k in &keys {
                *log.in_flight_per_key.get_mut(k).unwrap() -= 1;
            }
            if fail {
                return Err(Failure::retry("key 0 is refused for now"));
            }
            log.delivered.extend(items);
            Ok(())
        })
    }

    fn fork(&self) -> Option<LaneSink> {
        Some(self.clone())
    }
}

#[tokio::test]
async fn lanes_keep_each_keys_order_and_a_failing_key_holds_back_only_itself() {
    const COUNT: usize = 400;
    const KEYS: usize = 10;
    const LANE_WINDOW: usize = 64;
    for batch in [1, 5] {
        let released = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(LaneLog::default()));
        let key0_down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let detector = MemoryDetector {
            count: COUNT,
            window: LANE_WINDOW,
            keys: Some(KEYS),
            released: released.clone(),
            shutdown_timeout: Duration::from_millis(300),
        };
        let sink = LaneSink {
            log: log.clone(),
            key0_down: key0_down.clone(),
        };
        let policy = Policy::new(
            batch,
            Duration::from_millis(1),
            Duration::from_millis(2),
            None,
        )
        .parallel(8, Ordering::Key);
        let adapter: Box<dyn Adapter> = Box::new(Durable::new("lanes", sink, policy, None));
        let pipeline = Pipeline::new(
            Box::new(detector),
            vec![adapter],
            LANE_WINDOW,
            16,
            Duration::from_secs(5),
        );
        let cancel = CancellationToken::new();
        let pipeline = tokio::spawn(pipeline.run(cancel.clone()));

        // Key 0 is down: the other keys are delivered up to the in-flight window, the
        // position stays before key 0's first event (n = 10).
        tokio::time::sleep(Duration::from_millis(300)).await;
        {
            let log = log.lock().unwrap();
            let others = log.delivered.len();
            assert!(log.delivered.iter().all(|(_, k)| *k != 0));
            // Acknowledged up to 9; the window reaches 9 + LANE_WINDOW.
            let expected = (1..=9 + LANE_WINDOW).filter(|n| n % KEYS != 0).count();
            assert_eq!(
                others, expected,
                "batch {batch}: the other keys ran ahead by exactly the window"
            );
            assert!(
                released.lock().unwrap().iter().all(|p| *p < 10),
                "batch {batch}"
            );
        }
        key0_down.store(false, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..1000 {
            if log.lock().unwrap().delivered.len() >= COUNT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        pipeline.await.unwrap().unwrap();

        let log = log.lock().unwrap();
        let mut ns: Vec<u64> = log.delivered.iter().map(|(n, _)| *n).collect();
        ns.sort_unstable();
        assert_eq!(
            ns,
            (1..=COUNT as u64).collect::<Vec<_>>(),
            "batch {batch}: each once"
        );
        for k in 0..KEYS as u64 {
            let of_key: Vec<u64> = log
                .delivered
                .iter()
                .filter(|(_, kk)| *kk == k)
                .map(|(n, _)| *n)
                .collect();
            assert!(
                of_key.windows(2).all(|w| w[0] < w[1]),
                "batch {batch}: key {k} in order: {of_key:?}"
            );
        }
        assert_eq!(
            log.most_in_flight_per_key, 1,
            "batch {batch}: one delivery in flight per key"
        );
        assert!(
            log.most_in_flight > 1,
            "batch {batch}: lanes ran in parallel"
        );
        let released = released.lock().unwrap();
        assert!(released.windows(2).all(|w| w[0] < w[1]), "{released:?}");
        assert_eq!(released.last(), Some(&(COUNT as u64)), "batch {batch}");
    }
}

/// Answers `Failure::Hold` (the destination is misconfigured) `holds` times, then accepts.
struct HoldingSink {
    holds: usize,
    delivered: Arc<Mutex<Vec<u64>>>,
}

impl Sink for HoldingSink {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            if self.holds > 0 {
                self.holds -= 1;
                return Err(Failure::Hold {
                    error: "HTTP 401 (check the credentials)".into(),
                    retry_after: None,
                });
            }
            let ns = batch
                .iter()
                .map(|d| d.event.payload.value()["n"].as_u64().unwrap());
            self.delivered.lock().unwrap().extend(ns);
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_held_destination_never_uses_up_the_attempts() {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let released = Arc::new(Mutex::new(Vec::new()));
    let detector = MemoryDetector {
        count: 3,
        window: WINDOW,
        keys: None,
        released: released.clone(),
        shutdown_timeout: Duration::from_millis(300),
    };
    let sink = HoldingSink {
        holds: 6,
        delivered: delivered.clone(),
    };
    // Two attempts at most, and no dead letters: a counted failure would stop the adapter.
    let policy = Policy::new(
        1,
        Duration::from_millis(1),
        Duration::from_millis(2),
        Some(2),
    );
    let adapter: Box<dyn Adapter> = Box::new(Durable::new("held", sink, policy, None));
    let pipeline = Pipeline::new(
        Box::new(detector),
        vec![adapter],
        WINDOW,
        16,
        Duration::from_secs(5),
    );
    let cancel = CancellationToken::new();
    let pipeline = tokio::spawn(pipeline.run(cancel.clone()));
    for _ in 0..500 {
        if delivered.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    pipeline.await.unwrap().unwrap();
    assert_eq!(*delivered.lock().unwrap(), [1, 2, 3]);
    assert_eq!(released.lock().unwrap().last(), Some(&3));
}
