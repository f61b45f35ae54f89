//! What `/healthz` (liveness) and `/readyz` (readiness) report.
//!
//! - Live: the process can do its job. Fails, saying why, once the store refuses
//!   every write until a restart (a poisoned embedded store): restarting is the fix.
//! - Ready: it should get new clients. Also fails once a store call has failed
//!   (even a retryable one, until a write succeeds), while the socket cap is
//!   reached, while the process is draining for shutdown, and in a fleet until
//!   the node is in the ring (or once its heartbeats have failed for a TTL).

use crate::capacity::Capacity;
use protocol::{ConversationId, Seq, UserId};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use storage::{
    BucketRef, ConversationRecord, Message, Mutation, Order, Positions, PresenceRecord, Store, UserRecord,
};

#[derive(Default)]
pub struct Health {
    /// Fast check for the write path: is there a failure to clear?
    failing: AtomicBool,
    /// The last store failure since the last write that landed, and whether it is permanent.
    store: Mutex<Option<(String, bool)>>,
    draining: AtomicBool,
    /// Draining, past the notice: connections are being closed, new sockets refused.
    closing: AtomicBool,
    /// Shards waiting for `closing` (woken once, by `start_closing`).
    closing_waiters: Mutex<Vec<Waker>>,
}

impl Health {
    /// Runs on: a thread that wrote to the store (sequencer, presence, hashers).
    pub fn write_ok(&self) {
        if self.failing.load(Ordering::Relaxed) {
            let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
            // A permanent failure is not undone by a write that happened to pass.
            if s.as_ref().is_some_and(|(_, permanent)| !permanent) {
                *s = None;
                self.failing.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Runs on: a thread whose store call failed.
    pub fn store_failed(&self, e: &storage::StorageError) {
        let permanent = e.kind == storage::ErrorKind::Poisoned;
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if !s.as_ref().is_some_and(|(_, p)| *p) {
            *s = Some((e.to_string(), permanent));
        }
        self.failing.store(true, Ordering::Relaxed);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Runs on: main, at shutdown, once the readiness notice has run out.
    pub fn start_closing(&self) {
        self.closing.store(true, Ordering::Release);
        for w in self.closing_waiters.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            w.wake();
        }
    }

    /// Connections are to close with 1001 and new sockets to get 503.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves once `start_closing` has run: woken by it, never polled on a timer
    /// (an idle node must not wake for a shutdown that has not come).
    ///
    /// Runs on: a shard. # Cancel safety: safe.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| {
            if self.closing() {
                return Poll::Ready(());
            }
            let mut waiters = self.closing_waiters.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock `start_closing` takes after setting the flag.
            if self.closing() {
                return Poll::Ready(());
            }
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// `Err(why)`: the process should be restarted.
    pub fn live(&self) -> Result<(), String> {
        match &*self.store.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((why, true)) => Err(format!("the store refuses writes until a restart: {why}")),
            _ => Ok(()),
        }
    }

    /// `Err(why)`: send new clients elsewhere for now.
    pub fn ready(&self, capacity: &Capacity) -> Result<(), String> {
        self.live()?;
        if let Some((why, _)) = &*self.store.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(format!("the store failed and no write has succeeded since: {why}"));
        }
        if self.draining() {
            return Err("draining for shutdown".into());
        }
        if capacity.full() {
            return Err(format!("at the socket cap ({})", capacity.max_sockets()));
        }
        Ok(())
    }
}

/// The store as the gateway uses it: every call passes through to the backend,
/// and its outcome reaches [`Health`]. Any failure (a read on a dead cluster
/// fails before any write is tried) costs readiness; only a write that lands
/// restores it, since reads can pass while writes cannot (a full disk).
pub struct Observed {
    inner: Arc<dyn Store>,
    health: Arc<Health>,
}

impl Observed {
    pub fn new(inner: Arc<dyn Store>, health: Arc<Health>) -> Observed {
        Observed { inner, health }
    }

    fn seen<T>(&self, r: storage::Result<T>) -> storage::Result<T> {
        if let Err(e) = &r {
            self.health.store_failed(e);
        }
        r
    }

