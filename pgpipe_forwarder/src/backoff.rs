//! Exponential backoff with full jitter: attempt n waits a random time in
//! `[0, min(cap, base * 2^n)]`, never less than `floor`.

use std::time::Duration;

/// Backoff state for one retried operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    floor: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff starting at `base`, growing to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            floor: Duration::ZERO,
            attempt: 0,
        }
    }

    /// Sets the shortest wait (jitter may otherwise pick almost zero).
    pub fn with_floor(mut self, floor: Duration) -> Self {
        self.floor = floor;
        self
    }

    /// The upper bound of the wait before retry `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next retry, with full jitter.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let jittered = ceiling.mul_f64(fastrand::f64());
        jittered.max(self.floor.min(ceiling))
    }

    /// Back to the first attempt (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let ceilings: Vec<u64> = (0..6).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.ceiling(1_000), Duration::from_secs(10));
    }

    #[test]
    fn delays_stay_within_floor_and_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2))
            .with_floor(Duration::from_millis(100));
        for n in 0..50 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100), "attempt {n}: {d:?}");
            assert!(d <= b.ceiling(n), "attempt {n}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
