//! Switchboard's wire protocol: one message model, two encodings.
//!
//! - [`model`]: the client and server messages ([`ClientFrame`], [`ServerFrame`]).
//! - [`Subprotocol`]: `switchboard.v1.fb` (FlatBuffers binary frames, verified on
//!   receipt) and `switchboard.v1.json` (JSON text frames), with [`Subprotocol::decode_client`]
//!   and [`Subprotocol::encode_server`] as the gateway's two entry points.
//! - [`codes`]: the catalogue of error and close codes, each with its rule.
//!
//! ## Why one hand-written model instead of flatc's object API
//! The JSON form is part of the public protocol (browsers and tools speak it),
//! so it needs a shape chosen for people: string ids, snake_case tags, optional
//! fields left out. A hand-written model with serde gives that, and the
//! FlatBuffers conversion in [`fb`] is checked against it by round-trip tests.

pub mod codes;
pub mod fb;
pub mod model;

#[allow(clippy::all, unsafe_op_in_unsafe_fn, mismatched_lifetime_syntaxes, unused_imports)]
#[rustfmt::skip]
pub mod generated {
    include!("generated/switchboard_generated.rs");
}

pub use codes::{CloseCode, ErrorCode};
pub use model::*;

/// The subprotocol names a client offers in `Sec-WebSocket-Protocol`.
pub const FB_SUBPROTOCOL: &str = "switchboard.v1.fb";
pub const JSON_SUBPROTOCOL: &str = "switchboard.v1.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subprotocol {
    FlatBuffers,
    Json,
}

/// Why a client frame could not be decoded. Maps onto a request error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message type")]
    UnknownType,
    #[error("frame is not valid UTF-8")]
    InvalidUtf8,
}

impl DecodeError {
    pub fn malformed(why: impl Into<String>) -> Self {
        DecodeError::Malformed(why.into())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
            DecodeError::UnknownType => ErrorCode::UnknownType,
            DecodeError::InvalidUtf8 => ErrorCode::InvalidUtf8,
        }
    }
}

const CLIENT_TYPES: &[&str] = &[
    "sync",
    "send",
    "create_direct",
    "create_group",
    "add_members",
    "remove_member",
    "leave",
    "set_role",
    "get_conversation",
    "history",
    "list_conversations",
    "ping",
    "typing",
    "mark_delivered",
    "mark_read",
    "get_receipts",
    "edit",
    "delete",
    "mute",
    "react",
    "get_presence",
    "set_privacy",
];

impl Subprotocol {
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim() {
            FB_SUBPROTOCOL => Some(Subprotocol::FlatBuffers),
            JSON_SUBPROTOCOL => Some(Subprotocol::Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::FlatBuffers => FB_SUBPROTOCOL,
            Subprotocol::Json => JSON_SUBPROTOCOL,
        }
    }

    /// Whether frames of this subprotocol go out as WebSocket text (JSON) or binary frames.
    pub fn is_text(self) -> bool {
        matches!(self, Subprotocol::Json)
    }

    /// Decodes one client frame's payload.
    pub fn decode_client(self, payload: &[u8]) -> Result<ClientFrame, DecodeError> {
        match self {
            Subprotocol::FlatBuffers => fb::decode_client(payload),
            Subprotocol::Json => {
                let text = std::str::from_utf8(payload).map_err(|_| DecodeError::InvalidUtf8)?;
                json_decode_client(text)
            }
        }
    }

    /// The request id of a frame that [`decode_client`](Self::decode_client) refused,
    /// when it can still be read (a known envelope with an unknown type, a bad field,
    /// a wrong enum): the error reply carries it, so a client waiting on it does not hang.
    /// 0 when the frame is too broken to say.
    pub fn request_id(self, payload: &[u8]) -> u64 {
        match self {
            Subprotocol::FlatBuffers => fb::decode_request_id(payload),
            Subprotocol::Json => {
                #[derive(serde::Deserialize)]
                struct Head {
                    #[serde(default, with = "model::id_str")]
                    id: u64,
                }
                serde_json::from_slice::<Head>(payload).map_or(0, |h| h.id)
            }
        }
    }

