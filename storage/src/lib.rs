//! Switchboard's history and chat state, behind one trait.
//!
//! - [`Store`]: the backend trait. Blocking calls, run on storage threads, never on
//!   a gateway shard. Writes arrive as one [`Mutation`] batch per group commit
//!   and are durable when [`Store::commit`] returns.
//! - [`FjallStore`]: the embedded single-node backend.
//! - [`PostgresStore`]: PostgreSQL, for small fleets (schema in `migrations/postgres/`).
//! - [`CassandraStore`]: Apache Cassandra or ScyllaDB, for large fleets (schema in
//!   `deploy/cassandra/schema.cql`).
//! - [`page`]: history paging over time buckets, shared by every backend.
//! - [`StorageError`]: kind, retryability and context.
//!
//! ## The data model is Cassandra's
//! Messages are partitioned by `(conversation, time bucket)` and clustered by
//! position; a small per-conversation bucket index says which buckets exist and
//! where each starts. A history page reads one partition (two when it crosses a
//! bucket boundary). The embedded store keeps the same keys so that every backend
//! behaves the same and one conformance suite ([`conformance`]) checks them all.
//! docs/design/why-time-buckets.md gives the bucket size and its reasoning.
//!
//! ## Why positions are assigned above the store
//! The gateway's sequencer (one per conversation owner) assigns positions and
//! hands the store finished rows. Cassandra has no cheap atomic counter, and a
//! single writer per conversation is what makes positions gap-free and ordered.

mod cassandra_store;
mod codec;
pub mod conformance;
mod fjall_store;
mod postgres_store;
mod rows;
mod seal;
#[cfg(feature = "testkit")]
pub mod testkit;
mod wal;

pub use cassandra_store::{
    CassandraOptions, CassandraStore, REACTION_BLOCK, SCHEMA as CASSANDRA_SCHEMA,
    SCHEMA_VERSION as CASSANDRA_SCHEMA_VERSION, keyspace_cql, parse_consistency, reaction_block,
    schema_statements,
};
pub use fjall_store::FjallStore;
pub use postgres_store::{MIGRATIONS as POSTGRES_MIGRATIONS, PostgresOptions, PostgresStore};
pub use protocol::{ConversationId, ConversationKind, Message, MessageKind, Role, Seq, UserId};

use serde::{Deserialize, Serialize};

/// Width of a message time bucket: one day. See docs/design/why-time-buckets.md.
pub const BUCKET_MS: u64 = 86_400_000;

/// The bucket a message with server timestamp `ts_ms` belongs to.
pub fn bucket_of(ts_ms: u64) -> u32 {
    u32::try_from(ts_ms / BUCKET_MS).unwrap_or(u32::MAX)
}

/// Largest page a history read returns.
pub const MAX_PAGE: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub id: UserId,
    /// As registered; uniqueness is on the lowercase form.
    pub username: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub kind: ConversationKind,
    pub title: String,
    pub created_ms: u64,
    pub created_by: UserId,
    /// Position of the newest message (0: none yet).
    pub last_seq: Seq,
    pub last_ts_ms: u64,
}

/// Where a bucket of a conversation starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRef {
    pub bucket: u32,
    pub first_seq: Seq,
}

/// How far one member has got in one conversation. Both only move forward, and
/// `read <= delivered` is kept by the writer (reading implies having received).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Positions {
    /// Highest position any of the member's devices has received.
    pub delivered: Seq,
    /// Highest position the member has seen.
    pub read: Seq,
}

