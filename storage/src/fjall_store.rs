//! The embedded backend: fjall (an LSM tree) in one directory.
//!
//! One keyspace per table of the shared data model. Keys are big-endian so that
//! range scans walk a partition in position order. A commit is one record in its
//! lane's write-ahead log with one `fdatasync` (the group commit the sequencer
//! relies on; lanes sync concurrently, see `wal`), then one fjall write batch
//! without fjall's own fsync.
//!
//! Text bodies are sealed under per-message keys kept in a key vault beside the
//! LSM files (`message-keys.vault`, see `seal`): a delete erases the key in place,
//! so the text is gone from the disk although old LSM files still hold its
//! ciphertext.

use crate::codec::{self, corrupt, key2, u64_at};
use crate::seal::{self, Key, Pending, Vault};
use crate::wal::{self, Op, Wal};
use crate::{
    BucketRef, ConversationId, ConversationRecord, ErrorKind, Message, MessageKind, Mutation, OrErr, Order,
    Positions, Result, Role, Seq, StorageError, Store, UserId, UserRecord, bucket_of, pair,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};

pub struct FjallStore {
    db: Database,
    users: Keyspace,
    usernames: Keyspace,
    convs: Keyspace,
    members: Keyspace,
    user_convs: Keyspace,
    direct: Keyspace,
    messages: Keyspace,
    buckets: Keyspace,
    idem: Keyspace,
    positions: Keyspace,
    mutes: Keyspace,
    reactions: Keyspace,
    presence: Keyspace,
    /// The keys text bodies are sealed under.
    vault: Vault,
    /// Serialises username uniqueness checks (registration is rare; fjall has no CAS).
    register: Mutex<()>,
    /// Serialises the applies that merge positions with stored ones (read, max,
    /// write): held only while a logged commit is applied, never across an fsync.
    merge: Mutex<()>,
    /// Conversations' owner epochs and the fenced commits under way. In memory:
    /// the embedded store belongs to one process, whose owners all claim anew
    /// after a restart. A claim waits only for commits under way that write its
    /// own conversation (see [`Fencing`]).
    fencing: Mutex<Fencing>,
    /// Signalled when a fenced commit ends while a claim waits.
    settled: Condvar,
    /// One write-ahead log per commit lane (see `wal`).
    wal: Wal,
}

/// Owner epochs, and per conversation the fenced commits past their fence check
/// that have not yet landed (or failed). A claim bumps an epoch only when none
/// is under way for its conversation: a deposed owner's commit then lands
/// before the claim returns or not at all, and the claimer's reads see it.
/// (One lock for all would make every claim wait for every commit's fsync: a
/// cold cache's burst of claims queued behind the other partitions' commits.)
#[derive(Default)]
struct Fencing {
    epochs: HashMap<ConversationId, u64>,
    /// The node of each conversation's latest claim. In memory like the epochs:
    /// this store is one process's, so its claims end with it.
    owners: HashMap<ConversationId, u16>,
    under_way: HashMap<ConversationId, u32>,
    /// Claims waiting for a commit of theirs to end.
    waiting: usize,
}

/// Ends a fenced commit's hold on its conversations (landed or failed).
struct UnderWay<'a> {
    store: &'a FjallStore,
    conversations: Vec<ConversationId>,
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        if self.conversations.is_empty() {
            return;
        }
        let mut f = self.store.fencing.lock().unwrap_or_else(|p| p.into_inner());
        for c in &self.conversations {
            if let Some(n) = f.under_way.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    f.under_way.remove(c);
                }
            }
        }
        if f.waiting > 0 {
            self.store.settled.notify_all();
        }
    }
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore").finish_non_exhaustive()
    }
}

fn io<E: std::error::Error + Send + Sync + 'static>(context: &'static str) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::new(ErrorKind::Io, context, e)
}

/// A write's error: `Poisoned` once fjall refuses all writes, else `Io`.
fn write_err(context: &'static str) -> impl FnOnce(fjall::Error) -> StorageError {
    move |e| {
        let kind = if matches!(e, fjall::Error::Poisoned) { ErrorKind::Poisoned } else { ErrorKind::Io };
        StorageError::new(kind, context, e)
    }
}

