//! Exponential backoff with jitter, for re-dialling a peer that failed.
//!
//! After the n-th failure in a row the wait is drawn uniformly from the upper half of
//! `min * 2^(n-1)`, capped at `max`: peers that failed together do not retry together, and no
//! wait exceeds `max`.

use std::time::Duration;

/// The first wait after a failure.
pub const BACKOFF_MS_MIN: u64 = 50;
/// The longest wait between attempts.
pub const BACKOFF_MS_MAX: u64 = 2_000;

/// A backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_millis(BACKOFF_MS_MIN),
            max: Duration::from_millis(BACKOFF_MS_MAX),
        }
    }
}

impl Backoff {
    /// The wait after `failures` failures in a row (at least 1).
    pub fn delay(&self, failures: u32) -> Duration {
        assert!(failures >= 1, "a backoff follows at least one failure");
        assert!(self.min <= self.max, "backoff min {self:?} exceeds its max");
        let doublings = (failures - 1).min(32);
        let base = self
            .min
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max);
        let half = base / 2;
        let span = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            random_u64() % (span + 1)
        };
        let delay = half + Duration::from_nanos(jitter);
        assert!(delay <= self.max, "backoff {delay:?} past its max");
        delay
    }

    /// The waits after the 1st, 2nd, ... failure: an endless schedule for openraft.
    pub fn schedule(self) -> impl Iterator<Item = Duration> + Send + 'static {
        (1u32..).map(move |n| self.delay(n))
    }
}

fn random_u64() -> u64 {
    // Jitter needs no strong randomness; if the system source fails, no jitter is still safe.
    getrandom::u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_jitter_in_the_upper_half() {
        let b = Backoff::default();
        for n in 1..40 {
            let d = b.delay(n);
            let base = Duration::from_millis(BACKOFF_MS_MIN)
                .saturating_mul(1u32 << (n - 1).min(31))
                .min(b.max);
            assert!(d >= base / 2 && d <= base, "failure {n}: {d:?} vs {base:?}");
        }
        assert!(b.delay(30) >= b.max / 2);
        assert_eq!(b.schedule().take(5).count(), 5);
    }
}