/// One write. A batch of them is applied atomically and durably by [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    PutMessage(Message),
    /// Marks `(conversation, sender, client_msg_id)` as stored at `seq`.
    PutIdempotency {
        conversation: ConversationId,
        sender: UserId,
        client_msg_id: String,
        seq: Seq,
    },
    PutBucket {
        conversation: ConversationId,
        bucket: BucketRef,
    },
    PutConversation(ConversationRecord),
    PutMember {
        conversation: ConversationId,
        user: UserId,
        role: Role,
    },
    RemoveMember {
        conversation: ConversationId,
        user: UserId,
    },
    PutDirect {
        a: UserId,
        b: UserId,
        conversation: ConversationId,
    },
    /// Mutes (or unmutes) a conversation for one member: no push notifications for it.
    SetMuted {
        conversation: ConversationId,
        user: UserId,
        muted: bool,
    },
    /// Sets a member's delivered and read positions (the sequencer keeps them monotonic).
    PutPositions {
        conversation: ConversationId,
        user: UserId,
        positions: Positions,
    },
    /// Sets `user`'s reaction to message `seq` (one per user and message); an empty
    /// `emoji` removes it.
    PutReaction {
        conversation: ConversationId,
        seq: Seq,
        user: UserId,
        emoji: String,
    },
    /// When `user`'s last device disconnected.
    PutLastSeen {
        user: UserId,
        ms: u64,
    },
    /// Whether `user` hides their last-seen time.
    SetHideLastSeen {
        user: UserId,
        hide: bool,
    },
    /// The commit applies only if the conversation's owner epoch is still `epoch`
    /// (the caller's, from [`Store::claim`]); else nothing of it is applied and it
    /// fails with [`ErrorKind::Fenced`]. A node that lost a conversation to
    /// another can thus write nothing more into it.
    Fence {
        conversation: ConversationId,
        epoch: u64,
    },
}

/// What is stored about a user's presence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceRecord {
    /// When the user's last device disconnected (absent: never seen).
    pub last_seen_ms: Option<u64>,
    /// The user hides `last_seen` from everyone.
    pub hide_last_seen: bool,
}

/// Read direction within a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend failed to read or write (disk, network). Retryable.
    Io,
    /// The backend did not answer in time. Retryable; the write may or may not have landed.
    Timeout,
    /// Stored bytes could not be decoded.
    Corrupt,
    /// `create_user` with a username that exists.
    UsernameTaken,
    /// The backend refused the request (schema mismatch, bad configuration). Not retryable.
    Rejected,
    /// The backend can write nothing more until the process restarts: the embedded
    /// store after a failed journal write or fsync (what reached the disk is unknown,
    /// so it refuses to guess). Not retryable; health checks fail and say so.
    Poisoned,
    /// A fenced commit's conversation was claimed by another owner since: nothing
    /// was applied. The caller no longer owns it (it must reload before writing).
    Fenced,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?} while {context}: {source}")]
pub struct StorageError {
    pub kind: ErrorKind,
    pub context: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StorageError {
    pub fn new(
        kind: ErrorKind,
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StorageError { kind, context, source: source.into() }
    }

    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Io | ErrorKind::Timeout)
    }
}

