//! Cross-shard delivery: events, per-user mailboxes and the registry that finds them.
//!
//! Each user connected to a shard has one [`Mailbox`] there: a lock-free MPSC
//! queue any thread may push into, drained by that shard to the user's
//! socket(s) on it. The [`Registry`] maps `(user, shard)` to mailboxes; a user
//! with devices on two shards has two mailboxes and gets every event on both.
//!
//! Overflow policy: a mailbox holds at most `capacity` events. A push beyond it
//! is dropped, the mailbox is marked overflowed, the `mailbox_overflows` counter
//! goes up, and the owning shard closes that user's connections on the shard with
//! 4008 (slow consumer) so they reconnect and `sync`: nothing acknowledged is
//! lost because history has it.

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use protocol::{ConversationId, ErrorCode, Message, ServerFrame, ServerMsg, Subprotocol, UserId};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Instant;

/// A connection's id, unique in this process.
pub type ConnId = u64;

/// Something that happened in a conversation, to be shown to some connections.
#[derive(Debug)]
pub enum EventKind {
    /// A stored message. The connection that sent it (`origin`) gets an `ack`
    /// instead; when `to_others` is false (an idempotent resend) nobody else gets it.
    Message { message: Message, origin: Option<ConnId>, to_others: bool },
    /// A `send` that was refused; goes to the sending connection only.
    SendFailed { origin: ConnId, conversation_id: ConversationId, client_msg_id: String, code: ErrorCode },
}

/// An event plus its encodings, made at most once per subprotocol however many
/// connections it reaches (server frames are unmasked, so the bytes are shareable).
#[derive(Debug)]
pub struct Event {
    pub kind: EventKind,
    /// When the command behind it entered the sequencer's queue (for the delivery-latency metric).
    pub submitted: Instant,
    encoded: [OnceLock<Bytes>; 2],
}

impl Event {
    pub fn new(kind: EventKind) -> Arc<Event> {
        Self::submitted_at(kind, Instant::now())
    }

    pub fn submitted_at(kind: EventKind, submitted: Instant) -> Arc<Event> {
        Arc::new(Event { kind, submitted, encoded: [OnceLock::new(), OnceLock::new()] })
    }

    /// The broadcast form (`message` frame), as a complete WebSocket frame.
    pub fn broadcast_frame(&self, proto: Subprotocol) -> Option<Bytes> {
        let EventKind::Message { message, .. } = &self.kind else { return None };
        let slot = &self.encoded[proto as usize];
        Some(
            slot.get_or_init(|| {
                crate::frame::ws_frame(
                    proto,
                    &proto.encode_server(&ServerFrame {
                        id: 0,
                        body: ServerMsg::Message { message: message.clone() },
                    }),
                )
            })
            .clone(),
        )
    }
}

pub struct Mailbox {
    queue: SegQueue<Arc<Event>>,
    len: AtomicUsize,
    capacity: usize,
    waker: AtomicWaker,
    overflowed: AtomicBool,
    closed: AtomicBool,
}

/// The mailbox was full; the event is handed back.
#[derive(Debug)]
pub struct Full(pub Arc<Event>);

impl Mailbox {
    pub fn new(capacity: usize) -> Mailbox {
        Mailbox {
            queue: SegQueue::new(),
            len: AtomicUsize::new(0),
            capacity,
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Runs on: any thread.
    pub fn push(&self, ev: Arc<Event>) -> Result<(), Full> {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Release);
            self.waker.wake();
            return Err(Full(ev));
        }
        self.queue.push(ev);
        self.waker.wake();
        Ok(())
    }

    /// Runs on: the owning shard.
    pub fn pop(&self) -> Option<Arc<Event>> {
        let ev = self.queue.pop()?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Some(ev)
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

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves when there is something to drain, an overflow to act on, or the mailbox closed.
    ///
    /// Runs on: the owning shard. # Cancel safety: safe; nothing is consumed.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if !self.queue.is_empty()
                || self.overflowed.load(Ordering::Acquire)
                || self.closed.load(Ordering::Acquire)
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Finds a user's mailboxes on every shard.
pub struct Registry {
    shards: usize,
    map: papaya::HashMap<(UserId, u16), Arc<Mailbox>>,
    overflows: prometheus::IntCounter,
}

impl Registry {
    pub fn new(shards: usize, overflows: prometheus::IntCounter) -> Registry {
        Registry { shards, map: papaya::HashMap::new(), overflows }
    }

    /// Runs on: the shard that owns the mailbox.
    pub fn insert(&self, user: UserId, shard: u16, mb: Arc<Mailbox>) {
        self.map.pin().insert((user, shard), mb);
    }

    /// Runs on: the shard that owns the mailbox.
    pub fn remove(&self, user: UserId, shard: u16) {
        self.map.pin().remove(&(user, shard));
    }

    /// Pushes `ev` into every mailbox `user` has. Returns how many took it.
    ///
    /// Runs on: any thread (the sequencer, in practice).
    pub fn deliver(&self, user: UserId, ev: &Arc<Event>) -> usize {
        let map = self.map.pin();
        let mut n = 0;
        for shard in 0..self.shards as u16 {
            if let Some(mb) = map.get(&(user, shard)) {
                match mb.push(ev.clone()) {
                    Ok(()) => n += 1,
                    Err(Full(_)) => {
                        if self.overflows.get() == 0 {
                            tracing::warn!(
                                user,
                                shard,
                                "mailbox full; closing the user's connections there (logged once)"
                            );
                        }
                        self.overflows.inc();
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Arc<Event> {
        Event::new(EventKind::Message {
            message: Message {
                conversation_id: 1,
                seq,
                ts_ms: 0,
                sender_id: 1,
                client_msg_id: String::new(),
                kind: Default::default(),
                body: String::new(),
                target_user_id: None,
                role: None,
            },
            origin: None,
            to_others: true,
        })
    }

    #[test]
    fn mailbox_is_bounded_fifo_and_hands_back_overflow() {
        let mb = Mailbox::new(2);
        mb.push(ev(1)).unwrap();
        mb.push(ev(2)).unwrap();
        let Full(back) = mb.push(ev(3)).unwrap_err();
        assert!(matches!(back.kind, EventKind::Message { ref message, .. } if message.seq == 3));
        assert!(mb.take_overflowed());
        assert!(!mb.take_overflowed());
        let seqs: Vec<_> = std::iter::from_fn(|| mb.pop())
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
        let a = Arc::new(Mailbox::new(8));
        let b = Arc::new(Mailbox::new(8));
        r.insert(7, 0, a.clone());
        r.insert(7, 2, b.clone());
        assert_eq!(r.deliver(7, &ev(1)), 2);
        assert_eq!(r.deliver(8, &ev(1)), 0);
        r.remove(7, 0);
        assert_eq!(r.deliver(7, &ev(2)), 1);
        assert_eq!((a.len(), b.len()), (1, 2));
    }

    #[test]
    fn encodings_are_made_once_per_subprotocol() {
        let e = ev(5);
        let f1 = e.broadcast_frame(Subprotocol::Json).unwrap();
        let f2 = e.broadcast_frame(Subprotocol::Json).unwrap();
        assert_eq!(f1.as_ptr(), f2.as_ptr(), "second call shares the first encoding");
        assert_ne!(e.broadcast_frame(Subprotocol::FlatBuffers).unwrap(), f1);
    }
}
