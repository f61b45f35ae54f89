//! The sequencer: the threads that change conversations.
//!
//! Conversations are partitioned over `parts` sequencer threads (by default one per
//! shard, pinned to its shard's core) by [`router::Key::partition`], the key the
//! fleet's ring hashes: ring → node → partition is one scheme, and each
//! conversation has one writer in the fleet. Shards submit [`Command`]s through a
//! bounded queue per partition. A partition takes them in batches: checks
//! membership, permissions and idempotency against its cache, assigns each message
//! the next position and a server timestamp, writes the whole batch with one
//! durable [`Store::commit`] (group commit: one fsync for up to `commit_batch_max`
//! commands), and only then fans the resulting events out to the recipients'
//! mailboxes, in position order. Because one thread orders each conversation,
//! every mailbox sees a conversation's events in conversation order, and a
//! sender's `ack` lands in its place in that order. Partitions share nothing but
//! the store, the mailboxes and the metrics.
//!
//! Overflow policy: each partition's queue holds `sequencer_queue` commands; a
//! shard whose submit finds its partition's queue full answers the client with
//! 1020 (overloaded, retry) and the `rejected` counter goes up.

use crate::fleet::Router;
use crate::ids::IdGen;
use crate::mailbox::Registry;
use crate::metrics::Metrics;
use crate::push::Push;
use crate::vocab::clock::now_ms;
use crate::vocab::command::{Command, SendCmd};
use crate::vocab::event::{Answer, Event, EventKind};
use protocol::{
    Conversation, ConversationId, ConversationKind, ErrorCode, Member, Message, MessageKind, Role, Seq,
    UserId,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{BucketRef, ConversationRecord, Mutation, Order, Positions, Store, bucket_of, pair};

/// The shards' handle on the sequencer partitions.
#[derive(Clone)]
pub struct Sequencer {
    parts: Arc<[crate::queue::Sender<Command>]>,
    rejected: prometheus::IntCounter,
}

/// What the sequencer tells the attachment store after a commit: the
/// attachments whose message it deleted. (A send marks its attachment as
/// referred to itself, before its commit: see `conn::attachment_of`.)
///
/// Runs on: a sequencer partition (must not block: queue the file work).
pub trait AttachmentLinks: Send + Sync {
    fn unlinked(&self, ids: Vec<String>);
}

pub struct SequencerConfig {
    /// Partitions (threads); at least 1.
    pub parts: usize,
    pub queue: usize,
    pub batch_max: usize,
    /// Longest a loaded batch waits for company (see `StorageConfig::commit_window_us`).
    pub window: Option<Duration>,
    pub member_cap: usize,
    /// Told, after each commit, the attachments of the messages it deleted.
    pub attachments: Arc<dyn AttachmentLinks>,
}

impl Sequencer {
    pub fn start(
        cfg: SequencerConfig,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        ids: Arc<IdGen>,
        metrics: Arc<Metrics>,
        push: Arc<Push>,
        router: Arc<Router>,
    ) -> Sequencer {
        let parts = cfg.parts.max(1);
        let rejected = metrics.rejected.with_label_values(&["sequencer"]);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let txs: Vec<_> = (0..parts)
            .map(|part| {
                let (tx, rx) = crate::queue::bounded(cfg.queue);
                let mut worker = Worker {
                    part,
                    parts,
                    store: store.clone(),
                    registry: registry.clone(),
                    ids: ids.clone(),
                    metrics: metrics.clone(),
                    push: push.clone(),
                    router: router.clone(),
                    ring_seen: 0,
                    swept: Instant::now(),
                    member_cap: cfg.member_cap,
                    attachments: cfg.attachments.clone(),
                    convs: HashMap::new(),
                    adopted: Vec::new(),
                    reshow_since: None,
                };
                let (batch_max, window) = (cfg.batch_max, cfg.window);
                // Next to its shard (shard i runs on core i), so a partition's wake-ups
                // and cache stay on one core.
                let core = (!cores.is_empty()).then(|| cores[part % cores.len()]);
                std::thread::Builder::new()
                    .name(format!("sequencer-{part}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            core_affinity::set_for_current(core);
                        }
                        worker.run(rx, batch_max, window)
                    })
                    .expect("spawning a sequencer partition");
                tx
            })
            .collect();
        Sequencer { parts: txs.into(), rejected }
    }

    /// Commands waiting in the queues (not counting batches being committed).
    pub fn queued(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// Queues a command with the partition that orders its key; hands it back if
    /// that queue is full.
    ///
    /// Runs on: any shard, and `fleet-in`. Never blocks.
    pub fn submit(&self, cmd: Command) -> Result<(), Command> {
        let part = &self.parts[cmd.key().partition(self.parts.len())];
        part.try_send(cmd).map_err(|e| {
            if self.rejected.get() == 0 {
                tracing::warn!("a sequencer queue is full; answering overloaded (logged once)");
            }
            self.rejected.inc();
            e.into_inner()
        })
    }
}

/// Adds queued commands to `batch` until it holds `max`. Without a deadline it takes
/// only what is queued now; with one it also waits for more until then.
fn fill_batch<T>(
    rx: &crossbeam_channel::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    deadline: Option<Instant>,
) {
    while batch.len() < max {
        let next = match deadline {
            Some(d) => rx.recv_deadline(d).ok(),
            None => rx.try_recv().ok(),
        };
        match next {
            Some(c) => batch.push(c),
            None => break,
        }
    }
}

/// Most conversations kept in the sequencer's cache; past it the cache is
/// dropped and reloads on demand (a conversation is two small reads).
const CACHE_MAX: usize = 200_000;

struct ConvState {
    rec: ConversationRecord,
    members: BTreeMap<UserId, Role>,
    /// `members`' keys, shared by every event of a batch.
    recipients: Arc<[UserId]>,
    bucket: Option<u32>,
    /// Members' delivered and read positions (absent: zeros).
    positions: HashMap<UserId, Positions>,
    /// Members' mute flags, read from the store on first need after a commit.
    mutes: HashMap<UserId, bool>,
    /// This node's owner epoch of the conversation ([`Store::claim`]), which every
    /// commit touching it is fenced with; 0 for one created here until the
    /// creating batch commits and this node claims it.
    epoch: u64,
    /// When it was claimed (or created): claimed again after [`RECLAIM_AFTER`].
    claimed: Instant,
}

/// How long a cached conversation's claim serves: a store's fence timestamps
/// count time within an epoch in a bounded range (Cassandra's 2^40 µs, 12.7
/// days), so an owner takes a new epoch well before it runs out.
const RECLAIM_AFTER: Duration = Duration::from_secs(10 * 86_400);

/// After a node leaves the ring, how long a conversation taken over has its
/// recent messages (this far back, at most [`TAIL_MAX`]) shown again.
const TAKEOVER_WINDOW: Duration = Duration::from_secs(15);
const TAIL_MAX: usize = 100;

impl ConvState {
    /// Moves `user`'s positions forward to `seq` (delivered, and read if `read`).
    /// Returns the new positions if anything moved.
    fn advance(&mut self, batch: &mut Batch, user: UserId, seq: Seq, read: bool) -> Option<Positions> {
        let cur = self.positions.get(&user).copied().unwrap_or_default();
        let mut new = cur;
        new.delivered = new.delivered.max(seq);
        if read {
            new.read = new.read.max(seq);
        }
        if new == cur {
            return None;
        }
        self.positions.insert(user, new);
        batch.positions.insert((self.rec.id, user));
        Some(new)
    }

    fn set_members(&mut self) {
        self.recipients = self.members.keys().copied().collect();
    }

    fn snapshot(&self) -> Conversation {
        view(&self.rec, self.members.iter().map(|(&u, &r)| (u, r)))
    }
}

/// What a client is shown of a conversation.
fn view(rec: &ConversationRecord, members: impl Iterator<Item = (UserId, Role)>) -> Conversation {
    Conversation {
        conversation_id: rec.id,
        kind: rec.kind,
        title: rec.title.clone(),
        members: members.map(|(user_id, role)| Member { user_id, role }).collect(),
        last_seq: rec.last_seq,
        last_ts_ms: rec.last_ts_ms,
        created_ms: rec.created_ms,
    }
}

/// What a stored event is about, besides its body.
#[derive(Clone, Copy)]
enum About {
    Nothing,
    /// A member (membership events), with the new role for role changes.
    Member(UserId, Option<Role>),
    /// Another message (edits and deletions).
    Message(Seq),
}

/// An event and who it is for (chosen when it is built).
struct Effect(Arc<Event>, Arc<[UserId]>);

/// What one batch accumulates before its commit.
#[derive(Default)]
struct Batch {
    muts: Vec<Mutation>,
    effects: Vec<Effect>,
    touched: HashSet<ConversationId>,
    /// Members whose positions this batch moved.
    positions: HashSet<(ConversationId, UserId)>,
    idem: HashMap<(ConversationId, UserId, String), Message>,
    directs: HashMap<(UserId, UserId), ConversationId>,
    /// Reactions of the messages this batch touched, by user, as they stand in the batch.
    reactions: HashMap<(ConversationId, Seq), BTreeMap<UserId, String>>,
    /// Conversations this batch creates (no stored owner epoch to fence with yet).
    created: HashSet<ConversationId>,
    /// Attachments of the messages this batch deletes.
    unlinked: Vec<String>,
}

struct Worker {
    /// This partition, of `parts`.
    part: usize,
    attachments: Arc<dyn AttachmentLinks>,
    parts: usize,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    ids: Arc<IdGen>,
    metrics: Arc<Metrics>,
    push: Arc<Push>,
    router: Arc<Router>,
    /// The ring version the cache was last checked against.
    ring_seen: u64,
    /// When the cache was last swept for old claims.
    swept: Instant,
    member_cap: usize,
    /// Only conversations this partition of this node orders (see [`Worker::mine`]
    /// and [`Worker::forget_moved`]).
    convs: HashMap<ConversationId, ConvState>,
    /// Stored messages adopted by a head repair, shown with the next batch
    /// (already committed, so whatever that batch's fate).
    adopted: Vec<Effect>,
    /// While a [`Command::Takeover`] loads its conversation: show messages
    /// stored since then again.
    reshow_since: Option<u64>,
}

type Fail = ErrorCode;

fn internal(e: storage::StorageError) -> Fail {
    tracing::error!(error = %e, "store read failed in the sequencer");
    ErrorCode::Internal
}

impl Worker {
    // Runs on: the sequencer thread.
    //
    // Group commit: a batch is whatever queued while the last commit ran. Under
    // load (the last batch had company) it also waits up to `window` from its
    // first command for more, so one fsync and one round of shard wake-ups serve
    // more messages; a lone command after a lone command never waits.
    fn run(&mut self, rx: crossbeam_channel::Receiver<Command>, batch_max: usize, window: Option<Duration>) {
        let mut cmds = Vec::with_capacity(batch_max);
        let mut loaded = false;
        while let Ok(first) = rx.recv() {
            let deadline = window.filter(|_| loaded).map(|w| Instant::now() + w);
            cmds.push(first);
            fill_batch(&rx, &mut cmds, batch_max, deadline);
            loaded = cmds.len() > 1;
            // Only between batches: a batch's uncommitted changes live in the cache.
            if self.convs.len() >= CACHE_MAX {
                self.convs.clear();
            }
            self.forget_moved();
            let mut batch = Batch::default();
            self.metrics.commit_batch.observe(cmds.len() as f64);
            for cmd in cmds.drain(..) {
                self.apply(cmd, &mut batch);
            }
            self.finish(batch);
        }
    }

    /// Drops the cached state of conversations another node now owns: it may change
    /// them from now on, so the cache would go stale. Loaded again if they come back.
    fn forget_moved(&mut self) {
        // Once a minute: drop conversations claimed too long ago (claimed anew on next use).
        if self.swept.elapsed() > Duration::from_secs(60) {
            self.swept = Instant::now();
            self.convs.retain(|_, st| st.claimed.elapsed() < RECLAIM_AFTER);
        }
        let v = self.router.version();
        if v != self.ring_seen {
            self.ring_seen = v;
            let router = &self.router;
            self.convs.retain(|id, _| router.owns(router::Key::Conversation(*id)));
        }
    }

    /// Whether this partition of this node orders conversation `id` (only those
    /// stay in its cache and are claimed by it).
    fn mine(&self, id: ConversationId) -> bool {
        let key = router::Key::Conversation(id);
        key.partition(self.parts) == self.part && self.router.owns(key)
    }

    /// Whether this node owns `cmd`'s key; if not, forwards it to the owner (or, past
    /// the hop limit or with the queue full, refuses it retryably).
    fn owned(&self, cmd: Command, batch: &mut Batch) -> Option<Command> {
        let owner = self.router.owner(cmd.key());
        if owner == self.router.me() {
            return Some(cmd);
        }
        let refused = if cmd.origin().hops >= crate::fleet::MAX_HOPS {
            Some(crate::fleet::refusal(&cmd, ErrorCode::Unavailable))
        } else {
            self.router.forward(owner, cmd).err().map(|c| crate::fleet::refusal(&c, ErrorCode::Overloaded))
        };
        if let Some(f) = refused {
            batch.effects.push(Effect(f.event, f.to));
        }
        None
    }

    fn load(&mut self, id: ConversationId) -> Result<&mut ConvState, Fail> {
        if !self.convs.contains_key(&id) {
            // Claimed before anything is read: a deposed owner's commit under way lands
            // before the claim returns or not at all, so the reads below see it.
            let epoch = self.store.claim(id, self.router.me()).map_err(internal)?;
            let mut rec = self.store.conversation(id).map_err(internal)?.ok_or(ErrorCode::NotFound)?;
            let members: BTreeMap<_, _> = self.store.members(id).map_err(internal)?.into_iter().collect();
            let last = self.store.buckets(id).map_err(internal)?.last().copied();
            // A store without cross-partition transactions (Cassandra) may keep
            // messages past the head: a commit cut between its rows and its head, or
            // a deposed owner's batch whose head was refused. Nobody was shown them
            // and their senders were told "failed". The contiguous ones are adopted:
            // the head moves past them, their idempotency keys are written (a resend
            // is then acked at the stored position, not stored twice), and they are
            // shown to the members now. Adoption stops at a send already stored
            // within the head (a deposed owner's leftover, whose sender's resend was
            // stored already): this node writes over those with newer rows.
            if let Some(b) = last
                && let Some(newest) = self
                    .store
                    .read_bucket(id, b.bucket, b.first_seq, Seq::MAX, Order::Descending, 1)
                    .map_err(internal)?
                    .pop()
                && newest.seq > rec.last_seq
            {
                let head = rec.last_seq;
                let (mut repair, mut adopted) = (Vec::new(), Vec::new());
                let mut after = head;
                'scan: while after < newest.seq {
                    let page = storage::page(&*self.store, id, storage::Anchor::After(after), 100)
                        .map_err(internal)?;
                    for m in page.messages {
                        if m.seq != after + 1 {
                            break 'scan;
                        }
                        if m.kind == MessageKind::Text && !m.client_msg_id.is_empty() {
                            let stored = match self
                                .store
                                .idempotent_seq(id, m.sender_id, &m.client_msg_id)
                                .map_err(internal)?
                            {
                                Some(s) if s != m.seq && s <= head => {
                                    storage::message_at(&*self.store, id, s).map_err(internal)?.is_some_and(
                                        |o| o.sender_id == m.sender_id && o.client_msg_id == m.client_msg_id,
                                    )
                                }
                                _ => false,
                            };
                            if stored {
                                break 'scan;
                            }
                            repair.push(Mutation::PutIdempotency {
                                conversation: id,
                                sender: m.sender_id,
                                client_msg_id: m.client_msg_id.clone(),
                                seq: m.seq,
                            });
                        }
                        after = m.seq;
                        rec.last_ts_ms = rec.last_ts_ms.max(m.ts_ms);
                        adopted.push(m);
                    }
                    if !page.has_more {
                        break;
                    }
                }
                if after > head {
                    tracing::warn!(
                        conversation = id,
                        head,
                        adopted = after - head,
                        "head behind stored history; adopting"
                    );
                    rec.last_seq = after;
                    repair.push(Mutation::PutConversation(rec.clone()));
                    repair.push(Mutation::Fence { conversation: id, epoch });
                    self.store.commit_lane(self.part, &repair).map_err(|e| {
                        if e.kind == storage::ErrorKind::Fenced {
                            ErrorCode::Unavailable
                        } else {
                            internal(e)
                        }
                    })?;
                    let recipients: Arc<[UserId]> = members.keys().copied().collect();
                    self.adopted.extend(adopted.into_iter().map(|message| {
                        Effect(
                            Event::new(EventKind::Message { message, origin: None, to_others: true }),
                            recipients.clone(),
                        )
                    }));
                }
            }
            // Taken over shortly after a node left the ring: that node may have
            // committed its last batches and died before sending their events to
            // other nodes. The recent tail is shown again to every member (devices
            // dedupe by position), so nobody is left without what was stored. A
            // takeover command names how far back; otherwise the window does.
            let window_start = now_ms().saturating_sub(TAKEOVER_WINDOW.as_millis() as u64);
            let since = self.reshow_since.or_else(|| {
                (self.router.in_fleet() && self.router.departed_within(TAKEOVER_WINDOW))
                    .then_some(window_start)
            });
            if let Some(since) = since
                && rec.last_ts_ms >= since
                && rec.last_seq > 0
            {
                let page =
                    storage::page(&*self.store, id, storage::Anchor::Before(rec.last_seq + 1), TAIL_MAX)
                        .map_err(internal)?;
                let recipients: Arc<[UserId]> = members.keys().copied().collect();
                let mut tail: Vec<Message> = page.messages.into_iter().filter(|m| m.ts_ms >= since).collect();
                tail.reverse();
                self.adopted.extend(tail.into_iter().map(|message| {
                    Effect(
                        Event::new(EventKind::Message { message, origin: None, to_others: true }),
                        recipients.clone(),
                    )
                }));
            }
            let bucket = last.map(|b| b.bucket);
            let positions = self.store.all_positions(id).map_err(internal)?.into_iter().collect();
            let mut st = ConvState {
                rec,
                members,
                recipients: Arc::from([]),
                bucket,
                positions,
                mutes: HashMap::new(),
                epoch,
                claimed: Instant::now(),
            };
            st.set_members();
            self.convs.insert(id, st);
        }
        Ok(self.convs.get_mut(&id).expect("just inserted"))
    }

    /// The conversation, if `user` is a member of it.
    fn member(&mut self, id: ConversationId, user: UserId) -> Result<&mut ConvState, Fail> {
        let st = self.load(id)?;
        if st.members.contains_key(&user) { Ok(st) } else { Err(ErrorCode::NotMember) }
    }

    /// Appends a message at the conversation's next position.
    #[allow(clippy::too_many_arguments)]
    fn append(
        st: &mut ConvState,
        batch: &mut Batch,
        sender: UserId,
        kind: MessageKind,
        body: String,
        client_msg_id: String,
        about: About,
        attachment: Option<Box<protocol::Attachment>>,
    ) -> Message {
        let ts = now_ms().max(st.rec.last_ts_ms);
        let seq = st.rec.last_seq + 1;
        let b = bucket_of(ts);
        if st.bucket != Some(b) {
            batch.muts.push(Mutation::PutBucket {
                conversation: st.rec.id,
                bucket: BucketRef { bucket: b, first_seq: seq },
            });
            st.bucket = Some(b);
        }
        st.rec.last_seq = seq;
        st.rec.last_ts_ms = ts;
        batch.touched.insert(st.rec.id);
        let m = Message {
            conversation_id: st.rec.id,
            seq,
            ts_ms: ts,
            sender_id: sender,
            client_msg_id,
            kind,
            body,
            target_user_id: if let About::Member(u, _) = about { Some(u) } else { None },
            role: if let About::Member(_, r) = about { r } else { None },
            target_seq: if let About::Message(s) = about { Some(s) } else { None },
            edited_ms: None,
            reactions: Vec::new(),
            my_reaction: None,
            attachment,
        };
        batch.muts.push(Mutation::PutMessage(m.clone()));
        m
    }

    fn event(batch: &mut Batch, m: Message, recipients: Arc<[UserId]>) {
        batch.effects.push(Effect(
            Event::new(EventKind::Message { message: m, origin: None, to_others: true }),
            recipients,
        ));
    }

    /// Appends a membership event about `target` (no body, no client id).
    fn membership(
        st: &mut ConvState,
        batch: &mut Batch,
        actor: UserId,
        kind: MessageKind,
        target: UserId,
        role: Option<Role>,
    ) -> Message {
        Self::append(st, batch, actor, kind, String::new(), String::new(), About::Member(target, role), None)
    }

    /// Removes `user` and tells everyone who was a member, `user` included.
    fn remove(st: &mut ConvState, batch: &mut Batch, actor: UserId, user: UserId, kind: MessageKind) {
        let before = st.recipients.clone();
        st.members.remove(&user);
        st.set_members();
        batch.muts.push(Mutation::RemoveMember { conversation: st.rec.id, user });
        let m = Self::membership(st, batch, actor, kind, user, None);
        Self::event(batch, m, before);
    }

    fn apply(&mut self, cmd: Command, batch: &mut Batch) {
        let Some(cmd) = self.owned(cmd, batch) else { return };
        let (origin, actor) = (cmd.origin(), cmd.actor());
        // Typing and marks are answered only when refused.
        let settles = !matches!(cmd, Command::Typing { .. } | Command::Mark { .. });
        let result = match cmd {
            Command::Send(cmd) => {
                let (conversation, sender) = (cmd.conversation, cmd.sender);
                let client_msg_id = cmd.client_msg_id.clone();
                if let Err(code) = self.send(cmd, batch) {
                    batch.effects.push(Effect(
                        Event::new(EventKind::SendFailed {
                            origin: origin.conn,
                            conversation_id: conversation,
                            client_msg_id,
                            code,
                        }),
                        Arc::from([sender]),
                    ));
                }
                return;
            }
            Command::Takeover { conversation, since_ms, .. } => {
                // Loaded already: a command since the death loaded it and showed the tail.
                if !self.convs.contains_key(&conversation) {
                    self.reshow_since = Some(since_ms);
                    if let Err(code) = self.load(conversation) {
                        tracing::warn!(conversation, ?code, "taking a dead node's conversation over failed");
                    }
                    self.reshow_since = None;
                }
                return;
            }
            Command::Typing { conversation, user, typing, .. } => match self.member(conversation, user) {
                Ok(st) => {
                    batch.effects.push(Effect(
                        Event::new(EventKind::Typing { conversation_id: conversation, user, typing }),
                        st.recipients.clone(),
                    ));
                    return;
                }
                Err(code) => Err(code),
            },
            Command::Mute { actor, conversation, muted, .. } => self.member(conversation, actor).map(|st| {
                // Read again after the commit: right whether or not the commit succeeds.
                st.mutes.remove(&actor);
                batch.muts.push(Mutation::SetMuted { conversation, user: actor, muted });
                Answer::Ok
            }),
            Command::React { actor, conversation, seq, emoji, .. } => {
                self.react(actor, conversation, seq, emoji, batch).map(|()| Answer::Ok)
            }
            Command::Edit { actor, conversation, seq, body, .. } => {
                self.change(actor, conversation, seq, Some(body), batch).map(|()| Answer::Ok)
            }
            Command::Delete { actor, conversation, seq, .. } => {
                self.change(actor, conversation, seq, None, batch).map(|()| Answer::Ok)
            }
            Command::Mark { conversation, user, seq, read, .. } => match self.member(conversation, user) {
                Ok(st) if seq > st.rec.last_seq => Err(ErrorCode::BadCursor),
                Ok(st) => {
                    if let Some(p) = st.advance(batch, user, seq, read) {
                        batch.effects.push(Effect(
                            Event::new(EventKind::Receipt {
                                conversation_id: conversation,
                                user,
                                positions: p,
                            }),
                            st.recipients.clone(),
                        ));
                    }
                    return;
                }
                Err(code) => Err(code),
            },
            Command::CreateDirect { user, peer, .. } => {
                self.create_direct(user, peer, batch).map(Answer::Conversation)
            }
            Command::CreateGroup { id, owner, title, members, .. } => {
                self.create_group(id, owner, title, members, batch).map(Answer::Conversation)
            }
            Command::AddMembers { actor, conversation, users, .. } => {
                self.add_members(actor, conversation, users, batch).map(Answer::Conversation)
            }
            Command::RemoveMember { actor, conversation, user, .. } => if actor == user {
                self.leave(actor, conversation, batch).and_then(|()| Ok(self.load(conversation)?.snapshot()))
            } else {
                self.remove_member(actor, conversation, user, batch)
            }
            .map(Answer::Conversation),
            Command::Leave { actor, conversation, .. } => {
                self.leave(actor, conversation, batch).map(|()| Answer::Ok)
            }
            Command::SetRole { actor, conversation, user, role, .. } => {
                self.set_role(actor, conversation, user, role, batch).map(Answer::Conversation)
            }
        };
        batch
            .effects
            .push(Effect(Event::new(EventKind::Reply { origin, result, settles }), Arc::from([actor])));
    }

    /// Edits (`Some(body)`) or deletes (`None`) message `seq`: rewrites the stored
    /// message (new body, or a tombstone without one) and appends an `edit` or
    /// `delete` event in the conversation's order.
    fn change(
        &mut self,
        actor: UserId,
        conversation: ConversationId,
        seq: Seq,
        edit: Option<String>,
        batch: &mut Batch,
    ) -> Result<(), Fail> {
        self.member(conversation, actor)?;
        let original = self.text_message(conversation, seq, batch)?;
        let st = self.convs.get_mut(&conversation).expect("loaded");
        let role = st.members[&actor];
        let moderator = st.rec.kind == ConversationKind::Group && role != Role::Member;
        if original.sender_id != actor && !(edit.is_none() && moderator) {
            return Err(ErrorCode::Forbidden);
        }
        let (updated, kind, body) = match edit {
            Some(body) => {
                let edited_ms = Some(now_ms().max(original.ts_ms));
                (Message { body: body.clone(), edited_ms, ..original }, MessageKind::Edit, body)
            }
            None => {
                if let Some(a) = &original.attachment {
                    batch.unlinked.push(a.attachment_id.clone());
                }
                let tombstone = Message {
                    kind: MessageKind::Deleted,
                    body: String::new(),
                    edited_ms: None,
                    attachment: None,
                    ..original
                };
                (tombstone, MessageKind::Delete, String::new())
            }
        };
        batch.muts.push(Mutation::PutMessage(updated));
        let m = Self::append(st, batch, actor, kind, body, String::new(), About::Message(seq), None);
        Self::event(batch, m, st.recipients.clone());
        Ok(())
    }

    /// The newest version of text message `seq` (this batch's own write if it has
    /// one, else the store's): `NotFound` if absent or deleted, `InvalidField` if
    /// it is not a text message.
    fn text_message(
        &mut self,
        conversation: ConversationId,
        seq: Seq,
        batch: &Batch,
    ) -> Result<Message, Fail> {
        let last = self.load(conversation)?.rec.last_seq;
        if seq == 0 || seq > last {
            return Err(ErrorCode::NotFound);
        }
        let pending = batch.muts.iter().rev().find_map(|m| match m {
            Mutation::PutMessage(m) if m.conversation_id == conversation && m.seq == seq => Some(m.clone()),
            _ => None,
        });
        let m = match pending {
            Some(m) => m,
            None => storage::message_at(&*self.store, conversation, seq)
                .map_err(internal)?
                .ok_or(ErrorCode::NotFound)?,
        };
        match m.kind {
            MessageKind::Text => Ok(m),
            MessageKind::Deleted => Err(ErrorCode::NotFound),
            _ => Err(ErrorCode::InvalidField),
        }
    }

    /// Sets or removes `actor`'s reaction to text message `seq` and tells every
    /// member the message's new totals. Setting what is already set changes nothing.
    fn react(
        &mut self,
        actor: UserId,
        conversation: ConversationId,
        seq: Seq,
        emoji: String,
        batch: &mut Batch,
    ) -> Result<(), Fail> {
        self.member(conversation, actor)?;
        self.text_message(conversation, seq, batch)?;
        let key = (conversation, seq);
        let current = match batch.reactions.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stored = self.store.reactions(conversation, seq, seq).map_err(internal)?;
                e.insert(stored.into_iter().map(|(_, u, e)| (u, e)).collect())
            }
        };
        let changed = if emoji.is_empty() {
            current.remove(&actor).is_some()
        } else {
            current.insert(actor, emoji.clone()).as_ref() != Some(&emoji)
        };
        if !changed {
            return Ok(());
        }
        let reactions = storage::reaction_counts(current.values().map(String::as_str));
        batch.muts.push(Mutation::PutReaction { conversation, seq, user: actor, emoji: emoji.clone() });
        let recipients = self.convs[&conversation].recipients.clone();
        batch.effects.push(Effect(
            Event::new(EventKind::Reaction {
                conversation_id: conversation,
                seq,
                user: actor,
                emoji,
                reactions,
            }),
            recipients,
        ));
        Ok(())
    }

    fn send(&mut self, cmd: SendCmd, batch: &mut Batch) -> Result<(), Fail> {
        let SendCmd { conversation, sender, client_msg_id, body, attachment, origin, submitted } = cmd;
        let origin = origin.conn;
        let store = self.store.clone();
        let st = self.member(conversation, sender)?;
        let key = (conversation, sender, client_msg_id);
        let head = st.rec.last_seq;
        let earlier = match batch.idem.get(&key) {
            Some(m) => Some(m.clone()),
            // A key counts only if its position is in the order and holds this very
            // send: a deposed owner's fenced, refused batch may have left keys that
            // name positions the new owner filled with other messages.
            None => match store.idempotent_seq(conversation, sender, &key.2).map_err(internal)? {
                Some(seq) if seq <= head => storage::message_at(&*store, conversation, seq)
                    .map_err(internal)?
                    .filter(|m| m.sender_id == sender && m.client_msg_id == key.2),
                _ => None,
            },
        };
        if let Some(message) = earlier {
            // A resend: ack the stored message again, deliver nothing new.
            batch.effects.push(Effect(
                Event::new(EventKind::Message { message, origin: Some(origin), to_others: false }),
                Arc::from([sender]),
            ));
            return Ok(());
        }
        let m = Self::append(
            st,
            batch,
            sender,
            MessageKind::Text,
            body,
            key.2.clone(),
            About::Nothing,
            attachment,
        );
        // Your own messages are read: they never count as unread for you.
        st.advance(batch, sender, m.seq, true);
        batch.muts.push(Mutation::PutIdempotency {
            conversation,
            sender,
            client_msg_id: key.2.clone(),
            seq: m.seq,
        });
        let recipients = st.recipients.clone();
        batch.idem.insert(key, m.clone());
        batch.effects.push(Effect(
            Event::submitted_at(
                EventKind::Message { message: m, origin: Some(origin), to_others: true },
                submitted,
            ),
            recipients,
        ));
        Ok(())
    }

    fn user_exists(&self, u: UserId) -> Result<bool, Fail> {
        Ok(self.store.user(u).map_err(internal)?.is_some())
    }

    fn new_conv(
        &mut self,
        batch: &mut Batch,
        id: ConversationId,
        kind: ConversationKind,
        title: String,
        by: UserId,
        members: BTreeMap<UserId, Role>,
    ) -> ConversationId {
        let now = now_ms();
        let mut st = ConvState {
            rec: ConversationRecord {
                id,
                kind,
                title,
                created_ms: now,
                created_by: by,
                last_seq: 0,
                last_ts_ms: now,
            },
            members,
            recipients: Arc::from([]),
            bucket: None,
            positions: HashMap::new(),
            mutes: HashMap::new(),
            epoch: 0,
            claimed: Instant::now(),
        };
        batch.created.insert(id);
        st.set_members();
        self.convs.insert(id, st);
        id
    }

    fn create_direct(&mut self, user: UserId, peer: UserId, batch: &mut Batch) -> Result<Conversation, Fail> {
        if user == peer {
            return Err(ErrorCode::InvalidField);
        }
        let key = pair(user, peer);
        let existing = match batch.directs.get(&key) {
            Some(id) => Some(*id),
            None => self.store.direct(user, peer).map_err(internal)?,
        };
        if let Some(id) = existing {
            // Ordered elsewhere (another partition or node, by its id): read, not
            // loaded, since loading claims it and would fence its writer's next commit.
            if !self.mine(id) && !batch.created.contains(&id) {
                return self.read_snapshot(id);
            }
            return Ok(self.load(id)?.snapshot());
        }
        if !self.user_exists(peer)? {
            return Err(ErrorCode::NotFound);
        }
        let members = BTreeMap::from([(user, Role::Member), (peer, Role::Member)]);
        let id =
            self.new_conv(batch, self.ids.next(), ConversationKind::Direct, String::new(), user, members);
        for u in [user, peer] {
            batch.muts.push(Mutation::PutMember { conversation: id, user: u, role: Role::Member });
        }
        batch.muts.push(Mutation::PutDirect { a: user, b: peer, conversation: id });
        batch.directs.insert(key, id);
        batch.touched.insert(id);
        Ok(self.convs[&id].snapshot())
    }

    /// A conversation as stored, for one this partition does not order.
    fn read_snapshot(&self, id: ConversationId) -> Result<Conversation, Fail> {
        let rec = self.store.conversation(id).map_err(internal)?.ok_or(ErrorCode::NotFound)?;
        let members = self.store.members(id).map_err(internal)?;
        Ok(view(&rec, members.into_iter()))
    }

    fn create_group(
        &mut self,
        id: ConversationId,
        owner: UserId,
        title: String,
        members: Vec<UserId>,
        batch: &mut Batch,
    ) -> Result<Conversation, Fail> {
        let title = title.trim().to_owned();
        if title.is_empty() || title.chars().count() > 128 {
            return Err(ErrorCode::InvalidField);
        }
        let mut all = BTreeMap::from([(owner, Role::Owner)]);
        for u in members {
            if u != owner {
                all.insert(u, Role::Member);
            }
        }
        if all.len() > self.member_cap {
            return Err(ErrorCode::MemberCap);
        }
        for &u in all.keys() {
            if u != owner && !self.user_exists(u)? {
                return Err(ErrorCode::InvalidField);
            }
        }
        // A reused id (a resent or forged command) must not overwrite a conversation.
        if self.convs.contains_key(&id) || self.store.conversation(id).map_err(internal)?.is_some() {
            return Err(ErrorCode::InvalidField);
        }
        let id = self.new_conv(batch, id, ConversationKind::Group, title.clone(), owner, all.clone());
        for (&u, &role) in &all {
            batch.muts.push(Mutation::PutMember { conversation: id, user: u, role });
        }
        let st = self.convs.get_mut(&id).expect("just created");
        let m = Self::append(
            st,
            batch,
            owner,
            MessageKind::GroupCreated,
            title,
            String::new(),
            About::Nothing,
            None,
        );
        let (recipients, snap) = (st.recipients.clone(), st.snapshot());
        Self::event(batch, m, recipients);
        Ok(snap)
    }

    /// The actor's role, or why it cannot manage this group.
    fn manager(st: &ConvState, actor: UserId) -> Result<Role, Fail> {
        if st.rec.kind != ConversationKind::Group {
            return Err(ErrorCode::Forbidden);
        }
        match st.members.get(&actor) {
            None => Err(ErrorCode::NotMember),
            Some(r) if r.can_manage() => Ok(*r),
            Some(_) => Err(ErrorCode::Forbidden),
        }
    }

    fn add_members(
        &mut self,
        actor: UserId,
        conversation: ConversationId,
        users: Vec<UserId>,
        batch: &mut Batch,
    ) -> Result<Conversation, Fail> {
        let cap = self.member_cap;
        let st = self.load(conversation)?;
        Self::manager(st, actor)?;
        let mut new: Vec<UserId> = users.into_iter().filter(|u| !st.members.contains_key(u)).collect();
        new.sort_unstable();
        new.dedup();
        if st.members.len() + new.len() > cap {
            return Err(ErrorCode::MemberCap);
        }
        for &u in &new {
            if !self.user_exists(u)? {
                return Err(ErrorCode::InvalidField);
            }
        }
        let st = self.convs.get_mut(&conversation).expect("loaded");
        for u in new {
            st.members.insert(u, Role::Member);
            st.set_members();
            batch.muts.push(Mutation::PutMember { conversation, user: u, role: Role::Member });
            let m = Self::membership(st, batch, actor, MessageKind::MemberAdded, u, None);
            Self::event(batch, m, st.recipients.clone());
        }
        Ok(st.snapshot())
    }

    fn remove_member(
        &mut self,
        actor: UserId,
        conversation: ConversationId,
        user: UserId,
        batch: &mut Batch,
    ) -> Result<Conversation, Fail> {
        let st = self.load(conversation)?;
        let actor_role = Self::manager(st, actor)?;
        let target_role = *st.members.get(&user).ok_or(ErrorCode::InvalidField)?;
        // Owners remove anyone; admins remove plain members only.
        if target_role == Role::Owner || (actor_role == Role::Admin && target_role != Role::Member) {
            return Err(ErrorCode::Forbidden);
        }
        Self::remove(st, batch, actor, user, MessageKind::MemberRemoved);
        Ok(st.snapshot())
    }

    fn leave(&mut self, actor: UserId, conversation: ConversationId, batch: &mut Batch) -> Result<(), Fail> {
        let st = self.load(conversation)?;
        if st.rec.kind != ConversationKind::Group {
            return Err(ErrorCode::Forbidden);
        }
        let role = *st.members.get(&actor).ok_or(ErrorCode::NotMember)?;
        Self::remove(st, batch, actor, actor, MessageKind::MemberLeft);
        if role == Role::Owner {
            // Ownership passes to the longest-standing admin, else member (lowest id: ids are time-ordered).
            let heir = st
                .members
                .iter()
                .find(|(_, r)| **r == Role::Admin)
                .or_else(|| st.members.iter().next())
                .map(|(u, _)| *u);
            if let Some(heir) = heir {
                st.members.insert(heir, Role::Owner);
                batch.muts.push(Mutation::PutMember { conversation, user: heir, role: Role::Owner });
                let m = Self::membership(st, batch, actor, MessageKind::RoleChanged, heir, Some(Role::Owner));
                Self::event(batch, m, st.recipients.clone());
            }
        }
        Ok(())
    }

    fn set_role(
        &mut self,
        actor: UserId,
        conversation: ConversationId,
        user: UserId,
        role: Role,
        batch: &mut Batch,
    ) -> Result<Conversation, Fail> {
        let st = self.load(conversation)?;
        if Self::manager(st, actor)? != Role::Owner {
            return Err(ErrorCode::Forbidden);
        }
        if user == actor || !st.members.contains_key(&user) {
            return Err(ErrorCode::InvalidField);
        }
        let mut changes = vec![(user, role)];
        if role == Role::Owner {
            changes.push((actor, Role::Admin));
        }
        for (u, r) in changes {
            st.members.insert(u, r);
            batch.muts.push(Mutation::PutMember { conversation, user: u, role: r });
            let m = Self::membership(st, batch, actor, MessageKind::RoleChanged, u, Some(r));
            Self::event(batch, m, st.recipients.clone());
        }
        Ok(st.snapshot())
    }

    /// Whether `user` muted `conversation` (cached with the conversation).
    fn muted(&mut self, conversation: ConversationId, user: UserId) -> bool {
        let store = self.store.clone();
        let Some(st) = self.convs.get_mut(&conversation) else { return false };
        *st.mutes.entry(user).or_insert_with(|| {
            store.muted(conversation, user).unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading a mute failed; treating as not muted");
                false
            })
        })
    }

    /// Commits the batch durably, then delivers its effects in order.
    fn finish(&mut self, mut batch: Batch) {
        for id in &batch.touched {
            if let Some(st) = self.convs.get(id) {
                batch.muts.push(Mutation::PutConversation(st.rec.clone()));
            }
        }
        for &(conversation, user) in &batch.positions {
            if let Some(&positions) = self.convs.get(&conversation).and_then(|st| st.positions.get(&user)) {
                batch.muts.push(Mutation::PutPositions { conversation, user, positions });
            }
        }
        // Every conversation the batch writes is fenced with this node's epoch: if
        // another node claimed it meanwhile, nothing of the batch lands.
        let written: std::collections::BTreeSet<ConversationId> =
            batch.touched.iter().copied().chain(batch.positions.iter().map(|(c, _)| *c)).collect();
        for conversation in written.into_iter().filter(|c| !batch.created.contains(c)) {
            if let Some(st) = self.convs.get(&conversation) {
                batch.muts.push(Mutation::Fence { conversation, epoch: st.epoch });
            }
        }
        let started = Instant::now();
        // What a refused batch's commands are answered with.
        let mut failure = ErrorCode::Internal;
        let committed = match self.store.commit_lane(self.part, &batch.muts) {
            Ok(()) => {
                self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                true
            }
            Err(e) if e.kind == storage::ErrorKind::Fenced => {
                // Another node owns a conversation of this batch now: it is refused
                // retryably; the retry is routed to the new owner.
                self.metrics.errors.with_label_values(&["commit_fenced"]).inc();
                tracing::warn!(error = %e, "commit fenced: another node took a conversation over");
                failure = ErrorCode::Unavailable;
                for id in batch.touched.iter().chain(batch.positions.iter().map(|(c, _)| c)) {
                    self.convs.remove(id);
                }
                false
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&["commit_failed"]).inc();
                tracing::error!(error = ?e, writes = batch.muts.len(), "commit failed; the batch is refused");
                // The cache holds this batch's uncommitted changes: forget them.
                for id in batch.touched.iter().chain(batch.positions.iter().map(|(c, _)| c)) {
                    self.convs.remove(id);
                }
                false
            }
        };
        if committed {
            // Conversations created here and ordered here are claimed like loaded
            // ones, before anything in them is acknowledged: the claim names this
            // node, so if it dies they are found and their tails shown again.
            let me = self.router.me();
            let ours: Vec<ConversationId> =
                batch.created.iter().copied().filter(|&id| self.mine(id)).collect();
            for id in ours {
                match self.store.claim(id, me) {
                    Ok(epoch) => {
                        if let Some(st) = self.convs.get_mut(&id) {
                            st.epoch = epoch;
                        }
                    }
                    Err(e) => tracing::warn!(
                        conversation = id,
                        error = %e,
                        "claiming a new conversation failed; it is not shown again if this node dies"
                    ),
                }
            }
        }
        if committed && !batch.unlinked.is_empty() {
            self.attachments.unlinked(std::mem::take(&mut batch.unlinked));
        }
        // Counted before anyone is shown them (a client that saw one finds it counted).
        let stored = |e: &Effect| u64::from(matches!(e.0.kind, EventKind::Message { to_others: true, .. }));
        let messages: u64 = self.adopted.iter().map(stored).sum::<u64>()
            + if committed { batch.effects.iter().map(stored).sum() } else { 0 };
        self.metrics.messages_stored.inc_by(messages);
        let registry = self.registry.clone();
        let mut delivery = registry.delivery();
        let fleet = self.router.in_fleet();
        let mut remote = Vec::new();
        let adopted = std::mem::take(&mut self.adopted);
        let effects =
            adopted.into_iter().map(|e| (e, true)).chain(batch.effects.into_iter().map(|e| (e, false)));
        for (Effect(ev, recipients), stored) in effects {
            // Each effect's recipients were chosen when it was built; a failed commit
            // turns new messages into errors for their sender and successes into errors.
            let (ev, recipients) = if committed || stored {
                (ev, recipients)
            } else {
                match &ev.kind {
                    // Every ack of the batch becomes a failure, a resend's too: its message
                    // may be one this batch appended (a send and its resend in one batch).
                    EventKind::Message { message, origin: Some(origin), .. } => (
                        Event::new(EventKind::SendFailed {
                            origin: *origin,
                            conversation_id: message.conversation_id,
                            client_msg_id: message.client_msg_id.clone(),
                            code: failure,
                        }),
                        Arc::from([message.sender_id]),
                    ),
                    EventKind::Reply { origin, result: Ok(_), settles } => (
                        Event::new(EventKind::Reply {
                            origin: *origin,
                            result: Err(failure),
                            settles: *settles,
                        }),
                        recipients,
                    ),
                    // Not stored, so not true: never shown.
                    EventKind::Message { to_others: true, .. }
                    | EventKind::Receipt { .. }
                    | EventKind::Reaction { .. } => continue,
                    _ => (ev, recipients),
                }
            };
            let pushable = match &ev.kind {
                EventKind::Message { message, to_others: true, .. }
                    if committed && message.kind == MessageKind::Text =>
                {
                    Some(message)
                }
                _ => None,
            };
            let mut push = Vec::new();
            for &u in recipients.iter() {
                let reached = delivery.deliver(u, &ev);
                if let Some(m) = pushable
                    && reached == 0
                    && u != m.sender_id
                    && !self.muted(m.conversation_id, u)
                {
                    push.push(u);
                }
            }
            if fleet {
                // Pushed by fleet-out if no other node holds a device of theirs either.
                remote.push(crate::fleet::Fanned { event: ev, to: recipients, push });
            } else if let Some(m) = pushable {
                for u in push {
                    self.push.submit(u, m);
                }
            }
        }
        // Wakes the shards before the fleet's round trip starts.
        drop(delivery);
        self.router.fanout(remote);
        // A direct conversation created here (its pair's partition) may be ordered by
        // another partition or node by its id: keep only what this partition orders.
        for id in &batch.created {
            if !self.mine(*id) {
                self.convs.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fill_batch;
    use std::time::{Duration, Instant};

    #[test]
    fn without_a_window_a_batch_is_what_queued_during_the_last_commit() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 1..=3 {
            tx.send(i).unwrap();
        }
        let mut batch = vec![0];
        fill_batch(&rx, &mut batch, 10, None);
        assert_eq!(batch, [0, 1, 2, 3]);
        // Nothing queued: it returns at once instead of waiting for the next command.
        let mut batch = vec![4];
        fill_batch(&rx, &mut batch, 10, None);
        assert_eq!(batch, [4]);
    }

    #[test]
    fn a_window_gathers_later_commands_and_ends_at_the_batch_limit() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sender = std::thread::spawn(move || {
            for i in 1..=5 {
                tx.send(i).unwrap();
            }
            tx
        });
        let mut batch = vec![0];
        // A far deadline: only the limit can end this batch.
        fill_batch(&rx, &mut batch, 4, Some(Instant::now() + Duration::from_secs(600)));
        assert_eq!(batch, [0, 1, 2, 3]);
        let _tx = sender.join().unwrap();
        // What the limit left out opens the next batch, in order.
        assert_eq!(rx.try_recv(), Ok(4));
    }

    #[test]
    fn a_closed_window_still_takes_what_is_queued() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let mut batch = vec![0];
        fill_batch(&rx, &mut batch, 10, Some(Instant::now()));
        assert_eq!(batch, [0, 1, 2]);
    }
}
