//! The one message model both subprotocols carry.
//!
//! JSON shape: `{"type": "<snake_case variant>", "id": <request id>, ...fields}`.
//! 64-bit identifiers (`user_id`, `conversation_id`, ...) are JSON strings
//! because JavaScript numbers lose precision above 2^53; they are accepted as
//! strings or numbers. Positions (`seq`) and times (`*_ms`) are numbers.

use serde::{Deserialize, Serialize};

pub type UserId = u64;
pub type ConversationId = u64;
/// A message's position in its conversation: 1, 2, 3, ... with no gaps.
pub type Seq = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Member,
    Admin,
    Owner,
}

impl Role {
    /// Whether this role may add/remove members and change roles below its own.
    pub fn can_manage(self) -> bool {
        matches!(self, Role::Admin | Role::Owner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    #[default]
    Text,
    GroupCreated,
    MemberAdded,
    MemberRemoved,
    MemberLeft,
    RoleChanged,
    /// An edit of message `target_seq`; `body` is the new text.
    Edit,
    /// A deletion of message `target_seq`.
    Delete,
    /// A deleted message's tombstone (in history and replays; its body is gone).
    Deleted,
}

/// Serde helpers: 64-bit ids as JSON strings, accepting numbers too.
pub mod id_str {
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<'a> {
        Num(u64),
        Str(&'a str),
        Owned(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(n),
            Raw::Str(s) => s.parse().map_err(|_| de::Error::custom("expected a decimal id")),
            Raw::Owned(s) => s.parse().map_err(|_| de::Error::custom("expected a decimal id")),
        }
    }

    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] u64);
            Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
        }
    }

    pub mod vec {
        use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

        pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for id in v {
                seq.serialize_element(&id.to_string())?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] u64);
            Ok(Vec::<W>::deserialize(d)?.into_iter().map(|w| w.0).collect())
        }
    }
}

/// A client's statement of how far it has read a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub seq: Seq,
}

/// One frame from client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Request id chosen by the client, echoed on the reply. 0 when absent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u64,
    #[serde(flatten)]
    pub body: ClientMsg,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Start receiving conversation events, after replaying what was missed.
    Sync {
        #[serde(default)]
        positions: Vec<Position>,
    },
    Send {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        client_msg_id: String,
        /// The text; with an attachment, its caption (may be empty).
        #[serde(default)]
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attachment: Option<AttachmentRef>,
    },
    CreateDirect {
        #[serde(with = "id_str")]
        user_id: UserId,
    },
    CreateGroup {
        title: String,
        #[serde(default, with = "id_str::vec")]
        members: Vec<UserId>,
    },
    AddMembers {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(with = "id_str::vec")]
        user_ids: Vec<UserId>,
    },
    RemoveMember {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(with = "id_str")]
        user_id: UserId,
    },
    Leave {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
    },
    SetRole {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(with = "id_str")]
        user_id: UserId,
        role: Role,
    },
    GetConversation {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
    },
    History {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    ListConversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    Ping,
    /// One of my devices has received everything up to `seq`.
    MarkDelivered {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
    },
    /// I have seen everything up to `seq`.
    MarkRead {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
    },
    /// Replaces the text of my message `seq`.
    Edit {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
        body: String,
    },
    /// Deletes message `seq` (mine; in groups, admins and the owner may delete anyone's).
    Delete {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
    },
    /// Mutes (`true`) or unmutes a conversation for me: no push notifications for it.
    Mute {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        muted: bool,
    },
    /// Every member's delivered and read positions.
    GetReceipts {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
    },
    /// I am (`typing: true`) or stopped (`false`) typing in this conversation. Not stored.
    Typing {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        typing: bool,
    },
    /// Sets my reaction to message `seq`, replacing any earlier one of mine;
    /// `emoji: ""` removes it.
    React {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
        #[serde(default)]
        emoji: String,
    },
    /// The current presence of up to 100 users.
    GetPresence {
        #[serde(with = "id_str::vec")]
        user_ids: Vec<UserId>,
    },
    /// Hides (`true`) or shows my `last_seen` time to everyone.
    SetPrivacy {
        hide_last_seen: bool,
    },
}