    fn written<T>(&self, r: storage::Result<T>, wrote: bool) -> storage::Result<T> {
        if r.is_ok() && wrote {
            self.health.write_ok();
        }
        self.seen(r)
    }
}

impl Observed {
    fn committed(&self, r: storage::Result<()>, batch: &[Mutation]) -> storage::Result<()> {
        match r {
            // Fenced: the store answered (another node owns the conversation now).
            Err(e) if e.kind == storage::ErrorKind::Fenced => Err(e),
            r => self.written(r, !batch.is_empty()),
        }
    }
}

impl Store for Observed {
    fn commit(&self, batch: &[Mutation]) -> storage::Result<()> {
        self.committed(self.inner.commit(batch), batch)
    }
    fn commit_lane(&self, lane: usize, batch: &[Mutation]) -> storage::Result<()> {
        self.committed(self.inner.commit_lane(lane, batch), batch)
    }
    fn claim(&self, conv: ConversationId, node: u16) -> storage::Result<u64> {
        self.written(self.inner.claim(conv, node), true)
    }
    fn claimed_by(&self, node: u16, since_ms: u64) -> storage::Result<Vec<ConversationId>> {
        self.seen(self.inner.claimed_by(node, since_ms))
    }
    fn create_user(&self, user: &UserRecord) -> storage::Result<()> {
        match self.inner.create_user(user) {
            // A taken name is an answer, not a failure.
            Err(e) if e.kind == storage::ErrorKind::UsernameTaken => Err(e),
            r => self.written(r, true),
        }
    }
    fn user(&self, id: UserId) -> storage::Result<Option<UserRecord>> {
        self.seen(self.inner.user(id))
    }
    fn user_by_name(&self, username: &str) -> storage::Result<Option<UserRecord>> {
        self.seen(self.inner.user_by_name(username))
    }
    fn conversation(&self, id: ConversationId) -> storage::Result<Option<ConversationRecord>> {
        self.seen(self.inner.conversation(id))
    }
    fn members(&self, id: ConversationId) -> storage::Result<Vec<(UserId, protocol::Role)>> {
        self.seen(self.inner.members(id))
    }
    fn member_role(&self, id: ConversationId, user: UserId) -> storage::Result<Option<protocol::Role>> {
        self.seen(self.inner.member_role(id, user))
    }
    fn user_conversations(&self, user: UserId) -> storage::Result<Vec<ConversationId>> {
        self.seen(self.inner.user_conversations(user))
    }
    fn direct(&self, a: UserId, b: UserId) -> storage::Result<Option<ConversationId>> {
        self.seen(self.inner.direct(a, b))
    }
    fn idempotent_seq(&self, conv: ConversationId, sender: UserId, id: &str) -> storage::Result<Option<Seq>> {
        self.seen(self.inner.idempotent_seq(conv, sender, id))
    }
    fn muted(&self, conv: ConversationId, user: UserId) -> storage::Result<bool> {
        self.seen(self.inner.muted(conv, user))
    }
    fn positions(&self, conv: ConversationId, user: UserId) -> storage::Result<Positions> {
        self.seen(self.inner.positions(conv, user))
    }
    fn all_positions(&self, conv: ConversationId) -> storage::Result<Vec<(UserId, Positions)>> {
        self.seen(self.inner.all_positions(conv))
    }
    fn reactions(
        &self,
        conv: ConversationId,
        lo: Seq,
        hi: Seq,
    ) -> storage::Result<Vec<(Seq, UserId, String)>> {
        self.seen(self.inner.reactions(conv, lo, hi))
    }
    fn presence(&self, user: UserId) -> storage::Result<PresenceRecord> {
        self.seen(self.inner.presence(user))
    }
    fn buckets(&self, conv: ConversationId) -> storage::Result<Vec<BucketRef>> {
        self.seen(self.inner.buckets(conv))
    }
    fn read_bucket(
        &self,
        conv: ConversationId,
        bucket: u32,
        lo: Seq,
        hi: Seq,
        order: Order,
        limit: usize,
    ) -> storage::Result<Vec<Message>> {
        self.seen(self.inner.read_bucket(conv, bucket, lo, hi, order, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: storage::ErrorKind) -> storage::StorageError {
        storage::StorageError::new(kind, "committing a batch", "boom")
    }

    #[test]
    fn transient_failures_cost_readiness_until_a_write_passes() {
        let h = Health::default();
        let c = Capacity::new(10, 1);
        assert!(h.ready(&c).is_ok());
        h.store_failed(&err(storage::ErrorKind::Timeout));
        assert!(h.live().is_ok());
        assert!(h.ready(&c).unwrap_err().contains("boom"));
        h.write_ok();
        assert!(h.ready(&c).is_ok());
    }

    #[test]
    fn a_poisoned_store_fails_liveness_for_good() {
        let h = Health::default();
        h.store_failed(&err(storage::ErrorKind::Poisoned));
        h.store_failed(&err(storage::ErrorKind::Io));
        h.write_ok();
        let why = h.live().unwrap_err();
        assert!(why.contains("until a restart") && why.contains("boom"), "{why}");
    }
}
