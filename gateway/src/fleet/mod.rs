//! The fleet seam: which node owns what, and the wire between nodes.
//!
//! A node alone (no `[fleet]` configured) owns every key and none of the threads
//! below run: [`Router::submit`] hands every command to the local sequencer.
//!
//! In a fleet:
//! - [`Router`] holds the ring of live nodes (`router::Ring`). Shards route each
//!   command by its key ([`Command::key`]): to the local sequencer when this node
//!   owns it, else to the owner through `fleet-out`. The sequencer checks again
//!   when it takes the command (the ring may have moved since) and forwards it
//!   once more, at most [`MAX_HOPS`] times in all, else refuses it retryably (1022).
//! - `fleet-out` sends forwarded commands, and each commit batch's events for
//!   users on other nodes: it asks [`Locate`] once per round which nodes hold the
//!   recipients' devices, and sends each node one envelope per batch with only the
//!   events (and the users) it hosts. An answer always goes to its asker's node.
//! - `fleet-in` reads this node's inbound stream: commands to the sequencer,
//!   events to mailboxes; it acknowledges entries after that hand-off.
//! - `fleet-ring` renews this node's membership every heartbeat and swaps the
//!   ring when the live set changes.
//! - `fleet-loc` records which users have devices here. A connection's arrival is
//!   recorded before its `sync` reads the store, so any commit after that read is
//!   fanned out to this node (fan-out looks locations up after the commit).
//!
//! Overflow policy: `fleet-out`'s queue holds `fleet.out_queue` items. A shard's
//! forwarded command that finds it full is refused with 1020 (retry). A commit
//! batch's fan-out that finds it full is dropped and every node is told to
//! resync its connections (they close with 4008 and `sync`: history has every
//! event). A send to a node that still fails after `fleet.send_retry_ms` drops
//! the items: commands are refused with 1022 (retry), and the node is told,
//! once the link is back, to resync the users whose events were lost.

pub mod envelope;
pub mod memory;
pub mod redis;

use crate::mailbox::Registry;
use crate::metrics::Metrics;
use crate::push::Push;
use crate::sequencer::Sequencer;
use crate::vocab::command::Command;
use crate::vocab::event::{ConnId, Event, EventKind, Origin, node_of};
use envelope::{Addressed, AddressedRef, Body};
use futures_channel::oneshot;
use protocol::{ErrorCode, UserId};
use router::{Key, NodeId, Ring};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Most times a command is forwarded between nodes before it is refused (1022).
pub const MAX_HOPS: u8 = 3;

/// Sends envelopes to other nodes' inbound streams.
pub trait Wire: Send + 'static {
    /// Appends `payloads` to node `to`'s stream, in order (one round trip).
    fn send(&mut self, to: NodeId, payloads: &[&[u8]]) -> anyhow::Result<()>;
}

/// What this node's inbound stream gave.
pub enum Received {
    Entry {
        id: String,
        payload: Vec<u8>,
    },
    /// Entries were lost before they were read (the stream was trimmed past them).
    Gap,
}

/// Reads this node's inbound stream.
pub trait WireIn: Send + 'static {
    /// Up to `max` entries, waiting at most `block` for the first.
    fn recv(&mut self, max: usize, block: Duration) -> anyhow::Result<Vec<Received>>;
    /// The entries are handed off: never deliver them again.
    fn ack(&mut self, ids: &[String]) -> anyhow::Result<()>;
}

/// Which nodes hold users' devices.
pub trait Locate: Send + 'static {
    /// This node now holds devices of `users`.
    fn arrive(&mut self, users: &[UserId]) -> anyhow::Result<()>;
    /// This node holds no device of `users` any more.
    fn depart(&mut self, users: &[UserId]) -> anyhow::Result<()>;
    /// For each user, the live nodes holding one of its devices (this one included).
    fn nodes_of(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, Vec<NodeId>>>;
    /// The presence grace mark of each of `users` that has one (`router::location`).
    fn marks(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, String>>;
    /// Marks `user` as in its grace period, with `token`, for `ttl`.
    fn set_mark(&mut self, user: UserId, token: &str, ttl: Duration) -> anyhow::Result<()>;
    /// Clears `user`'s grace mark if it is still `token`.
    fn clear_mark(&mut self, user: UserId, token: &str) -> anyhow::Result<()>;
    /// The users node `node` recorded as holding a device of.
    fn users_of(&mut self, node: NodeId) -> anyhow::Result<Vec<UserId>>;
    /// Forgets node `node`'s users (it is gone, and they were seen to).
    fn forget(&mut self, node: NodeId) -> anyhow::Result<()>;
}

/// This node's membership.
pub trait Members: Send + 'static {
    /// Renews it; the live nodes (this one included), and whether this node was
    /// registered anew (its registration had expired, or Redis lost it).
    fn beat(&mut self) -> anyhow::Result<(Vec<NodeId>, bool)>;
    /// Leaves the fleet at once (on shutdown).
    fn leave(&mut self) -> anyhow::Result<()>;
}

