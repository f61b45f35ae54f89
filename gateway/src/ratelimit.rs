//! Per-connection rate limits (GCRA token buckets, from `governor`).
//!
//! A connection gets its limiters on its first limited request, so idle
//! connections pay one pointer for them. Over a limit, the request is refused
//! with 1021 `rate_limited` and the connection stays open. Every refusal also
//! draws on the connection's abuse budget (refilled at the limit's own rate);
//! when that is spent too the connection is closed with 1008: the client kept
//! sending at well over its limit after being told to stop.

use crate::config::Limits;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// What a limited request may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse it with 1021; the connection stays.
    Refuse,
    /// Refuse it and close the connection with 1008.
    Close,
}

pub struct ConnLimits {
    send: DefaultDirectRateLimiter,
    typing: DefaultDirectRateLimiter,
    receipt: DefaultDirectRateLimiter,
    abuse: DefaultDirectRateLimiter,
}

impl ConnLimits {
    pub fn new(l: &Limits) -> ConnLimits {
        ConnLimits {
            send: RateLimiter::direct(Quota::per_second(l.send_per_sec).allow_burst(l.send_burst)),
            typing: RateLimiter::direct(Quota::per_second(l.typing_per_sec).allow_burst(l.typing_burst)),
            receipt: RateLimiter::direct(Quota::per_second(l.receipts_per_sec).allow_burst(l.receipts_burst)),
            abuse: RateLimiter::direct(Quota::per_second(l.send_per_sec).allow_burst(l.abuse_budget)),
        }
    }

    /// Runs on: the owning shard.
    pub fn send(&self) -> Verdict {
        self.verdict(&self.send)
    }

    /// Runs on: the owning shard.
    pub fn typing(&self) -> Verdict {
        self.verdict(&self.typing)
    }

    /// Runs on: the owning shard.
    pub fn receipt(&self) -> Verdict {
        self.verdict(&self.receipt)
    }

    fn verdict(&self, limit: &DefaultDirectRateLimiter) -> Verdict {
        if limit.check().is_ok() {
            Verdict::Allow
        } else if self.abuse.check().is_ok() {
            Verdict::Refuse
        } else {
            Verdict::Close
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusals_then_close() {
        let mut l = crate::config::Config::default().limits;
        l.send_per_sec = std::num::NonZeroU32::new(1).unwrap();
        l.send_burst = std::num::NonZeroU32::new(3).unwrap();
        l.abuse_budget = std::num::NonZeroU32::new(2).unwrap();
        let c = ConnLimits::new(&l);
        let got: Vec<_> = (0..6).map(|_| c.send()).collect();
        assert_eq!(
            got,
            [
                Verdict::Allow,
                Verdict::Allow,
                Verdict::Allow,
                Verdict::Refuse,
                Verdict::Refuse,
                Verdict::Close
            ]
        );
    }
}
