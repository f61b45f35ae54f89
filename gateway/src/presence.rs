//! Presence: who is online, and when the others were last seen.
//!
//! A user is online while any of their devices is connected to this node: the
//! [`Registry`] holds a mailbox for them on some shard. Shards tell the presence
//! thread when a user's first device arrives on a shard or the last one leaves
//! ([`Presence::changed`]); the thread reads the registry itself, so a notice is
//! only a hint to look and never carries state that could go stale.
//!
//! - Online: announced at once to every connected user who shares a
//!   conversation with the user (direct conversations and groups of at most
//!   `max_group_size` members).
//! - Offline: when the last device leaves, a grace period (`grace_ms`) starts; a
//!   device that comes back within it cancels it and nobody hears a thing (a phone
//!   switching networks does not flap). When it runs out, `last_seen` (the time
//!   the last device left) is stored and `offline` is announced, without
//!   `last_seen` if the user hides it.
//!
//! Overflow policy: the thread's queue holds `queue` notices and requests. A
//! notice that finds it full is dropped (`queue_rejections_total{queue="presence"}`,
//! one log line); a sweep every grace period compares the thread's view with the
//! registry, so a missed departure is still announced, one grace period late.
//! Requests (`get_presence`, `set_privacy`) that find it full get 1020 (overloaded).
//!
//! Presence is per node: a fleet needs the router to share it (not built yet).

use crate::auth::now_ms;
use crate::mailbox::{Event, EventKind, Registry};
use futures_channel::oneshot;
use protocol::{ErrorCode, PresenceInfo, UserId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Mutation, Store};

/// Most users one `get_presence` may ask about.
pub const MAX_QUERY: usize = 100;
/// Most conversations of a user whose members hear about its presence changes.
const MAX_CONVERSATIONS: usize = 1000;

#[derive(Debug)]
enum Cmd {
    Changed(UserId),
    /// Who asks, and about whom.
    Query(UserId, Vec<UserId>, oneshot::Sender<Result<Vec<PresenceInfo>, ErrorCode>>),
    SetHide(UserId, bool, oneshot::Sender<Result<(), ErrorCode>>),
}

/// The shards' handle on the presence thread.
pub struct Presence {
    tx: crossbeam_channel::Sender<Cmd>,
    rejected: prometheus::IntCounter,
}

pub struct PresenceConfig {
    pub grace: Duration,
    pub queue: usize,
    pub max_group_size: usize,
}

impl Presence {
    pub fn start(
        cfg: PresenceConfig,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        rejected: prometheus::IntCounter,
    ) -> Presence {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue);
        let mut worker = Worker { cfg, store, registry, online: HashMap::new(), leaving: VecDeque::new() };
        std::thread::Builder::new()
            .name("presence".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the presence thread");
        Presence { tx, rejected }
    }

    fn submit(&self, cmd: Cmd) -> Result<(), Cmd> {
        self.tx.try_send(cmd).map_err(|e| {
            if self.rejected.get() == 0 {
                tracing::warn!("presence queue full; dropping notices (logged once)");
            }
            self.rejected.inc();
            e.into_inner()
        })
    }

    /// `user`'s first device arrived on a shard, or its last one there left.
    ///
    /// Runs on: any shard. Never blocks.
    pub fn changed(&self, user: UserId) {
        let _ = self.submit(Cmd::Changed(user));
    }

    /// The presence of `users`, in order.
    /// `users`' presence as `asker` may see it: only their contacts (as for events).
    pub async fn query(&self, asker: UserId, users: Vec<UserId>) -> Result<Vec<PresenceInfo>, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.submit(Cmd::Query(asker, users, tx)).map_err(|_| ErrorCode::Overloaded)?;
        rx.await.unwrap_or(Err(ErrorCode::Internal))
    }

    /// Hides or shows `user`'s `last_seen` (stored before it answers).
    pub async fn set_hide(&self, user: UserId, hide: bool) -> Result<(), ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.submit(Cmd::SetHide(user, hide, tx)).map_err(|_| ErrorCode::Overloaded)?;
        rx.await.unwrap_or(Err(ErrorCode::Internal))
    }
}

/// A user announced online: connected now, or within the grace period.
struct Online {
    /// Set while no device is connected: when the last one left (ms) and when the grace ends.
    leaving: Option<(u64, Instant)>,
}

struct Worker {
    cfg: PresenceConfig,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    online: HashMap<UserId, Online>,
    /// Grace periods in the order they end (all are equally long); stale entries are skipped.
    leaving: VecDeque<(Instant, UserId)>,
}

fn internal(e: storage::StorageError) -> ErrorCode {
    tracing::error!(error = %e, "presence store access failed");
    ErrorCode::Internal
}