impl FjallStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // At most 256 table files open at once (fjall's default is 900): the gateway
        // keeps `limits.fd_reserve` descriptors for the store, and this bounds its share.
        let db = Database::builder(dir)
            .max_cached_files(Some(256))
            .open()
            .map_err(io("opening the embedded store"))?;
        let ks =
            |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(io("opening a keyspace"));
        let (wal, records) = Wal::open(dir)?;
        let store = FjallStore {
            users: ks("users")?,
            usernames: ks("usernames")?,
            convs: ks("conversations")?,
            members: ks("members")?,
            user_convs: ks("user_conversations")?,
            direct: ks("direct_pairs")?,
            messages: ks("messages")?,
            buckets: ks("message_buckets")?,
            idem: ks("idempotency")?,
            positions: ks("positions")?,
            mutes: ks("mutes")?,
            reactions: ks("reactions")?,
            presence: ks("presence")?,
            vault: Vault::open(&dir.join("message-keys.vault"))?,
            register: Mutex::new(()),
            merge: Mutex::new(()),
            fencing: Mutex::new(Fencing::default()),
            settled: Condvar::new(),
            wal,
            db,
        };
        // Commits whose logs were synced but whose fjall writes may not have been:
        // applied again in commit order (each is a set of final values, so again
        // is harmless), then made durable in fjall and the logs emptied.
        let replayed = records.len();
        for r in records {
            store.apply(r.ops, &Pending { runs: r.keys })?;
        }
        store.vault.settle()?;
        store.checkpoint(false)?;
        if replayed > 0 {
            tracing::info!(commits = replayed, "replayed the write-ahead logs");
        }
        Ok(store)
    }

    fn idem_key(conv: ConversationId, sender: UserId, cmid: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(16 + cmid.len());
        k.extend_from_slice(&key2(conv, sender));
        k.extend_from_slice(cmid.as_bytes());
        k
    }

    /// The stored row of `msg`. Text bodies, and the bodies of `edit` events, are
    /// sealed under the key of the message concerned (a new one for a new text
    /// message, the same one for its edits); a `deleted` tombstone erases that key.
    /// `keys` holds this batch's keys by `(conversation, seq)`, `new` the keys
    /// the vault must write; `erased` is set when the vault erased a key.
    fn message_row(
        &self,
        msg: &Message,
        keys: &mut HashMap<(ConversationId, Seq), (u64, Key)>,
        new: &mut Pending,
        erased: &mut bool,
    ) -> Result<Vec<u8>> {
        let (c, seq) = (msg.conversation_id, msg.seq);
        let sealed = |(slot, key): (u64, Key)| {
            codec::encode_row(msg, Some((slot, &seal::seal(&key, c, seq, &seal::plaintext(msg)))))
        };
        match msg.kind {
            MessageKind::Text => {
                let found = match keys.get(&(c, seq)) {
                    Some(k) => Some(*k),
                    // Only an edit rewrites a text row; a new message has no key yet.
                    None if msg.edited_ms.is_some() => self.stored_key(c, Some(bucket_of(msg.ts_ms)), seq)?,
                    None => None,
                };
                let k = match found {
                    Some(k) => k,
                    None => {
                        let key = seal::new_key();
                        (self.vault.put(new, &key), key)
                    }
                };
                keys.insert((c, seq), k);
                Ok(sealed(k))
            }
            MessageKind::Edit => {
                let target = msg.target_seq.unwrap_or(0);
                let found = match keys.get(&(c, target)) {
                    Some(k) => Some(*k),
                    None => self.stored_key(c, None, target)?,
                };
                Ok(match found {
                    Some(k) => sealed(k),
                    // The message it edits is deleted, and its text with it.
                    None => codec::encode_message(&Message { body: String::new(), ..msg.clone() }),
                })
            }
            MessageKind::Deleted => {
                let found = match keys.remove(&(c, seq)) {
                    Some(k) => Some(k),
                    None => self.stored_key(c, Some(bucket_of(msg.ts_ms)), seq)?,
                };
                if let Some((slot, _)) = found {
                    new.forget(slot);
                    self.vault.erase(slot)?;
                    *erased = true;
                }
                Ok(codec::encode_message(&Message { body: String::new(), ..msg.clone() }))
            }
            _ => Ok(codec::encode_message(msg)),
        }
    }

    /// The vault slot and key of stored message `seq` (its bucket looked up when
    /// not given); `None` for a message that is absent, unsealed or erased.
    fn stored_key(&self, c: ConversationId, bucket: Option<u32>, seq: Seq) -> Result<Option<(u64, Key)>> {
        let bucket = match bucket {
            Some(b) => b,
            None => {
                let buckets = self.buckets(c)?;
                match buckets.partition_point(|b| b.first_seq <= seq).checked_sub(1) {
                    Some(i) => buckets[i].bucket,
                    None => return Ok(None),
                }
            }
        };
        let Some(v) =
            self.messages.get(codec::message_key(c, bucket, seq)).map_err(io("reading a message"))?
        else {
            return Ok(None);
        };
        let Some((slot, _)) = codec::decode_row(c, seq, &v)?.1 else {
            return Ok(None);
        };
        Ok(self.vault.get(slot)?.map(|k| (slot, k)))
    }

    /// Rows with their sealed bodies opened; an erased key leaves a body empty.
    fn unseal(&self, rows: Vec<codec::Row>) -> Result<Vec<Message>> {
        let slots: Vec<u64> = rows.iter().filter_map(|(_, s)| s.as_ref().map(|s| s.0)).collect();
        let keys = self.vault.get_many(&slots)?;
        rows.into_iter()
            .map(|(mut m, sealed)| {
                if let Some((slot, bytes)) = sealed
                    && let Some(key) = keys.get(&slot)
                {
                    seal::open_into(&mut m, key, &bytes)?;
                }
                Ok(m)
            })
            .collect()
    }

    /// A batch's table writes and new vault keys; `erased` when it erased a key.
    fn ops(&self, batch: &[Mutation]) -> Result<(Vec<Op>, Pending, bool)> {
        let mut ops = Vec::with_capacity(batch.len() * 2);
        let put = |table: u8, key: Vec<u8>, value: Vec<u8>| Op::Put { table, key, value };
        let remove = |table: u8, key: Vec<u8>| Op::Remove { table, key };
        let (mut keys, mut new, mut erased) = (HashMap::new(), Pending::default(), false);
        for m in batch {
            match m {
                Mutation::PutMessage(msg) => ops.push(put(
                    T_MESSAGES,
                    codec::message_key(msg.conversation_id, bucket_of(msg.ts_ms), msg.seq).to_vec(),
                    self.message_row(msg, &mut keys, &mut new, &mut erased)?,
                )),
                Mutation::PutIdempotency { conversation, sender, client_msg_id, seq } => ops.push(put(
                    T_IDEM,
                    Self::idem_key(*conversation, *sender, client_msg_id),
                    seq.to_be_bytes().to_vec(),
                )),
                Mutation::PutBucket { conversation, bucket } => ops.push(put(
                    T_BUCKETS,
                    codec::bucket_key(*conversation, bucket.bucket).to_vec(),
                    bucket.first_seq.to_be_bytes().to_vec(),
                )),
                Mutation::PutConversation(c) => ops.push(put(
                    T_CONVS,
                    c.id.to_be_bytes().to_vec(),
                    postcard::to_stdvec(c).or_err(ErrorKind::Corrupt, "encoding a conversation")?,
                )),
                Mutation::PutMember { conversation, user, role } => {
                    ops.push(put(
                        T_MEMBERS,
                        key2(*conversation, *user).to_vec(),
                        vec![codec::role_to_u8(*role)],
                    ));
                    ops.push(put(T_USER_CONVS, key2(*user, *conversation).to_vec(), Vec::new()));
                }
                Mutation::RemoveMember { conversation, user } => {
                    ops.push(remove(T_MEMBERS, key2(*conversation, *user).to_vec()));
                    ops.push(remove(T_USER_CONVS, key2(*user, *conversation).to_vec()));
                }
                Mutation::SetMuted { conversation, user, muted: true } => {
                    ops.push(put(T_MUTES, key2(*conversation, *user).to_vec(), Vec::new()))
                }
                Mutation::SetMuted { conversation, user, muted: false } => {
                    ops.push(remove(T_MUTES, key2(*conversation, *user).to_vec()))
                }
                Mutation::PutPositions { conversation, user, positions } => ops.push(Op::Positions {
                    key: key2(*conversation, *user),
                    delivered: positions.delivered,
                    read: positions.read,
                }),
                Mutation::PutReaction { conversation, seq, user, emoji } => {
                    let k = codec::reaction_key(*conversation, *seq, *user).to_vec();
                    ops.push(if emoji.is_empty() {
                        remove(T_REACTIONS, k)
                    } else {
                        put(T_REACTIONS, k, emoji.as_bytes().to_vec())
                    })
                }
                Mutation::PutLastSeen { user, ms } => ops.push(put(
                    T_PRESENCE,
                    key2(*user, PRESENCE_LAST_SEEN).to_vec(),
                    ms.to_be_bytes().to_vec(),
                )),
                Mutation::SetHideLastSeen { user, hide: true } => {
                    ops.push(put(T_PRESENCE, key2(*user, PRESENCE_HIDE).to_vec(), Vec::new()))
                }
                Mutation::SetHideLastSeen { user, hide: false } => {
                    ops.push(remove(T_PRESENCE, key2(*user, PRESENCE_HIDE).to_vec()))
                }
                Mutation::PutDirect { a, b: other, conversation } => {
                    let (x, y) = pair(*a, *other);
                    ops.push(put(T_DIRECT, key2(x, y).to_vec(), conversation.to_be_bytes().to_vec()));
                }
                Mutation::Fence { .. } => {}
            }
        }
        Ok((ops, new, erased))
    }

    /// Applies a logged commit: its vault keys, then its writes as one fjall batch
    /// written to fjall's journal without an fsync (the lane's log made it durable).
    fn apply(&self, ops: Vec<Op>, new: &Pending) -> Result<()> {
        // New keys before the rows that name them.
        if !new.is_empty() {
            self.vault.write(new)?;
        }
        let mut b = self.db.batch().durability(Some(PersistMode::Buffer));
        let mut positions = std::collections::BTreeMap::<[u8; 16], Positions>::new();
        for op in ops {
            match op {
                Op::Put { table, key, value } => b.insert(self.table(table)?, key, value),
                Op::Remove { table, key } => b.remove(self.table(table)?, key),
                Op::Positions { key, delivered, read } => {
                    let p = positions.entry(key).or_default();
                    p.delivered = p.delivered.max(delivered);
                    p.read = p.read.max(read);
                }
            }
        }
        // Positions only move forward, whoever writes them: merge with the stored row.
        let _merging = (!positions.is_empty()).then(|| self.merge.lock().unwrap_or_else(|p| p.into_inner()));
        for (k, mut p) in positions {
            if let Some(v) = self.positions.get(k).map_err(io("reading positions"))? {
                let old = decode_positions(&v)?;
                p.delivered = p.delivered.max(old.delivered);
                p.read = p.read.max(old.read);
            }
            b.insert(&self.positions, k.to_vec(), encode_positions(&p));
        }
        b.commit().map_err(write_err("committing a batch"))
    }

    /// Makes fjall's journal and the vault durable, then empties the logs
    /// (overwriting them first when `scrub`).
    fn checkpoint(&self, scrub: bool) -> Result<()> {
        self.wal.checkpoint(scrub, || {
            self.db.persist(PersistMode::SyncData).map_err(write_err("persisting the journal"))?;
            self.vault.sync()
        })
    }

    fn table(&self, t: u8) -> Result<&Keyspace> {
        Ok(match t {
            T_CONVS => &self.convs,
            T_MEMBERS => &self.members,
            T_USER_CONVS => &self.user_convs,
            T_DIRECT => &self.direct,
            T_MESSAGES => &self.messages,
            T_BUCKETS => &self.buckets,
            T_IDEM => &self.idem,
            T_MUTES => &self.mutes,
            T_REACTIONS => &self.reactions,
            T_PRESENCE => &self.presence,
            _ => return Err(corrupt("a log record names an unknown table")),
        })
    }

    fn get_postcard<T: serde::de::DeserializeOwned>(ks: &Keyspace, key: &[u8]) -> Result<Option<T>> {
        match ks.get(key).map_err(io("reading a row"))? {
            Some(v) => Ok(Some(postcard::from_bytes(&v).or_err(ErrorKind::Corrupt, "decoding a row")?)),
            None => Ok(None),
        }
    }
}