    pub fn encode_server(self, frame: &ServerFrame) -> Vec<u8> {
        match self {
            Subprotocol::FlatBuffers => fb::encode_server(frame),
            Subprotocol::Json => serde_json::to_vec(frame).expect("server frames always serialise"),
        }
    }

    /// Client-side helpers, used by tests, loadgen and example clients.
    pub fn encode_client(self, frame: &ClientFrame) -> Vec<u8> {
        match self {
            Subprotocol::FlatBuffers => fb::encode_client(frame),
            Subprotocol::Json => serde_json::to_vec(frame).expect("client frames always serialise"),
        }
    }

    pub fn decode_server(self, payload: &[u8]) -> Result<ServerFrame, DecodeError> {
        match self {
            Subprotocol::FlatBuffers => fb::decode_server(payload),
            Subprotocol::Json => {
                serde_json::from_slice(payload).map_err(|e| DecodeError::malformed(e.to_string()))
            }
        }
    }
}

fn json_decode_client(text: &str) -> Result<ClientFrame, DecodeError> {
    serde_json::from_str(text).map_err(|e| {
        // Tell "a type we do not know" apart from "a known type, badly formed";
        // only on the error path, so the happy path parses once.
        #[derive(serde::Deserialize)]
        struct Tag<'a> {
            #[serde(borrow, rename = "type")]
            ty: Option<std::borrow::Cow<'a, str>>,
        }
        match serde_json::from_str::<Tag>(text) {
            Ok(Tag { ty: Some(t) }) if !CLIENT_TYPES.contains(&t.as_ref()) => DecodeError::UnknownType,
            _ => DecodeError::malformed(e.to_string()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_samples() -> Vec<ClientFrame> {
        let msgs = vec![
            ClientMsg::Sync { positions: vec![Position { conversation_id: u64::MAX - 3, seq: 7 }] },
            ClientMsg::Send {
                conversation_id: 42,
                client_msg_id: "c-1".into(),
                body: "héllo ✓".into(),
                attachment: None,
            },
            ClientMsg::CreateDirect { user_id: 9 },
            ClientMsg::CreateGroup { title: "team".into(), members: vec![1, 2, 3] },
            ClientMsg::AddMembers { conversation_id: 5, user_ids: vec![8] },
            ClientMsg::RemoveMember { conversation_id: 5, user_id: 8 },
            ClientMsg::Leave { conversation_id: 5 },
            ClientMsg::SetRole { conversation_id: 5, user_id: 8, role: Role::Admin },
            ClientMsg::GetConversation { conversation_id: 5 },
            ClientMsg::History { conversation_id: 5, before: Some(10), after: None, limit: Some(50) },
            ClientMsg::History { conversation_id: 5, before: None, after: None, limit: None },
            ClientMsg::ListConversations { limit: Some(20), cursor: Some("abc".into()) },
            ClientMsg::Ping,
            ClientMsg::Typing { conversation_id: 5, typing: true },
            ClientMsg::Typing { conversation_id: 5, typing: false },
            ClientMsg::MarkDelivered { conversation_id: 5, seq: 9 },
            ClientMsg::MarkRead { conversation_id: 5, seq: 8 },
            ClientMsg::GetReceipts { conversation_id: 5 },
            ClientMsg::Edit { conversation_id: 5, seq: 3, body: "fixed ✓".into() },
            ClientMsg::Delete { conversation_id: 5, seq: 3 },
            ClientMsg::Mute { conversation_id: 5, muted: true },
            ClientMsg::React { conversation_id: 5, seq: 3, emoji: "👍🏽".into() },
            ClientMsg::React { conversation_id: 5, seq: 3, emoji: String::new() },
            ClientMsg::GetPresence { user_ids: vec![1, u64::MAX] },
            ClientMsg::SetPrivacy { hide_last_seen: true },
        ];
        msgs.into_iter().enumerate().map(|(i, body)| ClientFrame { id: i as u64, body }).collect()
    }

    fn server_samples() -> Vec<ServerFrame> {
        let m = Message {
            conversation_id: 1 << 60,
            seq: 3,
            ts_ms: 1_700_000_000_000,
            sender_id: 77,
            client_msg_id: "x".into(),
            kind: MessageKind::RoleChanged,
            body: String::new(),
            target_user_id: Some(78),
            role: Some(Role::Admin),
            target_seq: None,
            edited_ms: None,
            reactions: vec![],
            my_reaction: None,
            attachment: None,
        };
        let reactions = vec![
            ReactionCount { emoji: "❤️".into(), count: 3 },
            ReactionCount { emoji: "👍".into(), count: 1 },
        ];
        let msgs = vec![
            ServerMsg::Welcome { user_id: 1, connection_id: 2, server_time_ms: 3, max_frame_bytes: 65536 },
            ServerMsg::Ack { conversation_id: 1, client_msg_id: "c".into(), seq: 2, ts_ms: 3 },
            ServerMsg::Message { message: m.clone() },
            ServerMsg::Message {
                message: Message {
                    kind: MessageKind::Edit,
                    target_seq: Some(2),
                    edited_ms: Some(1_700_000_000_001),
                    target_user_id: None,
                    role: None,
                    ..m.clone()
                },
            },
            ServerMsg::Message {
                message: Message {
                    kind: MessageKind::Text,
                    reactions: reactions.clone(),
                    my_reaction: Some("👍".into()),
                    ..m.clone()
                },
            },
            ServerMsg::Conversation {
                conversation: Conversation {
                    conversation_id: 4,
                    kind: ConversationKind::Group,
                    title: "t".into(),
                    members: vec![Member { user_id: 1, role: Role::Owner }],
                    last_seq: 9,
                    last_ts_ms: 10,
                    created_ms: 11,
                },
            },
            ServerMsg::History { conversation_id: 4, messages: vec![m.clone(), m.clone()], has_more: true },
            ServerMsg::Conversations {
                items: vec![ConversationSummary {
                    conversation_id: 4,
                    kind: ConversationKind::Direct,
                    title: String::new(),
                    last_seq: 1,
                    last_ts_ms: 2,
                    read_seq: 1,
                    unread: 0,
                    muted: true,
                    last_message: Some(m.clone()),
                }],
                next_cursor: Some("n".into()),
            },
            ServerMsg::SyncDone { conversations: 2, messages: 1000 },
            ServerMsg::Error {
                code: 1011,
                name: "not_member".into(),
                message: "m".into(),
                client_msg_id: None,
            },
            ServerMsg::Ok,
            ServerMsg::Pong,
            ServerMsg::Typing { conversation_id: 5, user_id: 6, typing: true, expires_ms: 5000 },
            ServerMsg::Receipt { conversation_id: 5, user_id: 6, delivered_seq: 9, read_seq: 7 },
            ServerMsg::Receipts {
                conversation_id: 5,
                members: vec![
                    MemberPositions { user_id: 6, delivered_seq: 9, read_seq: 7 },
                    MemberPositions { user_id: 7, delivered_seq: 0, read_seq: 0 },
                ],
            },
            ServerMsg::Presence { presence: PresenceInfo { user_id: 6, online: true, last_seen_ms: None } },
            ServerMsg::PresenceList {
                users: vec![
                    PresenceInfo { user_id: 6, online: false, last_seen_ms: Some(1_700_000_000_000) },
                    PresenceInfo { user_id: 7, online: false, last_seen_ms: None },
                ],
            },
            ServerMsg::Reaction { conversation_id: 5, seq: 3, user_id: 6, emoji: "👍".into(), reactions },
            ServerMsg::Reaction {
                conversation_id: 5,
                seq: 3,
                user_id: 6,
                emoji: String::new(),
                reactions: vec![],
            },
        ];
        msgs.into_iter().enumerate().map(|(i, body)| ServerFrame { id: i as u64, body }).collect()
    }

    #[test]
    fn every_client_message_round_trips_in_both_subprotocols() {
        for p in [Subprotocol::FlatBuffers, Subprotocol::Json] {
            for f in client_samples() {
                let bytes = p.encode_client(&f);
                assert_eq!(p.decode_client(&bytes).unwrap(), f, "{p:?}");
            }
        }
    }

    #[test]
    fn every_server_message_round_trips_in_both_subprotocols() {
        for p in [Subprotocol::FlatBuffers, Subprotocol::Json] {
            for f in server_samples() {
                let bytes = p.encode_server(&f);
                assert_eq!(p.decode_server(&bytes).unwrap(), f, "{p:?}");
            }
        }
    }

    #[test]
    fn json_ids_are_strings_and_accept_numbers() {
        let f = ClientFrame { id: 1, body: ClientMsg::CreateDirect { user_id: u64::MAX } };
        let text = String::from_utf8(Subprotocol::Json.encode_client(&f)).unwrap();
        assert!(text.contains(r#""user_id":"18446744073709551615""#), "{text}");
        let parsed = Subprotocol::Json.decode_client(br#"{"type":"create_direct","user_id":12}"#).unwrap();
        assert_eq!(parsed.body, ClientMsg::CreateDirect { user_id: 12 });
    }

    #[test]
    fn bad_json_is_classified() {
        let j = Subprotocol::Json;
        assert_eq!(j.decode_client(b"{\"type\":\"fly\"}").unwrap_err(), DecodeError::UnknownType);
        assert!(matches!(j.decode_client(b"{\"type\":\"send\"}").unwrap_err(), DecodeError::Malformed(_)));
        assert!(matches!(j.decode_client(b"not json").unwrap_err(), DecodeError::Malformed(_)));
        assert_eq!(j.decode_client(b"{\"type\":\xff}").unwrap_err(), DecodeError::InvalidUtf8);
        assert_eq!(j.request_id(b"{\"type\":\"fly\",\"id\":\"7\"}"), 7);
        assert_eq!(j.request_id(b"{\"type\":\"history\",\"id\":8,\"limit\":\"x\"}"), 8);
        assert_eq!(j.request_id(b"not json"), 0);
    }

    #[test]
    fn garbage_flatbuffers_never_panic() {
        let good = fb::encode_client(&client_samples()[1]);
        // Truncations, bit flips and random bytes: every one must be an error or a
        // valid frame, never a panic.
        for cut in 0..good.len() {
            let _ = fb::decode_client(&good[..cut]);
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let _ = fb::decode_client(&b);
            }
        }
        assert!(fb::decode_client(&[0xff; 3]).is_err());
        assert!(fb::decode_client(&[]).is_err());
    }

    #[test]
    fn unknown_flatbuffers_union_member_is_unknown_type() {
        let mut b = flatbuffers::FlatBufferBuilder::new();
        let body = generated::switchboard::v_1::PingReq::create(
            &mut b,
            &generated::switchboard::v_1::PingReqArgs {},
        );
        let root = generated::switchboard::v_1::ClientFrame::create(
            &mut b,
            &generated::switchboard::v_1::ClientFrameArgs {
                id: 1,
                body_type: generated::switchboard::v_1::ClientBody(200),
                body: Some(body.as_union_value()),
            },
        );
        b.finish_minimal(root);
        assert_eq!(fb::decode_client(b.finished_data()).unwrap_err(), DecodeError::UnknownType);
        assert_eq!(Subprotocol::FlatBuffers.request_id(b.finished_data()), 1, "the id is still readable");
        assert_eq!(Subprotocol::FlatBuffers.request_id(&[0xff; 3]), 0);
    }
}