impl Worker {
    // Runs on: the presence thread.
    fn run(&mut self, rx: crossbeam_channel::Receiver<Cmd>) {
        let mut next_sweep = Instant::now() + self.cfg.grace;
        loop {
            let wake = self.leaving.front().map_or(next_sweep, |(t, _)| (*t).min(next_sweep));
            match rx.recv_deadline(wake) {
                Ok(Cmd::Changed(u)) => self.changed(u),
                Ok(Cmd::Query(asker, users, reply)) => {
                    let _ = reply.send(self.query(asker, &users));
                }
                Ok(Cmd::SetHide(u, hide, reply)) => {
                    let r =
                        self.store.commit(&[Mutation::SetHideLastSeen { user: u, hide }]).map_err(internal);
                    let _ = reply.send(r);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + self.cfg.grace;
            }
            self.expire(now);
        }
    }

    fn changed(&mut self, u: UserId) {
        let connected = self.registry.is_connected(u);
        match (self.online.get(&u).map(|o| o.leaving.is_some()), connected) {
            (None, true) => {
                self.online.insert(u, Online { leaving: None });
                self.announce(u, true, None);
            }
            // Back within the grace period: nobody was told it had gone.
            (Some(true), true) => {
                self.online.insert(u, Online { leaving: None });
            }
            (Some(false), false) => {
                let until = Instant::now() + self.cfg.grace;
                self.online.insert(u, Online { leaving: Some((now_ms(), until)) });
                self.leaving.push_back((until, u));
            }
            _ => {}
        }
    }

    /// Starts the grace period of announced users whose departure notice was lost.
    fn sweep(&mut self, now: Instant) {
        let gone: Vec<UserId> = self
            .online
            .iter()
            .filter(|(u, o)| o.leaving.is_none() && !self.registry.is_connected(**u))
            .map(|(u, _)| *u)
            .collect();
        for u in gone {
            let until = now + self.cfg.grace;
            self.online.insert(u, Online { leaving: Some((now_ms(), until)) });
            self.leaving.push_back((until, u));
        }
    }

    /// Announces the users whose grace period is over, after storing their `last_seen`.
    fn expire(&mut self, now: Instant) {
        let mut gone = Vec::new();
        while let Some(&(until, u)) = self.leaving.front() {
            if until > now {
                break;
            }
            self.leaving.pop_front();
            let Some(Online { leaving: Some((left_ms, t)) }) = self.online.get(&u) else { continue };
            if *t != until {
                continue; // an older grace period, since cancelled and restarted
            }
            let left_ms = *left_ms;
            if self.registry.is_connected(u) {
                // Its arrival notice is still queued: it never really left.
                self.online.get_mut(&u).expect("present").leaving = None;
                continue;
            }
            self.online.remove(&u);
            gone.push((u, left_ms));
        }
        if gone.is_empty() {
            return;
        }
        let writes: Vec<_> = gone.iter().map(|&(user, ms)| Mutation::PutLastSeen { user, ms }).collect();
        if let Err(e) = self.store.commit(&writes) {
            tracing::error!(error = %e, "storing last_seen failed");
        }
        for (u, ms) in gone {
            let hidden = self.store.presence(u).map(|p| p.hide_last_seen).unwrap_or(true);
            self.announce(u, false, (!hidden).then_some(ms));
        }
    }

    /// Tells every connected user who shares a small enough conversation with `u`.
    fn announce(&self, u: UserId, online: bool, last_seen_ms: Option<u64>) {
        let contacts = match self.contacts(u) {
            Ok(c) => c,
            Err(_) => return,
        };
        let ev = Event::new(EventKind::Presence(PresenceInfo { user_id: u, online, last_seen_ms }));
        let mut delivery = self.registry.delivery();
        for c in contacts {
            // Reaches only the mailboxes that exist: contacts who are connected.
            delivery.deliver(c, &ev);
        }
    }

    /// The users who share a conversation (direct, or a group of at most
    /// `max_group_size` members) with `u`. Cost: one index read plus one member
    /// scan per conversation, at most `MAX_CONVERSATIONS` of them.
    fn contacts(&self, u: UserId) -> Result<HashSet<UserId>, ErrorCode> {
        let mut out = HashSet::new();
        for c in self.store.user_conversations(u).map_err(internal)?.into_iter().take(MAX_CONVERSATIONS) {
            let members = self.store.members(c).map_err(internal)?;
            if members.len() <= self.cfg.max_group_size.max(2) {
                out.extend(members.into_iter().map(|(m, _)| m).filter(|m| *m != u));
            }
        }
        Ok(out)
    }

    /// Presence is shown only to contacts (who would get its events): to anyone else
    /// every user looks offline and never seen, so presence neither leaks to
    /// strangers nor tells them whether an account exists.
    fn query(&self, asker: UserId, users: &[UserId]) -> Result<Vec<PresenceInfo>, ErrorCode> {
        let contacts = self.contacts(asker)?;
        users
            .iter()
            .map(|&u| {
                if u != asker && !contacts.contains(&u) {
                    return Ok(PresenceInfo { user_id: u, online: false, last_seen_ms: None });
                }
                if self.online.contains_key(&u) || self.registry.is_connected(u) {
                    return Ok(PresenceInfo { user_id: u, online: true, last_seen_ms: None });
                }
                let rec = self.store.presence(u).map_err(internal)?;
                let last_seen_ms = if rec.hide_last_seen { None } else { rec.last_seen_ms };
                Ok(PresenceInfo { user_id: u, online: false, last_seen_ms })
            })
            .collect()
    }
}