/// Takes over what was sent to a dead node.
pub trait Reap: Send + 'static {
    /// The payloads left in `dead`'s stream (read and not acknowledged, or unread).
    fn take_dead(&mut self, dead: NodeId) -> anyhow::Result<Vec<Vec<u8>>>;
    /// Appends `payload` to `dead`'s stream.
    fn tell(&mut self, dead: NodeId, payload: &[u8]) -> anyhow::Result<()>;
}

/// A fleet member's connections to the others, one per thread that uses them.
pub struct Links {
    pub wire: Box<dyn Wire>,
    pub inbound: Box<dyn WireIn>,
    /// `fleet-out`'s lookups.
    pub locate: Box<dyn Locate>,
    /// `fleet-loc`'s arrivals and departures.
    pub locate_conns: Box<dyn Locate>,
    /// The presence thread's lookups and grace marks (taken when it starts).
    pub locate_presence: Option<Box<dyn Locate>>,
    pub members: Box<dyn Members>,
    pub reap: Box<dyn Reap>,
    pub heartbeat: Duration,
}

/// Bounds and timings of the fleet threads.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub out_queue: usize,
    pub loc_queue: usize,
    /// How long `fleet-out` retries a failing send before dropping it.
    pub send_retry: Duration,
    /// A node whose heartbeats fail this long is taken for dead by the others.
    pub ttl: Duration,
}

/// Something for `fleet-out` to send.
enum Outgoing {
    /// A command for another node's sequencer.
    Command(NodeId, Box<Command>),
    /// A commit batch's events, for whichever other nodes host their recipients.
    Fanout(Vec<Fanned>),
}

/// One event of a commit batch, with its recipients.
pub struct Fanned {
    pub event: Arc<Event>,
    pub to: Arc<[UserId]>,
    /// Recipients this node holds no device of and who did not mute the
    /// conversation: pushed if no other node holds one either.
    pub push: Vec<UserId>,
}

enum LocJob {
    Arrive(UserId, oneshot::Sender<()>),
    Depart(UserId),
    /// Record every user here again (the fleet's Redis lost the records).
    Reannounce,
}

/// Where commands go. Shared by every thread.
pub struct Router {
    me: NodeId,
    ring: RwLock<Arc<Ring>>,
    /// Bumped whenever the ring changes.
    version: AtomicU64,
    out: Option<crate::queue::Sender<Outgoing>>,
    loc: Option<crate::queue::Sender<LocJob>>,
    /// A fan-out was dropped (queue full): every node must resync.
    lost_all: AtomicBool,
    /// When a node last left the ring (died, left, or missed its heartbeats).
    departed: std::sync::Mutex<Option<Instant>>,
    /// Asks `fleet-ring` to leave the fleet; it answers on the channel inside.
    leave: Option<crossbeam_channel::Sender<crossbeam_channel::Sender<()>>>,
    rejected: prometheus::IntCounter,
    nodes: prometheus::IntGauge,
    /// When this node's heartbeat last succeeded (`now_ms`; 0: never), and the TTL it
    /// must renew within: for readiness.
    beat_ms: AtomicU64,
    ttl: Duration,
    left: AtomicBool,
    /// `fleet-in` reads this node's stream while set (cleared at shutdown) ...
    reading: AtomicBool,
    /// ... and sets this once it has handed its last read on.
    reader_done: AtomicBool,
}

/// The receiving ends, for [`start`].
pub struct Receivers {
    out: crossbeam_channel::Receiver<Outgoing>,
    loc: crossbeam_channel::Receiver<LocJob>,
    leave: crossbeam_channel::Receiver<crossbeam_channel::Sender<()>>,
}

impl Router {
    /// A node alone: it owns every key.
    pub fn alone(me: NodeId, metrics: &Metrics) -> Router {
        Router {
            me,
            ring: RwLock::new(Arc::new(Ring::new([me]))),
            version: AtomicU64::new(0),
            out: None,
            loc: None,
            lost_all: AtomicBool::new(false),
            departed: std::sync::Mutex::new(None),
            leave: None,
            rejected: metrics.rejected.with_label_values(&["fleet"]),
            nodes: metrics.fleet_nodes.clone(),
            beat_ms: AtomicU64::new(0),
            ttl: Duration::MAX,
            left: AtomicBool::new(false),
            reading: AtomicBool::new(true),
            reader_done: AtomicBool::new(false),
        }
    }

