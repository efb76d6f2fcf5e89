//! Per-site write rate limits: a token bucket per site, so one site writing in a loop cannot
//! starve the others of the log, the projector or the disk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sustained transactions per second one site may write by default.
pub const WRITE_RATE_PER_SECOND_DEFAULT: f64 = 200.0;
/// Transactions a site may write in a burst by default.
pub const WRITE_BURST_DEFAULT: f64 = 2_000.0;

/// A token bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: WRITE_RATE_PER_SECOND_DEFAULT,
            burst: WRITE_BURST_DEFAULT,
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One bucket per site. Sites are created by the admin, so the map is bounded by them.
pub struct SiteLimiter {
    limit: Option<RateLimit>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl SiteLimiter {
    /// `None`: no limit.
    pub fn new(limit: Option<RateLimit>) -> SiteLimiter {
        if let Some(l) = limit {
            assert!(
                l.per_second > 0.0 && l.burst >= 1.0,
                "rate limit must allow some writes: {l:?}"
            );
        }
        SiteLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> Option<RateLimit> {
        self.limit
    }

    /// Takes one token for `site`, or says how long until one is free.
    pub fn check(&self, site: &str, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let mut buckets = self.buckets.lock().expect("rate limiter lock poisoned");
        let bucket = buckets.entry(site.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate_per_site() {
        let l = SiteLimiter::new(Some(RateLimit {
            per_second: 10.0,
            burst: 3.0,
        }));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check("a", t0).is_ok());
        }
        let wait = l.check("a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(l.check("b", t0).is_ok(), "sites do not share a bucket");
        assert!(l.check("a", t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check("a", t0 + Duration::from_millis(100)).is_err());
        assert!(SiteLimiter::new(None).check("a", t0).is_ok());
    }
}
