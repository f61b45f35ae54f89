//! Cross-shard delivery: events, per-user mailboxes, per-shard inboxes and the
//! registry that finds them.
//!
//! Each user connected to a shard has one [`Mailbox`] there: a lock-free MPSC
//! queue any thread may push into, drained by that shard to the user's
//! socket(s) on it. The [`Registry`] maps `(user, shard)` to mailboxes; a user
//! with devices on two shards has two mailboxes and gets every event on both.
//!
//! A push does not wake anyone. The first push into an idle mailbox puts the
//! mailbox on its shard's [`Inbox`] (a run queue of mailboxes with something to
//! drain), and the pusher's [`Delivery`] wakes each shard it touched once, when
//! it is dropped. A commit batch of hundreds of events therefore costs each
//! shard one cross-thread wake-up, not one per event.
//!
//! Bounds and overflow: a mailbox holds at most `capacity` events. A push beyond
//! it is dropped, the mailbox is marked overflowed, the `mailbox_overflows`
//! counter goes up, and the owning shard closes that user's connections on the
//! shard with 4008 (slow consumer) so they reconnect and `sync`: nothing
//! acknowledged is lost because history has it. An inbox holds each mailbox at
//! most once (the mailbox's `scheduled` flag), so it is bounded by the number of
//! mailboxes on its shard and never overflows.

use crate::vocab::event::Event;
use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;
use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender};
use protocol::UserId;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;

/// The pushing side of a user's mailbox on one shard (shared; found through the
/// [`Registry`]). The draining side is the shard's [`Drain`].
///
/// The queue is futures' unbounded MPSC (an intrusive lock-free list) rather than
/// a segmented array queue: it is about 100 bytes per idle user instead of 500
/// (no cache-line padding, no preallocated block), and idle users are most users.
pub struct Mailbox {
    tx: UnboundedSender<Arc<Event>>,
    len: AtomicUsize,
    capacity: usize,
    /// On its shard's inbox (or being drained); cleared by the shard before it drains.
    scheduled: AtomicBool,
    overflowed: AtomicBool,
}

/// The draining side of a mailbox. Owned by the shard.
pub struct Drain {
    mailbox: Arc<Mailbox>,
    rx: UnboundedReceiver<Arc<Event>>,
}

impl Drain {
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Runs on: the owning shard.
    pub fn pop(&mut self) -> Option<Arc<Event>> {
        let ev = self.rx.try_recv().ok()?;
        self.mailbox.len.fetch_sub(1, Ordering::AcqRel);
        Some(ev)
    }
}

/// The mailbox was full; the event is handed back.
#[derive(Debug)]
pub struct Full(pub Arc<Event>);

impl Mailbox {
    /// A mailbox holding at most `capacity` events, and its draining side.
    pub fn new(capacity: usize) -> (Arc<Mailbox>, Drain) {
        let (tx, rx) = futures_channel::mpsc::unbounded();
        let mailbox = Arc::new(Mailbox {
            tx,
            len: AtomicUsize::new(0),
            capacity,
            scheduled: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
        });
        (mailbox.clone(), Drain { mailbox, rx })
    }

    /// Queues `ev` without waking anyone; see [`Registry::delivery`] for that.
    ///
    /// Runs on: any thread.
    pub fn push(&self, ev: Arc<Event>) -> Result<(), Full> {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Release);
            return Err(Full(ev));
        }
        // Fails only once the drain is gone (the user left the shard): nobody to show it to.
        if let Err(e) = self.tx.unbounded_send(ev) {
            self.len.fetch_sub(1, Ordering::AcqRel);
            drop(e.into_inner());
        }
        Ok(())
    }

    /// Marks the mailbox as needing a drain. True when the caller must put it on
    /// its shard's inbox (it was not already there).
    ///
    /// Runs on: any thread, after `push`.
    fn schedule(&self) -> bool {
        // Release: whoever takes the mark off (with Acquire) sees the pushed event.
        !self.scheduled.swap(true, Ordering::AcqRel)
    }

    /// Takes the mailbox off the run queue's books before draining it: a push after
    /// this schedules it again, a push before it is visible to the drain that follows.
    ///
    /// Runs on: the owning shard.
    pub fn unschedule(&self) {
        self.scheduled.swap(false, Ordering::AcqRel);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a push was dropped since the last call (and clears the mark).
    pub fn take_overflowed(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }
}

/// A shard's run queue: the mailboxes on it with something to drain.
pub struct Inbox {
    ready: SegQueue<(UserId, Arc<Mailbox>)>,
    waker: AtomicWaker,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox { ready: SegQueue::new(), waker: AtomicWaker::new() }
    }

    /// The next mailbox to drain, with its user.
    ///
    /// Runs on: the owning shard.
    pub fn pop(&self) -> Option<(UserId, Arc<Mailbox>)> {
        self.ready.pop()
    }

    /// Resolves when a mailbox is waiting.
    ///
    /// Runs on: the owning shard. # Cancel safety: safe; nothing is consumed.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.ready.is_empty() { Poll::Pending } else { Poll::Ready(()) }
        })
        .await
    }
}

