//! Per-connection rate limits (GCRA token buckets, from `governor`).
//!
//! Every client request draws on one budget ([`budget_of`] says which). A
//! connection gets its limiters on its first request, so idle connections pay one
//! pointer for them. Over a limit, the request is refused with 1021
//! `rate_limited` and the connection stays open. Every refusal also draws on the
//! connection's abuse budget (refilled at the send rate); when that is spent too
//! the connection is closed with 1008: the client kept sending at well over its
//! limit after being told to stop.

use crate::config::Limits;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use protocol::ClientMsg;
use std::num::NonZeroU32;

/// What a limited request may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse it with 1021; the connection stays.
    Refuse,
    /// Refuse it and close the connection with 1008.
    Close,
}

/// The budgets a connection's requests draw on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `send`, `react`: each is stored and delivered to every member.
    Send,
    /// `typing`.
    Typing,
    /// `mark_delivered`, `mark_read`.
    Receipt,
    /// `edit`, `delete`: each is stored and delivered to every member.
    Edit,
    /// `create_direct`, `create_group`, `add_members`, `remove_member`, `set_role`, `leave`.
    Group,
    /// `mute`, `set_privacy`.
    Settings,
    /// `history`, `list_conversations`, `get_conversation`, `get_receipts`, `get_presence`, `sync`.
    Read,
    /// `ping`.
    Ping,
}

const BUDGETS: usize = 8;

/// Which budget a request draws on. Every request draws on one.
pub fn budget_of(msg: &ClientMsg) -> Budget {
    match msg {
        ClientMsg::Send { .. } | ClientMsg::React { .. } => Budget::Send,
        ClientMsg::Typing { .. } => Budget::Typing,
        ClientMsg::MarkDelivered { .. } | ClientMsg::MarkRead { .. } => Budget::Receipt,
        ClientMsg::Edit { .. } | ClientMsg::Delete { .. } => Budget::Edit,
        ClientMsg::CreateDirect { .. }
        | ClientMsg::CreateGroup { .. }
        | ClientMsg::AddMembers { .. }
        | ClientMsg::RemoveMember { .. }
        | ClientMsg::SetRole { .. }
        | ClientMsg::Leave { .. } => Budget::Group,
        ClientMsg::Mute { .. } | ClientMsg::SetPrivacy { .. } => Budget::Settings,
        ClientMsg::History { .. }
        | ClientMsg::ListConversations { .. }
        | ClientMsg::GetConversation { .. }
        | ClientMsg::GetReceipts { .. }
        | ClientMsg::GetPresence { .. }
        | ClientMsg::Sync { .. } => Budget::Read,
        ClientMsg::Ping => Budget::Ping,
    }
}

pub struct ConnLimits {
    budgets: [DefaultDirectRateLimiter; BUDGETS],
    abuse: DefaultDirectRateLimiter,
}

fn limiter(per_sec: NonZeroU32, burst: NonZeroU32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_second(per_sec).allow_burst(burst))
}

impl ConnLimits {
    pub fn new(l: &Limits) -> ConnLimits {
        // In `Budget` order.
        ConnLimits {
            budgets: [
                limiter(l.send_per_sec, l.send_burst),
                limiter(l.typing_per_sec, l.typing_burst),
                limiter(l.receipts_per_sec, l.receipts_burst),
                limiter(l.edits_per_sec, l.edits_burst),
                limiter(l.groups_per_sec, l.groups_burst),
                limiter(l.settings_per_sec, l.settings_burst),
                limiter(l.reads_per_sec, l.reads_burst),
                limiter(l.pings_per_sec, l.pings_burst),
            ],
            abuse: limiter(l.send_per_sec, l.abuse_budget),
        }
    }

    /// Runs on: the owning shard.
    pub fn check(&self, budget: Budget) -> Verdict {
        if self.budgets[budget as usize].check().is_ok() {
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
        l.send_per_sec = NonZeroU32::new(1).unwrap();
        l.send_burst = NonZeroU32::new(3).unwrap();
        l.abuse_budget = NonZeroU32::new(2).unwrap();
        let c = ConnLimits::new(&l);
        let got: Vec<_> = (0..6).map(|_| c.check(Budget::Send)).collect();
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

    #[test]
    fn budgets_are_separate() {
        let mut l = crate::config::Config::default().limits;
        l.pings_burst = NonZeroU32::new(1).unwrap();
        let c = ConnLimits::new(&l);
        assert_eq!(c.check(Budget::Ping), Verdict::Allow);
        assert_eq!(c.check(Budget::Ping), Verdict::Refuse);
        assert_eq!(c.check(Budget::Read), Verdict::Allow, "pings do not spend reads");
    }
}