    /// A fleet member; its threads start with [`start`] once the sequencer exists.
    pub fn member(me: NodeId, cfg: &FleetConfig, metrics: &Metrics) -> (Router, Receivers) {
        let (out_tx, out) = crate::queue::bounded(cfg.out_queue);
        let (loc_tx, loc) = crate::queue::bounded(cfg.loc_queue);
        let (leave_tx, leave) = crossbeam_channel::bounded(1);
        let r = Router {
            out: Some(out_tx),
            loc: Some(loc_tx),
            leave: Some(leave_tx),
            ttl: cfg.ttl,
            ..Router::alone(me, metrics)
        };
        (r, Receivers { out, loc, leave })
    }

    /// Leaves the fleet (the others take this node's conversations over at their
    /// next heartbeat, instead of after its registration expires). Waits at most
    /// `wait`.
    ///
    /// Runs on: main, at shutdown.
    pub fn leave(&self, wait: Duration) {
        let Some(leave) = &self.leave else { return };
        self.left.store(true, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        if leave.try_send(tx).is_ok() {
            let _ = rx.recv_timeout(wait);
        }
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// At shutdown: `fleet-in` stops reading this node's stream (what is left there
    /// goes to the node that reaps it once this one has left the ring), and
    /// returns once every command it read has been handed to the sequencer and
    /// every event to a mailbox, then the sequencer's queue is empty and
    /// `fleet-out` has sent everything queued (the replies to other nodes'
    /// clients among it), or `wait` has passed. True if it got there.
    ///
    /// Runs on: main, at shutdown.
    pub fn quiesce(&self, sequencer: &Sequencer, wait: Duration) -> bool {
        let Some(out) = &self.out else { return true };
        self.reading.store(false, Ordering::Release);
        let until = Instant::now() + wait;
        // Idle several checks in a row: a batch being committed or a round being
        // sent has left its queue already.
        let mut idle = 0;
        while Instant::now() < until {
            let done = self.reader_done.load(Ordering::Acquire) && sequencer.queued() == 0 && out.is_empty();
            idle = if done { idle + 1 } else { 0 };
            if idle >= 5 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// For readiness: `Err(why)` unless this node is in the fleet's ring (always
    /// true alone) and its last heartbeat is younger than the TTL, so the others
    /// count it live and route its users' events to it.
    pub fn joined(&self) -> Result<(), String> {
        if !self.in_fleet() {
            return Ok(());
        }
        if self.left.load(Ordering::Relaxed) {
            return Err("left the fleet ring".into());
        }
        let at = self.beat_ms.load(Ordering::Relaxed);
        if at == 0 || !self.ring().contains(self.me) {
            return Err("not in the fleet ring yet".into());
        }
        let age = Duration::from_millis(crate::vocab::clock::now_ms().saturating_sub(at));
        if age >= self.ttl {
            return Err(format!(
                "no fleet heartbeat for {} ms (ttl {} ms): the others may count this node dead",
                age.as_millis(),
                self.ttl.as_millis()
            ));
        }
        Ok(())
    }

    fn beat_ok(&self) {
        self.beat_ms.store(crate::vocab::clock::now_ms(), Ordering::Relaxed);
    }

    pub fn in_fleet(&self) -> bool {
        self.out.is_some()
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().expect("ring lock").clone()
    }

    /// Whether a node left the ring within `window`: a conversation taken over
    /// now may have had its last events committed and never sent by that node.
    pub fn departed_within(&self, window: Duration) -> bool {
        self.departed.lock().expect("departed lock").is_some_and(|at| at.elapsed() < window)
    }

    /// Changes whenever the ring does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn set_ring(&self, nodes: Vec<NodeId>) -> bool {
        let ring = Ring::new(nodes);
        let mut cur = self.ring.write().expect("ring lock");
        if cur.nodes() == ring.nodes() {
            return false;
        }
        tracing::info!(nodes = ?ring.nodes(), "fleet ring changed");
        self.nodes.set(ring.nodes().len() as i64);
        if cur.nodes().iter().any(|n| !ring.contains(*n)) {
            *self.departed.lock().expect("departed lock") = Some(Instant::now());
        }
        *cur = Arc::new(ring);
        self.version.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// The node that owns `key` (this one if the ring is empty: it has not heard of anyone).
    pub fn owner(&self, key: Key) -> NodeId {
        if !self.in_fleet() {
            return self.me;
        }
        self.ring.read().expect("ring lock").owner(key).unwrap_or(self.me)
    }

    pub fn owns(&self, key: Key) -> bool {
        self.owner(key) == self.me
    }

    /// Routes a command: to `sequencer` if this node owns its key, else to the owner.
    /// Hands it back if the queue it needs is full.
    ///
    /// Runs on: any shard, and `fleet-in`.
    pub fn submit(&self, sequencer: &Sequencer, cmd: Command) -> Result<(), Command> {
        match self.owner(cmd.key()) {
            n if n == self.me => sequencer.submit(cmd),
            n => self.forward(n, cmd),
        }
    }

    /// Queues `cmd` for node `to`'s sequencer. Hands it back if the queue is full.
    pub fn forward(&self, to: NodeId, cmd: Command) -> Result<(), Command> {
        let out = self.out.as_ref().expect("forwarding needs a fleet");
        out.try_send(Outgoing::Command(to, Box::new(cmd))).map_err(|e| {
            self.rejected.inc();
            match e.into_inner() {
                Outgoing::Command(_, c) => *c,
                Outgoing::Fanout(_) => unreachable!("sent a command"),
            }
        })
    }

    /// Hands a commit batch's events to `fleet-out` for the other nodes.
    ///
    /// Runs on: the sequencer (and `fleet-in`, for refusals). Never blocks.
    pub fn fanout(&self, batch: Vec<Fanned>) {
        let Some(out) = &self.out else { return };
        if batch.is_empty() {
            return;
        }
        if out.try_send(Outgoing::Fanout(batch)).is_err() {
            self.rejected.inc();
            if !self.lost_all.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    "fleet-out queue full: a batch's events for other nodes are dropped; they resync"
                );
            }
        }
    }

    /// Records that `user` has a device here, before its connection syncs. Waits for
    /// the record (a link failure is logged and retried in the background: this
    /// node's own traffic does not wait for the fleet).
    ///
    /// Runs on: a shard.
    pub async fn arrive(&self, user: UserId) {
        let Some(loc) = &self.loc else { return };
        let (tx, rx) = oneshot::channel();
        if loc.try_send(LocJob::Arrive(user, tx)).is_err() {
            self.rejected.inc();
            return;
        }
        let _ = rx.await;
    }

    /// One of `user`'s connections here closed.
    ///
    /// Runs on: a shard. Never blocks: when the queue is full the record stays
    /// (the user's events still reach this node, which has nobody to show them to).
    pub fn depart(&self, user: UserId) {
        if let Some(loc) = &self.loc
            && loc.try_send(LocJob::Depart(user)).is_err()
        {
            self.rejected.inc();
        }
    }
}

/// The refusal of `cmd` with `code`, as the event its asker gets.
pub fn refusal(cmd: &Command, code: ErrorCode) -> Fanned {
    let origin = cmd.origin();
    let kind = match cmd {
        Command::Send(s) => EventKind::SendFailed {
            origin: origin.conn,
            conversation_id: s.conversation,
            client_msg_id: s.client_msg_id.clone(),
            code,
        },
        Command::Typing { .. } | Command::Mark { .. } => {
            EventKind::Reply { origin, result: Err(code), settles: false }
        }
        _ => EventKind::Reply { origin, result: Err(code), settles: true },
    };
    Fanned { event: Event::new(kind), to: Arc::from([cmd.actor()]), push: Vec::new() }
}

/// Delivers events to local mailboxes.
fn deliver_local(registry: &Registry, events: impl IntoIterator<Item = (Arc<Event>, Vec<UserId>)>) {
    let mut d = registry.delivery();
    for (ev, to) in events {
        for u in to {
            d.deliver(u, &ev);
        }
    }
}

/// Starts `fleet-out`, `fleet-in`, `fleet-ring` and `fleet-loc`. The first
/// heartbeat (joining) happens here, so the ring is known when this returns.
#[allow(clippy::too_many_arguments)]
pub fn start(
    links: Links,
    rx: Receivers,
    cfg: FleetConfig,
    router: Arc<Router>,
    sequencer: Sequencer,
    registry: Arc<Registry>,
    push: Arc<Push>,
    metrics: Arc<Metrics>,
    store: Arc<dyn storage::Store>,
    on_node_gone: Box<dyn Fn(NodeId) + Send>,
) -> anyhow::Result<()> {
    let Links { wire, inbound, locate, locate_conns, mut members, mut reap, heartbeat, locate_presence: _ } =
        links;
    router.set_ring(members.beat()?.0);
    router.beat_ok();
    // How long a reaped node's stream is drained again: until every node's ring
    // has dropped it (a TTL and a heartbeat apart at most) and what they were
    // still sending it has gone through fleet-out's retries.
    let rewatch = 2 * cfg.ttl + cfg.send_retry;
    // Dead nodes whose conversations are to be shown again (see `take_over`).
    let (takeover_tx, takeover_rx) = crossbeam_channel::bounded::<NodeId>(TAKEOVERS_QUEUED);
    {
        let (router, sequencer, ttl) = (router.clone(), sequencer.clone(), cfg.ttl);
        std::thread::Builder::new().name("fleet-takeover".into()).spawn(move || {
            for dead in takeover_rx {
                take_over(&*store, dead, ttl, &router, &sequencer);
            }
        })?;
    }
    {
        let (router, registry, metrics) = (router.clone(), registry.clone(), metrics.clone());
        std::thread::Builder::new().name("fleet-out".into()).spawn(move || {
            Out { router, registry, push, metrics, wire, locate, cfg, lost: HashMap::new() }.run(rx.out)
        })?;
    }
    {
        let (router, registry) = (router.clone(), registry.clone());
        std::thread::Builder::new().name("fleet-in".into()).spawn({
            let sequencer = sequencer.clone();
            move || inbound_loop(inbound, router, sequencer, registry, metrics)
        })?;
    }
    {
        let (router, loc, registry) = (router.clone(), router.loc.clone(), registry.clone());
        std::thread::Builder::new().name("fleet-ring".into()).spawn(move || {
            // Nodes reaped lately, until when their streams are drained again.
            let mut reaped: HashMap<NodeId, Instant> = HashMap::new();
            loop {
                match rx.leave.recv_timeout(heartbeat) {
                    Ok(done) => {
                        if let Err(e) = members.leave() {
                            tracing::warn!(error = %e, "leaving the fleet failed; the others wait for the TTL");
                        }
                        let _ = done.send(());
                        return;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
                let (nodes, fresh) = match members.beat() {
                    Ok(b) => {
                        router.beat_ok();
                        b
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet heartbeat failed; keeping the last ring");
                        continue;
                    }
                };
                if fresh && let Some(loc) = &loc {
                    // Redis lost this node's records (it restarted empty, or this node
                    // was taken for dead): record its users again, and make every
                    // connection here resync, since events for them may have been
                    // sent nowhere meanwhile (their locations were unknown).
                    let _ = loc.try_send(LocJob::Reannounce);
                    tracing::warn!("the fleet lost this node's records: every connection here resyncs");
                    deliver_local(&registry, [(Event::new(EventKind::Resync), registry.users())]);
                }
                let before = router.ring();
                if router.set_ring(nodes) {
                    let after = router.ring();
                    // The lowest live node takes over what was left for the dead.
                    if after.nodes().first() == Some(&router.me) {
                        for &dead in before.nodes().iter().filter(|n| !after.contains(**n)) {
                            reap_dead(&mut *reap, dead, &router, &sequencer, true);
                            reaped.insert(dead, Instant::now() + rewatch);
                            if takeover_tx.try_send(dead).is_err() {
                                tracing::warn!(dead, "takeover queue full: a dead node's conversations are not shown again");
                            }
                            // Its users' contacts hear they went offline, unless they come back.
                            on_node_gone(dead);
                        }
                    }
                }
                // A node whose ring still had the dead one may have sent it
                // commands after the reap: they are taken over too, a heartbeat late.
                let ring = router.ring();
                let now = Instant::now();
                reaped.retain(|n, until| !ring.contains(*n) && now < *until);
                if ring.nodes().first() == Some(&router.me) {
                    for &dead in reaped.keys() {
                        reap_dead(&mut *reap, dead, &router, &sequencer, false);
                    }
                }
            }
        })?;
    }
    std::thread::Builder::new()
        .name("fleet-loc".into())
        .spawn(move || loc_loop(rx.loc, locate_conns, registry))?;
    Ok(())
}

/// Most users remembered per node as needing a resync before it becomes "all".
const LOST_MAX: usize = 10_000;

/// What `fleet-out` lost for one node and must tell it once the link is back.
#[derive(Default)]
struct Lost {
    users: HashSet<UserId>,
    all: bool,
}

struct Out {
    router: Arc<Router>,
    registry: Arc<Registry>,
    push: Arc<Push>,
    metrics: Arc<Metrics>,
    wire: Box<dyn Wire>,
    locate: Box<dyn Locate>,
    cfg: FleetConfig,
    lost: HashMap<NodeId, Lost>,
}

/// Most items `fleet-out` takes in one round.
const ROUND_MAX: usize = 512;

impl Out {
    // Runs on: fleet-out.
    fn run(mut self, rx: crossbeam_channel::Receiver<Outgoing>) {
        let mut items = Vec::with_capacity(ROUND_MAX);
        while let Ok(first) = rx.recv() {
            items.push(first);
            while items.len() < ROUND_MAX {
                match rx.try_recv() {
                    Ok(i) => items.push(i),
                    Err(_) => break,
                }
            }
            self.round(std::mem::take(&mut items));
        }
    }

    fn round(&mut self, items: Vec<Outgoing>) {
        let me = self.router.me;
        if self.router.lost_all.swap(false, Ordering::AcqRel) {
            for n in self.router.ring().nodes().iter().filter(|&&n| n != me) {
                self.lost.entry(*n).or_default().all = true;
            }
        }
        // Where the batches' recipients are: one lookup for the round.
        let users: Vec<UserId> = {
            let mut s = HashSet::new();
            for i in &items {
                if let Outgoing::Fanout(b) = i {
                    for f in b {
                        s.extend(f.to.iter().copied());
                    }
                }
            }
            s.into_iter().collect()
        };
        let located = if users.is_empty() {
            HashMap::new()
        } else {
            match self.locate.nodes_of(&users) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "looking up users' nodes failed; their remote devices resync");
                    // Nobody knows where they are: every node resyncs them.
                    for n in self.router.ring().nodes().iter().filter(|&&n| n != me) {
                        self.note_lost(*n, &users);
                    }
                    HashMap::new()
                }
            }
        };
        // Per node, its payloads in queue order, and what each carried (for failures).
        let mut per_node: BTreeMap<NodeId, Vec<(Vec<u8>, Carried)>> = BTreeMap::new();
        let mut pushes = Vec::new();
        for item in items {
            match item {
                Outgoing::Command(to, cmd) => {
                    let payload = envelope::encode_command(&cmd);
                    per_node.entry(to).or_default().push((payload, Carried::Command(cmd)));
                }
                Outgoing::Fanout(batch) => {
                    // Per node: which of the batch's events it gets, and for whom there.
                    let mut plan: BTreeMap<NodeId, Vec<(usize, Vec<UserId>)>> = BTreeMap::new();
                    for (i, f) in batch.iter().enumerate() {
                        let mut at: BTreeMap<NodeId, Vec<UserId>> = BTreeMap::new();
                        for &u in f.to.iter() {
                            for &n in located.get(&u).into_iter().flatten() {
                                if n != me {
                                    at.entry(n).or_default().push(u);
                                }
                            }
                        }
                        // An answer goes to its asker's node whatever the lookup said.
                        if let Some((conn, user)) = asker(f) {
                            let n = node_of(conn);
                            if n != me {
                                let v = at.entry(n).or_default();
                                if !v.contains(&user) {
                                    v.push(user);
                                }
                            }
                        }
                        for u in &f.push {
                            if located.get(u).is_none_or(|n| n.is_empty())
                                && let EventKind::Message { message, .. } = &f.event.kind
                            {
                                pushes.push((*u, message.clone()));
                            }
                        }
                        for (n, us) in at {
                            plan.entry(n).or_default().push((i, us));
                        }
                    }
                    for (n, events) in &plan {
                        let refs: Vec<AddressedRef<'_>> = events
                            .iter()
                            .map(|(i, to)| AddressedRef { event: &batch[*i].event.kind, to })
                            .collect();
                        let users: Vec<UserId> =
                            events.iter().flat_map(|(_, to)| to.iter().copied()).collect();
                        let payload = envelope::encode_events(&refs);
                        per_node.entry(*n).or_default().push((payload, Carried::Events(users)));
                    }
                }
            }
        }
        for (u, m) in pushes {
            self.push.submit(u, &m);
        }
        for (node, payloads) in per_node {
            self.send(node, payloads);
        }
        // Tell nodes whose link is back what they missed.
        let owed: Vec<NodeId> = self.lost.keys().copied().collect();
        for node in owed {
            self.send(node, Vec::new());
        }
    }

    fn note_lost(&mut self, node: NodeId, users: &[UserId]) {
        let l = self.lost.entry(node).or_default();
        if !l.all {
            l.users.extend(users.iter().copied());
            if l.users.len() > LOST_MAX {
                l.users.clear();
                l.all = true;
            }
        }
    }

    /// Sends `payloads` to `node` (after any resync notice it is owed), retrying for
    /// `send_retry`; then gives up: commands are refused, events noted as lost.
    fn send(&mut self, node: NodeId, mut payloads: Vec<(Vec<u8>, Carried)>) {
        if let Some(l) = self.lost.get(&node) {
            let notice = Body::Resync { users: l.users.iter().copied().collect(), all: l.all };
            payloads.insert(0, (envelope::encode(&notice), Carried::Notice));
        }
        if payloads.is_empty() {
            return;
        }
        let refs: Vec<&[u8]> = payloads.iter().map(|(p, _)| p.as_slice()).collect();
        let deadline = Instant::now() + self.cfg.send_retry;
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.wire.send(node, &refs) {
                Ok(()) => {
                    self.metrics.fleet_entries.inc_by(refs.len() as u64);
                    if matches!(payloads.first(), Some((_, Carried::Notice))) {
                        self.lost.remove(&node);
                    }
                    return;
                }
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::debug!(node, error = %e, "sending to a node failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, entries = refs.len(), "sending to a node failed; giving up");
                    break;
                }
            }
        }
        let mut refused = Vec::new();
        for (_, carried) in payloads {
            match carried {
                Carried::Command(cmd) => refused.push(refusal(&cmd, ErrorCode::Unavailable)),
                Carried::Events(users) => self.note_lost(node, &users),
                Carried::Notice => {}
            }
        }
        self.metrics.errors.with_label_values(&["fleet_send_failed"]).inc();
        // The askers of refused commands are on this node (the shards forwarded them).
        deliver_local(&self.registry, refused.into_iter().map(|f| (f.event, f.to.to_vec())));
    }
}

