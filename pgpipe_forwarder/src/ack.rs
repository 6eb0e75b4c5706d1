//! Acknowledgement tracking: which source position may be acknowledged, given what every
//! durable adapter has delivered.
//!
//! The detector numbers events `1, 2, 3, ...` as it hands them to the bus and records, for
//! each, the source position just after it (a queue position or a WAL LSN). Each durable
//! adapter delivers its events in order and reports the highest number it has finished
//! (delivered or dead-lettered). A position may be acknowledged once every durable adapter
//! has finished the event it follows, so a crash can repeat only events still in flight.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::Bus;
use crate::error::Error;
use crate::event::{Delivery, Event};

/// Pure bookkeeping of the in-flight window; `P` is the source's position type.
#[derive(Debug)]
pub struct AckTracker<P> {
    /// Positions after events not yet finished by every durable adapter, oldest first.
    pending: VecDeque<(u64, P)>,
    /// Per durable adapter: the highest event number it finished.
    finished: Vec<u64>,
    /// Per durable adapter with a route: the numbers of the events it gets that it has
    /// not finished, oldest first (`None`: it gets every event). Events it does not get
    /// count as finished by it.
    routed: Vec<Option<VecDeque<u64>>>,
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
            routed: vec![None; durable_adapters],
            last_seq: 0,
            released_seq: 0,
        }
    }

    /// Marks the durable adapters (by number) that have a route: they get only the
    /// events [`AckTracker::push_routed_event`] says they get.
    pub fn set_routed(&mut self, routed: &[bool]) {
        for (slot, &has_route) in self.routed.iter_mut().zip(routed) {
            *slot = has_route.then(VecDeque::new);
        }
    }

    /// Numbers the next event and remembers the position after it. Returns its number.
    pub fn push_event(&mut self, position_after: P) -> u64 {
        self.push_routed_event(position_after, |_| true)
    }

    /// [`AckTracker::push_event`] for an event that durable adapter `i` gets only when
    /// `gets(i)` (adapters without a route get every event).
    pub fn push_routed_event(&mut self, position_after: P, gets: impl Fn(usize) -> bool) -> u64 {
        self.last_seq += 1;
        self.pending.push_back((self.last_seq, position_after));
        for (adapter, queue) in self.routed.iter_mut().enumerate() {
            if let Some(queue) = queue {
                if gets(adapter) {
                    queue.push_back(self.last_seq);
                }
            }
        }
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
        if let Some(Some(queue)) = self.routed.get_mut(adapter) {
            while queue.front().is_some_and(|&s| s <= seq) {
                queue.pop_front();
            }
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
        self.finished
            .iter()
            .zip(&self.routed)
            .map(|(&done, routed)| match routed {
                None => done,
                // Done up to the first event it gets and has not finished.
                Some(queue) => queue.front().map_or(self.last_seq, |&next| next - 1),
            })
            .min()
            .unwrap_or(self.last_seq)
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

    /// Marks the durable adapters that have a route (see [`Bus::routed_durables`]).
    pub fn with_routes(mut self, routed: &[bool]) -> Self {
        self.tracker.set_routed(routed);
        self
    }

    /// Numbers the next event and remembers the position after it.
    pub fn push_event(&mut self, position_after: P) -> u64 {
        self.before_push();
        self.tracker.push_event(position_after)
    }

    /// Numbers `event`, remembers the position after it and hands it to the adapters its
    /// route reaches. Returns its number.
    pub fn publish(&mut self, bus: &Bus, position_after: P, event: Event) -> Result<u64, Error> {
        self.before_push();
        let seq = self
            .tracker
            .push_routed_event(position_after, |adapter| bus.durable_gets(adapter, &event));
        bus.publish(&Delivery {
            seq,
            event: Arc::new(event),
        })?;
        Ok(seq)
    }

    fn before_push(&mut self) {
        if self.room() == 1 {
            // The window fills now: the stall clock starts here.
            self.last_progress = Instant::now();
        }
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
    fn an_event_outside_a_route_counts_as_finished_by_that_adapter() {
        // Adapter 0 gets everything, adapter 1 only the events marked `true`.
        let mut t = AckTracker::new(2);
        t.set_routed(&[false, true]);
        let push = |t: &mut AckTracker<&'static str>, p, to_1: bool| {
            t.push_routed_event(p, |adapter| adapter == 0 || to_1)
        };
        let a = push(&mut t, "p1", false);
        let b = push(&mut t, "p2", true);
        let c = push(&mut t, "p3", false);
        t.finished(0, a);
        // Adapter 1 never gets a: released on adapter 0's word alone.
        assert_eq!(t.take_releasable(), Some("p1"));
        t.finished(0, c);
        // b is adapter 1's and not finished: p2 and p3 wait for it.
        assert_eq!(t.take_releasable(), None);
        assert_eq!(t.in_flight(), 2);
        t.finished(1, b);
        assert_eq!(t.take_releasable(), Some("p3"));
        assert_eq!(t.in_flight(), 0);
        // An adapter that gets nothing never holds anything back.
        let d = push(&mut t, "p4", false);
        t.finished(0, d);
        assert_eq!(t.take_releasable(), Some("p4"));
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
