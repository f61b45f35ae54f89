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
//! In a fleet, online means a device on any node, and the grace period is
//! fleet-wide (`router::location`, "grace marks"):
//! - A first device here announces `online` only if no other node holds a device
//!   of the user and no grace period begun on another node is running.
//! - The last device here leaving starts the grace period only if no other node
//!   holds a device; the node marks the user in Redis for it.
//! - When the grace ends, `offline` is announced only if still no node holds a
//!   device and the mark is this node's (a later departure on another node
//!   leaves its own mark, and that node announces).
//! - Announcements reach contacts on other nodes through the fleet's fan-out;
//!   `get_presence` counts devices and grace periods on every node.
//!
//! If Redis cannot be reached, each node decides from what it holds itself (and
//! asks nothing of Redis for 2 s after a failed call, so a stuck Redis does not
//! stall `get_presence` behind one timeout after another).
//!
//! A node that dies or leaves cannot announce its users' departures. The node
//! that takes its work over ([`Presence::node_gone`], from `fleet-ring`) reads
//! the users it recorded, and starts the grace period for each one that no
//! other node holds a device of and whose grace is not already running
//! elsewhere; when it ends, the user is announced offline unless a device came
//! back meanwhile (the dead node's own location entries are not counted).

use crate::fleet::{Fanned, Locate, Router};
use crate::mailbox::Registry;
use crate::vocab::clock::now_ms;
use crate::vocab::event::{Event, EventKind};
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
/// Most arrival and departure notices handled together (one fleet lookup for all).
const BATCH: usize = 256;
/// After a fleet call fails, presence decides locally for this long without
/// calling again: with Redis down or stuck, every call would wait out its
/// timeout, and the thread must keep answering `get_presence`.
const FLEET_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Cmd {
    Changed(UserId),
    /// Who asks, and about whom.
    Query(UserId, Vec<UserId>, oneshot::Sender<Result<Vec<PresenceInfo>, ErrorCode>>),
    SetHide(UserId, bool, oneshot::Sender<Result<(), ErrorCode>>),
    /// A node left the fleet (died, or left): its users left it.
    NodeGone(router::NodeId),
}

/// The shards' handle on the presence thread.
pub struct Presence {
    tx: crate::queue::Sender<Cmd>,
    rejected: prometheus::IntCounter,
}

pub struct PresenceConfig {
    pub grace: Duration,
    pub queue: usize,
    pub max_group_size: usize,
}

/// The fleet's side of presence: where users' other devices are, grace marks,
/// and the fan-out to other nodes. Absent when the node runs alone.
pub struct FleetPresence {
    pub locate: Box<dyn Locate>,
    pub router: Arc<Router>,
}

