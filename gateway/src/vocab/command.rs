//! Commands: the changes to a conversation its owner's sequencer makes, from a
//! shard of any node. Serializable: a command travels to the node that owns its key.

use crate::vocab::event::Origin;
use protocol::{ConversationId, Role, Seq, UserId};
use std::time::Instant;

/// A change to a conversation, for its owner's sequencer. Serializable: a command
/// for a conversation another node owns travels there (see [`crate::fleet`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "c", rename_all = "snake_case")]
pub enum Command {
    Send(SendCmd),
    /// Replaces the text of message `seq` (its sender only).
    Edit {
        actor: UserId,
        conversation: ConversationId,
        seq: Seq,
        body: String,
        origin: Origin,
    },
    /// Tombstones message `seq` (its sender; in groups also admins and the owner).
    Delete {
        actor: UserId,
        conversation: ConversationId,
        seq: Seq,
        origin: Origin,
    },
    /// Sets (or, with an empty emoji, removes) a member's reaction to message `seq`.
    React {
        actor: UserId,
        conversation: ConversationId,
        seq: Seq,
        emoji: String,
        origin: Origin,
    },
    /// Mutes or unmutes a conversation for one member.
    Mute {
        actor: UserId,
        conversation: ConversationId,
        muted: bool,
        origin: Origin,
    },
    /// A member's device received (or the member read) everything up to `seq`.
    Mark {
        conversation: ConversationId,
        user: UserId,
        seq: Seq,
        read: bool,
        origin: Origin,
    },
    /// A typing start or stop: checked and relayed in order with the batch, never stored.
    Typing {
        conversation: ConversationId,
        user: UserId,
        typing: bool,
        origin: Origin,
    },
    CreateDirect {
        user: UserId,
        peer: UserId,
        origin: Origin,
    },
    CreateGroup {
        /// Chosen by the asking node ([`crate::ids::IdGen`]), so the group's owner node is known
        /// before it exists: the command is routed by it.
        id: ConversationId,
        owner: UserId,
        title: String,
        members: Vec<UserId>,
        origin: Origin,
    },
    AddMembers {
        actor: UserId,
        conversation: ConversationId,
        users: Vec<UserId>,
        origin: Origin,
    },
    RemoveMember {
        actor: UserId,
        conversation: ConversationId,
        user: UserId,
        origin: Origin,
    },
    Leave {
        actor: UserId,
        conversation: ConversationId,
        origin: Origin,
    },
    SetRole {
        actor: UserId,
        conversation: ConversationId,
        user: UserId,
        role: Role,
        origin: Origin,
    },
    /// From the fleet, not a client: a node that owned the conversation died.
    /// Its new owner loads it (claiming it) and shows every member the messages
    /// stored since `since_ms` again, which the dead node may have acknowledged
    /// without sending to other nodes. Answered never; devices dedupe by position.
    Takeover {
        conversation: ConversationId,
        since_ms: u64,
        origin: Origin,
    },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SendCmd {
    pub conversation: ConversationId,
    pub sender: UserId,
    pub client_msg_id: String,
    pub body: String,
    /// An attachment the shard checked is uploaded (to this conversation, by the sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Box<protocol::Attachment>>,
    /// The connection that sent it: it gets the ack.
    pub origin: Origin,
    /// When the shard queued it (for the delivery-latency metric; a forwarded command
    /// counts from its arrival at the owner).
    #[serde(skip, default = "Instant::now")]
    pub submitted: Instant,
}

/// A command's `origin` field: `$send` for a send (`$c` is its [`SendCmd`]), the
/// variant's own field for the rest. One list of variants for both accessors.
macro_rules! origin_field {
    ($cmd:expr, $c:ident => $send:expr) => {
        match $cmd {
            Command::Send($c) => $send,
            Command::Edit { origin, .. }
            | Command::Delete { origin, .. }
            | Command::React { origin, .. }
            | Command::Mute { origin, .. }
            | Command::Mark { origin, .. }
            | Command::Typing { origin, .. }
            | Command::CreateDirect { origin, .. }
            | Command::CreateGroup { origin, .. }
            | Command::AddMembers { origin, .. }
            | Command::RemoveMember { origin, .. }
            | Command::Leave { origin, .. }
            | Command::SetRole { origin, .. }
            | Command::Takeover { origin, .. } => origin,
        }
    };
}

impl Command {
    /// Who asked, and where the answer goes.
    pub fn origin(&self) -> Origin {
        *origin_field!(self, c => &c.origin)
    }

    pub fn origin_mut(&mut self) -> &mut Origin {
        origin_field!(self, c => &mut c.origin)
    }

    /// What the command is routed by: its conversation, or for `create_direct` the
    /// pair of users (one owner decides whether their direct conversation exists).
    pub fn key(&self) -> router::Key {
        use router::Key;
        match self {
            Command::Send(c) => Key::Conversation(c.conversation),
            Command::CreateDirect { user, peer, .. } => Key::pair(*user, *peer),
            Command::CreateGroup { id, .. } => Key::Conversation(*id),
            Command::Edit { conversation, .. }
            | Command::Delete { conversation, .. }
            | Command::React { conversation, .. }
            | Command::Mute { conversation, .. }
            | Command::Mark { conversation, .. }
            | Command::Typing { conversation, .. }
            | Command::AddMembers { conversation, .. }
            | Command::RemoveMember { conversation, .. }
            | Command::Leave { conversation, .. }
            | Command::SetRole { conversation, .. }
            | Command::Takeover { conversation, .. } => Key::Conversation(*conversation),
        }
    }

    /// The user acting (the asker's user).
    pub fn actor(&self) -> UserId {
        match self {
            Command::Send(c) => c.sender,
            Command::Mark { user, .. }
            | Command::Typing { user, .. }
            | Command::CreateDirect { user, .. } => *user,
            Command::CreateGroup { owner, .. } => *owner,
            Command::Edit { actor, .. }
            | Command::Delete { actor, .. }
            | Command::React { actor, .. }
            | Command::Mute { actor, .. }
            | Command::AddMembers { actor, .. }
            | Command::RemoveMember { actor, .. }
            | Command::Leave { actor, .. }
            | Command::SetRole { actor, .. } => *actor,
            // Nobody: the fleet asked.
            Command::Takeover { .. } => 0,
        }
    }
}