/// What a payload carried, for when it cannot be sent.
enum Carried {
    Command(Box<Command>),
    Events(Vec<UserId>),
    Notice,
}

/// The connection an event answers, and its user.
fn asker(f: &Fanned) -> Option<(ConnId, UserId)> {
    let actor = || f.to.first().copied();
    match &f.event.kind {
        EventKind::Message { message, origin: Some(c), .. } => Some((*c, message.sender_id)),
        // Addressed to the asker alone.
        EventKind::SendFailed { origin, .. } => Some((*origin, actor()?)),
        EventKind::Reply { origin, .. } => Some((origin.conn, actor()?)),
        _ => None,
    }
}

/// Reads this node's stream: commands to the sequencer (refused retryably if its
/// queue is full), events to mailboxes, resync notices to the connections named.
///
/// Runs on: fleet-in.
fn inbound_loop(
    mut inbound: Box<dyn WireIn>,
    router: Arc<Router>,
    sequencer: Sequencer,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        if !router.reading.load(Ordering::Acquire) {
            router.reader_done.store(true, Ordering::Release);
            return;
        }
        let got = match inbound.recv(256, Duration::from_secs(1)) {
            Ok(g) => {
                backoff = Duration::from_millis(10);
                g
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading this node's stream failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut ids = Vec::with_capacity(got.len());
        let mut events = Vec::new();
        for r in got {
            let (id, payload) = match r {
                Received::Entry { id, payload } => (id, payload),
                Received::Gap => {
                    tracing::warn!(
                        "this node's stream lost entries before they were read; every connection resyncs"
                    );
                    events.push((Event::new(EventKind::Resync), registry.users()));
                    continue;
                }
            };
            // A Redis stream id is `<ms>-<n>`, the ms of Redis's clock at the append.
            if let Some(at) = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()) {
                let lag_ms = crate::vocab::clock::now_ms().saturating_sub(at);
                metrics.fleet_stream_lag_seconds.observe(lag_ms as f64 / 1000.0);
            }
            ids.push(id);
            metrics.fleet_received.inc();
            match envelope::decode(&payload) {
                Ok(Body::Command { cmd }) => {
                    let mut cmd = *cmd;
                    cmd.origin_mut().hops += 1;
                    if let Err(cmd) = sequencer.submit(cmd) {
                        router.fanout(vec![refusal(&cmd, ErrorCode::Overloaded)]);
                    }
                }
                Ok(Body::Events { events: evs }) => {
                    events.extend(evs.into_iter().map(|Addressed { event, to }| (Event::new(event), to)));
                }
                Ok(Body::Resync { users, all }) => {
                    let to = if all { registry.users() } else { users };
                    events.push((Event::new(EventKind::Resync), to));
                }
                Err(e) => {
                    metrics.errors.with_label_values(&["fleet_bad_envelope"]).inc();
                    tracing::warn!(error = %e, "dropping an envelope this node cannot read");
                }
            }
        }
        deliver_local(&registry, events);
        if !ids.is_empty()
            && let Err(e) = inbound.ack(&ids)
        {
            // Delivered again after a restart of this thread's reader: clients dedup.
            tracing::warn!(error = %e, "acknowledging stream entries failed");
        }
    }
}