/// Tables a log record names (never renumbered: logs outlive builds).
const T_CONVS: u8 = 1;
const T_MEMBERS: u8 = 2;
const T_USER_CONVS: u8 = 3;
const T_DIRECT: u8 = 4;
const T_MESSAGES: u8 = 5;
const T_BUCKETS: u8 = 6;
const T_IDEM: u8 = 7;
const T_MUTES: u8 = 8;
const T_REACTIONS: u8 = 9;
const T_PRESENCE: u8 = 10;

/// Column tags of the `presence` keyspace (`user | tag`).
const PRESENCE_LAST_SEEN: u64 = 0;
const PRESENCE_HIDE: u64 = 1;

fn encode_positions(p: &Positions) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&p.delivered.to_be_bytes());
    v.extend_from_slice(&p.read.to_be_bytes());
    v
}

fn decode_positions(v: &[u8]) -> Result<Positions> {
    Ok(Positions { delivered: u64_at(v, 0)?, read: u64_at(v, 8)? })
}

impl Store for FjallStore {
    fn commit(&self, batch: &[Mutation]) -> Result<()> {
        // Writers without a lane of their own (presence, tools) share the last one.
        self.commit_lane(wal::LANES - 1, batch)
    }

    fn commit_lane(&self, lane: usize, batch: &[Mutation]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // Checked and marked under way in one step: a claim of one of these
        // conversations now waits until this commit has landed or failed.
        let _under_way = {
            let mut f = self.fencing.lock().unwrap_or_else(|p| p.into_inner());
            let mut conversations = Vec::new();
            for m in batch {
                if let Mutation::Fence { conversation, epoch } = m {
                    if f.epochs.get(conversation).copied().unwrap_or(0) != *epoch {
                        return Err(StorageError::new(
                            ErrorKind::Fenced,
                            "committing",
                            format!("conversation {conversation} was claimed by another owner"),
                        ));
                    }
                    conversations.push(*conversation);
                }
            }
            for c in &conversations {
                *f.under_way.entry(*c).or_default() += 1;
            }
            UnderWay { store: self, conversations }
        };
        let (ops, new, erased) = self.ops(batch)?;
        if ops.is_empty() && new.is_empty() && !erased {
            // Fences only: checked, nothing to write.
            return Ok(());
        }
        let mut held = self.wal.lane(lane);
        // Durable in the lane's log, then visible: applied to fjall without its fsync.
        let due = self.wal.append(&mut held, lane, &ops, &new.runs)?;
        self.apply(ops, &new)?;
        drop(held);
        // An erased key must be gone from the logs too before the tombstone is acknowledged.
        if due || erased {
            self.checkpoint(erased)?;
        }
        Ok(())
    }

