//! Snowflake-style 63-bit ids for users and conversations: unique across a fleet
//! without coordination, and roughly time-ordered.
//!
//! Layout: 41 bits of milliseconds since 2025-01-01 UTC, 10 bits of node id,
//! 12 bits of per-millisecond sequence.

use std::sync::atomic::{AtomicU64, Ordering};

const EPOCH_MS: u64 = 1_735_689_600_000;

/// The highest node id (10 bits).
pub const MAX_NODE_ID: u16 = 1023;

pub struct IdGen {
    node: u64,
    /// `(ms << 12) | seq` of the last id handed out.
    last: AtomicU64,
}

impl IdGen {
    pub fn new(node: u16) -> IdGen {
        assert!(node <= MAX_NODE_ID, "node id is 10 bits");
        IdGen { node: u64::from(node), last: AtomicU64::new(0) }
    }

    /// Runs on: any thread.
    pub fn next(&self) -> u64 {
        let now = crate::vocab::clock::now_ms().saturating_sub(EPOCH_MS);
        let mut cur = self.last.load(Ordering::Relaxed);
        loop {
            // Never go backwards, even if the clock does; borrow from the future if the
            // 4096 ids of a millisecond run out.
            let next = (now << 12).max(cur + 1);
            match self.last.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    let (ms, seq) = (next >> 12, next & 0xfff);
                    return (ms << 22) | (self.node << 12) | seq;
                }
                Err(seen) => cur = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_carry_the_node() {
        let g = IdGen::new(5);
        let mut prev = 0;
        for _ in 0..10_000 {
            let id = g.next();
            assert!(id > prev);
            assert_eq!((id >> 12) & 0x3ff, 5);
            assert!(id < 1 << 63, "fits a signed 64-bit column");
            prev = id;
        }
    }
}
