//! Acknowledgement tracking: which source position may be acknowledged, given what every
//! durable adapter has delivered.
//!
//! The detector numbers events `1, 2, 3, ...` as it hands them to the bus and records, for
//! each, the source position just after it (a queue position or a WAL LSN). Each durable
//! adapter delivers its events in order and reports the highest number it has finished
//! (delivered or dead-lettered). A position may be acknowledged once every durable adapter
//! has finished the event it follows, so a crash can repeat only events still in flight.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;

/// Pure bookkeeping of the in-flight window; `P` is the source's position type.
#[derive(Debug)]
pub struct AckTracker<P> {
    /// Positions after events not yet finished by every durable adapter, oldest first.
    pending: VecDeque<(u64, P)>,
    /// Per durable adapter: the highest event number it finished.
    finished: Vec<u64>,
    /// The number of the last event handed out.
    last_seq: u64,
    /// Number of the event the last released position follows.
    released_seq: u64,
}

impl<P> AckTracker<P> {
    /// A tracker for `durable_adapters` adapters whose acknowledgements count.
    pub fn new(durable_adapters: usize) -> Self {
        AckTracker {
            pending: VecDeque::new(),
            finished: vec![0; durable_adapters],
            last_seq: 0,
            released_seq: 0,
        }
    }

    /// Numbers the next event and remembers the position after it. Returns its number.
    pub fn push_event(&mut self, position_after: P) -> u64 {
        self.last_seq += 1;
        self.pending.push_back((self.last_seq, position_after));
        self.last_seq
    }

    /// Records a position that follows no new event (the source moved on without events
    /// for us). It becomes acknowledgeable with the event before it.
    pub fn push_position(&mut self, position: P) {
        match self.pending.back_mut() {
            Some((seq, last)) if *seq == self.last_seq => *last = position,
            _ => self.pending.push_back((self.last_seq, position)),
        }
    }

    /// Durable adapter `adapter` finished every event up to `seq`.
    pub fn finished(&mut self, adapter: usize, seq: u64) {
        if let Some(done) = self.finished.get_mut(adapter) {
            *done = (*done).max(seq);
        }
    }

    /// The number of events handed out that some durable adapter has not finished.
    pub fn in_flight(&self) -> u64 {
        self.last_seq - self.finished_by_all()
    }

    /// The newest position every durable adapter is past, if a new one is available.
    pub fn take_releasable(&mut self) -> Option<P> {
        let done = self.finished_by_all();
        let mut release = None;
        while let Some((seq, _)) = self.pending.front() {
            if *seq > done {
                break;
            }
            let (seq, position) = self.pending.pop_front().expect("front exists");
            self.released_seq = seq;
            release = Some(position);
        }
        release
    }

    /// The number of the last event covered by a released position.
    pub fn released_seq(&self) -> u64 {
        self.released_seq
    }

    fn finished_by_all(&self) -> u64 {
        // With no durable adapter an event is finished once handed to the bus.
        self.finished.iter().copied().min().unwrap_or(self.last_seq)
    }
}

/// The handle an adapter reports its progress with. Every adapter gets one: durable
/// adapters report what they finished, live ones what they handed on (at once).
#[derive(Debug, Clone)]
pub struct Acker {
    adapter: usize,
    /// `None` for a live adapter: its events never hold the source position back, so
    /// acknowledging them is done the moment they are handed on.
    tx: Option<mpsc::UnboundedSender<(usize, u64)>>,
}

impl Acker {
    /// A handle for durable adapter number `adapter`.
    pub fn new(adapter: usize, tx: mpsc::UnboundedSender<(usize, u64)>) -> Self {
        Acker {
            adapter,
            tx: Some(tx),
        }
    }

    /// The handle of a live adapter (sse, ws): its acknowledgements count at once.
    pub fn live() -> Self {
        Acker {
            adapter: usize::MAX,
            tx: None,
        }
    }

    /// Every event up to `seq` is delivered or dead-lettered.
    pub fn finished(&self, seq: u64) {
        if let Some(tx) = &self.tx {
            // The detector may already be gone on shutdown; nothing to tell it then.
            let _ = tx.send((self.adapter, seq));
        }
    }
}

/// A detector's in-flight window: the tracker, the adapters' acknowledgements and the
/// flow-control limit, shared by every detector.
///
/// A forgotten acknowledgement is loud: when the window has been full for `stall_warning`
/// without any acknowledgement arriving, it logs a warning naming the detector (and again
/// every `stall_warning` while it stays stuck), instead of hanging silently.
#[derive(Debug)]
pub struct InFlight<P> {
    tracker: AckTracker<P>,
    acks: mpsc::UnboundedReceiver<(usize, u64)>,
    max: u64,
    stall_warning: Duration,
    last_progress: Instant,
    detector: &'static str,
}

