//! Lanes: which queued events may be delivered now, when a durable adapter delivers several
//! batches at once.
//!
//! Every event belongs to a lane ([`Ordering`]): by default its channel and key, so that a
//! key's changes arrive in commit order. A lane has at most one batch in flight; its next
//! events wait until that batch is finished (delivered or dead-lettered), however long its
//! retries take, while other lanes go on. Events without a key (tables without a primary
//! key, emits that give none, notifications) share one lane per channel: nothing orders
//! them but their channel, so they keep the channel's order.
//!
//! A batch takes whole runs of ready lanes (each lane's queued events in order), so a batch
//! never holds events of a lane that is in flight elsewhere, and within a batch each lane's
//! events keep their order.
//!
//! Acknowledgements stay cumulative: the watermark (every event up to it is finished)
//! advances only over a contiguous prefix of the events received, so a crash repeats only
//! events that were queued or in flight. The detector's in-flight window bounds how far the
//! other lanes run ahead of a lane that is stuck retrying.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::event::{Delivery, Event};

/// Which events must keep their relative order (`webhook.ordering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Events of one channel and key, in order; keyless events in order per channel.
    #[default]
    Key,
    /// Events of one channel, in order.
    Channel,
    /// No order: every event is its own lane.
    None,
}

impl Ordering {
    /// The names accepted in the configuration.
    pub const NAMES: &'static [&'static str] = &["key", "channel", "none"];
}

/// A lane's identity. Lanes whose hashes collide share one lane: less parallelism, never
/// a broken order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LaneId {
    Hashed(u64),
    Alone(u64),
}

/// The lanes of one adapter: events queued per lane, lanes in flight, the watermark.
#[derive(Debug)]
pub struct Lanes {
    ordering: Ordering,
    /// Every event received and not yet covered by the watermark, in arrival (seq) order,
    /// with whether it is finished.
    window: VecDeque<(u64, bool)>,
    queued: HashMap<LaneId, VecDeque<Delivery>>,
    in_flight: HashSet<LaneId>,
    /// Lanes with queued events and nothing in flight, oldest first.
    ready: VecDeque<LaneId>,
}

/// A batch taken from [`Lanes::take_batch`]: its events in seq order, and the lanes it holds.
#[derive(Debug)]
pub struct LaneBatch {
    /// The events, in the order they were received.
    pub events: Vec<Delivery>,
    lanes: Vec<LaneId>,
}

impl Lanes {
    /// No events yet.
    pub fn new(ordering: Ordering) -> Lanes {
        Lanes {
            ordering,
            window: VecDeque::new(),
            queued: HashMap::new(),
            in_flight: HashSet::new(),
            ready: VecDeque::new(),
        }
    }

    /// Queues a received event (events arrive in increasing seq order).
    pub fn push(&mut self, delivery: Delivery) {
        let lane = self.lane_of(&delivery);
        self.window.push_back((delivery.seq, false));
        let queue = self.queued.entry(lane).or_default();
        queue.push_back(delivery);
        if queue.len() == 1 && !self.in_flight.contains(&lane) {
            self.ready.push_back(lane);
        }
    }

    /// The next batch of at most `max` events from lanes with nothing in flight, or `None`
    /// when no lane is ready. Its lanes are in flight until [`Lanes::finish`].
    pub fn take_batch(&mut self, max: usize) -> Option<LaneBatch> {
        let mut batch = LaneBatch {
            events: Vec::new(),
            lanes: Vec::new(),
        };
        while batch.events.len() < max.max(1) {
            let Some(lane) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.queued.get_mut(&lane) else {
                continue;
            };
            let room = max.max(1) - batch.events.len();
            let take = queue.len().min(room);
            batch.events.extend(queue.drain(..take));
            if queue.is_empty() {
                self.queued.remove(&lane);
            }
            self.in_flight.insert(lane);
            batch.lanes.push(lane);
        }
        if batch.events.is_empty() {
            return None;
        }
        batch.events.sort_by_key(|d| d.seq);
        Some(batch)
    }

    /// Every event of `batch` is finished: its lanes are free again. Returns the new
    /// watermark when it moved.
    pub fn finish(&mut self, batch: &LaneBatch) -> Option<u64> {
        for lane in &batch.lanes {
            self.in_flight.remove(lane);
            if self.queued.contains_key(lane) {
                self.ready.push_back(*lane);
            }
        }
        for d in &batch.events {
            if let Ok(i) = self.window.binary_search_by_key(&d.seq, |(seq, _)| *seq) {
                self.window[i].1 = true;
            }
        }
        let mut watermark = None;
        while let Some(&(seq, true)) = self.window.front() {
            watermark = Some(seq);
            self.window.pop_front();
        }
        watermark
    }

    /// Events received and not yet finished (queued or in flight).
    pub fn unfinished(&self) -> usize {
        self.window.len()
    }

    fn lane_of(&self, delivery: &Delivery) -> LaneId {
        let event: &Event = &delivery.event;
        let mut h = DefaultHasher::new();
        match self.ordering {
            Ordering::None => return LaneId::Alone(delivery.seq),
            Ordering::Channel => event.channel.hash(&mut h),
            Ordering::Key => {
                event.channel.hash(&mut h);
                match &event.key {
                    None | Some(serde_json::Value::Null) => 0u8.hash(&mut h),
                    Some(key) => {
                        1u8.hash(&mut h);
                        // The key's JSON text, streamed into the hasher (no allocation).
                        let _ = serde_json::to_writer(HashWriter(&mut h), key);
                    }
                }
            }
        }
        LaneId::Hashed(h.finish())
    }
}

