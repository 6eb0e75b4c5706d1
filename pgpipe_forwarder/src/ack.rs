//! Acknowledgement tracking: which source position may be acknowledged, given what every
//! durable adapter has delivered.
//!
//! The detector numbers events `1, 2, 3, ...` as it hands them to the bus and records, for
//! each, the source position just after it (a queue position or a WAL LSN). Each durable
//! adapter delivers its events in order and reports the highest number it has finished
//! (delivered or dead-lettered). A position may be acknowledged once every durable adapter
//! has finished the event it follows, so a crash can repeat only events still in flight.

use std::collections::VecDeque;

use tokio::sync::mpsc;

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

/// The handle a durable adapter reports its progress with.
#[derive(Debug, Clone)]
pub struct Acker {
    adapter: usize,
    tx: mpsc::UnboundedSender<(usize, u64)>,
}

impl Acker {
    /// A handle for durable adapter number `adapter`.
    pub fn new(adapter: usize, tx: mpsc::UnboundedSender<(usize, u64)>) -> Self {
        Acker { adapter, tx }
    }

    /// Every event up to `seq` is delivered or dead-lettered.
    pub fn finished(&self, seq: u64) {
        // The detector may already be gone on shutdown; nothing to tell it then.
        let _ = self.tx.send((self.adapter, seq));
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

    #[test]
    fn without_durable_adapters_everything_is_releasable() {
        let mut t = AckTracker::new(0);
        t.push_event("p1");
        t.push_event("p2");
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.take_releasable(), Some("p2"));
    }
}
