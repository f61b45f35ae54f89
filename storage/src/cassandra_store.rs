//! The Cassandra backend (Apache Cassandra 3.11/4.x/5.x, ScyllaDB): the history
//! store for large fleets.
//!
//! Schema: `deploy/cassandra/schema.cql`, applied by [`CassandraStore::migrate`]
//! with the configured keyspace and replication. Why each table is shaped as it
//! is and what every query costs: docs/design/why-cassandra-layout.md.
//!
//! The driver is `scylla` on a small tokio runtime this store owns (`cql-io`
//! threads). [`Store`] methods block the calling storage thread on it; gateway
//! shards never call them (they reach storage threads over bounded channels).
//!
//! - Every statement is prepared once ([`Stmt`]), routed token-aware to a replica
//!   of its partition, at the configured consistency (LOCAL_QUORUM by default).
//! - Every write is an idempotent upsert and marked so, which lets the driver
//!   retry it; the one lightweight transaction (claiming a username) is not, and
//!   is never retried blindly.
//! - Writes carry client-side timestamps from one monotonic generator, so two
//!   commits from this process apply in commit order. Read positions and the
//!   conversation head are the exception: each is written `USING TIMESTAMP` equal
//!   to its own value, so the higher position wins whatever the arrival order.
//! - A commit is not one transaction (Cassandra has none across partitions). It
//!   runs in four phases, each waiting for the one before ([`plan`]): the new
//!   text messages' keys, the messages and conversation records, then every
//!   index and state row that refers to them (and deleted messages' keys), then
//!   the conversation heads. A commit that fails part-way therefore never leaves
//!   a message without its key, or a head or an idempotency key pointing at a
//!   message that is not stored; the sequencer reloads the conversation, and the
//!   head it derives covers whatever did land, so no position is handed out twice.
//! - Text bodies are sealed under per-message keys (`seal`, table
//!   `message_keys`), so that a delete can destroy the text: see
//!   [`CassandraStore::erase_deleted`].

use crate::codec::{
    conv_kind_from_i16, conv_kind_to_i16, corrupt, i, kind_to_u8, message_from_columns, role_from_u8, small,
    u,
};
use crate::rows::Rows;
use crate::seal::{self, Key, Sealing};
use crate::{
    BucketRef, ConversationId, ConversationRecord, ErrorKind, Message, MessageKind, Mutation, Order,
    Positions, PresenceRecord, Result, Role, Seq, StorageError, Store, UserId, UserRecord, pair,
};
use futures_util::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::pager::{NextPageError, NextRowError};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{
    DbError, ExecutionError, PagerExecutionError, RequestAttemptError, RequestError, WriteType,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, MaybeUnset};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The schema, as shipped in `deploy/cassandra/schema.cql`.
pub const SCHEMA: &str = include_str!("../../deploy/cassandra/schema.cql");
/// The schema version this build writes and needs.
pub const SCHEMA_VERSION: i32 = 4;
/// Positions per reactions partition (see the schema).
pub const REACTION_BLOCK: u64 = 1024;
/// Statements per unlogged batch, and their approximate size in bytes: well
/// under Cassandra's default `batch_size_fail_threshold` (50 KiB).
/// Client-side timeout of one schema statement in `migrate`: a table or keyspace
/// change waits for the cluster's schema to settle, which takes seconds on a busy
/// node (CI saw one pass the 5 s request timeout). They are `IF NOT EXISTS`, so a
/// retried `migrate` after a timeout is safe.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);

const BATCH_MAX_STATEMENTS: usize = 64;
const BATCH_MAX_BYTES: usize = 32 * 1024;
/// Requests one commit keeps in flight (per phase).
const IN_FLIGHT: usize = 32;
/// Rows per page when reading a whole partition (members, buckets, positions).
const PAGE_ROWS: i32 = 1000;

/// How to reach the cluster and how to write to it.
#[derive(Debug, Clone)]
pub struct CassandraOptions {
    /// `host:port` of a few nodes; the driver discovers the rest.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// The datacenter this gateway runs in: requests go to its replicas only.
    /// `None` routes to any datacenter (single-DC clusters).
    pub local_dc: Option<String>,
    /// `local_quorum` (default), `quorum`, `each_quorum`, `local_one`, `one` or `all`.
    pub consistency: String,
    /// Replication factor per datacenter, for the keyspace `migrate` creates.
    pub replication: BTreeMap<String, u32>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// Client-side timeout of one request (all its retries included).
    pub request_timeout: Duration,
    /// How long a `client_msg_id` is remembered for deduplication.
    pub idempotency_ttl: Duration,
}

impl CassandraOptions {
    /// Checks the options without connecting (for config validation).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.contact_points.is_empty() {
            return Err("contact_points is empty".into());
        }
        if !is_identifier(&self.keyspace) {
            return Err(format!(
                "keyspace {:?} is not a CQL identifier (letters, digits, _; 1-48 chars, not starting with a digit)",
                self.keyspace
            ));
        }
        parse_consistency(&self.consistency)?;
        if self.replication.is_empty() {
            return Err("replication lists no datacenter".into());
        }
        for (dc, rf) in &self.replication {
            if dc.is_empty() || !dc.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
                return Err(format!("replication: {dc:?} is not a datacenter name"));
            }
            if *rf == 0 {
                return Err(format!("replication: {dc} has replication factor 0"));
            }
        }
        if let Some(dc) = &self.local_dc
            && !self.replication.contains_key(dc)
        {
            return Err(format!(
                "local_dc {dc:?} is not in replication (which lists {:?})",
                self.replication.keys()
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("username and password go together".into());
        }
        let ttl = self.idempotency_ttl.as_secs();
        if ttl == 0 || ttl > i32::MAX as u64 {
            return Err("idempotency_ttl must be between 1 s and 68 years".into());
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    (1..=48).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Parses a consistency level as written in the config.
pub fn parse_consistency(s: &str) -> std::result::Result<Consistency, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "local_one" => Consistency::LocalOne,
        "quorum" => Consistency::Quorum,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "all" => Consistency::All,
        _ => {
            return Err(format!(
                "unknown consistency {s:?} (one of local_quorum, quorum, each_quorum, local_one, one, all)"
            ));
        }
    })
}

/// The keyspace statement `migrate` runs, with the configured replication.
pub fn keyspace_cql(opts: &CassandraOptions) -> String {
    let dcs: Vec<String> = opts.replication.iter().map(|(dc, rf)| format!("'{dc}': {rf}")).collect();
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {{'class': 'NetworkTopologyStrategy', {}}} \
         AND durable_writes = true",
        opts.keyspace,
        dcs.join(", ")
    )
}

/// The schema file's statements, in order, for `opts`: comments dropped, the
/// keyspace statement replaced by [`keyspace_cql`], tables in `opts.keyspace`.
pub fn schema_statements(opts: &CassandraOptions) -> Vec<String> {
    let text: String =
        SCHEMA.lines().map(|l| l.split_once("--").map_or(l, |(code, _)| code)).collect::<Vec<_>>().join("\n");
    text.split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with("CREATE KEYSPACE") {
                keyspace_cql(opts)
            } else {
                s.replace("switchboard.", &format!("{}.", opts.keyspace))
            }
        })
        .collect()
}

/// Every statement the store runs. `{ks}` stands for the keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Stmt {
    InsertMessage,
    InsertBucket,
    InsertIdempotency,
    InsertConversation,
    UpdateHead,
    InsertMember,
    DeleteMember,
    InsertUserConversation,
    DeleteUserConversation,
    InsertDirect,
    InsertMute,
    DeleteMute,
    UpdateDelivered,
    UpdateRead,
    InsertReaction,
    DeleteReaction,
    UpdateLastSeen,
    UpdateHideLastSeen,
    InsertUser,
    DeleteUser,
    ClaimUsername,
    SelectUser,
    SelectUsername,
    SelectUsernameSerial,
    SelectConversation,
    SelectMembers,
    SelectMemberRole,
    SelectUserConversations,
    SelectDirect,
    SelectIdempotency,
    SelectMute,
    SelectPositions,
    SelectAllPositions,
    SelectReactions,
    SelectPresence,
    SelectBuckets,
    SelectMessagesAsc,
    SelectMessagesDesc,
    InsertKey,
    DeleteKey,
    SelectKey,
    SelectKeys,
    SelectEpochSerial,
    SetEpoch,
    UpdateHeadUnfenced,
    InsertNodeClaim,
    SelectNodeClaims,
    SelectClaimState,
}

const MESSAGE_COLS: &str =
    "seq, ts_ms, sender_id, client_msg_id, kind, body, target_user_id, role, target_seq, edited_ms, sealed";

impl Stmt {
    pub(crate) const ALL: [Stmt; 48] = [
        Stmt::InsertMessage,
        Stmt::InsertBucket,
        Stmt::InsertIdempotency,
        Stmt::InsertConversation,
        Stmt::UpdateHead,
        Stmt::InsertMember,
        Stmt::DeleteMember,
        Stmt::InsertUserConversation,
        Stmt::DeleteUserConversation,
        Stmt::InsertDirect,
        Stmt::InsertMute,
        Stmt::DeleteMute,
        Stmt::UpdateDelivered,
        Stmt::UpdateRead,
        Stmt::InsertReaction,
        Stmt::DeleteReaction,
        Stmt::UpdateLastSeen,
        Stmt::UpdateHideLastSeen,
        Stmt::InsertUser,
        Stmt::DeleteUser,
        Stmt::ClaimUsername,
        Stmt::SelectUser,
        Stmt::SelectUsername,
        Stmt::SelectUsernameSerial,
        Stmt::SelectConversation,
        Stmt::SelectMembers,
        Stmt::SelectMemberRole,
        Stmt::SelectUserConversations,
        Stmt::SelectDirect,
        Stmt::SelectIdempotency,
        Stmt::SelectMute,
        Stmt::SelectPositions,
        Stmt::SelectAllPositions,
        Stmt::SelectReactions,
        Stmt::SelectPresence,
        Stmt::SelectBuckets,
        Stmt::SelectMessagesAsc,
        Stmt::SelectMessagesDesc,
        Stmt::InsertKey,
        Stmt::DeleteKey,
        Stmt::SelectKey,
        Stmt::SelectKeys,
        Stmt::SelectEpochSerial,
        Stmt::SetEpoch,
        Stmt::UpdateHeadUnfenced,
        Stmt::InsertNodeClaim,
        Stmt::SelectNodeClaims,
        Stmt::SelectClaimState,
    ];