impl Presence {
    pub fn start(
        cfg: PresenceConfig,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        fleet: Option<FleetPresence>,
        rejected: prometheus::IntCounter,
    ) -> Presence {
        let (tx, rx) = crate::queue::bounded(cfg.queue);
        let mut worker = Worker {
            cfg,
            store,
            registry,
            fleet,
            fleet_down_until: None,
            online: HashMap::new(),
            leaving: VecDeque::new(),
        };
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

    /// Node `node` left the fleet: start its users' grace periods here (see
    /// the module docs). A callback for `fleet::start`.
    ///
    /// Runs on: fleet-ring. Never blocks (a full queue drops it; logged).
    pub fn on_node_gone(&self) -> Box<dyn Fn(router::NodeId) + Send> {
        let tx = self.tx.clone();
        Box::new(move |node| {
            if tx.try_send(Cmd::NodeGone(node)).is_err() {
                tracing::warn!(node, "presence queue full: a gone node's users are not announced offline");
            }
        })
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
    /// Set while no device is connected.
    leaving: Option<Leaving>,
}

struct Leaving {
    /// When the last device left (ms).
    left_ms: u64,
    /// A node that is gone: its location entries (kept for a while) do not count.
    gone: Option<router::NodeId>,
    /// When the grace period ends.
    until: Instant,
    /// This departure's grace mark (in a fleet).
    token: String,
}

struct Worker {
    cfg: PresenceConfig,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    fleet: Option<FleetPresence>,
    /// Set when a fleet call failed: until then, nothing is asked of the fleet.
    fleet_down_until: Option<Instant>,
    online: HashMap<UserId, Online>,
    /// Grace periods in the order they end (all are equally long); stale entries are skipped.
    leaving: VecDeque<(Instant, UserId)>,
}

fn internal(e: storage::StorageError) -> ErrorCode {
    tracing::error!(error = %e, "presence store access failed");
    ErrorCode::Internal
}

/// What the fleet knows of a user beyond this node.
#[derive(Default)]
struct Elsewhere {
    /// The other live nodes holding one of its devices.
    nodes: Vec<router::NodeId>,
    /// The grace mark of its last departure, if its grace period runs.
    mark: Option<String>,
}

impl Elsewhere {
    /// Whether another node holds a device, not counting node `gone`.
    fn device(&self, gone: Option<router::NodeId>) -> bool {
        self.nodes.iter().any(|&n| Some(n) != gone)
    }
}

impl Worker {
    // Runs on: the presence thread.
    fn run(&mut self, rx: crossbeam_channel::Receiver<Cmd>) {
        let mut next_sweep = Instant::now() + self.cfg.grace;
        let mut changed = Vec::new();
        loop {
            let wake = self.leaving.front().map_or(next_sweep, |(t, _)| (*t).min(next_sweep));
            let mut next = match rx.recv_deadline(wake) {
                Ok(cmd) => Some(cmd),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            while let Some(cmd) = next.take() {
                match cmd {
                    Cmd::Changed(u) => changed.push(u),
                    Cmd::Query(asker, users, reply) => {
                        let _ = reply.send(self.query(asker, &users));
                    }
                    Cmd::SetHide(u, hide, reply) => {
                        let r = self
                            .store
                            .commit(&[Mutation::SetHideLastSeen { user: u, hide }])
                            .map_err(internal);
                        let _ = reply.send(r);
                    }
                    Cmd::NodeGone(node) => self.node_gone(node),
                }
                if changed.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !changed.is_empty() {
                self.changed(std::mem::take(&mut changed));
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + self.cfg.grace;
            }
            self.expire(now);
        }
    }

    /// The fleet's side, unless a call failed within [`FLEET_BACKOFF`].
    fn fleet(&mut self) -> Option<&mut FleetPresence> {
        if self.fleet_down_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        self.fleet.as_mut()
    }

    /// Notes a failed fleet call: nothing more is asked for [`FLEET_BACKOFF`].
    fn fleet_failed(&mut self, what: &str, e: &anyhow::Error) {
        if self.fleet_down_until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, "presence: {what} failed; deciding locally for {FLEET_BACKOFF:?}");
        }
        self.fleet_down_until = Some(Instant::now() + FLEET_BACKOFF);
    }

    /// Other nodes' devices and grace marks of `users` (one round trip each).
    /// Alone, or when the fleet cannot be asked, nothing is known: this node
    /// decides from what it holds.
    fn elsewhere(&mut self, users: &[UserId]) -> HashMap<UserId, Elsewhere> {
        let Some(f) = self.fleet() else { return HashMap::new() };
        if users.is_empty() {
            return HashMap::new();
        }
        let me = f.router.me();
        let looked = f.locate.nodes_of(users).and_then(|n| Ok((n, f.locate.marks(users)?)));
        match looked {
            Ok((nodes, mut marks)) => users
                .iter()
                .map(|u| {
                    let nodes = nodes.get(u).map(|ns| ns.iter().copied().filter(|&n| n != me).collect());
                    (*u, Elsewhere { nodes: nodes.unwrap_or_default(), mark: marks.remove(u) })
                })
                .collect(),
            Err(e) => {
                self.fleet_failed("reading the fleet's locations", &e);
                HashMap::new()
            }
        }
    }

    /// Clears a grace mark of this node's (if it cannot, the mark expires).
    fn clear_mark(&mut self, u: UserId, token: &str) {
        if let Some(f) = self.fleet()
            && let Err(e) = f.locate.clear_mark(u, token)
        {
            self.fleet_failed("clearing a grace mark", &e);
        }
    }

    fn changed(&mut self, mut users: Vec<UserId>) {
        users.sort_unstable();
        users.dedup();
        let (mut arrived, mut departed) = (Vec::new(), Vec::new());
        for u in users {
            let connected = self.registry.is_connected(u);
            match (self.online.get(&u).map(|o| o.leaving.is_some()), connected) {
                (None, true) => arrived.push(u),
                // Back within the grace period: nobody was told it had gone.
                (Some(true), true) => {
                    let left = self.online.insert(u, Online { leaving: None }).and_then(|o| o.leaving);
                    if let Some(l) = left {
                        self.clear_mark(u, &l.token);
                    }
                }
                (Some(false), false) => departed.push(u),
                _ => {}
            }
        }
        let all: Vec<UserId> = arrived.iter().chain(&departed).copied().collect();
        let known = self.elsewhere(&all);
        for u in arrived {
            self.online.insert(u, Online { leaving: None });
            // Online through another node already, or in a grace period begun there:
            // its contacts never saw it go.
            if known.get(&u).is_some_and(|e| e.device(None) || e.mark.is_some()) {
                continue;
            }
            self.announce(u, true, None);
        }
        self.depart(departed, &known, Instant::now(), None);
    }

    /// Node `gone` left the fleet: the grace period of each of its users that no
    /// other node holds a device of and whose grace is not running elsewhere (a
    /// mark of `gone`'s own is taken over).
    fn node_gone(&mut self, gone: router::NodeId) {
        let Some(f) = self.fleet() else {
            tracing::warn!(gone, "presence: the fleet is unreachable; a gone node's users are not announced");
            return;
        };
        let users = match f.locate.users_of(gone) {
            Ok(u) => u,
            Err(e) => {
                self.fleet_failed("reading a gone node's users", &e);
                return;
            }
        };
        let users: Vec<UserId> = users
            .into_iter()
            .filter(|u| !self.online.contains_key(u) && !self.registry.is_connected(*u))
            .collect();
        let known = self.elsewhere(&users);
        let theirs = format!("{gone}:");
        let left: Vec<UserId> = users
            .into_iter()
            .filter(|u| {
                known.get(u).is_none_or(|e| {
                    !e.device(Some(gone)) && e.mark.as_ref().is_none_or(|m| m.starts_with(&theirs))
                })
            })
            .collect();
        tracing::info!(
            gone,
            users = left.len(),
            "presence: a gone node's users start their grace period here"
        );
        self.depart(left, &known, Instant::now(), Some(gone));
        if let Some(f) = self.fleet()
            && let Err(e) = f.locate.forget(gone)
        {
            self.fleet_failed("forgetting a gone node's users", &e);
        }
    }

    /// The last devices here (or on node `gone`) of `users` left: a grace period
    /// each, unless another node holds a device (that node tells when its own last
    /// one leaves).
    fn depart(
        &mut self,
        users: Vec<UserId>,
        known: &HashMap<UserId, Elsewhere>,
        now: Instant,
        gone: Option<router::NodeId>,
    ) {
        let me = self.fleet.as_ref().map_or(0, |f| f.router.me());
        for u in users {
            if known.get(&u).is_some_and(|e| e.device(gone)) {
                self.online.remove(&u);
                continue;
            }
            let (left_ms, until) = (now_ms(), now + self.cfg.grace);
            let token = format!("{me}:{left_ms}:{:08x}", rand::random::<u32>());
            let ttl = 2 * self.cfg.grace + Duration::from_secs(1);
            if let Some(f) = self.fleet()
                && let Err(e) = f.locate.set_mark(u, &token, ttl)
            {
                self.fleet_failed("setting a grace mark", &e);
            }
            self.online.insert(u, Online { leaving: Some(Leaving { left_ms, gone, until, token }) });
            self.leaving.push_back((until, u));
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
        let known = self.elsewhere(&gone);
        self.depart(gone, &known, now, None);
    }

    /// Announces the users whose grace period is over, after storing their `last_seen`.
    fn expire(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some(&(until, u)) = self.leaving.front() {
            if until > now {
                break;
            }
            self.leaving.pop_front();
            let Some(Online { leaving: Some(l) }) = self.online.get(&u) else { continue };
            if l.until != until {
                continue; // an older grace period, since cancelled and restarted
            }
            if self.registry.is_connected(u) {
                // Its arrival notice is still queued: it never really left.
                let l = self.online.get_mut(&u).expect("present").leaving.take().expect("leaving");
                self.clear_mark(u, &l.token);
                continue;
            }
            due.push(u);
        }
        if due.is_empty() {
            return;
        }
        let known = self.elsewhere(&due);
        let mut gone = Vec::new();
        for u in due {
            let Some(Online { leaving: Some(l) }) = self.online.remove(&u) else { continue };
            match known.get(&u) {
                // Came back on another node within the grace period.
                Some(e) if e.device(l.gone) => self.clear_mark(u, &l.token),
                // Left again on another node later: that node announces.
                Some(Elsewhere { mark: Some(m), .. }) if *m != l.token => {}
                _ => {
                    self.clear_mark(u, &l.token);
                    gone.push((u, l.left_ms));
                }
            }
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
        for &c in &contacts {
            // Reaches only the mailboxes that exist: contacts who are connected.
            delivery.deliver(c, &ev);
        }
        // And contacts on other nodes (the fan-out sends only to nodes holding them).
        if let Some(f) = &self.fleet
            && !contacts.is_empty()
        {
            let to: Arc<[UserId]> = contacts.into_iter().collect();
            f.router.fanout(vec![Fanned { event: ev, to, push: Vec::new() }]);
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
    fn query(&mut self, asker: UserId, users: &[UserId]) -> Result<Vec<PresenceInfo>, ErrorCode> {
        let contacts = self.contacts(asker)?;
        let visible = |u: &UserId| *u == asker || contacts.contains(u);
        let here = |w: &Self, u: &UserId| w.online.contains_key(u) || w.registry.is_connected(*u);
        let ask: Vec<UserId> = users.iter().copied().filter(|u| visible(u) && !here(self, u)).collect();
        let known = self.elsewhere(&ask);
        users
            .iter()
            .map(|&u| {
                if !visible(&u) {
                    return Ok(PresenceInfo { user_id: u, online: false, last_seen_ms: None });
                }
                if here(self, &u) || known.get(&u).is_some_and(|e| e.device(None) || e.mark.is_some()) {
                    return Ok(PresenceInfo { user_id: u, online: true, last_seen_ms: None });
                }
                let rec = self.store.presence(u).map_err(internal)?;
                let last_seen_ms = if rec.hide_last_seen { None } else { rec.last_seen_ms };
                Ok(PresenceInfo { user_id: u, online: false, last_seen_ms })
            })
            .collect()
    }
}