/// A stored message (or membership event) as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub ts_ms: u64,
    #[serde(with = "id_str")]
    pub sender_id: UserId,
    #[serde(default)]
    pub client_msg_id: String,
    #[serde(default)]
    pub kind: MessageKind,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "id_str::opt")]
    pub target_user_id: Option<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// For `edit` and `delete` events: the message concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_seq: Option<Seq>,
    /// On an edited message (in history and replays): when it was last edited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ms: Option<u64>,
    /// In history and replays: the reactions to this message, most used first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionCount>,
    /// In history and replays: the reader's own reaction to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub my_reaction: Option<String>,
    /// A text message's attachment (`body` is then its caption). Boxed: most
    /// messages have none, and messages are moved and cloned on the hot path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Box<Attachment>>,
}

/// What a `send` names: an attachment uploaded to this conversation by the
/// sender, and how to show it (the server fills in the rest from the upload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    pub attachment_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// A small inline preview (e.g. a base64 thumbnail), at most 8 KiB.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preview: String,
}

/// An attachment as a message carries it: what was uploaded (size, type and
/// checksum as the server checked them) and how to show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub attachment_id: String,
    pub file_name: String,
    pub media_type: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preview: String,
}

/// How many members reacted to a message with one emoji.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionCount {
    pub emoji: String,
    pub count: u32,
}

/// One user's presence. `last_seen_ms` is absent while online, and always when
/// the user hides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceInfo {
    #[serde(with = "id_str")]
    pub user_id: UserId,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(with = "id_str")]
    pub user_id: UserId,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub kind: ConversationKind,
    #[serde(default)]
    pub title: String,
    pub members: Vec<Member>,
    pub last_seq: Seq,
    pub last_ts_ms: u64,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub kind: ConversationKind,
    #[serde(default)]
    pub title: String,
    pub last_seq: Seq,
    pub last_ts_ms: u64,
    /// How far you have read.
    #[serde(default)]
    pub read_seq: Seq,
    /// `last_seq - read_seq`: your own messages count as read.
    #[serde(default)]
    pub unread: u64,
    /// You muted it (no push notifications).
    #[serde(default)]
    pub muted: bool,
    /// The message at `last_seq`, for the list's preview line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<Message>,
}

/// One member's delivered and read positions in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPositions {
    #[serde(with = "id_str")]
    pub user_id: UserId,
    pub delivered_seq: Seq,
    pub read_seq: Seq,
}

/// One frame from server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The request id this frame answers; 0 for events.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u64,
    #[serde(flatten)]
    pub body: ServerMsg,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        #[serde(with = "id_str")]
        user_id: UserId,
        #[serde(with = "id_str")]
        connection_id: u64,
        server_time_ms: u64,
        max_frame_bytes: u32,
    },
    /// The message with this `client_msg_id` is durable at `seq`.
    Ack {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        client_msg_id: String,
        seq: Seq,
        ts_ms: u64,
    },
    Message {
        message: Message,
    },
    Conversation {
        conversation: Conversation,
    },
    History {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        messages: Vec<Message>,
        has_more: bool,
    },
    Conversations {
        items: Vec<ConversationSummary>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_cursor: Option<String>,
    },
    SyncDone {
        conversations: u32,
        messages: u64,
    },
    Error {
        code: u16,
        name: String,
        message: String,
        /// Set when the error answers a `send` (which has no request id of its own).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    Ok,
    Pong,
    /// `user_id` is typing in `conversation_id` (or stopped). Show it for at most
    /// `expires_ms` unless refreshed; a message from that user ends it too.
    Typing {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(with = "id_str")]
        user_id: UserId,
        typing: bool,
        expires_ms: u32,
    },
    /// `user_id`'s positions in `conversation_id` moved forward.
    Receipt {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        #[serde(with = "id_str")]
        user_id: UserId,
        delivered_seq: Seq,
        read_seq: Seq,
    },
    /// The answer to `get_receipts`.
    Receipts {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        members: Vec<MemberPositions>,
    },
    /// A user who shares a conversation with you came online or went offline.
    Presence {
        presence: PresenceInfo,
    },
    /// The answer to `get_presence`, in the order asked.
    PresenceList {
        users: Vec<PresenceInfo>,
    },
    /// `user_id` set (`emoji` non-empty) or removed its reaction to message `seq`;
    /// `reactions` are the message's new totals.
    Reaction {
        #[serde(with = "id_str")]
        conversation_id: ConversationId,
        seq: Seq,
        #[serde(with = "id_str")]
        user_id: UserId,
        #[serde(default)]
        emoji: String,
        reactions: Vec<ReactionCount>,
    },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