    pub(crate) fn template(self) -> String {
        match self {
            Stmt::InsertMessage => "INSERT INTO {ks}.messages (conversation_id, bucket, seq, ts_ms, sender_id, \
                 client_msg_id, kind, body, target_user_id, role, target_seq, edited_ms, sealed) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                .into(),
            Stmt::InsertKey => {
                "INSERT INTO {ks}.message_keys (conversation_id, block, seq, key) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                    .into()
            }
            Stmt::DeleteKey => {
                "DELETE FROM {ks}.message_keys USING TIMESTAMP ? WHERE conversation_id = ? AND block = ? AND seq = ?"
                    .into()
            }
            Stmt::SelectKey => {
                "SELECT key FROM {ks}.message_keys WHERE conversation_id = ? AND block = ? AND seq = ?".into()
            }
            Stmt::SelectEpochSerial => "SELECT owner_epoch, created_ms FROM {ks}.conversations WHERE id = ?".into(),
            Stmt::InsertNodeClaim => {
                "INSERT INTO {ks}.node_claims (node, conversation_id, epoch) VALUES (?, ?, ?)".into()
            }
            Stmt::SelectNodeClaims => "SELECT conversation_id, epoch FROM {ks}.node_claims WHERE node = ?".into(),
            Stmt::SelectClaimState => {
                "SELECT owner_epoch, last_ts_ms FROM {ks}.conversations WHERE id = ?".into()
            }
            // A claim (a new epoch) or a fence (the same one): applied only while the
            // stored epoch is the one bound last (null: never claimed).
            Stmt::SetEpoch => {
                "UPDATE {ks}.conversations SET owner_epoch = ? WHERE id = ? IF owner_epoch = ?".into()
            }
            Stmt::SelectKeys => "SELECT seq, key FROM {ks}.message_keys \
                 WHERE conversation_id = ? AND block = ? AND seq >= ? AND seq <= ?"
                .into(),
            Stmt::InsertBucket => {
                "INSERT INTO {ks}.message_buckets (conversation_id, bucket, first_seq) VALUES (?, ?, ?)".into()
            }
            Stmt::InsertIdempotency => "INSERT INTO {ks}.idempotency (conversation_id, sender_id, client_msg_id, seq) \
                 VALUES (?, ?, ?, ?) USING TTL ?"
                .into(),
            Stmt::InsertConversation => {
                "INSERT INTO {ks}.conversations (id, kind, title, created_ms, created_by) VALUES (?, ?, ?, ?, ?)"
                    .into()
            }
            // A lightweight transaction: the head moves only under the epoch of the
            // owner that wrote the rows (null: a conversation nobody claimed yet).
            // A commit without a fence (a conversation it creates): plain.
            Stmt::UpdateHeadUnfenced => {
                "UPDATE {ks}.conversations SET last_seq = ?, last_ts_ms = ? WHERE id = ?".into()
            }
            Stmt::UpdateHead => "UPDATE {ks}.conversations SET last_seq = ?, last_ts_ms = ? WHERE id = ? \
                 IF owner_epoch = ?"
                .into(),
            Stmt::InsertMember => {
                "INSERT INTO {ks}.members (conversation_id, user_id, role) VALUES (?, ?, ?)".into()
            }
            Stmt::DeleteMember => "DELETE FROM {ks}.members WHERE conversation_id = ? AND user_id = ?".into(),
            Stmt::InsertUserConversation => {
                "INSERT INTO {ks}.user_conversations (user_id, conversation_id) VALUES (?, ?)".into()
            }
            Stmt::DeleteUserConversation => {
                "DELETE FROM {ks}.user_conversations WHERE user_id = ? AND conversation_id = ?".into()
            }
            Stmt::InsertDirect => {
                "INSERT INTO {ks}.direct_pairs (user_lo, user_hi, conversation_id) VALUES (?, ?, ?)".into()
            }
            Stmt::InsertMute => "INSERT INTO {ks}.mutes (conversation_id, user_id) VALUES (?, ?)".into(),
            Stmt::DeleteMute => "DELETE FROM {ks}.mutes WHERE conversation_id = ? AND user_id = ?".into(),
            Stmt::UpdateDelivered => "UPDATE {ks}.positions USING TIMESTAMP ? SET delivered = ? \
                 WHERE conversation_id = ? AND user_id = ?"
                .into(),
            Stmt::UpdateRead => {
                "UPDATE {ks}.positions USING TIMESTAMP ? SET read = ? WHERE conversation_id = ? AND user_id = ?"
                    .into()
            }
            Stmt::InsertReaction => "INSERT INTO {ks}.reactions (conversation_id, block, seq, user_id, emoji) \
                 VALUES (?, ?, ?, ?, ?)"
                .into(),
            Stmt::DeleteReaction => "DELETE FROM {ks}.reactions \
                 WHERE conversation_id = ? AND block = ? AND seq = ? AND user_id = ?"
                .into(),
            Stmt::UpdateLastSeen => "UPDATE {ks}.presence SET last_seen_ms = ? WHERE user_id = ?".into(),
            Stmt::UpdateHideLastSeen => "UPDATE {ks}.presence SET hide_last_seen = ? WHERE user_id = ?".into(),
            Stmt::InsertUser => {
                "INSERT INTO {ks}.users (id, username, password_hash, created_ms) VALUES (?, ?, ?, ?)".into()
            }
            Stmt::DeleteUser => "DELETE FROM {ks}.users WHERE id = ?".into(),
            Stmt::ClaimUsername => {
                "INSERT INTO {ks}.usernames (username_lower, user_id) VALUES (?, ?) IF NOT EXISTS".into()
            }
            Stmt::SelectUser => {
                "SELECT id, username, password_hash, created_ms FROM {ks}.users WHERE id = ?".into()
            }
            Stmt::SelectUsername | Stmt::SelectUsernameSerial => {
                "SELECT user_id FROM {ks}.usernames WHERE username_lower = ?".into()
            }
            Stmt::SelectConversation => "SELECT id, kind, title, created_ms, created_by, last_seq, last_ts_ms \
                 FROM {ks}.conversations WHERE id = ?"
                .into(),
            Stmt::SelectMembers => "SELECT user_id, role FROM {ks}.members WHERE conversation_id = ?".into(),
            Stmt::SelectMemberRole => {
                "SELECT role FROM {ks}.members WHERE conversation_id = ? AND user_id = ?".into()
            }
            Stmt::SelectUserConversations => {
                "SELECT conversation_id FROM {ks}.user_conversations WHERE user_id = ?".into()
            }
            Stmt::SelectDirect => {
                "SELECT conversation_id FROM {ks}.direct_pairs WHERE user_lo = ? AND user_hi = ?".into()
            }
            Stmt::SelectIdempotency => "SELECT seq FROM {ks}.idempotency \
                 WHERE conversation_id = ? AND sender_id = ? AND client_msg_id = ?"
                .into(),
            Stmt::SelectMute => {
                "SELECT user_id FROM {ks}.mutes WHERE conversation_id = ? AND user_id = ?".into()
            }
            Stmt::SelectPositions => {
                "SELECT delivered, read FROM {ks}.positions WHERE conversation_id = ? AND user_id = ?".into()
            }
            Stmt::SelectAllPositions => {
                "SELECT user_id, delivered, read FROM {ks}.positions WHERE conversation_id = ?".into()
            }
            Stmt::SelectReactions => "SELECT seq, user_id, emoji FROM {ks}.reactions \
                 WHERE conversation_id = ? AND block = ? AND seq >= ? AND seq <= ?"
                .into(),
            Stmt::SelectPresence => {
                "SELECT last_seen_ms, hide_last_seen FROM {ks}.presence WHERE user_id = ?".into()
            }
            Stmt::SelectBuckets => {
                "SELECT bucket, first_seq FROM {ks}.message_buckets WHERE conversation_id = ?".into()
            }
            Stmt::SelectMessagesAsc => format!(
                "SELECT {MESSAGE_COLS} FROM {{ks}}.messages WHERE conversation_id = ? AND bucket = ? \
                 AND seq >= ? AND seq <= ? ORDER BY seq ASC LIMIT ?"
            ),
            Stmt::SelectMessagesDesc => format!(
                "SELECT {MESSAGE_COLS} FROM {{ks}}.messages WHERE conversation_id = ? AND bucket = ? \
                 AND seq >= ? AND seq <= ? ORDER BY seq DESC LIMIT ?"
            ),
        }
    }

    pub(crate) fn cql(self, keyspace: &str) -> String {
        self.template().replace("{ks}", keyspace)
    }

    /// Whether running the statement twice has the effect of running it once.
    /// Only the username claim (a lightweight transaction) is not.
    pub(crate) fn idempotent(self) -> bool {
        !matches!(self, Stmt::ClaimUsername | Stmt::SetEpoch | Stmt::UpdateHead)
    }

    /// Consistency overrides; everything else uses the configured level.
    fn consistency(self) -> Option<Consistency> {
        match self {
            // Reads the claim's Paxos state, to learn whether a timed-out claim landed.
            Stmt::SelectUsernameSerial | Stmt::SelectEpochSerial => Some(Consistency::LocalSerial),
            _ => None,
        }
    }

    /// Whole-partition reads, fetched in driver pages.
    fn paged(self) -> bool {
        matches!(
            self,
            Stmt::SelectMembers
                | Stmt::SelectUserConversations
                | Stmt::SelectNodeClaims
                | Stmt::SelectAllPositions
                | Stmt::SelectBuckets
                | Stmt::SelectReactions
                | Stmt::SelectKeys
        )
    }
}

/// A bound value: unset leaves a column as stored (and writes no tombstone),
/// `Set(None)` writes null.
pub(crate) type Value = MaybeUnset<Option<CqlValue>>;

fn big(v: u64) -> Value {
    MaybeUnset::Set(Some(CqlValue::BigInt(i(v))))
}

fn int(v: i32) -> Value {
    MaybeUnset::Set(Some(CqlValue::Int(v)))
}

fn smallint(v: i16) -> Value {
    MaybeUnset::Set(Some(CqlValue::SmallInt(v)))
}

fn text(v: &str) -> Value {
    MaybeUnset::Set(Some(CqlValue::Text(v.to_owned())))
}

fn blob(v: &[u8]) -> Value {
    MaybeUnset::Set(Some(CqlValue::Blob(v.to_vec())))
}

fn boolean(v: bool) -> Value {
    MaybeUnset::Set(Some(CqlValue::Boolean(v)))
}

fn big_or_unset(v: Option<u64>) -> Value {
    v.map_or(MaybeUnset::Unset, big)
}

fn bucket_i32(b: u32) -> i32 {
    i32::try_from(b).unwrap_or(i32::MAX)
}

/// The reactions (and message keys) partition holding position `seq`.
pub fn reaction_block(seq: Seq) -> u64 {
    seq / REACTION_BLOCK
}

/// One statement of a commit, and the partition it writes.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub stmt: Stmt,
    pub values: Vec<Value>,
    pub partition: String,
}

impl Write {
    fn new(stmt: Stmt, partition: String, values: Vec<Value>) -> Write {
        Write { stmt, values, partition }
    }

    /// Approximate serialized size, for keeping batches small.
    fn size(&self) -> usize {
        self.values
            .iter()
            .map(|v| match v {
                MaybeUnset::Set(Some(CqlValue::Text(s))) => 4 + s.len(),
                MaybeUnset::Set(Some(CqlValue::Blob(b))) => 4 + b.len(),
                _ => 12,
            })
            .sum()
    }
}