/// Finds a user's mailboxes on every shard.
pub struct Registry {
    map: papaya::HashMap<(UserId, u16), Arc<Mailbox>>,
    inboxes: Box<[Inbox]>,
    overflows: prometheus::IntCounter,
}

impl Registry {
    pub fn new(shards: usize, overflows: prometheus::IntCounter) -> Registry {
        Registry {
            map: papaya::HashMap::new(),
            inboxes: (0..shards).map(|_| Inbox::new()).collect(),
            overflows,
        }
    }

    /// Shard `shard`'s run queue.
    pub fn inbox(&self, shard: u16) -> &Inbox {
        &self.inboxes[shard as usize]
    }

    /// Runs on: the shard that owns the mailbox.
    pub fn insert(&self, user: UserId, shard: u16, mb: Arc<Mailbox>) {
        self.map.pin().insert((user, shard), mb);
    }

    /// Runs on: the shard that owns the mailbox.
    pub fn remove(&self, user: UserId, shard: u16) {
        self.map.pin().remove(&(user, shard));
    }

    /// Whether `user` has a mailbox (so a connected device) on any shard.
    ///
    /// Runs on: any thread.
    pub fn is_connected(&self, user: UserId) -> bool {
        let map = self.map.pin();
        (0..self.inboxes.len() as u16).any(|s| map.contains_key(&(user, s)))
    }

    /// Every user with a mailbox here.
    ///
    /// Runs on: any thread.
    pub fn users(&self) -> Vec<UserId> {
        let mut v: Vec<UserId> = self.map.pin().keys().map(|(u, _)| *u).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Starts a round of pushes; the shards it reached are woken when it is dropped.
    pub fn delivery(&self) -> Delivery<'_> {
        Delivery { registry: self, touched: vec![false; self.inboxes.len()] }
    }
}

/// A round of pushes (one commit batch, in practice). Each shard that got an
/// event is woken once, when the round is dropped.
pub struct Delivery<'a> {
    registry: &'a Registry,
    touched: Vec<bool>,
}

impl Delivery<'_> {
    /// Pushes `ev` into every mailbox `user` has. Returns how many took it.
    ///
    /// Runs on: any thread (the sequencer, in practice).
    pub fn deliver(&mut self, user: UserId, ev: &Arc<Event>) -> usize {
        let r = self.registry;
        let map = r.map.pin();
        let mut n = 0;
        for shard in 0..r.inboxes.len() as u16 {
            let Some(mb) = map.get(&(user, shard)) else { continue };
            match mb.push(ev.clone()) {
                Ok(()) => n += 1,
                Err(Full(_)) => {
                    if r.overflows.get() == 0 {
                        tracing::warn!(
                            user,
                            shard,
                            "mailbox full; closing the user's connections there (logged once)"
                        );
                    }
                    r.overflows.inc();
                }
            }
            // Overflowed mailboxes are scheduled too: the shard acts on the mark.
            if mb.schedule() {
                r.inboxes[shard as usize].ready.push((user, mb.clone()));
                self.touched[shard as usize] = true;
            }
        }
        n
    }
}

impl Drop for Delivery<'_> {
    fn drop(&mut self) {
        for (i, t) in self.touched.iter().enumerate() {
            if *t {
                self.registry.inboxes[i].waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::event::EventKind;

    use crate::vocab::event::test_event as ev;

    #[test]
    fn mailbox_is_bounded_fifo_and_hands_back_overflow() {
        let (mb, mut drain) = Mailbox::new(2);
        mb.push(ev(1)).unwrap();
        mb.push(ev(2)).unwrap();
        let Full(back) = mb.push(ev(3)).unwrap_err();
        assert!(matches!(back.kind, EventKind::Message { ref message, .. } if message.seq == 3));
        assert!(mb.take_overflowed());
        assert!(!mb.take_overflowed());
        let seqs: Vec<_> = std::iter::from_fn(|| drain.pop())
            .map(|e| match &e.kind {
                EventKind::Message { message, .. } => message.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert!(mb.is_empty());
    }

    #[test]
    fn registry_reaches_every_shard_of_a_user() {
        let r = Registry::new(3, prometheus::IntCounter::new("x", "x").unwrap());
        let (a, _da) = Mailbox::new(8);
        let (b, _db) = Mailbox::new(8);
        r.insert(7, 0, a.clone());
        r.insert(7, 2, b.clone());
        let mut d = r.delivery();
        assert_eq!(d.deliver(7, &ev(1)), 2);
        assert_eq!(d.deliver(8, &ev(1)), 0);
        r.remove(7, 0);
        assert_eq!(d.deliver(7, &ev(2)), 1);
        drop(d);
        assert_eq!((a.len(), b.len()), (1, 2));
        // Each mailbox is on its shard's run queue once, however many pushes it took.
        let queued = |s| std::iter::from_fn(|| r.inbox(s).pop()).map(|(u, _)| u).collect::<Vec<_>>();
        assert_eq!((queued(0), queued(1), queued(2)), (vec![7], vec![], vec![7]));
        // Taken off the books, the next push queues it again.
        b.unschedule();
        r.delivery().deliver(7, &ev(3));
        assert_eq!(queued(2), vec![7]);
    }
}
