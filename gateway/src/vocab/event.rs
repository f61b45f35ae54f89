//! What travels to devices: events (and the answers addressed to one connection),
//! with their once-made wire encodings; connection ids and origins.

use bytes::Bytes;
use protocol::{ConversationId, ErrorCode, Message, ServerFrame, ServerMsg, Subprotocol, UserId};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A connection's id, unique in the fleet: the node id in the top 16 bits (see
/// [`conn_ids`]), so an answer finds its way back to the node of the connection.
pub type ConnId = u64;

/// The node a connection id was given out by.
pub fn node_of(conn: ConnId) -> u16 {
    (conn >> 48) as u16
}

/// Where node `node` starts numbering its connections: its id in the top 16 bits and
/// a random start below (at least 2^46 ids before the numbering wraps), so a
/// restarted node does not hand out the ids its previous run's answers still name.
pub fn conn_ids(node: u16) -> u64 {
    (u64::from(node) << 48) | (rand::random::<u64>() & ((1 << 46) - 1))
}

/// Who asked: the connection and its request id. Every command the sequencer takes
/// carries one, and its answer is an event addressed to it, so the answer travels
/// like every other event (through the asker's mailbox, or across nodes) and lands
/// in its place in the conversation's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub conn: ConnId,
    pub request: u64,
    /// How many times the command was forwarded between nodes (bounded, so two
    /// nodes that disagree about the ring for a moment cannot bounce it forever).
    #[serde(default)]
    pub hops: u8,
}

impl Origin {
    pub fn new(conn: ConnId, request: u64) -> Origin {
        Origin { conn, request, hops: 0 }
    }
}

/// A successful answer to a request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok,
    Conversation(protocol::Conversation),
}

/// Something that happened in a conversation, to be shown to some connections.
/// Serializable: events for users on other nodes travel there (see [`crate::fleet`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum EventKind {
    /// A stored message. The connection that sent it (`origin`) gets an `ack`
    /// instead; when `to_others` is false (an idempotent resend) nobody else gets it.
    Message { message: Message, origin: Option<ConnId>, to_others: bool },
    /// A `send` that was refused; goes to the sending connection only.
    SendFailed { origin: ConnId, conversation_id: ConversationId, client_msg_id: String, code: ErrorCode },
    /// The answer to a request other than `send`; to `origin` only. Requests that
    /// answer only when refused (`typing`, `mark_*`) get one on failure alone.
    /// `settles`: the request is one that is always answered (the asker counts it as in flight).
    Reply { origin: Origin, result: Result<Answer, ErrorCode>, settles: bool },
    /// `user` started or stopped typing. Ephemeral: shown to synced connections of
    /// the other members, never stored, never held for a connection that has not synced.
    Typing { conversation_id: ConversationId, user: UserId, typing: bool },
    /// `user`'s delivered/read positions moved forward (stored before this is sent).
    /// Shown to every member's synced connections, the user's own included.
    Receipt { conversation_id: ConversationId, user: UserId, positions: storage::Positions },
    /// `user` set (or, with an empty emoji, removed) its reaction to message `seq`
    /// (stored before this is sent); `reactions` are the message's new totals.
    /// Shown to every member's synced connections.
    Reaction {
        conversation_id: ConversationId,
        seq: protocol::Seq,
        user: UserId,
        emoji: String,
        reactions: Vec<protocol::ReactionCount>,
    },
    /// A contact came online or went offline. Shown to synced connections.
    Presence(protocol::PresenceInfo),
    /// Events for this user were lost between nodes: its connections close with
    /// 4008 and `sync` on reconnect (history has every stored event).
    Resync,
}

/// How long a typing indicator lasts without a refresh, milliseconds (sent with each one).
pub const TYPING_EXPIRES_MS: u32 = 5000;

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

    /// The broadcast form (the same frame for every connection it reaches), as a
    /// complete WebSocket frame; `None` for replies meant for one connection.
    pub fn broadcast_frame(&self, proto: Subprotocol) -> Option<Bytes> {
        if matches!(self.kind, EventKind::SendFailed { .. } | EventKind::Reply { .. } | EventKind::Resync) {
            return None;
        }
        let slot = &self.encoded[proto as usize];
        Some(
            slot.get_or_init(|| {
                let body = match &self.kind {
                    EventKind::Message { message, .. } => ServerMsg::Message { message: message.clone() },
                    &EventKind::Typing { conversation_id, user, typing } => ServerMsg::Typing {
                        conversation_id,
                        user_id: user,
                        typing,
                        expires_ms: TYPING_EXPIRES_MS,
                    },
                    &EventKind::Receipt { conversation_id, user, positions } => ServerMsg::Receipt {
                        conversation_id,
                        user_id: user,
                        delivered_seq: positions.delivered,
                        read_seq: positions.read,
                    },
                    EventKind::Reaction { conversation_id, seq, user, emoji, reactions } => {
                        ServerMsg::Reaction {
                            conversation_id: *conversation_id,
                            seq: *seq,
                            user_id: *user,
                            emoji: emoji.clone(),
                            reactions: reactions.clone(),
                        }
                    }
                    EventKind::Presence(p) => ServerMsg::Presence { presence: p.clone() },
                    EventKind::SendFailed { .. } | EventKind::Reply { .. } | EventKind::Resync => {
                        unreachable!("checked above")
                    }
                };
                crate::vocab::frame::ws_frame(proto, &proto.encode_server(&ServerFrame { id: 0, body }))
            })
            .clone(),
        )
    }
}

/// A message event at position `seq` of conversation 1 (for tests).
#[cfg(test)]
pub fn test_event(seq: u64) -> Arc<Event> {
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
            target_seq: None,
            edited_ms: None,
            reactions: Vec::new(),
            my_reaction: None,
            attachment: None,
        },
        origin: None,
        to_others: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_made_once_per_subprotocol() {
        let e = test_event(5);
        let f1 = e.broadcast_frame(Subprotocol::Json).unwrap();
        let f2 = e.broadcast_frame(Subprotocol::Json).unwrap();
        assert_eq!(f1.as_ptr(), f2.as_ptr(), "second call shares the first encoding");
        assert_ne!(e.broadcast_frame(Subprotocol::FlatBuffers).unwrap(), f1);
    }
}
