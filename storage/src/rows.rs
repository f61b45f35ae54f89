//! One commit's writes reduced to each key's final state, for the backends that
//! write rows over the network (PostgreSQL, Cassandra).

use crate::codec::role_to_u8;
use crate::{ConversationRecord, Message, Mutation, Positions, pair};
use std::collections::BTreeMap;

/// One commit's rows, reduced to each key's final state (a batch may write the
/// same key twice, e.g. a message and then its edit, and one multi-row statement
/// may not touch a row twice).
#[derive(Default)]
pub(crate) struct Rows<'a> {
    pub(crate) messages: BTreeMap<(u64, u32, u64), &'a Message>,
    pub(crate) idempotency: BTreeMap<(u64, u64, &'a str), u64>,
    pub(crate) buckets: BTreeMap<(u64, u32), u64>,
    pub(crate) conversations: BTreeMap<u64, &'a ConversationRecord>,
    pub(crate) members: BTreeMap<(u64, u64), Option<i16>>,
    pub(crate) direct: BTreeMap<(u64, u64), u64>,
    pub(crate) mutes: BTreeMap<(u64, u64), bool>,
    pub(crate) positions: BTreeMap<(u64, u64), Positions>,
    pub(crate) reactions: BTreeMap<(u64, u64, u64), &'a str>,
    pub(crate) last_seen: BTreeMap<u64, u64>,
    pub(crate) hide: BTreeMap<u64, bool>,
    /// Conversation → the owner epoch the commit requires.
    pub(crate) fences: BTreeMap<u64, u64>,
}

impl<'a> Rows<'a> {
    pub(crate) fn of(batch: &'a [Mutation]) -> Rows<'a> {
        let mut r = Rows::default();
        for m in batch {
            match m {
                Mutation::PutMessage(msg) => {
                    r.messages.insert((msg.conversation_id, crate::bucket_of(msg.ts_ms), msg.seq), msg);
                }
                Mutation::PutIdempotency { conversation, sender, client_msg_id, seq } => {
                    r.idempotency.insert((*conversation, *sender, client_msg_id), *seq);
                }
                Mutation::PutBucket { conversation, bucket } => {
                    r.buckets.insert((*conversation, bucket.bucket), bucket.first_seq);
                }
                Mutation::PutConversation(c) => {
                    r.conversations.insert(c.id, c);
                }
                Mutation::PutMember { conversation, user, role } => {
                    r.members.insert((*conversation, *user), Some(i16::from(role_to_u8(*role))));
                }
                Mutation::RemoveMember { conversation, user } => {
                    r.members.insert((*conversation, *user), None);
                }
                Mutation::PutDirect { a, b, conversation } => {
                    r.direct.insert(pair(*a, *b), *conversation);
                }
                Mutation::SetMuted { conversation, user, muted } => {
                    r.mutes.insert((*conversation, *user), *muted);
                }
                Mutation::PutPositions { conversation, user, positions } => {
                    let p = r.positions.entry((*conversation, *user)).or_default();
                    p.delivered = p.delivered.max(positions.delivered);
                    p.read = p.read.max(positions.read);
                }
                Mutation::PutReaction { conversation, seq, user, emoji } => {
                    r.reactions.insert((*conversation, *seq, *user), emoji);
                }
                Mutation::PutLastSeen { user, ms } => {
                    r.last_seen.insert(*user, *ms);
                }
                Mutation::SetHideLastSeen { user, hide } => {
                    r.hide.insert(*user, *hide);
                }
                Mutation::Fence { conversation, epoch } => {
                    r.fences.insert(*conversation, *epoch);
                }
            }
        }
        r
    }
}
