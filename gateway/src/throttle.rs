//! Failed-login throttling with exponential backoff, per account and per address.
//!
//! A key (a lowercased username, or a client address) may fail `free` times; each
//! failure after that locks it for `base`, doubling per further failure up to
//! `max`. While locked, a login is answered 429 with `Retry-After` before any
//! password is hashed, so a guesser costs the server nothing and gets a handful of
//! guesses an hour. A success clears the key. State is per node, in memory, and
//! bounded: past `max_keys` entries, those idle for longer than `max` go first,
//! then the least recently failed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

pub struct Throttle {
    free: u32,
    base: Duration,
    max: Duration,
    max_keys: usize,
    map: Mutex<HashMap<String, Entry>>,
}

impl Throttle {
    pub fn new(free: u32, base: Duration, max: Duration, max_keys: usize) -> Throttle {
        Throttle { free, base, max, max_keys, map: Mutex::new(HashMap::new()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(retry_after)` while `key` is locked.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        match self.map().get(key).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failed login for `key`.
    pub fn failed(&self, key: &str, now: Instant) {
        let mut map = self.map();
        if map.len() >= self.max_keys && !map.contains_key(key) {
            self.evict(&mut map, now);
        }
        let e = map.entry(key.to_owned()).or_insert(Entry { failures: 0, locked_until: None, last: now });
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        if e.failures > self.free {
            let doublings = (e.failures - self.free - 1).min(30);
            let wait = self.base.saturating_mul(1 << doublings).min(self.max);
            e.locked_until = Some(now + wait);
        }
    }

    /// A successful login: the key starts afresh.
    pub fn succeeded(&self, key: &str) {
        self.map().remove(key);
    }

    fn evict(&self, map: &mut HashMap<String, Entry>, now: Instant) {
        map.retain(|_, e| now.duration_since(e.last) < self.max);
        if map.len() >= self.max_keys {
            // Still full of recent failures: drop the older half.
            let mut lasts: Vec<Instant> = map.values().map(|e| e.last).collect();
            lasts.sort_unstable();
            let cut = lasts[lasts.len() / 2];
            map.retain(|_, e| e.last > cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_failures_then_doubling_locks_then_a_success_clears() {
        let t = Throttle::new(2, Duration::from_secs(1), Duration::from_secs(5), 100);
        let t0 = Instant::now();
        t.failed("alice", t0);
        t.failed("alice", t0);
        assert_eq!(t.check("alice", t0), Ok(()), "two free failures");
        t.failed("alice", t0);
        assert_eq!(t.check("alice", t0), Err(Duration::from_secs(1)));
        assert_eq!(t.check("alice", t0 + Duration::from_secs(1)), Ok(()));
        t.failed("alice", t0);
        assert_eq!(t.check("alice", t0), Err(Duration::from_secs(2)));
        for _ in 0..10 {
            t.failed("alice", t0);
        }
        assert_eq!(t.check("alice", t0), Err(Duration::from_secs(5)), "capped");
        assert_eq!(t.check("bob", t0), Ok(()), "per key");
        t.succeeded("alice");
        assert_eq!(t.check("alice", t0), Ok(()));
    }

    #[test]
    fn bounded() {
        let t = Throttle::new(0, Duration::from_secs(1), Duration::from_secs(60), 10);
        let t0 = Instant::now();
        for i in 0..100u64 {
            t.failed(&format!("k{i}"), t0 + Duration::from_millis(i));
        }
        assert!(t.map().len() <= 10);
        assert!(t.check("k99", t0).is_err(), "the newest stay");
    }
}
