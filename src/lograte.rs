//! Log rate limiting: a token bucket per key (a caller's uid, or a request
//! kind), so that no user can flood the daemon's log. A line that is let
//! through after others were dropped says how many were dropped.
//!
//! It owns only the counting; callers format their lines (and cut long
//! input with [`crate::types::cut`]) themselves.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Instant;

/// Lines a key may log at once.
const BURST: f64 = 20.0;
/// Lines a key may log per second, in the long run.
const PER_SEC: f64 = 2.0;
/// Keys remembered at most; past that the table starts afresh.
const MAX_KEYS: usize = 4096;

struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

/// A set of token buckets, one per key.
pub struct RateLimit {
    buckets: Mutex<HashMap<u64, Bucket>>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl RateLimit {
    /// May `key` log a line now? `Some(n)`: yes, and `n` lines of this key
    /// were dropped since its last line. `None`: drop this one.
    pub fn allow(&self, key: u64) -> Option<u64> {
        let now = Instant::now();
        let mut m = self.buckets.lock();
        if m.len() >= MAX_KEYS && !m.contains_key(&key) {
            m.clear();
        }
        let b = m.entry(key).or_insert(Bucket {
            tokens: BURST,
            last: now,
            dropped: 0,
        });
        let dt = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * PER_SEC).min(BURST);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.dropped))
        } else {
            b.dropped += 1;
            None
        }
    }
}

/// Lines about control-socket requests, keyed by the caller's uid.
pub static CONTROL: LazyLock<RateLimit> = LazyLock::new(RateLimit::default);

/// Warnings about failed FUSE requests, keyed by the request kind.
pub static FUSE: LazyLock<RateLimit> = LazyLock::new(RateLimit::default);

/// ` (N similar lines dropped)` when `dropped` > 0, else nothing.
pub fn dropped_note(dropped: u64) -> String {
    if dropped == 0 {
        String::new()
    } else {
        format!(" ({dropped} earlier line(s) dropped by the log rate limit)")
    }
}

/// A stable key for a text (an operation name).
pub fn key_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_drops_then_counts() {
        let r = RateLimit::default();
        for _ in 0..20 {
            assert_eq!(r.allow(7), Some(0));
        }
        assert_eq!(r.allow(7), None);
        assert_eq!(r.allow(7), None);
        // Another key is not affected.
        assert_eq!(r.allow(8), Some(0));
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(r.allow(7), Some(2));
    }
}