/// Re-routes the commands left in dead node `dead`'s stream to their owners now.
/// Events for its users are dropped (they reconnect elsewhere and sync), and a
/// resync notice for all is left in its stream: a node taken for dead that was
/// not (stopped for a while, or its registration lost with a Redis restart)
/// reads it after the dropped events, so its connections resync. The stream is
/// kept (trimmed like any other) for that reason.
///
/// `first`: the reap when the node left the ring. Later ones (each heartbeat
/// for a while) take what lagging nodes sent it since; they leave the notice
/// again only if they took anything (the notice itself among it).
///
/// Runs on: fleet-ring.
fn reap_dead(reap: &mut dyn Reap, dead: NodeId, router: &Router, sequencer: &Sequencer, first: bool) {
    let payloads = match reap.take_dead(dead) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(dead, error = %e, "taking over a dead node's stream failed");
            return;
        }
    };
    if !first && payloads.is_empty() {
        return;
    }
    let mut rerouted = 0;
    for p in &payloads {
        if let Ok(Body::Command { cmd }) = envelope::decode(p) {
            rerouted += 1;
            if let Err(cmd) = router.submit(sequencer, *cmd) {
                router.fanout(vec![refusal(&cmd, ErrorCode::Overloaded)]);
            }
        }
    }
    if let Err(e) = reap.tell(dead, &envelope::encode(&Body::Resync { users: Vec::new(), all: true })) {
        tracing::warn!(dead, error = %e, "leaving a resync notice for a dead node failed");
    }
    if first {
        tracing::info!(dead, rerouted, "took over a dead node's stream");
    } else if rerouted > 0 {
        tracing::info!(
            dead,
            rerouted,
            "took over commands sent to a dead node after its stream was taken over"
        );
    }
}

