//! Per-connection rate limits: GCRA (the generic cell rate algorithm, a token
//! bucket without a refill timer), one word of state per budget.
//!
//! Every client request draws on one budget ([`budget_of`] says which). Over a
//! limit, the request is refused with 1021
//! `rate_limited` and the connection stays open. Every refusal also draws on the
//! connection's abuse budget (refilled at the send rate); when that is spent too
//! the connection is closed with 1008: the client kept sending at well over its
//! limit after being told to stop.

use crate::config::Limits;
use protocol::ClientMsg;
use std::cell::Cell;
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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

/// One budget's rate as GCRA sees it, in nanoseconds: the interval between
/// requests at the sustained rate, and how far ahead of it a burst may run.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    interval: u64,
    tolerance: u64,
}

impl Rate {
    pub fn new(per_sec: NonZeroU32, burst: NonZeroU32) -> Rate {
        let interval = 1_000_000_000 / u64::from(per_sec.get());
        Rate { interval, tolerance: interval * u64::from(burst.get() - 1) }
    }
}

/// Every budget's rate, from the config; shared by all connections. A SIGHUP
/// reload replaces them in place ([`Rates::set`]): each value is an atomic read
/// with `Relaxed` ordering (a plain load on x86-64 and AArch64), so the check
/// costs what it did with plain fields; a request racing a reload may see one
/// budget's old interval with its new tolerance, which errs by one request at most.
#[derive(Debug)]
pub struct Rates {
    /// Per budget in `Budget` order, then the abuse budget: (interval, tolerance).
    cells: [(AtomicU64, AtomicU64); BUDGETS + 1],
}

impl Rates {
    pub fn new(l: &Limits) -> Rates {
        let r = Rates { cells: Default::default() };
        r.set(l);
        r
    }

    /// Takes the rates from `l`, for every connection's next request.
    ///
    /// Runs on: main (start, SIGHUP).
    pub fn set(&self, l: &Limits) {
        // In `Budget` order, then the abuse budget.
        let rates = [
            Rate::new(l.send_per_sec, l.send_burst),
            Rate::new(l.typing_per_sec, l.typing_burst),
            Rate::new(l.receipts_per_sec, l.receipts_burst),
            Rate::new(l.edits_per_sec, l.edits_burst),
            Rate::new(l.groups_per_sec, l.groups_burst),
            Rate::new(l.settings_per_sec, l.settings_burst),
            Rate::new(l.reads_per_sec, l.reads_burst),
            Rate::new(l.pings_per_sec, l.pings_burst),
            Rate::new(l.send_per_sec, l.abuse_budget),
        ];
        for ((interval, tolerance), r) in self.cells.iter().zip(rates) {
            interval.store(r.interval, Ordering::Relaxed);
            tolerance.store(r.tolerance, Ordering::Relaxed);
        }
    }

    fn get(&self, i: usize) -> Rate {
        let (interval, tolerance) = &self.cells[i];
        Rate { interval: interval.load(Ordering::Relaxed), tolerance: tolerance.load(Ordering::Relaxed) }
    }
}

/// A connection's budgets: per budget, GCRA's one word of state (the theoretical
/// arrival time, in nanoseconds of [`now`]). 72 bytes in the connection itself;
/// the rates are shared.
#[derive(Default)]
pub struct ConnLimits {
    tat: [Cell<u64>; BUDGETS + 1],
}

/// Nanoseconds on a monotonic clock shared by every limiter of the process.
pub fn now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// GCRA: the request conforms if it is at most `tolerance` ahead of the sustained
/// rate; if so it takes its place in the schedule.
fn take(tat: &Cell<u64>, r: Rate, now: u64) -> bool {
    let t = tat.get().max(now);
    if t - now > r.tolerance {
        return false;
    }
    tat.set(t + r.interval);
    true
}

impl ConnLimits {
    /// Runs on: the owning shard.
    pub fn check(&self, rates: &Rates, budget: Budget, now: u64) -> Verdict {
        if take(&self.tat[budget as usize], rates.get(budget as usize), now) {
            Verdict::Allow
        } else if take(&self.tat[BUDGETS], rates.get(BUDGETS), now) {
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
        let (rates, c) = (Rates::new(&l), ConnLimits::default());
        let got: Vec<_> = (0..6).map(|_| c.check(&rates, Budget::Send, 1_000)).collect();
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
    fn new_rates_apply_to_connections_already_open() {
        let mut l = crate::config::Config::default().limits;
        l.send_per_sec = NonZeroU32::new(1).unwrap();
        l.send_burst = NonZeroU32::new(1).unwrap();
        let (rates, c) = (Rates::new(&l), ConnLimits::default());
        assert_eq!(c.check(&rates, Budget::Send, 0), Verdict::Allow);
        assert_eq!(c.check(&rates, Budget::Send, 0), Verdict::Refuse, "burst of 1");
        l.send_burst = NonZeroU32::new(5).unwrap();
        rates.set(&l);
        assert_eq!(c.check(&rates, Budget::Send, 0), Verdict::Allow, "the reloaded burst, same connection");
    }

    #[test]
    fn budgets_are_separate() {
        let mut l = crate::config::Config::default().limits;
        l.pings_burst = NonZeroU32::new(1).unwrap();
        let (rates, c) = (Rates::new(&l), ConnLimits::default());
        assert_eq!(c.check(&rates, Budget::Ping, 0), Verdict::Allow);
        assert_eq!(c.check(&rates, Budget::Ping, 0), Verdict::Refuse);
        assert_eq!(c.check(&rates, Budget::Read, 0), Verdict::Allow, "pings do not spend reads");
    }

    #[test]
    fn the_sustained_rate_refills_and_the_burst_does_not_grow() {
        let mut l = crate::config::Config::default().limits;
        l.send_per_sec = NonZeroU32::new(10).unwrap(); // one per 100 ms
        l.send_burst = NonZeroU32::new(2).unwrap();
        let (rates, c) = (Rates::new(&l), ConnLimits::default());
        let ms = 1_000_000;
        let t0 = 5_000 * ms;
        assert_eq!(c.check(&rates, Budget::Send, t0), Verdict::Allow);
        assert_eq!(c.check(&rates, Budget::Send, t0), Verdict::Allow);
        assert_eq!(c.check(&rates, Budget::Send, t0), Verdict::Refuse, "burst of 2");
        assert_eq!(c.check(&rates, Budget::Send, t0 + 100 * ms), Verdict::Allow, "one back per interval");
        assert_eq!(c.check(&rates, Budget::Send, t0 + 100 * ms), Verdict::Refuse);
        // A long idle spell gives back the burst, no more.
        let later = t0 + 60_000 * ms;
        let allowed = (0..5).filter(|_| c.check(&rates, Budget::Send, later) == Verdict::Allow).count();
        assert_eq!(allowed, 2);
    }
}