/// Feeds written bytes to a hasher.
struct HashWriter<'a>(&'a mut DefaultHasher);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn delivery(seq: u64, channel: &str, key: Option<serde_json::Value>) -> Delivery {
        Delivery {
            seq,
            event: Arc::new(Event {
                id: Uuid::now_v7(),
                channel: channel.into(),
                operation: "UPDATE".into(),
                payload: json!({}).into(),
                key,
                source: "emit".into(),
                created_at: Utc::now(),
                transaction: None,
            }),
        }
    }

    fn seqs(b: &LaneBatch) -> Vec<u64> {
        b.events.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn one_batch_in_flight_per_key_and_the_others_go_on() {
        let mut l = Lanes::new(Ordering::Key);
        l.push(delivery(1, "o", Some(json!({"id": 1}))));
        l.push(delivery(2, "o", Some(json!({"id": 2}))));
        l.push(delivery(3, "o", Some(json!({"id": 1}))));
        let a = l.take_batch(1).unwrap();
        assert_eq!(seqs(&a), [1]);
        let b = l.take_batch(1).unwrap();
        assert_eq!(seqs(&b), [2]);
        // Key 1's next event waits for its batch in flight.
        assert!(l.take_batch(1).is_none());
        // Key 2 finishing first does not move the watermark past key 1's event 1.
        assert_eq!(l.finish(&b), None);
        assert!(l.take_batch(1).is_none());
        assert_eq!(l.finish(&a), Some(2));
        let c = l.take_batch(1).unwrap();
        assert_eq!(seqs(&c), [3]);
        assert_eq!(l.finish(&c), Some(3));
        assert_eq!(l.unfinished(), 0);
    }

    #[test]
    fn a_batch_takes_whole_runs_of_ready_keys_in_order() {
        let mut l = Lanes::new(Ordering::Key);
        for (seq, k) in [(1, 1), (2, 2), (3, 1), (4, 3), (5, 2)] {
            l.push(delivery(seq, "o", Some(json!({"id": k}))));
        }
        let a = l.take_batch(10).unwrap();
        assert_eq!(seqs(&a), [1, 2, 3, 4, 5]);
        // Key 1 arrives again while its batch is in flight: it waits.
        l.push(delivery(6, "o", Some(json!({"id": 1}))));
        l.push(delivery(7, "o", Some(json!({"id": 4}))));
        let b = l.take_batch(10).unwrap();
        assert_eq!(seqs(&b), [7]);
        assert_eq!(l.finish(&b), None);
        assert_eq!(l.finish(&a), Some(5));
        assert_eq!(seqs(&l.take_batch(10).unwrap()), [6]);
    }

    #[test]
    fn a_batch_split_in_a_lane_keeps_the_rest_for_later() {
        let mut l = Lanes::new(Ordering::Key);
        for seq in 1..=5 {
            l.push(delivery(seq, "o", Some(json!({"id": 1}))));
        }
        let a = l.take_batch(2).unwrap();
        assert_eq!(seqs(&a), [1, 2]);
        assert!(l.take_batch(2).is_none());
        assert_eq!(l.finish(&a), Some(2));
        assert_eq!(seqs(&l.take_batch(2).unwrap()), [3, 4]);
    }

    #[test]
    fn keyless_events_keep_their_channels_order() {
        let mut l = Lanes::new(Ordering::Key);
        l.push(delivery(1, "a", None));
        l.push(delivery(2, "a", Some(serde_json::Value::Null)));
        l.push(delivery(3, "b", None));
        let a = l.take_batch(1).unwrap();
        assert_eq!(seqs(&a), [1]);
        // Channel b's keyless lane is another lane; channel a's waits.
        assert_eq!(seqs(&l.take_batch(1).unwrap()), [3]);
        assert!(l.take_batch(1).is_none());
        l.finish(&a);
        assert_eq!(seqs(&l.take_batch(1).unwrap()), [2]);
    }

    #[test]
    fn channel_and_none_orderings() {
        let mut l = Lanes::new(Ordering::Channel);
        l.push(delivery(1, "a", Some(json!(1))));
        l.push(delivery(2, "a", Some(json!(2))));
        assert_eq!(seqs(&l.take_batch(1).unwrap()), [1]);
        assert!(l.take_batch(1).is_none());

        let mut l = Lanes::new(Ordering::None);
        l.push(delivery(1, "a", Some(json!(1))));
        l.push(delivery(2, "a", Some(json!(1))));
        let a = l.take_batch(1).unwrap();
        let b = l.take_batch(1).unwrap();
        assert_eq!((seqs(&a), seqs(&b)), (vec![1], vec![2]));
        assert_eq!(l.finish(&b), None);
        assert_eq!(l.finish(&a), Some(2));
    }

    #[test]
    fn the_watermark_follows_seqs_with_gaps() {
        // An adapter routed only some channels sees seqs with gaps.
        let mut l = Lanes::new(Ordering::None);
        l.push(delivery(4, "a", None));
        l.push(delivery(9, "a", None));
        let a = l.take_batch(1).unwrap();
        let b = l.take_batch(1).unwrap();
        assert_eq!(l.finish(&b), None);
        assert_eq!(l.finish(&a), Some(9));
    }
}