/// A commit as four phases of writes; each phase starts when the one before
/// has been acknowledged (see the module docs for why). `sealing` is
/// [`Sealing::of`] the same batch.
/// The write timestamp of a fenced store's position writes (message rows, their
/// keys, heads): `FENCE_BASE + epoch · 2^40 + µs since the claim`. Every write of
/// a later owner (a higher epoch) is newer than every write of an earlier one,
/// whatever the clocks and whenever a stopped node wakes, so Cassandra keeps the
/// later owner's rows (docs/design/fenced-commit.md). Above any real clock
/// (2^53 µs is the year 2255), so rows written before fencing lose too.
pub(crate) const FENCE_BASE: i64 = 1 << 53;

/// A write timestamp for `epoch`, `since` the claim (capped, so it never reaches
/// the next epoch's range; the gateway re-claims long before).
pub(crate) fn fence_ts(epoch: u64, since: Duration) -> i64 {
    let micros = (since.as_micros() as u64).min((1 << 40) - 1);
    FENCE_BASE + ((epoch.min((1 << 22) - 1) as i64) << 40) + micros as i64
}

pub(crate) fn plan(
    batch: &[Mutation],
    idempotency_ttl_s: i32,
    sealing: &Sealing,
    ts: &dyn Fn(u64) -> i64,
) -> [Vec<Write>; 4] {
    let rows = Rows::of(batch);
    let (mut keys, mut first, mut second, mut third) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &(conv, seq, key) in &sealing.put_keys {
        let block = reaction_block(seq);
        keys.push(Write::new(
            Stmt::InsertKey,
            format!("message_keys/{conv}/{block}"),
            vec![
                big(conv),
                big(block),
                big(seq),
                blob(&key),
                MaybeUnset::Set(Some(CqlValue::BigInt(ts(conv)))),
            ],
        ));
    }
    for &(conv, seq) in &sealing.drop_keys {
        let block = reaction_block(seq);
        second.push(Write::new(
            Stmt::DeleteKey,
            format!("message_keys/{conv}/{block}"),
            vec![MaybeUnset::Set(Some(CqlValue::BigInt(ts(conv)))), big(conv), big(block), big(seq)],
        ));
    }
    for (&(conv, bucket, seq), m) in &rows.messages {
        // Deleting clears an edit time; otherwise an absent field is left unset
        // (no tombstone per message): fields are never cleared after creation.
        let edited = match (m.edited_ms, m.kind) {
            (None, MessageKind::Deleted) => MaybeUnset::Set(None),
            (e, _) => big_or_unset(e),
        };
        // Text is only ever stored sealed; a deleted message's ciphertext is cleared.
        let (body, sealed) = match (m.kind, sealing.sealed.get(&(conv, seq))) {
            (_, Some(sealed)) => (text(""), blob(sealed)),
            (MessageKind::Deleted, None) => (text(""), MaybeUnset::Set(None)),
            (MessageKind::Text | MessageKind::Edit, None) => (text(""), MaybeUnset::Unset),
            _ => (text(&m.body), MaybeUnset::Unset),
        };
        first.push(Write::new(
            Stmt::InsertMessage,
            format!("messages/{conv}/{bucket}"),
            vec![
                big(conv),
                int(bucket_i32(bucket)),
                big(seq),
                big(m.ts_ms),
                big(m.sender_id),
                text(&m.client_msg_id),
                smallint(i16::from(kind_to_u8(m.kind))),
                body,
                big_or_unset(m.target_user_id),
                m.role.map_or(MaybeUnset::Unset, |r| smallint(i16::from(crate::codec::role_to_u8(r)))),
                big_or_unset(m.target_seq),
                edited,
                sealed,
                MaybeUnset::Set(Some(CqlValue::BigInt(ts(conv)))),
            ],
        ));
    }
    for (&(conv, bucket), &first_seq) in &rows.buckets {
        first.push(Write::new(
            Stmt::InsertBucket,
            format!("message_buckets/{conv}"),
            vec![big(conv), int(bucket_i32(bucket)), big(first_seq)],
        ));
    }
    for c in rows.conversations.values() {
        first.push(Write::new(
            Stmt::InsertConversation,
            format!("conversations/{}", c.id),
            vec![
                big(c.id),
                smallint(conv_kind_to_i16(c.kind)),
                text(&c.title),
                big(c.created_ms),
                big(c.created_by),
            ],
        ));
        // The head last: fenced, on condition that the writer still owns the
        // conversation (its epoch; null for 0: nobody claimed it since it was made).
        third.push(match rows.fences.get(&c.id) {
            Some(&epoch) => Write::new(
                Stmt::UpdateHead,
                format!("conversations/{}", c.id),
                vec![
                    big(c.last_seq),
                    big(c.last_ts_ms),
                    big(c.id),
                    if epoch > 0 { big(epoch) } else { MaybeUnset::Set(None) },
                ],
            ),
            None => Write::new(
                Stmt::UpdateHeadUnfenced,
                format!("conversations/{}", c.id),
                vec![big(c.last_seq), big(c.last_ts_ms), big(c.id)],
            ),
        });
    }
    for (&(conv, sender, cmid), &seq) in &rows.idempotency {
        second.push(Write::new(
            Stmt::InsertIdempotency,
            format!("idempotency/{conv}/{sender}/{cmid}"),
            vec![big(conv), big(sender), text(cmid), big(seq), int(idempotency_ttl_s)],
        ));
    }
    for (&(conv, user), role) in &rows.members {
        match role {
            Some(role) => {
                second.push(Write::new(
                    Stmt::InsertMember,
                    format!("members/{conv}"),
                    vec![big(conv), big(user), smallint(*role)],
                ));
                second.push(Write::new(
                    Stmt::InsertUserConversation,
                    format!("user_conversations/{user}"),
                    vec![big(user), big(conv)],
                ));
            }
            None => {
                second.push(Write::new(
                    Stmt::DeleteMember,
                    format!("members/{conv}"),
                    vec![big(conv), big(user)],
                ));
                second.push(Write::new(
                    Stmt::DeleteUserConversation,
                    format!("user_conversations/{user}"),
                    vec![big(user), big(conv)],
                ));
            }
        }
    }
    for (&(lo, hi), &conv) in &rows.direct {
        second.push(Write::new(
            Stmt::InsertDirect,
            format!("direct_pairs/{lo}/{hi}"),
            vec![big(lo), big(hi), big(conv)],
        ));
    }
    for (&(conv, user), &muted) in &rows.mutes {
        let stmt = if muted { Stmt::InsertMute } else { Stmt::DeleteMute };
        second.push(Write::new(stmt, format!("mutes/{conv}"), vec![big(conv), big(user)]));
    }
    for (&(conv, user), p) in &rows.positions {
        // USING TIMESTAMP <position>: the higher position wins, in any order.
        for (stmt, v) in [(Stmt::UpdateDelivered, p.delivered), (Stmt::UpdateRead, p.read)] {
            second.push(Write::new(
                stmt,
                format!("positions/{conv}"),
                vec![big(v), big(v), big(conv), big(user)],
            ));
        }
    }
    for (&(conv, seq, user), &emoji) in &rows.reactions {
        let block = reaction_block(seq);
        let partition = format!("reactions/{conv}/{block}");
        if emoji.is_empty() {
            second.push(Write::new(
                Stmt::DeleteReaction,
                partition,
                vec![big(conv), big(block), big(seq), big(user)],
            ));
        } else {
            second.push(Write::new(
                Stmt::InsertReaction,
                partition,
                vec![big(conv), big(block), big(seq), big(user), text(emoji)],
            ));
        }
    }
    for (&user, &ms) in &rows.last_seen {
        second.push(Write::new(Stmt::UpdateLastSeen, format!("presence/{user}"), vec![big(ms), big(user)]));
    }
    for (&user, &hide) in &rows.hide {
        second.push(Write::new(
            Stmt::UpdateHideLastSeen,
            format!("presence/{user}"),
            vec![boolean(hide), big(user)],
        ));
    }
    [keys, first, second, third]
}

/// Groups one phase's writes by partition (first-seen order) and splits each
/// group into unlogged batches of bounded size. A single-partition unlogged
/// batch is applied atomically by the replica and costs one round trip.
pub(crate) fn batches(writes: Vec<Write>) -> Vec<Vec<Write>> {
    let mut by_partition: Vec<(String, Vec<Write>)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for w in writes {
        let at = *index.entry(w.partition.clone()).or_insert_with(|| {
            by_partition.push((w.partition.clone(), Vec::new()));
            by_partition.len() - 1
        });
        by_partition[at].1.push(w);
    }
    let mut out = Vec::new();
    for (_, group) in by_partition {
        let mut cur: Vec<Write> = Vec::new();
        let mut bytes = 0;
        for w in group {
            let size = w.size();
            if !cur.is_empty() && (cur.len() == BATCH_MAX_STATEMENTS || bytes + size > BATCH_MAX_BYTES) {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += size;
            cur.push(w);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

// ---- errors ----

/// What a server error means for the caller: overload, unavailability and
/// timeouts are retryable; a refused statement (schema, auth, syntax) is not.
fn db_kind(e: &DbError) -> ErrorKind {
    match e {
        DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => ErrorKind::Timeout,
        DbError::Unavailable { .. }
        | DbError::Overloaded
        | DbError::IsBootstrapping
        | DbError::ReadFailure { .. }
        | DbError::WriteFailure { .. }
        | DbError::ServerError
        | DbError::RateLimitReached { .. }
        | DbError::TruncateError
        | DbError::Unprepared { .. }
        | DbError::Other(_) => ErrorKind::Io,
        DbError::SyntaxError
        | DbError::Invalid
        | DbError::AlreadyExists { .. }
        | DbError::FunctionFailure { .. }
        | DbError::AuthenticationError
        | DbError::Unauthorized
        | DbError::ConfigError
        | DbError::ProtocolError => ErrorKind::Rejected,
        _ => ErrorKind::Io,
    }
}

fn attempt_kind(e: &RequestAttemptError) -> ErrorKind {
    match e {
        RequestAttemptError::DbError(db, _) => db_kind(db),
        RequestAttemptError::SerializationError(_) | RequestAttemptError::CqlRequestSerialization(_) => {
            ErrorKind::Rejected
        }
        _ => ErrorKind::Io,
    }
}

pub(crate) fn execution_kind(e: &ExecutionError) -> ErrorKind {
    match e {
        ExecutionError::RequestTimeout(_) => ErrorKind::Timeout,
        ExecutionError::LastAttemptError(a) => attempt_kind(a),
        ExecutionError::BadQuery(_) => ErrorKind::Rejected,
        _ => ErrorKind::Io,
    }
}

fn request_kind(e: &RequestError) -> ErrorKind {
    match e {
        RequestError::RequestTimeout(_) => ErrorKind::Timeout,
        RequestError::LastAttemptError(a) => attempt_kind(a),
        _ => ErrorKind::Io,
    }
}

fn page_kind(e: &NextPageError) -> ErrorKind {
    match e {
        NextPageError::RequestFailure(r) => request_kind(r),
        NextPageError::TypeCheckError(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

fn cql(context: &'static str) -> impl FnOnce(ExecutionError) -> StorageError {
    move |e| StorageError::new(execution_kind(&e), context, e)
}

fn pager(context: &'static str) -> impl FnOnce(PagerExecutionError) -> StorageError {
    move |e| {
        let kind = match &e {
            PagerExecutionError::NextPageError(p) => page_kind(p),
            PagerExecutionError::SerializationError(_) => ErrorKind::Rejected,
            _ => ErrorKind::Io,
        };
        StorageError::new(kind, context, e)
    }
}

fn next_row(context: &'static str) -> impl Fn(NextRowError) -> StorageError {
    move |e| {
        let kind = match &e {
            NextRowError::NextPageError(p) => page_kind(p),
            _ => ErrorKind::Corrupt,
        };
        StorageError::new(kind, context, e)
    }
}

fn decode<E: std::error::Error + Send + Sync + 'static>(
    context: &'static str,
) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::new(ErrorKind::Corrupt, context, e)
}

/// Whether `e` is the server saying the keyspace or table does not exist.
fn is_missing_schema(e: &ExecutionError) -> bool {
    matches!(e, ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::Invalid, _)))
}

/// Whether a failed username claim may nevertheless have been applied.
fn claim_outcome_unknown(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::WriteTimeout { write_type, .. },
            _,
        )) => {
            matches!(write_type, WriteType::Cas)
        }
        ExecutionError::LastAttemptError(RequestAttemptError::BrokenConnectionError(_)) => true,
        _ => false,
    }
}