impl<P> InFlight<P> {
    /// A window of at most `max` events for `durable` adapters reporting on `acks`.
    pub fn new(
        detector: &'static str,
        acks: mpsc::UnboundedReceiver<(usize, u64)>,
        durable: usize,
        max: usize,
        stall_warning: Duration,
    ) -> Self {
        InFlight {
            tracker: AckTracker::new(durable),
            acks,
            max: max.max(1) as u64,
            stall_warning,
            last_progress: Instant::now(),
            detector,
        }
    }

    /// Events handed out and not yet finished by every durable adapter.
    pub fn in_flight(&self) -> u64 {
        self.tracker.in_flight()
    }

    /// How many more events may be handed out now.
    pub fn room(&self) -> u64 {
        self.max.saturating_sub(self.tracker.in_flight())
    }

    /// The most events in flight at once (`max_in_flight`).
    pub fn capacity(&self) -> u64 {
        self.max
    }

    /// Numbers the next event and remembers the position after it.
    pub fn push_event(&mut self, position_after: P) -> u64 {
        if self.room() == 1 {
            // The window fills now: the stall clock starts here.
            self.last_progress = Instant::now();
        }
        self.tracker.push_event(position_after)
    }

    /// Records a position that follows no new event (see [`AckTracker::push_position`]).
    pub fn push_position(&mut self, position: P) {
        self.tracker.push_position(position);
    }

    /// The newest position every durable adapter is past, if a new one is available.
    pub fn take_releasable(&mut self) -> Option<P> {
        self.tracker.take_releasable()
    }

    /// The number of the last event covered by a released position.
    pub fn released_seq(&self) -> u64 {
        self.tracker.released_seq()
    }

    /// Takes every acknowledgement already waiting, without blocking.
    pub fn drain(&mut self) {
        while let Ok((adapter, seq)) = self.acks.try_recv() {
            self.finished(adapter, seq);
        }
    }

    /// Waits for acknowledgements and takes them all. Cancel-safe (use it in `select!`).
    /// Warns while the window is full and nothing is acknowledged. Fails with
    /// [`Error::BusClosed`] when no adapter can acknowledge any more.
    pub async fn acked(&mut self) -> Result<(), Error> {
        loop {
            let full = self.room() == 0;
            let stall_at = self.last_progress + self.stall_warning;
            tokio::select! {
                ack = self.acks.recv() => {
                    let (adapter, seq) = ack.ok_or(Error::BusClosed)?;
                    self.finished(adapter, seq);
                    self.drain();
                    return Ok(());
                }
                _ = tokio::time::sleep_until(stall_at), if full => {
                    tracing::warn!(component = "detector", detector = self.detector,
                        in_flight = self.in_flight(), waited = ?self.stall_warning,
                        "the in-flight window is full and no adapter acknowledged anything: \
                         an adapter is stuck or forgot an acknowledgement");
                    self.last_progress = Instant::now();
                }
            }
        }
    }

    fn finished(&mut self, adapter: usize, seq: u64) {
        self.tracker.finished(adapter, seq);
        self.last_progress = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_only_what_every_durable_adapter_finished() {
        let mut t = AckTracker::new(2);
        let a = t.push_event("p1");
        let b = t.push_event("p2");
        let c = t.push_event("p3");
        assert_eq!(t.in_flight(), 3);
        t.finished(0, c);
        assert_eq!(t.take_releasable(), None);
        t.finished(1, a);
        assert_eq!(t.take_releasable(), Some("p1"));
        t.finished(1, b);
        assert_eq!(t.take_releasable(), Some("p2"));
        assert_eq!(t.in_flight(), 1);
        t.finished(1, c);
        assert_eq!(t.take_releasable(), Some("p3"));
        assert_eq!(t.take_releasable(), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_position_without_events_rides_on_the_event_before_it() {
        let mut t = AckTracker::new(1);
        t.push_position("idle0");
        assert_eq!(t.take_releasable(), Some("idle0"));
        let a = t.push_event("p1");
        t.push_position("batch-end");
        assert_eq!(t.take_releasable(), None);
        t.finished(0, a);
        assert_eq!(t.take_releasable(), Some("batch-end"));
    }

    #[tokio::test]
    async fn the_window_limits_and_takes_acks() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = InFlight::new("test", rx, 1, 2, Duration::from_secs(60));
        let a = w.push_event("p1");
        w.push_event("p2");
        assert_eq!(w.room(), 0);
        Acker::new(0, tx.clone()).finished(a);
        Acker::live().finished(99);
        w.acked().await.unwrap();
        assert_eq!((w.room(), w.take_releasable()), (1, Some("p1")));
        drop(tx);
        assert!(matches!(w.acked().await, Err(Error::BusClosed)));
    }

    #[test]
    fn without_durable_adapters_everything_is_releasable() {
        let mut t = AckTracker::new(0);
        t.push_event("p1");
        t.push_event("p2");
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.take_releasable(), Some("p2"));
    }
}