/// pingora-style context: `.or_err(ErrorKind::Io, "reading a bucket")`.
pub trait OrErr<T> {
    fn or_err(self, kind: ErrorKind, context: &'static str) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> OrErr<T> for std::result::Result<T, E> {
    fn or_err(self, kind: ErrorKind, context: &'static str) -> Result<T> {
        self.map_err(|e| StorageError::new(kind, context, e))
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A history backend. Every method blocks; callers run them on storage threads.
///
/// Runs on: storage threads (the sequencer thread for `commit`, reader threads for the rest).
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` atomically; durable (fsynced or replicated) when it returns `Ok`.
    fn commit(&self, batch: &[Mutation]) -> Result<()>;

    /// [`Store::commit`] from writer `lane` (a sequencer partition). Commits from
    /// different lanes may make themselves durable concurrently (the embedded
    /// store keeps a log per lane); one lane's commits are one caller's, in order.
    fn commit_lane(&self, lane: usize, batch: &[Mutation]) -> Result<()> {
        let _ = lane;
        self.commit(batch)
    }

    /// Makes the caller the conversation's owner: bumps its owner epoch and returns
    /// the new one (0 for a conversation that does not exist). Every commit fenced
    /// ([`Mutation::Fence`]) with an older epoch fails from then on, and a commit
    /// fenced with the old epoch that is under way either lands before this returns
    /// or not at all, so reads after it see everything the old owner wrote.
    ///
    /// Records `node` (the claiming gateway node) as the owner, listed by
    /// [`Store::claimed_by`] until another claim replaces it.
    fn claim(&self, conv: ConversationId, node: u16) -> Result<u64>;

    /// The conversations whose latest claim is `node`'s and whose last message is
    /// at or after `since_ms`: what a node that died may have acknowledged without
    /// telling every recipient. In no particular order.
    fn claimed_by(&self, node: u16, since_ms: u64) -> Result<Vec<ConversationId>>;

    /// Creates a user; fails with [`ErrorKind::UsernameTaken`] if the lowercase name exists.
    /// Durable when it returns.
    fn create_user(&self, user: &UserRecord) -> Result<()>;
    fn user(&self, id: UserId) -> Result<Option<UserRecord>>;
    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>>;

    fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRecord>>;
    fn members(&self, id: ConversationId) -> Result<Vec<(UserId, Role)>>;
    fn member_role(&self, id: ConversationId, user: UserId) -> Result<Option<Role>>;
    /// Every conversation `user` is a member of, in no particular order.
    fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationId>>;
    /// The direct conversation of the unordered pair `{a, b}`.
    fn direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>>;

    fn idempotent_seq(
        &self,
        conv: ConversationId,
        sender: UserId,
        client_msg_id: &str,
    ) -> Result<Option<Seq>>;

    /// Whether `user` muted the conversation.
    fn muted(&self, conv: ConversationId, user: UserId) -> Result<bool>;
    /// A member's positions in a conversation (zeros when none were stored).
    fn positions(&self, conv: ConversationId, user: UserId) -> Result<Positions>;
    /// Every stored member position of a conversation, by user id.
    fn all_positions(&self, conv: ConversationId) -> Result<Vec<(UserId, Positions)>>;

    /// Reactions to messages `lo..=hi` as `(seq, user, emoji)`, by seq then user.
    fn reactions(&self, conv: ConversationId, lo: Seq, hi: Seq) -> Result<Vec<(Seq, UserId, String)>>;
    /// A user's last-seen time and privacy setting.
    fn presence(&self, user: UserId) -> Result<PresenceRecord>;

    /// The conversation's buckets, oldest first.
    fn buckets(&self, conv: ConversationId) -> Result<Vec<BucketRef>>;
    /// Messages of one bucket with `lo <= seq <= hi`, in `order`, at most `limit`.
    fn read_bucket(
        &self,
        conv: ConversationId,
        bucket: u32,
        lo: Seq,
        hi: Seq,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Message>>;
}

/// Orders a pair for the direct-conversation key.
pub fn pair(a: UserId, b: UserId) -> (UserId, UserId) {
    if a <= b { (a, b) } else { (b, a) }
}

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The newest messages, newest first.
    Latest,
    /// Messages with `seq < n`, newest first.
    Before(Seq),
    /// Messages with `seq > n`, oldest first.
    After(Seq),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<Message>,
    /// Whether more messages lie beyond this page in its direction.
    pub has_more: bool,
}

/// Reads one page of history, walking bucket partitions as needed.
///
/// Cost: one read of the (small) bucket index plus one partition read per bucket
/// touched; a page of at most [`MAX_PAGE`] usually touches one bucket, two when it
/// crosses a boundary. Empty buckets are never visited because the index only
/// lists buckets that hold messages.
pub fn page(store: &dyn Store, conv: ConversationId, anchor: Anchor, limit: usize) -> Result<Page> {
    let limit = limit.clamp(1, MAX_PAGE);
    let buckets = store.buckets(conv)?;
    // Index of the bucket holding `seq` (the last one starting at or before it).
    let locate = |seq: Seq| buckets.partition_point(|b| b.first_seq <= seq).checked_sub(1);
    let want = limit + 1;
    let mut out = Vec::with_capacity(want);
    match anchor {
        Anchor::Latest | Anchor::Before(_) => {
            let hi = match anchor {
                Anchor::Before(0) | Anchor::Before(1) => {
                    return Ok(Page { messages: vec![], has_more: false });
                }
                Anchor::Before(n) => n - 1,
                _ => Seq::MAX,
            };
            let Some(mut i) = (if hi == Seq::MAX { buckets.len().checked_sub(1) } else { locate(hi) }) else {
                return Ok(Page { messages: vec![], has_more: false });
            };
            loop {
                let b = buckets[i];
                out.extend(store.read_bucket(
                    conv,
                    b.bucket,
                    b.first_seq,
                    hi,
                    Order::Descending,
                    want - out.len(),
                )?);
                if out.len() >= want || i == 0 {
                    break;
                }
                i -= 1;
            }
        }
        Anchor::After(n) => {
            let lo = n.saturating_add(1);
            let mut i = locate(lo).unwrap_or(0);
            while i < buckets.len() {
                let b = buckets[i];
                out.extend(store.read_bucket(
                    conv,
                    b.bucket,
                    lo,
                    Seq::MAX,
                    Order::Ascending,
                    want - out.len(),
                )?);
                if out.len() >= want {
                    break;
                }
                i += 1;
            }
        }
    }
    let has_more = out.len() > limit;
    out.truncate(limit);
    Ok(Page { messages: out, has_more })
}

/// A message's reaction totals, most used first (ties by emoji), from `(user, emoji)` pairs.
pub fn reaction_counts<'a>(of: impl IntoIterator<Item = &'a str>) -> Vec<protocol::ReactionCount> {
    let mut counts: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for e in of {
        *counts.entry(e).or_default() += 1;
    }
    let mut v: Vec<_> = counts
        .into_iter()
        .map(|(emoji, count)| protocol::ReactionCount { emoji: emoji.into(), count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.emoji.cmp(&b.emoji)));
    v
}

/// Fills in `reactions` and `viewer`'s `my_reaction` on `messages` (all of one
/// conversation). Cost: one range read over the messages' positions.
pub fn add_reactions(
    store: &dyn Store,
    conv: ConversationId,
    viewer: UserId,
    messages: &mut [Message],
) -> Result<()> {
    let (Some(lo), Some(hi)) = (messages.iter().map(|m| m.seq).min(), messages.iter().map(|m| m.seq).max())
    else {
        return Ok(());
    };
    let all = store.reactions(conv, lo, hi)?;
    if all.is_empty() {
        return Ok(());
    }
    for m in messages.iter_mut().filter(|m| m.kind == MessageKind::Text) {
        let start = all.partition_point(|r| r.0 < m.seq);
        let mine = all[start..].iter().take_while(|r| r.0 == m.seq);
        m.reactions = reaction_counts(mine.clone().map(|r| r.2.as_str()));
        m.my_reaction = mine.clone().find(|r| r.1 == viewer).map(|r| r.2.clone());
    }
    Ok(())
}

/// One page of `user`'s conversations by last activity, newest first (ties by id),
/// starting after `after` = `(last_ts_ms, id)` of the previous page's last item.
/// Each carries the user's read position, unread count, mute flag and the newest
/// message (with reactions). Returns the page and whether more follow.
///
/// Cost: one index read plus two point reads (head, positions) per conversation the
/// user is in, and two more (mute, newest message) per conversation listed.
pub fn conversation_list(
    store: &dyn Store,
    user: UserId,
    limit: usize,
    after: Option<(u64, ConversationId)>,
) -> Result<(Vec<protocol::ConversationSummary>, bool)> {
    let mut recs = Vec::new();
    for c in store.user_conversations(user)? {
        if let Some(r) = store.conversation(c)? {
            recs.push((r, store.positions(c, user)?.read));
        }
    }
    let key = |r: &(ConversationRecord, Seq)| (r.0.last_ts_ms, r.0.id);
    recs.sort_by_key(|r| std::cmp::Reverse(key(r)));
    let items: Vec<_> =
        recs.into_iter().filter(|r| after.is_none_or(|a| key(r) < a)).take(limit + 1).collect();
    let more = items.len() > limit;
    let mut out = Vec::with_capacity(limit);
    for (r, read) in items.into_iter().take(limit) {
        let mut last_message = match r.last_seq {
            0 => None,
            seq => message_at(store, r.id, seq)?,
        };
        if let Some(m) = &mut last_message {
            add_reactions(store, r.id, user, std::slice::from_mut(m))?;
        }
        out.push(protocol::ConversationSummary {
            conversation_id: r.id,
            kind: r.kind,
            title: r.title,
            last_seq: r.last_seq,
            last_ts_ms: r.last_ts_ms,
            read_seq: read,
            unread: r.last_seq.saturating_sub(read),
            muted: store.muted(r.id, user)?,
            last_message,
        });
    }
    Ok((out, more))
}

/// Reads the single message at `seq`, if stored.
pub fn message_at(store: &dyn Store, conv: ConversationId, seq: Seq) -> Result<Option<Message>> {
    let buckets = store.buckets(conv)?;
    let Some(i) = buckets.partition_point(|b| b.first_seq <= seq).checked_sub(1) else {
        return Ok(None);
    };
    Ok(store.read_bucket(conv, buckets[i].bucket, seq, seq, Order::Ascending, 1)?.pop())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_arithmetic() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(BUCKET_MS - 1), 0);
        assert_eq!(bucket_of(BUCKET_MS), 1);
        assert_eq!(bucket_of(1_700_000_000_000), 19675);
        assert_eq!(bucket_of(u64::MAX), u32::MAX);
    }

    #[test]
    fn a_page_locates_its_bucket_across_boundaries() {
        // Buckets starting at positions 1, 101 and 201; every anchor lands in the right one.
        struct Three;
        impl Store for Three {
            fn commit(&self, _: &[Mutation]) -> Result<()> {
                unreachable!()
            }
            fn claim(&self, _: ConversationId, _: u16) -> Result<u64> {
                unreachable!()
            }
            fn claimed_by(&self, _: u16, _: u64) -> Result<Vec<ConversationId>> {
                unreachable!()
            }
            fn create_user(&self, _: &UserRecord) -> Result<()> {
                unreachable!()
            }
            fn user(&self, _: UserId) -> Result<Option<UserRecord>> {
                unreachable!()
            }
            fn user_by_name(&self, _: &str) -> Result<Option<UserRecord>> {
                unreachable!()
            }
            fn conversation(&self, _: ConversationId) -> Result<Option<ConversationRecord>> {
                unreachable!()
            }
            fn members(&self, _: ConversationId) -> Result<Vec<(UserId, Role)>> {
                unreachable!()
            }
            fn member_role(&self, _: ConversationId, _: UserId) -> Result<Option<Role>> {
                unreachable!()
            }
            fn user_conversations(&self, _: UserId) -> Result<Vec<ConversationId>> {
                unreachable!()
            }
            fn direct(&self, _: UserId, _: UserId) -> Result<Option<ConversationId>> {
                unreachable!()
            }
            fn idempotent_seq(&self, _: ConversationId, _: UserId, _: &str) -> Result<Option<Seq>> {
                unreachable!()
            }
            fn muted(&self, _: ConversationId, _: UserId) -> Result<bool> {
                unreachable!()
            }
            fn positions(&self, _: ConversationId, _: UserId) -> Result<Positions> {
                unreachable!()
            }
            fn all_positions(&self, _: ConversationId) -> Result<Vec<(UserId, Positions)>> {
                unreachable!()
            }
            fn reactions(&self, _: ConversationId, _: Seq, _: Seq) -> Result<Vec<(Seq, UserId, String)>> {
                unreachable!()
            }
            fn presence(&self, _: UserId) -> Result<PresenceRecord> {
                unreachable!()
            }
            fn buckets(&self, _: ConversationId) -> Result<Vec<BucketRef>> {
                Ok([1, 101, 201]
                    .iter()
                    .enumerate()
                    .map(|(b, &s)| BucketRef { bucket: b as u32 + 7, first_seq: s })
                    .collect())
            }
            fn read_bucket(
                &self,
                conv: ConversationId,
                bucket: u32,
                lo: Seq,
                hi: Seq,
                order: Order,
                limit: usize,
            ) -> Result<Vec<Message>> {
                let (first, last) = (u64::from(bucket - 7) * 100 + 1, u64::from(bucket - 7) * 100 + 100);
                let mut seqs: Vec<Seq> = (first.max(lo)..=last.min(hi).min(250)).collect();
                if order == Order::Descending {
                    seqs.reverse();
                }
                Ok(seqs
                    .into_iter()
                    .take(limit)
                    .map(|seq| Message {
                        conversation_id: conv,
                        seq,
                        ts_ms: 0,
                        sender_id: 1,
                        client_msg_id: String::new(),
                        kind: MessageKind::Text,
                        body: String::new(),
                        target_user_id: None,
                        role: None,
                        target_seq: None,
                        edited_ms: None,
                        reactions: vec![],
                        my_reaction: None,
                        attachment: None,
                    })
                    .collect())
            }
        }
        let seqs = |a: Anchor, n: usize| {
            let p = page(&Three, 1, a, n).unwrap();
            (p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), p.has_more)
        };
        assert_eq!(seqs(Anchor::Latest, 3), (vec![250, 249, 248], true));
        assert_eq!(seqs(Anchor::Before(103), 4), (vec![102, 101, 100, 99], true), "crosses back a boundary");
        assert_eq!(seqs(Anchor::After(98), 4), (vec![99, 100, 101, 102], true), "crosses forward");
        assert_eq!(seqs(Anchor::After(247), 10), (vec![248, 249, 250], false));
        assert_eq!(seqs(Anchor::Before(3), 10), (vec![2, 1], false));
        assert_eq!(seqs(Anchor::Before(1), 10), (vec![], false));
        assert_eq!(seqs(Anchor::After(0), 100).0, (1..=100).collect::<Vec<_>>());
    }
}