/// Most dead nodes waiting for [`take_over`] (overflow: logged and skipped; their
/// conversations' tails are shown again only when a command loads them).
const TAKEOVERS_QUEUED: usize = 64;

/// How far before a node was found dead its conversations' messages are shown
/// again, beyond the TTL it took to find out: how long its `fleet-out` may have
/// lagged behind its acknowledgements.
const FANOUT_LAG_MAX: Duration = Duration::from_secs(15);

/// Closes the gap between a dead node's acknowledgements and its fan-out: its
/// sequencer answered a batch's senders before `fleet-out` sent the batch's
/// events to other nodes, so a `kill -9` between the two leaves acknowledged
/// messages that some members never got. Every conversation the dead node had
/// claimed and written lately gets a [`Command::Takeover`] at its new owner,
/// which shows the recent messages to every member again (devices dedupe).
///
/// Runs on: fleet-takeover (the store may be slow; the heartbeat must not wait).
fn take_over(
    store: &dyn storage::Store,
    dead: NodeId,
    ttl: Duration,
    router: &Router,
    sequencer: &Sequencer,
) {
    let since_ms = crate::vocab::clock::now_ms().saturating_sub((ttl + FANOUT_LAG_MAX).as_millis() as u64);
    let convs = match store.claimed_by(dead, since_ms).or_else(|_| store.claimed_by(dead, since_ms)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dead, error = %e, "listing a dead node's conversations failed; not shown again");
            return;
        }
    };
    // No connection asked: a refusal (none is sent back) would come here, to nobody.
    let origin = Origin::new(ConnId::from(router.me) << 48, 0);
    let mut refused = 0;
    for &conversation in &convs {
        let mut cmd = Command::Takeover { conversation, since_ms, origin };
        // A full queue is waited out briefly: these are few and matter.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(back) = router.submit(sequencer, cmd) {
            if Instant::now() >= deadline {
                refused += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            cmd = back;
        }
    }
    tracing::info!(dead, conversations = convs.len(), refused, "showing a dead node's recent messages again");
}