    fn claim(&self, conv: ConversationId, node: u16) -> Result<u64> {
        if self.conversation(conv)?.is_none() {
            return Ok(0);
        }
        let mut f = self.fencing.lock().unwrap_or_else(|p| p.into_inner());
        while f.under_way.contains_key(&conv) {
            f.waiting += 1;
            f = self.settled.wait(f).unwrap_or_else(|p| p.into_inner());
            f.waiting -= 1;
        }
        f.owners.insert(conv, node);
        let e = f.epochs.entry(conv).or_default();
        *e += 1;
        Ok(*e)
    }

    fn claimed_by(&self, node: u16, since_ms: u64) -> Result<Vec<ConversationId>> {
        let mine: Vec<ConversationId> = {
            let f = self.fencing.lock().unwrap_or_else(|p| p.into_inner());
            f.owners.iter().filter(|&(_, &n)| n == node).map(|(&c, _)| c).collect()
        };
        let mut out = Vec::new();
        for c in mine {
            if self.conversation(c)?.is_some_and(|r| r.last_ts_ms >= since_ms) {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn create_user(&self, user: &UserRecord) -> Result<()> {
        let _guard = self.register.lock().unwrap_or_else(|p| p.into_inner());
        let name = user.username.to_lowercase();
        if self.usernames.contains_key(&name).map_err(io("checking a username"))? {
            return Err(StorageError::new(ErrorKind::UsernameTaken, "registering", "username taken"));
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncData));
        b.insert(&self.usernames, name.into_bytes(), user.id.to_be_bytes().to_vec());
        b.insert(
            &self.users,
            user.id.to_be_bytes().to_vec(),
            postcard::to_stdvec(user).or_err(ErrorKind::Corrupt, "encoding a user")?,
        );
        b.commit().map_err(write_err("committing a user"))
    }

    fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        Self::get_postcard(&self.users, &id.to_be_bytes())
    }

    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        match self.usernames.get(username.to_lowercase()).map_err(io("reading a username"))? {
            Some(id) => self.user(u64_at(&id, 0)?),
            None => Ok(None),
        }
    }

    fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRecord>> {
        Self::get_postcard(&self.convs, &id.to_be_bytes())
    }

    fn members(&self, id: ConversationId) -> Result<Vec<(UserId, Role)>> {
        self.members
            .prefix(id.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv.into_inner().map_err(io("scanning members"))?;
                Ok((u64_at(&k, 8)?, codec::role_from_u8(*v.first().ok_or_else(|| corrupt("empty role"))?)?))
            })
            .collect()
    }

    fn muted(&self, conv: ConversationId, user: UserId) -> Result<bool> {
        self.mutes.contains_key(key2(conv, user)).map_err(io("reading a mute"))
    }

    fn positions(&self, conv: ConversationId, user: UserId) -> Result<Positions> {
        match self.positions.get(key2(conv, user)).map_err(io("reading positions"))? {
            Some(v) => decode_positions(&v),
            None => Ok(Positions::default()),
        }
    }

    fn all_positions(&self, conv: ConversationId) -> Result<Vec<(UserId, Positions)>> {
        self.positions
            .prefix(conv.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv.into_inner().map_err(io("scanning positions"))?;
                Ok((u64_at(&k, 8)?, decode_positions(&v)?))
            })
            .collect()
    }

    fn reactions(&self, conv: ConversationId, lo: Seq, hi: Seq) -> Result<Vec<(Seq, UserId, String)>> {
        if lo > hi {
            return Ok(Vec::new());
        }
        let range = codec::reaction_key(conv, lo, 0)..=codec::reaction_key(conv, hi, u64::MAX);
        self.reactions
            .range(range)
            .map(|kv| {
                let (k, v) = kv.into_inner().map_err(io("scanning reactions"))?;
                let emoji = String::from_utf8(v.to_vec()).map_err(|_| corrupt("emoji not utf-8"))?;
                Ok((u64_at(&k, 8)?, u64_at(&k, 16)?, emoji))
            })
            .collect()
    }

    fn presence(&self, user: UserId) -> Result<crate::PresenceRecord> {
        let last_seen_ms =
            match self.presence.get(key2(user, PRESENCE_LAST_SEEN)).map_err(io("reading presence"))? {
                Some(v) => Some(u64_at(&v, 0)?),
                None => None,
            };
        let hide_last_seen =
            self.presence.contains_key(key2(user, PRESENCE_HIDE)).map_err(io("reading presence"))?;
        Ok(crate::PresenceRecord { last_seen_ms, hide_last_seen })
    }

    fn member_role(&self, id: ConversationId, user: UserId) -> Result<Option<Role>> {
        match self.members.get(key2(id, user)).map_err(io("reading a member"))? {
            Some(v) => Ok(Some(codec::role_from_u8(*v.first().ok_or_else(|| corrupt("empty role"))?)?)),
            None => Ok(None),
        }
    }

    fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationId>> {
        self.user_convs
            .prefix(user.to_be_bytes())
            .map(|kv| u64_at(&kv.key().map_err(io("scanning user conversations"))?, 8))
            .collect()
    }

    fn direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>> {
        let (x, y) = pair(a, b);
        match self.direct.get(key2(x, y)).map_err(io("reading a direct pair"))? {
            Some(v) => Ok(Some(u64_at(&v, 0)?)),
            None => Ok(None),
        }
    }

    fn idempotent_seq(
        &self,
        conv: ConversationId,
        sender: UserId,
        client_msg_id: &str,
    ) -> Result<Option<Seq>> {
        match self
            .idem
            .get(Self::idem_key(conv, sender, client_msg_id))
            .map_err(io("reading an idempotency key"))?
        {
            Some(v) => Ok(Some(u64_at(&v, 0)?)),
            None => Ok(None),
        }
    }

    fn buckets(&self, conv: ConversationId) -> Result<Vec<BucketRef>> {
        self.buckets
            .prefix(conv.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv.into_inner().map_err(io("scanning buckets"))?;
                Ok(BucketRef { bucket: codec::u32_at(&k, 8)?, first_seq: u64_at(&v, 0)? })
            })
            .collect()
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
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        let range = codec::message_key(conv, bucket, lo)..=codec::message_key(conv, bucket, hi);
        let decode = |kv: fjall::Guard| -> Result<codec::Row> {
            let (k, v) = kv.into_inner().map_err(io("reading a bucket"))?;
            codec::decode_row(conv, u64_at(&k, 12)?, &v)
        };
        let iter = self.messages.range(range);
        let rows = match order {
            Order::Ascending => iter.take(limit).map(decode).collect::<Result<Vec<_>>>()?,
            Order::Descending => iter.rev().take(limit).map(decode).collect::<Result<Vec<_>>>()?,
        };
        self.unseal(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::msg;

    /// A commit whose log record was synced but whose fjall writes were lost (a
    /// power cut before fjall's journal reached the disk) is there after a restart.
    #[test]
    fn a_logged_commit_missing_from_fjall_is_replayed_at_open() {
        let (src, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let c = 31;
        let m = Message { body: "replayed-3c9e".into(), ..msg(c, 1, 1_700_000_000_000, 7) };
        let batch = [
            Mutation::PutConversation(ConversationRecord {
                id: c,
                kind: protocol::ConversationKind::Direct,
                title: String::new(),
                created_ms: 1,
                created_by: 7,
                last_seq: 1,
                last_ts_ms: m.ts_ms,
            }),
            Mutation::PutBucket {
                conversation: c,
                bucket: BucketRef { bucket: bucket_of(m.ts_ms), first_seq: 1 },
            },
            Mutation::PutMessage(m.clone()),
            Mutation::PutPositions {
                conversation: c,
                user: 7,
                positions: Positions { delivered: 1, read: 1 },
            },
        ];
        // The record a commit would log, written to a fresh directory's lane 4 only.
        let (ops, new, _) = FjallStore::open(src.path()).unwrap().ops(&batch).unwrap();
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            wal.append(&mut wal.lane(4), 4, &ops, &new.runs).unwrap();
        }
        let s = FjallStore::open(dir.path()).unwrap();
        assert_eq!(s.conversation(c).unwrap().map(|r| r.last_seq), Some(1));
        assert_eq!(crate::message_at(&s, c, 1).unwrap().map(|m| m.body), Some("replayed-3c9e".into()));
        assert_eq!(s.positions(c, 7).unwrap(), Positions { delivered: 1, read: 1 });
        // Replayed, made durable and the log emptied; new keys go after the replayed one.
        let logs = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("wal-04-"))
                .count()
        };
        assert_eq!(logs(), 0);
        let m2 = Message { body: "after-77aa".into(), ..msg(c, 2, m.ts_ms + 1, 7) };
        s.commit_lane(4, &[Mutation::PutMessage(m2)]).unwrap();
        assert_eq!(crate::message_at(&s, c, 1).unwrap().map(|m| m.body), Some("replayed-3c9e".into()));
        assert_eq!(crate::message_at(&s, c, 2).unwrap().map(|m| m.body), Some("after-77aa".into()));
    }
}