/// A message row as read: [`crate::codec::MessageColumns`] and then `sealed`.
type SealedColumns =
    (i64, i64, i64, String, i16, String, Option<i64>, Option<i16>, Option<i64>, Option<i64>, Option<Vec<u8>>);

// ---- the store ----

pub struct CassandraStore {
    rt: tokio::runtime::Runtime,
    session: Session,
    opts: CassandraOptions,
    ttl_s: i32,
    prepared: OnceLock<Vec<PreparedStatement>>,
    preparing: Mutex<()>,
    /// This process's claims: epoch and when, for the fence timestamps.
    claims: Mutex<HashMap<ConversationId, (u64, std::time::Instant)>>,
    /// When this handle opened: the clock of unfenced (epoch 0) writes.
    opened: std::time::Instant,
    /// Tests: runs between a commit's phases (given the number of phases done),
    /// to fail a commit part-way for real (e.g. by killing the node).
    #[cfg(feature = "testkit")]
    between_phases: Mutex<Option<PhaseHook>>,
}

#[cfg(feature = "testkit")]
type PhaseHook = Box<dyn Fn(usize) + Send + Sync>;

impl std::fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraStore").field("keyspace", &self.opts.keyspace).finish_non_exhaustive()
    }
}

impl CassandraStore {
    /// Connects to the cluster (the keyspace need not exist yet: see [`Self::migrate`]).
    pub fn connect(opts: &CassandraOptions) -> Result<CassandraStore> {
        opts.check().map_err(|e| StorageError::new(ErrorKind::Rejected, "checking Cassandra options", e))?;
        let consistency = parse_consistency(&opts.consistency)
            .map_err(|e| StorageError::new(ErrorKind::Rejected, "checking Cassandra options", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cql-io")
            .enable_all()
            .build()
            .map_err(|e| StorageError::new(ErrorKind::Io, "starting the Cassandra runtime", e))?;
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &opts.local_dc {
            policy = policy.prefer_datacenter(dc.clone()).permit_dc_failover(false);
        }
        let profile = ExecutionProfile::builder()
            .consistency(consistency)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(opts.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&opts.contact_points)
            .connection_timeout(opts.connect_timeout)
            .default_execution_profile_handle(profile.into_handle())
            .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()));
        if let (Some(user), Some(password)) = (&opts.username, &opts.password) {
            builder = builder.user(user, password);
        }
        let session = rt.block_on(async {
            match tokio::time::timeout(opts.connect_timeout * 2, builder.build()).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(StorageError::new(ErrorKind::Io, "connecting to Cassandra", e)),
                Err(e) => Err(StorageError::new(ErrorKind::Timeout, "connecting to Cassandra", e)),
            }
        })?;
        Ok(CassandraStore {
            rt,
            session,
            ttl_s: i32::try_from(opts.idempotency_ttl.as_secs()).unwrap_or(i32::MAX),
            opts: opts.clone(),
            prepared: OnceLock::new(),
            preparing: Mutex::new(()),
            claims: Mutex::new(HashMap::new()),
            opened: std::time::Instant::now(),
            #[cfg(feature = "testkit")]
            between_phases: Mutex::new(None),
        })
    }

    /// Creates the keyspace and tables if missing (`deploy/cassandra/schema.cql`),
    /// waits for schema agreement and records the version. Returns whether it
    /// changed anything. Never alters an existing keyspace's replication (that
    /// needs `ALTER KEYSPACE` and a repair, by an operator).
    pub fn migrate(&self) -> Result<bool> {
        if self.schema_version()? >= SCHEMA_VERSION {
            return Ok(false);
        }
        self.rt.block_on(async {
            for stmt in schema_statements(&self.opts) {
                let mut stmt = scylla::statement::unprepared::Statement::from(stmt);
                stmt.set_request_timeout(Some(SCHEMA_TIMEOUT));
                self.session.query_unpaged(stmt, ()).await.map_err(cql("applying the Cassandra schema"))?;
            }
            // Columns later versions added to tables an older keyspace already has:
            // version 2 sealed bodies, version 3 owner epochs (fencing).
            let ks = &self.opts.keyspace;
            for (table, column, ty) in
                [("messages", "sealed", "blob"), ("conversations", "owner_epoch", "bigint")]
            {
                let has = self
                    .session
                    .query_unpaged(
                        "SELECT column_name FROM system_schema.columns \
                         WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
                        (ks, table, column),
                    )
                    .await
                    .map_err(cql("reading a table's columns"))?
                    .into_rows_result()
                    .map_err(decode("reading a table's columns"))?
                    .rows_num()
                    > 0;
                if !has {
                    let mut stmt = scylla::statement::unprepared::Statement::from(format!(
                        "ALTER TABLE {ks}.{table} ADD {column} {ty}"
                    ));
                    stmt.set_request_timeout(Some(SCHEMA_TIMEOUT));
                    self.session.query_unpaged(stmt, ()).await.map_err(cql("adding a column"))?;
                }
            }
            self.session
                .await_schema_agreement()
                .await
                .map_err(|e| StorageError::new(ErrorKind::Io, "waiting for schema agreement", e))?;
            self.session
                .query_unpaged(
                    format!("INSERT INTO {ks}.schema_version (id, version) VALUES (0, {SCHEMA_VERSION})"),
                    (),
                )
                .await
                .map_err(cql("recording the schema version"))?;
            Ok(true)
        })
    }

    /// The schema version of the keyspace (0: keyspace or tables missing).
    pub fn schema_version(&self) -> Result<i32> {
        let ks = &self.opts.keyspace;
        self.rt.block_on(async {
            let r = self
                .session
                .query_unpaged(format!("SELECT version FROM {ks}.schema_version WHERE id = 0"), ())
                .await;
            match r {
                Err(e) if is_missing_schema(&e) => Ok(0),
                Err(e) => Err(cql("reading the schema version")(e)),
                Ok(r) => {
                    let rows = r.into_rows_result().map_err(decode("reading the schema version"))?;
                    let v: Option<(Option<i32>,)> =
                        rows.maybe_first_row().map_err(decode("reading the schema version"))?;
                    Ok(v.and_then(|v| v.0).unwrap_or(0))
                }
            }
        })
    }

    /// Drops the keyspace (tests only: each conformance run uses its own).
    #[doc(hidden)]
    pub fn drop_keyspace(&self) -> Result<()> {
        let ks = &self.opts.keyspace;
        self.rt.block_on(async {
            self.session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
                .await
                .map(drop)
                .map_err(cql("dropping the keyspace"))
        })
    }

    /// Tests: `hook(n)` runs after phase `n` of every later commit has landed and
    /// before phase `n + 1` starts.
    #[cfg(feature = "testkit")]
    pub fn set_between_phases(&self, hook: Option<PhaseHook>) {
        *self.between_phases.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// Runs one CQL statement, `{ks}` standing for the keyspace (tests: making
    /// a keyspace look like an older schema's).
    #[cfg(feature = "testkit")]
    pub fn execute_raw(&self, statement: &str) -> Result<()> {
        let statement = statement.replace("{ks}", &self.opts.keyspace);
        self.rt.block_on(async {
            self.session.query_unpaged(statement, ()).await.map(drop).map_err(cql("running a statement"))
        })
    }

    /// A message's stored key (tests: searching the node's files for it).
    #[cfg(feature = "testkit")]
    pub fn message_key(&self, conv: ConversationId, seq: Seq) -> Result<Option<Vec<u8>>> {
        Ok(self.stored_keys(&[(conv, seq)])?.remove(&(conv, seq)).map(|k| k.to_vec()))
    }

    /// The names of the cluster's keyspaces (tests: finding their own leftovers).
    #[cfg(feature = "testkit")]
    pub fn keyspaces(&self) -> Result<Vec<String>> {
        self.rt.block_on(async {
            let r = self
                .session
                .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
                .await
                .map_err(cql("listing keyspaces"))?;
            let rows = r.into_rows_result().map_err(decode("listing keyspaces"))?;
            rows.rows::<(String,)>()
                .map_err(decode("listing keyspaces"))?
                .map(|r| r.map(|(k,)| k).map_err(decode("listing keyspaces")))
                .collect()
        })
    }

    /// Drops another keyspace of the cluster (tests: removing a dead run's leftovers).
    #[cfg(feature = "testkit")]
    pub fn drop_other_keyspace(&self, keyspace: &str) -> Result<()> {
        if !is_identifier(keyspace) {
            return Err(StorageError::new(ErrorKind::Rejected, "dropping a keyspace", "not a keyspace name"));
        }
        self.rt.block_on(async {
            self.session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
                .await
                .map(drop)
                .map_err(cql("dropping a keyspace"))
        })
    }

    /// The prepared statements, prepared on first use (after `migrate`).
    fn prepared(&self) -> Result<&[PreparedStatement]> {
        if let Some(p) = self.prepared.get() {
            return Ok(p);
        }
        let _one = self.preparing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.prepared.get() {
            return Ok(p);
        }
        let all = self.rt.block_on(async {
            let mut out = Vec::with_capacity(Stmt::ALL.len());
            for s in Stmt::ALL {
                let mut p = self
                    .session
                    .prepare(s.cql(&self.opts.keyspace))
                    .await
                    .map_err(|e| StorageError::new(ErrorKind::Io, "preparing statements", e))?;
                p.set_is_idempotent(s.idempotent());
                if let Some(c) = s.consistency() {
                    p.set_consistency(c);
                }
                if s.paged() {
                    p.set_page_size(PAGE_ROWS);
                }
                out.push(p);
            }
            Ok::<_, StorageError>(out)
        })?;
        Ok(self.prepared.get_or_init(|| all))
    }

    fn stmt(&self, s: Stmt) -> Result<&PreparedStatement> {
        Ok(&self.prepared()?[s as usize])
    }

    /// At most one row of a single-partition read.
    fn one<T>(&self, context: &'static str, s: Stmt, values: impl SerializeRow) -> Result<Option<T>>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let stmt = self.stmt(s)?;
        self.rt.block_on(async {
            let r = self.session.execute_unpaged(stmt, values).await.map_err(cql(context))?;
            let rows = r.into_rows_result().map_err(decode(context))?;
            rows.maybe_first_row::<T>().map_err(decode(context))
        })
    }

    /// Every row of a read, fetched page by page.
    fn all<T>(&self, context: &'static str, s: Stmt, values: impl SerializeRow) -> Result<Vec<T>>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm> + 'static,
    {
        let stmt = self.stmt(s)?.clone();
        self.rt.block_on(async {
            let pager = self.session.execute_iter(stmt, values).await.map_err(pager(context))?;
            pager.rows_stream::<T>().map_err(decode(context))?.map_err(next_row(context)).try_collect().await
        })
    }

    /// The stored keys of messages `wanted` (those erased are absent), one
    /// request each, all in flight together (edits are few).
    fn stored_keys(&self, wanted: &[(ConversationId, Seq)]) -> Result<HashMap<(ConversationId, Seq), Key>> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let stmt = self.stmt(Stmt::SelectKey)?;
        self.rt.block_on(async {
            let found = futures_util::stream::iter(wanted.iter().copied())
                .map(|(conv, seq)| async move {
                    let r = self
                        .session
                        .execute_unpaged(stmt, (i(conv), i(reaction_block(seq)), i(seq)))
                        .await
                        .map_err(cql("reading message keys"))?;
                    let rows = r.into_rows_result().map_err(decode("reading message keys"))?;
                    let key = rows.maybe_first_row::<(Vec<u8>,)>().map_err(decode("reading message keys"))?;
                    key.map(|(k,)| Ok(((conv, seq), seal::key_from_bytes(k)?))).transpose()
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(found.into_iter().flatten().collect())
        })
    }

    /// The keys of `seqs` (any order, repeats allowed) in conversation `conv`:
    /// one paged read per block of positions they fall in.
    fn keys_of(&self, conv: ConversationId, seqs: &[Seq]) -> Result<HashMap<Seq, Key>> {
        let mut blocks: BTreeMap<u64, (Seq, Seq)> = BTreeMap::new();
        for &seq in seqs {
            let r = blocks.entry(reaction_block(seq)).or_insert((seq, seq));
            *r = (r.0.min(seq), r.1.max(seq));
        }
        let mut out = HashMap::with_capacity(seqs.len());
        for (block, (lo, hi)) in blocks {
            for (seq, key) in self.all::<(i64, Vec<u8>)>(
                "reading message keys",
                Stmt::SelectKeys,
                (i(conv), i(block), i(lo), i(hi)),
            )? {
                out.insert(u(seq), seal::key_from_bytes(key)?);
            }
        }
        Ok(out)
    }

    /// Takes deleted messages' keys out of every live node's commit log
    /// (`gateway erase`, on a schedule). A delete writes a tombstone; the key's
    /// bytes stay in the commit log segment that received it until the segment
    /// is recycled, which on a quiet node may be never. Dropping a table makes
    /// every node flush its memtables and recycle all of its commit log segments
    /// (CASSANDRA-16986), so this creates and drops an empty scratch table.
    /// (With `auto_snapshot`, each node keeps an empty snapshot of it.) The
    /// SSTables that hold keys are a node-local matter: `nodetool garbagecollect`
    /// on `message_keys` (deploy/cassandra/switchboard-erase-keys), which the
    /// returned report reminds of.
    pub fn erase_deleted(&self) -> Result<String> {
        let ks = &self.opts.keyspace;
        let scratch = format!("{ks}.erase_scratch");
        self.rt.block_on(async {
            for cql_text in [
                format!("DROP TABLE IF EXISTS {scratch}"),
                format!("CREATE TABLE {scratch} (k int PRIMARY KEY)"),
                format!("DROP TABLE {scratch}"),
            ] {
                let mut stmt = scylla::statement::unprepared::Statement::from(cql_text);
                stmt.set_request_timeout(Some(SCHEMA_TIMEOUT));
                self.session.query_unpaged(stmt, ()).await.map_err(cql("recycling commit logs"))?;
                self.session
                    .await_schema_agreement()
                    .await
                    .map_err(|e| StorageError::new(ErrorKind::Io, "waiting for schema agreement", e))?;
            }
            Ok(format!(
                "memtables flushed and commit logs recycled on every live node; deleted keys leave the \
                 SSTables when each node runs `nodetool garbagecollect {ks} message_keys` \
                 (deploy/cassandra/switchboard-erase-keys)"
            ))
        })
    }

    /// Runs one batch of same-partition writes.
    async fn write(&self, prepared: &[PreparedStatement], group: Vec<Write>) -> Result<()> {
        if let [w] = group.as_slice() {
            return self
                .session
                .execute_unpaged(&prepared[w.stmt as usize], &w.values)
                .await
                .map(drop)
                .map_err(cql("writing a commit"));
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for w in &group {
            batch.append_statement(prepared[w.stmt as usize].clone());
        }
        batch.set_is_idempotent(group.iter().all(|w| w.stmt.idempotent()));
        let values: Vec<Vec<Value>> = group.into_iter().map(|w| w.values).collect();
        self.session.batch(&batch, values).await.map(drop).map_err(cql("writing a commit"))
    }
}

/// A fenced commit's conditions: all applied, or [`ErrorKind::Fenced`].
fn all_applied(applied: Vec<bool>) -> Result<()> {
    if applied.into_iter().all(|a| a) {
        Ok(())
    } else {
        Err(StorageError::new(ErrorKind::Fenced, "committing", "a conversation was claimed by another owner"))
    }
}

impl CassandraStore {
    /// Fails with [`ErrorKind::Fenced`] unless every conversation's epoch is the one given.
    async fn check_fences(&self, prepared: &[PreparedStatement], fences: &BTreeMap<u64, u64>) -> Result<()> {
        let checks = fences.iter().map(|(&conv, &epoch)| async move {
            let e = (epoch > 0).then_some(i(epoch));
            self.set_epoch(prepared, conv, e, e, "fencing a commit").await
        });
        all_applied(futures_util::future::try_join_all(checks).await?)
    }

    /// Sets the conversation's owner epoch to `new` if it is `expected`; whether it was.
    async fn set_epoch(
        &self,
        prepared: &[PreparedStatement],
        conv: ConversationId,
        new: Option<i64>,
        expected: Option<i64>,
        context: &'static str,
    ) -> Result<bool> {
        self.lwt(&prepared[Stmt::SetEpoch as usize], (new, i(conv), expected), context).await
    }

    /// Runs a lightweight transaction; whether it applied. A timeout leaves the
    /// outcome unknown: a retryable [`ErrorKind::Timeout`].
    async fn lwt(
        &self,
        stmt: &PreparedStatement,
        values: impl SerializeRow,
        context: &'static str,
    ) -> Result<bool> {
        let r = self.session.execute_unpaged(stmt, values).await.map_err(|e| {
            if claim_outcome_unknown(&e) {
                StorageError::new(ErrorKind::Timeout, context, e)
            } else {
                cql(context)(e)
            }
        })?;
        let rows = r.into_rows_result().map_err(decode(context))?;
        let row: Option<scylla::value::Row> = rows.maybe_first_row().map_err(decode(context))?;
        match row.map(|r| r.columns).unwrap_or_default().first() {
            Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
            _ => Err(corrupt("unexpected answer to a conditional update")),
        }
    }
}

impl Store for CassandraStore {
    fn commit(&self, batch: &[Mutation]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let prepared = self.prepared()?;
        let rows = Rows::of(batch);
        let sealing = Sealing::of(&rows, self.stored_keys(&Sealing::wanted(&rows))?);
        let ts = {
            let claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
            let fenced: HashMap<u64, i64> = rows
                .fences
                .iter()
                .map(|(&conv, &epoch)| {
                    let since = claims.get(&conv).filter(|c| c.0 == epoch).map_or(self.opened, |c| c.1);
                    (conv, fence_ts(epoch, since.elapsed()))
                })
                .collect();
            let unfenced = fence_ts(0, self.opened.elapsed());
            move |conv: u64| fenced.get(&conv).copied().unwrap_or(unfenced)
        };
        let phases = plan(batch, self.ttl_s, &sealing, &ts);
        self.rt.block_on(async {
            // The fence first: one lightweight transaction per fenced conversation,
            // serialised with claims by Paxos. Fenced: nothing is written.
            self.check_fences(prepared, &rows.fences).await?;
            let [keys, first, second, heads] = phases;
            #[cfg_attr(not(feature = "testkit"), expect(clippy::unused_enumerate_index))]
            for (_done, writes) in [keys, first, second].into_iter().enumerate() {
                #[cfg(feature = "testkit")]
                if _done > 0
                    && let Some(hook) = &*self.between_phases.lock().unwrap_or_else(|e| e.into_inner())
                {
                    hook(_done);
                }
                futures_util::stream::iter(batches(writes))
                    .map(|group| self.write(prepared, group))
                    .buffer_unordered(IN_FLIGHT)
                    .try_collect::<Vec<()>>()
                    .await?;
            }
            #[cfg(feature = "testkit")]
            if let Some(hook) = &*self.between_phases.lock().unwrap_or_else(|e| e.into_inner()) {
                hook(3);
            }
            // The heads: each a lightweight transaction on the writer's epoch. A claim
            // that came in after the first check (this node stopped meanwhile) makes
            // it fail: the head stays, so these rows stay past it, unseen, until the
            // new owner writes over them (its fence timestamps are newer) or adopts
            // them; and the batch is answered as fenced, never acknowledged.
            let heads = heads.into_iter().map(|w| async move {
                let stmt = &prepared[w.stmt as usize];
                if w.stmt == Stmt::UpdateHeadUnfenced {
                    self.session.execute_unpaged(stmt, w.values).await.map_err(cql("moving a head"))?;
                    return Ok(true);
                }
                self.lwt(stmt, w.values, "moving a head").await
            });
            all_applied(futures_util::future::try_join_all(heads).await?)
        })
    }

    /// Claims with a lightweight transaction: reads the epoch at LOCAL_SERIAL (which
    /// settles any Paxos round in flight), then sets the next one if it is still
    /// the one read; contention (two claimers at once) retries.
    fn claim(&self, conv: ConversationId, node: u16) -> Result<u64> {
        let prepared = self.prepared()?;
        self.rt.block_on(async {
            for _ in 0..16 {
                let r = self
                    .session
                    .execute_unpaged(&prepared[Stmt::SelectEpochSerial as usize], (i(conv),))
                    .await
                    .map_err(cql("claiming a conversation"))?;
                let rows = r.into_rows_result().map_err(decode("claiming a conversation"))?;
                let row: Option<(Option<i64>, Option<i64>)> =
                    rows.maybe_first_row().map_err(decode("claiming a conversation"))?;
                // No conversation (or only an epoch cell): nothing to own yet.
                let Some((epoch, Some(_created))) = row else { return Ok(0) };
                let next = epoch.unwrap_or(0) + 1;
                if self.set_epoch(prepared, conv, Some(next), epoch, "claiming a conversation").await? {
                    // Recorded before the claim returns, so before anything this
                    // node writes under it is acknowledged.
                    self.session
                        .execute_unpaged(
                            &prepared[Stmt::InsertNodeClaim as usize],
                            (i32::from(node), i(conv), next),
                        )
                        .await
                        .map_err(cql("recording a conversation's claimer"))?;
                    let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
                    claims.insert(conv, (u(next), std::time::Instant::now()));
                    return Ok(u(next));
                }
            }
            Err(StorageError::new(
                ErrorKind::Timeout,
                "claiming a conversation",
                "contended by other claimers",
            ))
        })
    }

    /// The node's claim rows, each kept while the conversation's epoch is still
    /// the claimed one and its last message is recent enough (one read each, all
    /// in flight together; only a node's death asks).
    fn claimed_by(&self, node: u16, since_ms: u64) -> Result<Vec<ConversationId>> {
        let claims = self.all::<(i64, i64)>(
            "listing a node's conversations",
            Stmt::SelectNodeClaims,
            (i32::from(node),),
        )?;
        let stmt = self.stmt(Stmt::SelectClaimState)?;
        self.rt.block_on(async {
            let kept = futures_util::stream::iter(claims)
                .map(|(conv, epoch)| async move {
                    let r = self
                        .session
                        .execute_unpaged(stmt, (conv,))
                        .await
                        .map_err(cql("listing a node's conversations"))?;
                    let rows = r.into_rows_result().map_err(decode("listing a node's conversations"))?;
                    let state = rows
                        .maybe_first_row::<(Option<i64>, Option<i64>)>()
                        .map_err(decode("listing a node's conversations"))?;
                    Ok::<_, StorageError>(match state {
                        Some((Some(e), Some(ts))) if e == epoch && u(ts) >= since_ms => Some(u(conv)),
                        _ => None,
                    })
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(kept.into_iter().flatten().collect())
        })
    }

    /// Writes the user row, then claims the lowercase name with a lightweight
    /// transaction. A claim that timed out is settled by reading the name back
    /// at LOCAL_SERIAL. A lost claim deletes the user row again.
    fn create_user(&self, user: &UserRecord) -> Result<()> {
        let prepared = self.prepared()?;
        let lower = user.username.to_lowercase();
        self.rt.block_on(async {
            self.session
                .execute_unpaged(
                    &prepared[Stmt::InsertUser as usize],
                    (i(user.id), &user.username, &user.password_hash, i(user.created_ms)),
                )
                .await
                .map_err(cql("registering"))?;
            let claim = self
                .session
                .execute_unpaged(&prepared[Stmt::ClaimUsername as usize], (&lower, i(user.id)))
                .await;
            let owner = match claim {
                Ok(r) => {
                    // An LWT answers `[applied]`, plus the existing row when not applied.
                    let rows = r.into_rows_result().map_err(decode("registering"))?;
                    let row: Option<scylla::value::Row> =
                        rows.maybe_first_row().map_err(decode("registering"))?;
                    let cols = row.map(|r| r.columns).unwrap_or_default();
                    match cols.as_slice() {
                        [Some(CqlValue::Boolean(true)), ..] => return Ok(()),
                        [Some(CqlValue::Boolean(false)), .., Some(CqlValue::BigInt(id))] => Some(u(*id)),
                        _ => return Err(corrupt("unexpected answer to a username claim")),
                    }
                }
                Err(e) if claim_outcome_unknown(&e) => {
                    let serial = &prepared[Stmt::SelectUsernameSerial as usize];
                    let r =
                        self.session.execute_unpaged(serial, (&lower,)).await.map_err(cql("registering"))?;
                    let rows = r.into_rows_result().map_err(decode("registering"))?;
                    match rows.maybe_first_row::<(i64,)>().map_err(decode("registering"))? {
                        Some((id,)) => Some(u(id)),
                        None => return Err(StorageError::new(ErrorKind::Timeout, "registering", e)),
                    }
                }
                Err(e) => return Err(cql("registering")(e)),
            };
            match owner {
                Some(id) if id == user.id => Ok(()),
                _ => {
                    // The name is someone else's: take back the row written for it. Should
                    // this fail too, the row is unreachable (no name maps to it, and its id
                    // is never handed out), so the refusal stands either way.
                    let _ = self
                        .session
                        .execute_unpaged(&prepared[Stmt::DeleteUser as usize], (i(user.id),))
                        .await;
                    Err(StorageError::new(ErrorKind::UsernameTaken, "registering", "username taken"))
                }
            }
        })
    }

    fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        Ok(self.one::<(i64, String, String, i64)>("reading a user", Stmt::SelectUser, (i(id),))?.map(
            |(id, username, password_hash, created_ms)| UserRecord {
                id: u(id),
                username,
                password_hash,
                created_ms: u(created_ms),
            },
        ))
    }

    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let lower = username.to_lowercase();
        match self.one::<(i64,)>("reading a username", Stmt::SelectUsername, (&lower,))? {
            Some((id,)) => self.user(u(id)),
            None => Ok(None),
        }
    }

    fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRecord>> {
        type Head = (i64, Option<i16>, Option<String>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
        let Some(r) = self.one::<Head>("reading a conversation", Stmt::SelectConversation, (i(id),))? else {
            return Ok(None);
        };
        // A head written before its record (a half-applied commit) is not a conversation.
        let Some(kind) = r.1 else { return Ok(None) };
        Ok(Some(ConversationRecord {
            id: u(r.0),
            kind: conv_kind_from_i16(kind)?,
            title: r.2.unwrap_or_default(),
            created_ms: u(r.3.unwrap_or(0)),
            created_by: u(r.4.unwrap_or(0)),
            last_seq: u(r.5.unwrap_or(0)),
            last_ts_ms: u(r.6.unwrap_or(0)),
        }))
    }

    fn members(&self, id: ConversationId) -> Result<Vec<(UserId, Role)>> {
        self.all::<(i64, i16)>("reading members", Stmt::SelectMembers, (i(id),))?
            .into_iter()
            .map(|(user, role)| Ok((u(user), role_from_u8(small(role)?)?)))
            .collect()
    }

    fn member_role(&self, id: ConversationId, user: UserId) -> Result<Option<Role>> {
        self.one::<(i16,)>("reading a member", Stmt::SelectMemberRole, (i(id), i(user)))?
            .map(|(r,)| role_from_u8(small(r)?))
            .transpose()
    }

    fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationId>> {
        Ok(self
            .all::<(i64,)>("reading a user's conversations", Stmt::SelectUserConversations, (i(user),))?
            .into_iter()
            .map(|(c,)| u(c))
            .collect())
    }

    fn direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>> {
        let (x, y) = pair(a, b);
        Ok(self.one::<(i64,)>("reading a direct pair", Stmt::SelectDirect, (i(x), i(y)))?.map(|(c,)| u(c)))
    }

    fn idempotent_seq(
        &self,
        conv: ConversationId,
        sender: UserId,
        client_msg_id: &str,
    ) -> Result<Option<Seq>> {
        Ok(self
            .one::<(i64,)>(
                "reading an idempotency key",
                Stmt::SelectIdempotency,
                (i(conv), i(sender), client_msg_id),
            )?
            .map(|(s,)| u(s)))
    }

    fn muted(&self, conv: ConversationId, user: UserId) -> Result<bool> {
        Ok(self.one::<(i64,)>("reading a mute", Stmt::SelectMute, (i(conv), i(user)))?.is_some())
    }

    fn positions(&self, conv: ConversationId, user: UserId) -> Result<Positions> {
        Ok(self
            .one::<(Option<i64>, Option<i64>)>(
                "reading positions",
                Stmt::SelectPositions,
                (i(conv), i(user)),
            )?
            .map(|(d, r)| Positions { delivered: u(d.unwrap_or(0)), read: u(r.unwrap_or(0)) })
            .unwrap_or_default())
    }

    fn all_positions(&self, conv: ConversationId) -> Result<Vec<(UserId, Positions)>> {
        Ok(self
            .all::<(i64, Option<i64>, Option<i64>)>(
                "reading positions",
                Stmt::SelectAllPositions,
                (i(conv),),
            )?
            .into_iter()
            .map(|(user, d, r)| {
                (u(user), Positions { delivered: u(d.unwrap_or(0)), read: u(r.unwrap_or(0)) })
            })
            .collect())
    }

    fn reactions(&self, conv: ConversationId, lo: Seq, hi: Seq) -> Result<Vec<(Seq, UserId, String)>> {
        let mut out = Vec::new();
        if lo > hi {
            return Ok(out);
        }
        // One request per block in the range: a range wider than a few blocks (a
        // caller asking for "everything") ends at the newest message, since no
        // reaction lies beyond it.
        let hi = if reaction_block(hi) - reaction_block(lo) > 4 {
            match crate::page(self, conv, crate::Anchor::Latest, 1)?.messages.first() {
                Some(newest) if newest.seq >= lo => hi.min(newest.seq),
                _ => return Ok(out),
            }
        } else {
            hi
        };
        for block in reaction_block(lo)..=reaction_block(hi) {
            out.extend(
                self.all::<(i64, i64, String)>(
                    "reading reactions",
                    Stmt::SelectReactions,
                    (i(conv), i(block), i(lo), i(hi)),
                )?
                .into_iter()
                .map(|(s, user, emoji)| (u(s), u(user), emoji)),
            );
        }
        Ok(out)
    }

    fn presence(&self, user: UserId) -> Result<PresenceRecord> {
        Ok(self
            .one::<(Option<i64>, Option<bool>)>("reading presence", Stmt::SelectPresence, (i(user),))?
            .map(|(seen, hide)| PresenceRecord {
                last_seen_ms: seen.map(u),
                hide_last_seen: hide.unwrap_or(false),
            })
            .unwrap_or_default())
    }

    fn buckets(&self, conv: ConversationId) -> Result<Vec<BucketRef>> {
        self.all::<(i32, i64)>("reading buckets", Stmt::SelectBuckets, (i(conv),))?
            .into_iter()
            .map(|(bucket, first)| {
                Ok(BucketRef {
                    bucket: u32::try_from(bucket).map_err(|_| corrupt("negative bucket"))?,
                    first_seq: u(first),
                })
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
        let s = match order {
            Order::Ascending => Stmt::SelectMessagesAsc,
            Order::Descending => Stmt::SelectMessagesDesc,
        };
        let stmt = self.stmt(s)?;
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);

        let rows: Vec<SealedColumns> = self.rt.block_on(async {
            // LIMIT is at most a page (101 rows): one request, one partition.
            let r = self
                .session
                .execute_unpaged(stmt, (i(conv), bucket_i32(bucket), i(lo), i(hi), limit))
                .await
                .map_err(cql("reading a bucket"))?;
            let rows = r.into_rows_result().map_err(decode("reading a bucket"))?;
            rows.rows::<SealedColumns>()
                .map_err(decode("reading a bucket"))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(decode("reading a bucket"))
        })?;
        let mut out = Vec::with_capacity(rows.len());
        let mut sealed = Vec::new();
        for r in rows {
            let (seq, kind, target, body) = (u(r.0), r.4, r.8.map(u), r.10);
            let m = message_from_columns(conv, (r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9))?;
            if let Some(body) = body {
                // An `edit` row is sealed under the key of the message it edits.
                let key_seq = if kind == i16::from(kind_to_u8(MessageKind::Edit)) {
                    target.unwrap_or(seq)
                } else {
                    seq
                };
                sealed.push((out.len(), key_seq, body));
            }
            out.push(m);
        }
        if !sealed.is_empty() {
            let keys = self.keys_of(conv, &sealed.iter().map(|s| s.1).collect::<Vec<_>>())?;
            for (at, key_seq, body) in sealed {
                // No key: the message was deleted, and its text with it.
                if let Some(key) = keys.get(&key_seq) {
                    seal::open_into(&mut out[at], key, &body)?;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConversationKind;
    use std::collections::{BTreeSet, HashMap};

    fn opts() -> CassandraOptions {
        CassandraOptions {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "chat_eu".into(),
            local_dc: Some("eu-west".into()),
            consistency: "local_quorum".into(),
            replication: BTreeMap::from([("eu-west".into(), 3), ("us-east".into(), 2)]),
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            idempotency_ttl: Duration::from_secs(604_800),
        }
    }

    /// A table of the schema file: columns, partition key, clustering columns, options.
    #[derive(Debug)]
    struct Table {
        columns: BTreeSet<String>,
        partition: Vec<String>,
        clustering: Vec<String>,
        options: String,
    }

    fn tables() -> HashMap<String, Table> {
        let mut out = HashMap::new();
        for stmt in schema_statements(&opts()) {
            let Some(rest) = stmt.strip_prefix("CREATE TABLE IF NOT EXISTS chat_eu.") else { continue };
            let (name, rest) = rest.split_once(" (").expect("table body");
            // The parenthesis closing the table body (options may hold more).
            let mut depth = 1;
            let close = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += i32::from(c == '(') - i32::from(c == ')');
                    depth == 0
                })
                .expect("closing parenthesis")
                .0;
            let (body, options) = (&rest[..close], &rest[close + 1..]);
            let mut columns = BTreeSet::new();
            let (mut partition, mut clustering) = (Vec::new(), Vec::new());
            let pk = body.find("PRIMARY KEY (");
            for col in body[..pk.unwrap_or(body.len())].split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let mut words = col.split_whitespace();
                let c = words.next().unwrap().to_owned();
                if col.ends_with("PRIMARY KEY") {
                    partition.push(c.clone());
                }
                columns.insert(c);
            }
            if let Some(at) = pk {
                let key = &body[at + "PRIMARY KEY (".len()..];
                let key = key.trim_end().strip_suffix(')').expect("key closes");
                let (part, clus) = match key.strip_prefix('(') {
                    Some(k) => {
                        let (p, c) = k.split_once(')').unwrap();
                        (p.to_owned(), c.trim_start_matches(',').to_owned())
                    }
                    None => match key.split_once(',') {
                        Some((p, c)) => (p.to_owned(), c.to_owned()),
                        None => (key.to_owned(), String::new()),
                    },
                };
                let names =
                    |s: &str| s.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect();
                partition = names(&part);
                clustering = names(&clus);
            }
            out.insert(
                name.to_owned(),
                Table { columns, partition, clustering, options: options.to_owned() },
            );
        }
        out
    }

    /// The table a statement touches.
    fn table_of(cql: &str) -> String {
        let after = ["FROM chat_eu.", "INTO chat_eu.", "UPDATE chat_eu."]
            .iter()
            .find_map(|k| cql.split_once(k).map(|(_, r)| r))
            .expect("statement names a table");
        after.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').next().unwrap().to_owned()
    }

    /// Columns bound by equality in a WHERE clause, or listed in an INSERT.
    fn keyed_columns(cql: &str) -> BTreeSet<String> {
        if let Some((_, rest)) = cql.split_once(" (")
            && cql.starts_with("INSERT")
        {
            return rest.split(')').next().unwrap().split(',').map(|c| c.trim().to_owned()).collect();
        }
        let (_, wh) = cql.split_once(" WHERE ").expect("a WHERE clause");
        wh.split(" AND ").filter_map(|c| c.split_once(" = ?").map(|(col, _)| col.trim().to_owned())).collect()
    }

    #[test]
    fn statement_table_matches_the_enum() {
        for (n, s) in Stmt::ALL.iter().enumerate() {
            assert_eq!(*s as usize, n, "Stmt::ALL is in declaration order");
        }
        let distinct: BTreeSet<_> = Stmt::ALL.iter().collect();
        assert_eq!(distinct.len(), Stmt::ALL.len());
    }

    #[test]
    fn schema_has_the_promised_shape() {
        let t = tables();
        let m = &t["messages"];
        assert_eq!(m.partition, ["conversation_id", "bucket"], "messages by (conversation, time bucket)");
        assert_eq!(m.clustering, ["seq"]);
        assert!(m.options.contains("CLUSTERING ORDER BY (seq DESC)"), "newest first: {}", m.options);
        assert!(m.options.contains("LeveledCompactionStrategy"));
        assert_eq!(t["user_conversations"].partition, ["user_id"], "the per-user conversation index");
        assert_eq!(t["positions"].partition, ["conversation_id"]);
        assert!(t["positions"].columns.contains("read") && t["positions"].columns.contains("delivered"));
        assert_eq!(t["usernames"].partition, ["username_lower"], "unique usernames");
        assert_eq!(t["users"].partition, ["id"]);
        let idem = &t["idempotency"];
        assert_eq!(idem.partition, ["conversation_id", "sender_id", "client_msg_id"]);
        let ttl: u64 = idem
            .options
            .split("default_time_to_live = ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("idempotency keys expire");
        assert!(ttl >= 86_400, "kept at least a day: {ttl}");
        assert!(idem.options.contains("TimeWindowCompactionStrategy"));
        assert_eq!(t["reactions"].partition, ["conversation_id", "block"], "reactions are bounded too");
        for (name, table) in &t {
            assert!(!table.partition.is_empty(), "{name} has a partition key");
            for c in table.partition.iter().chain(&table.clustering) {
                assert!(table.columns.contains(c), "{name}: key column {c} is declared");
            }
        }
        let all = schema_statements(&opts()).join(";").to_ascii_uppercase();
        for banned in ["ALLOW FILTERING", "CREATE INDEX", "MATERIALIZED VIEW", "SIMPLESTRATEGY"] {
            assert!(!all.contains(banned), "the schema uses no {banned}");
        }
    }

    #[test]
    fn a_later_owners_writes_are_newer_whatever_the_clock() {
        let day = Duration::from_secs(86_400);
        // A later epoch beats any time within an earlier one (up to the cap).
        assert!(fence_ts(2, Duration::ZERO) > fence_ts(1, 12 * day));
        assert!(fence_ts(2, Duration::ZERO) > fence_ts(1, 365 * day), "capped below the next epoch");
        // One owner's writes move forward with time.
        assert!(fence_ts(5, Duration::from_micros(2)) > fence_ts(5, Duration::from_micros(1)));
        // Every fenced write is newer than anything written with a real clock.
        let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
        assert!(fence_ts(0, Duration::ZERO) as u128 > now_us * 4);
        assert!(fence_ts(u64::MAX, 365 * day) > 0, "never overflows");
    }

    #[test]
    fn schema_statements_take_the_configured_keyspace_and_replication() {
        let s = schema_statements(&opts());
        assert_eq!(
            s[0],
            "CREATE KEYSPACE IF NOT EXISTS chat_eu WITH replication = {'class': 'NetworkTopologyStrategy', \
             'eu-west': 3, 'us-east': 2} AND durable_writes = true"
        );
        assert_eq!(s.len(), 1 + tables().len());
        for stmt in &s[1..] {
            assert!(stmt.starts_with("CREATE TABLE IF NOT EXISTS chat_eu."), "{stmt}");
            assert!(!stmt.contains("switchboard."), "{stmt}");
            assert!(!stmt.contains("--"), "comments are stripped: {stmt}");
        }
    }

    #[test]
    fn every_statement_reads_or_writes_one_partition_by_its_full_key() {
        let t = tables();
        for s in Stmt::ALL {
            let cql = s.cql("chat_eu");
            assert!(!cql.contains("{ks}"), "{cql}");
            assert!(!cql.to_ascii_uppercase().contains("ALLOW FILTERING"), "{cql}");
            let table = &t[&table_of(&cql)];
            let keyed = keyed_columns(&cql);
            for pk in &table.partition {
                assert!(keyed.contains(pk), "{s:?} binds partition key column {pk}: {cql}");
            }
            if cql.starts_with("SELECT") {
                let cols = cql["SELECT ".len()..cql.find(" FROM ").unwrap()].split(',').map(str::trim);
                for c in cols {
                    assert!(table.columns.contains(c), "{s:?} reads a declared column {c}");
                }
                let full_key = table.partition.iter().chain(&table.clustering).all(|c| keyed.contains(c));
                assert!(
                    full_key || s.paged() || cql.contains("LIMIT ?"),
                    "{s:?}: a multi-row read is paged or limited: {cql}"
                );
            }
            if cql.contains("ORDER BY") {
                assert!(cql.contains("ORDER BY seq"), "ordering only by the clustering column: {cql}");
            }
        }
    }

    #[test]
    fn only_lightweight_transactions_are_not_idempotent() {
        for s in Stmt::ALL {
            let lwt = s.cql("ks").contains(" IF ");
            assert_eq!(s.idempotent(), !lwt, "{s:?}");
        }
        assert_eq!(Stmt::SelectUsernameSerial.consistency(), Some(Consistency::LocalSerial));
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(opts().check(), Ok(()));
        let bad = |f: fn(&mut CassandraOptions)| {
            let mut o = opts();
            f(&mut o);
            o.check().unwrap_err()
        };
        assert!(bad(|o| o.keyspace = "chat-eu".into()).contains("identifier"));
        assert!(bad(|o| o.keyspace = "1chat".into()).contains("identifier"));
        assert!(bad(|o| o.keyspace = "a; DROP KEYSPACE x".into()).contains("identifier"));
        assert!(bad(|o| o.replication.clear()).contains("no datacenter"));
        assert!(
            bad(|o| {
                o.replication.insert("eu-west".into(), 0);
            })
            .contains("factor 0")
        );
        assert!(
            bad(|o| {
                o.replication.insert("x'y".into(), 1);
            })
            .contains("datacenter name")
        );
        assert!(bad(|o| o.local_dc = Some("ap".into())).contains("not in replication"));
        assert!(bad(|o| o.consistency = "twoish".into()).contains("unknown consistency"));
        assert!(bad(|o| o.contact_points.clear()).contains("empty"));
        assert!(bad(|o| o.username = Some("u".into())).contains("together"));
        assert!(bad(|o| o.idempotency_ttl = Duration::ZERO).contains("idempotency_ttl"));
        assert_eq!(parse_consistency("LOCAL_QUORUM"), Ok(Consistency::LocalQuorum));
        assert_eq!(parse_consistency("each_quorum"), Ok(Consistency::EachQuorum));
    }

    fn message(conv: u64, seq: u64, ts_ms: u64) -> Message {
        Message {
            conversation_id: conv,
            seq,
            ts_ms,
            sender_id: 7,
            client_msg_id: format!("c{seq}"),
            kind: MessageKind::Text,
            body: format!("hello {seq}"),
            target_user_id: None,
            role: None,
            target_seq: None,
            edited_ms: None,
            reactions: vec![],
            my_reaction: None,
            attachment: None,
        }
    }

    fn big_at(w: &Write, n: usize) -> i64 {
        match &w.values[n] {
            MaybeUnset::Set(Some(CqlValue::BigInt(v))) => *v,
            v => panic!("{:?} value {n} is {v:?}", w.stmt),
        }
    }

    #[test]
    fn a_send_commits_in_four_ordered_phases() {
        let day = crate::BUCKET_MS;
        let conv = ConversationRecord {
            id: 5,
            kind: ConversationKind::Group,
            title: "t".into(),
            created_ms: 1,
            created_by: 7,
            last_seq: 3,
            last_ts_ms: day + 10,
        };
        let batch = vec![
            Mutation::PutMessage(message(5, 1, day - 1)),
            Mutation::PutMessage(message(5, 2, day)),
            Mutation::PutMessage(message(5, 3, day + 10)),
            Mutation::PutBucket { conversation: 5, bucket: BucketRef { bucket: 1, first_seq: 2 } },
            Mutation::PutIdempotency { conversation: 5, sender: 7, client_msg_id: "c3".into(), seq: 3 },
            Mutation::PutPositions {
                conversation: 5,
                user: 7,
                positions: Positions { delivered: 3, read: 2 },
            },
            Mutation::PutConversation(conv),
        ];
        let rows = Rows::of(&batch);
        let sealing = Sealing::of(&rows, HashMap::new());
        let [keys, first, second, third] = plan(&batch, 600, &sealing, &|_| FENCE_BASE);
        assert_eq!(
            keys.iter().map(|w| w.stmt).collect::<Vec<_>>(),
            [Stmt::InsertKey; 3],
            "keys before all else"
        );
        assert_eq!(keys[0].partition, "message_keys/5/0");
        let stmts = |p: &[Write]| p.iter().map(|w| w.stmt).collect::<Vec<_>>();
        assert_eq!(
            stmts(&first),
            [
                Stmt::InsertMessage,
                Stmt::InsertMessage,
                Stmt::InsertMessage,
                Stmt::InsertBucket,
                Stmt::InsertConversation
            ],
            "messages and records first"
        );
        assert_eq!(stmts(&second), [Stmt::InsertIdempotency, Stmt::UpdateDelivered, Stmt::UpdateRead]);
        assert_eq!(stmts(&third), [Stmt::UpdateHeadUnfenced], "the head last");
        // Messages land in their day's partition.
        assert_eq!(first[0].partition, "messages/5/0");
        assert_eq!(first[1].partition, "messages/5/1");
        assert_eq!(first[2].partition, first[1].partition);
        // Optional fields are left unset: no tombstone per message.
        assert!(first[0].values[8..12].iter().all(|v| matches!(v, MaybeUnset::Unset)));
        // Text is stored sealed under the key written for it, never in the clear.
        assert!(matches!(&first[0].values[7], MaybeUnset::Set(Some(CqlValue::Text(b))) if b.is_empty()));
        let key_of_1 = keys.iter().find(|w| big_at(w, 2) == 1).expect("message 1's key");
        let (MaybeUnset::Set(Some(CqlValue::Blob(key))), MaybeUnset::Set(Some(CqlValue::Blob(sealed)))) =
            (&key_of_1.values[3], &first[0].values[12])
        else {
            panic!("a key and a sealed body")
        };
        let key: Key = key.clone().try_into().unwrap();
        assert_eq!(seal::open_text(&key, 5, 1, sealed).unwrap(), "hello 1");
        // The idempotency key carries the configured TTL.
        assert!(matches!(second[0].values[4], MaybeUnset::Set(Some(CqlValue::Int(600)))));
        // Positions are written USING TIMESTAMP <their value>; the head plainly
        // (unfenced here; fenced, on condition of the epoch).
        assert_eq!((big_at(&second[1], 0), big_at(&second[1], 1)), (3, 3));
        assert_eq!((big_at(&second[2], 0), big_at(&second[2], 1)), (2, 2));
        assert_eq!(
            (big_at(&third[0], 0), big_at(&third[0], 1), big_at(&third[0], 2)),
            (3, (day + 10) as i64, 5)
        );
        // Each phase's writes group into one batch per partition.
        let groups = batches(first);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 1, 1]);
    }

    #[test]
    fn a_delete_clears_the_edit_time_and_reactions_and_members_use_deletes() {
        let mut deleted = message(5, 2, 1000);
        deleted.kind = MessageKind::Deleted;
        deleted.body.clear();
        let batch = vec![
            Mutation::PutMessage(deleted),
            Mutation::PutReaction { conversation: 5, seq: 2047, user: 8, emoji: "👍".into() },
            Mutation::PutReaction { conversation: 5, seq: 2048, user: 8, emoji: String::new() },
            Mutation::RemoveMember { conversation: 5, user: 9 },
            Mutation::SetMuted { conversation: 5, user: 8, muted: false },
        ];
        let rows = Rows::of(&batch);
        let [keys, first, second, _] =
            plan(&batch, 600, &Sealing::of(&rows, HashMap::new()), &|_| FENCE_BASE);
        assert!(keys.is_empty());
        assert!(matches!(first[0].values[11], MaybeUnset::Set(None)), "edited_ms written as null");
        assert!(matches!(first[0].values[12], MaybeUnset::Set(None)), "the ciphertext cleared");
        let stmts: Vec<_> = second.iter().map(|w| (w.stmt, w.partition.as_str())).collect();
        assert_eq!(
            stmts,
            [
                (Stmt::DeleteKey, "message_keys/5/0"),
                (Stmt::DeleteMember, "members/5"),
                (Stmt::DeleteUserConversation, "user_conversations/9"),
                (Stmt::DeleteMute, "mutes/5"),
                (Stmt::InsertReaction, "reactions/5/1"),
                (Stmt::DeleteReaction, "reactions/5/2"),
            ]
        );
    }

    #[test]
    fn batches_stay_within_one_partition_and_under_the_size_limits() {
        let mut batch: Vec<Mutation> = (1..=200).map(|s| Mutation::PutMessage(message(5, s, 1000))).collect();
        let mut long = message(6, 1, 1000);
        long.body = "x".repeat(20_000);
        batch.push(Mutation::PutMessage(long.clone()));
        long.seq = 2;
        batch.push(Mutation::PutMessage(long.clone()));
        long.seq = 3;
        batch.push(Mutation::PutMessage(long));
        let rows = Rows::of(&batch);
        let [_, first, ..] = plan(&batch, 600, &Sealing::of(&rows, HashMap::new()), &|_| FENCE_BASE);
        let groups = batches(first);
        for g in &groups {
            assert!(g.iter().all(|w| w.partition == g[0].partition), "one partition per batch");
            assert!(g.len() <= BATCH_MAX_STATEMENTS);
            assert!(g.len() == 1 || g.iter().map(Write::size).sum::<usize>() <= BATCH_MAX_BYTES);
        }
        let count = |p: &str| groups.iter().filter(|g| g[0].partition == p).map(Vec::len).collect::<Vec<_>>();
        assert_eq!(count("messages/5/0"), [64, 64, 64, 8]);
        assert_eq!(count("messages/6/0"), [1, 1, 1], "20 KB bodies go one per batch");
    }

    #[test]
    fn reaction_blocks_bound_a_page_to_two_partitions() {
        assert_eq!(reaction_block(0), 0);
        assert_eq!(reaction_block(REACTION_BLOCK - 1), 0);
        assert_eq!(reaction_block(REACTION_BLOCK), 1);
        for lo in 0..3 * REACTION_BLOCK {
            let hi = lo + crate::MAX_PAGE as u64;
            assert!(reaction_block(hi) - reaction_block(lo) <= 1, "{lo}..={hi}");
        }
    }

    #[test]
    fn errors_map_to_retryable_or_not() {
        use scylla::statement::Consistency as C;
        let db = |e: DbError| ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "x".into()));
        let timeout = |w: WriteType| {
            db(DbError::WriteTimeout { consistency: C::LocalQuorum, received: 1, required: 2, write_type: w })
        };
        assert_eq!(
            execution_kind(&ExecutionError::RequestTimeout(Duration::from_secs(5))),
            ErrorKind::Timeout
        );
        assert_eq!(execution_kind(&timeout(WriteType::UnloggedBatch)), ErrorKind::Timeout);
        assert_eq!(
            execution_kind(&db(DbError::Unavailable { consistency: C::LocalQuorum, required: 2, alive: 1 })),
            ErrorKind::Io
        );
        assert_eq!(execution_kind(&db(DbError::Overloaded)), ErrorKind::Io);
        assert_eq!(execution_kind(&db(DbError::Invalid)), ErrorKind::Rejected);
        assert_eq!(execution_kind(&db(DbError::Unauthorized)), ErrorKind::Rejected);
        assert_eq!(execution_kind(&ExecutionError::EmptyPlan), ErrorKind::Io);
        assert!(is_missing_schema(&db(DbError::Invalid)));
        assert!(!is_missing_schema(&db(DbError::Overloaded)));
        assert!(claim_outcome_unknown(&timeout(WriteType::Cas)), "a CAS timeout may have applied");
        assert!(!claim_outcome_unknown(&db(DbError::Invalid)));
        let e = cql("writing a commit")(timeout(WriteType::Simple));
        assert!(e.retryable() && e.kind == ErrorKind::Timeout);
    }

    #[test]
    fn keyspace_cql_lists_every_datacenter() {
        let mut o = opts();
        o.replication = BTreeMap::from([("dc1".into(), 3)]);
        o.keyspace = "switchboard".into();
        assert_eq!(
            keyspace_cql(&o),
            "CREATE KEYSPACE IF NOT EXISTS switchboard WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'dc1': 3} AND durable_writes = true"
        );
    }
}