/// Records arrivals and departures. Counts connections per user, so a user is
/// removed only when its last connection here closes.
///
/// Runs on: fleet-loc.
fn loc_loop(rx: crossbeam_channel::Receiver<LocJob>, mut locate: Box<dyn Locate>, registry: Arc<Registry>) {
    let mut here: HashMap<UserId, u32> = HashMap::new();
    // Records to write again when the link works.
    let mut owed: HashSet<UserId> = HashSet::new();
    // Users connected here without a record: events for them may have gone
    // nowhere, so once recorded their connections here resync.
    let mut unrecorded: HashSet<UserId> = HashSet::new();
    loop {
        let job = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(j) => Some(j),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        match job {
            Some(LocJob::Arrive(user, done)) => {
                *here.entry(user).or_default() += 1;
                // Once more on a new connection: a kept one may have died with a Redis restart.
                if let Err(e) = locate.arrive(&[user]).or_else(|_| locate.arrive(&[user])) {
                    tracing::warn!(
                        error = %e,
                        "recording a user's arrival failed; it connects here unrecorded (local events only) \
                         and resyncs once recorded"
                    );
                    owed.insert(user);
                    unrecorded.insert(user);
                }
                let _ = done.send(());
            }
            Some(LocJob::Reannounce) => {
                owed.extend(here.keys().copied());
            }
            Some(LocJob::Depart(user)) => {
                let n = here.entry(user).or_default();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    here.remove(&user);
                    owed.remove(&user);
                    unrecorded.remove(&user);
                    if !registry.is_connected(user)
                        && let Err(e) = locate.depart(&[user])
                    {
                        tracing::debug!(error = %e, "recording a departure failed (the record stays)");
                    }
                }
            }
            None => {}
        }
        if !owed.is_empty() {
            let users: Vec<UserId> = owed.iter().copied().collect();
            if locate.arrive(&users).is_ok() {
                owed.clear();
                let users: Vec<UserId> = unrecorded.drain().collect();
                if !users.is_empty() {
                    deliver_local(&registry, [(Event::new(EventKind::Resync), users)]);
                }
            }
        }
    }
}
