//! Conversion between the model and the FlatBuffers wire form.
//!
//! Decoding always verifies the buffer first (`flatbuffers::root`), so a
//! hostile frame yields a [`DecodeError`], never a panic or an out-of-bounds read.

use crate::DecodeError;
use crate::generated::switchboard::v_1 as fb;
use crate::model::*;
use flatbuffers::{FlatBufferBuilder, WIPOffset};

fn role_to_fb(r: Role) -> fb::Role {
    match r {
        Role::Member => fb::Role::Member,
        Role::Admin => fb::Role::Admin,
        Role::Owner => fb::Role::Owner,
    }
}

fn role_from_fb(r: fb::Role) -> Result<Role, DecodeError> {
    match r {
        fb::Role::Member => Ok(Role::Member),
        fb::Role::Admin => Ok(Role::Admin),
        fb::Role::Owner => Ok(Role::Owner),
        _ => Err(DecodeError::malformed("unknown role")),
    }
}

fn kind_to_fb(k: MessageKind) -> fb::MessageKind {
    match k {
        MessageKind::Text => fb::MessageKind::Text,
        MessageKind::GroupCreated => fb::MessageKind::GroupCreated,
        MessageKind::MemberAdded => fb::MessageKind::MemberAdded,
        MessageKind::MemberRemoved => fb::MessageKind::MemberRemoved,
        MessageKind::MemberLeft => fb::MessageKind::MemberLeft,
        MessageKind::RoleChanged => fb::MessageKind::RoleChanged,
        MessageKind::Edit => fb::MessageKind::Edit,
        MessageKind::Delete => fb::MessageKind::Delete,
        MessageKind::Deleted => fb::MessageKind::Deleted,
    }
}

fn kind_from_fb(k: fb::MessageKind) -> Result<MessageKind, DecodeError> {
    Ok(match k {
        fb::MessageKind::Text => MessageKind::Text,
        fb::MessageKind::GroupCreated => MessageKind::GroupCreated,
        fb::MessageKind::MemberAdded => MessageKind::MemberAdded,
        fb::MessageKind::MemberRemoved => MessageKind::MemberRemoved,
        fb::MessageKind::MemberLeft => MessageKind::MemberLeft,
        fb::MessageKind::RoleChanged => MessageKind::RoleChanged,
        fb::MessageKind::Edit => MessageKind::Edit,
        fb::MessageKind::Delete => MessageKind::Delete,
        fb::MessageKind::Deleted => MessageKind::Deleted,
        _ => return Err(DecodeError::malformed("unknown message kind")),
    })
}

fn ckind_to_fb(k: ConversationKind) -> fb::ConversationKind {
    match k {
        ConversationKind::Direct => fb::ConversationKind::Direct,
        ConversationKind::Group => fb::ConversationKind::Group,
    }
}

fn ckind_from_fb(k: fb::ConversationKind) -> Result<ConversationKind, DecodeError> {
    match k {
        fb::ConversationKind::Direct => Ok(ConversationKind::Direct),
        fb::ConversationKind::Group => Ok(ConversationKind::Group),
        _ => Err(DecodeError::malformed("unknown conversation kind")),
    }
}

fn req_str<'a>(v: Option<&'a str>, field: &str) -> Result<&'a str, DecodeError> {
    v.ok_or_else(|| DecodeError::malformed(format!("missing field `{field}`")))
}

fn ids(v: Option<flatbuffers::Vector<'_, u64>>) -> Vec<u64> {
    v.map(|v| v.iter().collect()).unwrap_or_default()
}

// ---------------------------------------------------------------- client frames

pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(128);
    let (ty, body) = match &frame.body {
        ClientMsg::Sync { positions } => {
            let ps: Vec<_> = positions
                .iter()
                .map(|p| {
                    fb::Position::create(
                        &mut b,
                        &fb::PositionArgs { conversation_id: p.conversation_id, seq: p.seq },
                    )
                })
                .collect();
            let positions = Some(b.create_vector(&ps));
            let o = fb::SyncReq::create(&mut b, &fb::SyncReqArgs { positions });
            (fb::ClientBody::SyncReq, o.as_union_value())
        }
        ClientMsg::Send { conversation_id, client_msg_id, body, attachment } => {
            let client_msg_id = Some(b.create_string(client_msg_id));
            let body = Some(b.create_string(body));
            let attachment = attachment.as_ref().map(|a| {
                let attachment_id = Some(b.create_string(&a.attachment_id));
                let preview = Some(b.create_string(&a.preview));
                fb::AttachmentRef::create(
                    &mut b,
                    &fb::AttachmentRefArgs { attachment_id, width: a.width, height: a.height, preview },
                )
            });
            let o = fb::SendReq::create(
                &mut b,
                &fb::SendReqArgs { conversation_id: *conversation_id, client_msg_id, body, attachment },
            );
            (fb::ClientBody::SendReq, o.as_union_value())
        }
        ClientMsg::CreateDirect { user_id } => {
            let o = fb::CreateDirectReq::create(&mut b, &fb::CreateDirectReqArgs { user_id: *user_id });
            (fb::ClientBody::CreateDirectReq, o.as_union_value())
        }
        ClientMsg::CreateGroup { title, members } => {
            let title = Some(b.create_string(title));
            let members = Some(b.create_vector(members));
            let o = fb::CreateGroupReq::create(&mut b, &fb::CreateGroupReqArgs { title, members });
            (fb::ClientBody::CreateGroupReq, o.as_union_value())
        }
        ClientMsg::AddMembers { conversation_id, user_ids } => {
            let user_ids = Some(b.create_vector(user_ids));
            let o = fb::AddMembersReq::create(
                &mut b,
                &fb::AddMembersReqArgs { conversation_id: *conversation_id, user_ids },
            );
            (fb::ClientBody::AddMembersReq, o.as_union_value())
        }
        ClientMsg::RemoveMember { conversation_id, user_id } => {
            let o = fb::RemoveMemberReq::create(
                &mut b,
                &fb::RemoveMemberReqArgs { conversation_id: *conversation_id, user_id: *user_id },
            );
            (fb::ClientBody::RemoveMemberReq, o.as_union_value())
        }
        ClientMsg::Leave { conversation_id } => {
            let o = fb::LeaveReq::create(&mut b, &fb::LeaveReqArgs { conversation_id: *conversation_id });
            (fb::ClientBody::LeaveReq, o.as_union_value())
        }
        ClientMsg::SetRole { conversation_id, user_id, role } => {
            let o = fb::SetRoleReq::create(
                &mut b,
                &fb::SetRoleReqArgs {
                    conversation_id: *conversation_id,
                    user_id: *user_id,
                    role: role_to_fb(*role),
                },
            );
            (fb::ClientBody::SetRoleReq, o.as_union_value())
        }
        ClientMsg::GetConversation { conversation_id } => {
            let o = fb::GetConversationReq::create(
                &mut b,
                &fb::GetConversationReqArgs { conversation_id: *conversation_id },
            );
            (fb::ClientBody::GetConversationReq, o.as_union_value())
        }
        ClientMsg::History { conversation_id, before, after, limit } => {
            let o = fb::HistoryReq::create(
                &mut b,
                &fb::HistoryReqArgs {
                    conversation_id: *conversation_id,
                    before: *before,
                    after: *after,
                    limit: *limit,
                },
            );
            (fb::ClientBody::HistoryReq, o.as_union_value())
        }
        ClientMsg::ListConversations { limit, cursor } => {
            let cursor = cursor.as_deref().map(|c| b.create_string(c));
            let o = fb::ListConversationsReq::create(
                &mut b,
                &fb::ListConversationsReqArgs { limit: *limit, cursor },
            );
            (fb::ClientBody::ListConversationsReq, o.as_union_value())
        }
        ClientMsg::Ping => {
            let o = fb::PingReq::create(&mut b, &fb::PingReqArgs {});
            (fb::ClientBody::PingReq, o.as_union_value())
        }
        ClientMsg::Typing { conversation_id, typing } => {
            let o = fb::TypingReq::create(
                &mut b,
                &fb::TypingReqArgs { conversation_id: *conversation_id, typing: *typing },
            );
            (fb::ClientBody::TypingReq, o.as_union_value())
        }
        ClientMsg::MarkDelivered { conversation_id, seq } => {
            let o = fb::MarkDeliveredReq::create(
                &mut b,
                &fb::MarkDeliveredReqArgs { conversation_id: *conversation_id, seq: *seq },
            );
            (fb::ClientBody::MarkDeliveredReq, o.as_union_value())
        }
        ClientMsg::MarkRead { conversation_id, seq } => {
            let o = fb::MarkReadReq::create(
                &mut b,
                &fb::MarkReadReqArgs { conversation_id: *conversation_id, seq: *seq },
            );
            (fb::ClientBody::MarkReadReq, o.as_union_value())
        }
        ClientMsg::Edit { conversation_id, seq, body } => {
            let body = Some(b.create_string(body));
            let o = fb::EditReq::create(
                &mut b,
                &fb::EditReqArgs { conversation_id: *conversation_id, seq: *seq, body },
            );
            (fb::ClientBody::EditReq, o.as_union_value())
        }
        ClientMsg::Mute { conversation_id, muted } => {
            let o = fb::MuteReq::create(
                &mut b,
                &fb::MuteReqArgs { conversation_id: *conversation_id, muted: *muted },
            );
            (fb::ClientBody::MuteReq, o.as_union_value())
        }
        ClientMsg::Delete { conversation_id, seq } => {
            let o = fb::DeleteReq::create(
                &mut b,
                &fb::DeleteReqArgs { conversation_id: *conversation_id, seq: *seq },
            );
            (fb::ClientBody::DeleteReq, o.as_union_value())
        }
        ClientMsg::React { conversation_id, seq, emoji } => {
            let emoji = Some(b.create_string(emoji));
            let o = fb::ReactReq::create(
                &mut b,
                &fb::ReactReqArgs { conversation_id: *conversation_id, seq: *seq, emoji },
            );
            (fb::ClientBody::ReactReq, o.as_union_value())
        }
        ClientMsg::GetPresence { user_ids } => {
            let user_ids = Some(b.create_vector(user_ids));
            let o = fb::GetPresenceReq::create(&mut b, &fb::GetPresenceReqArgs { user_ids });
            (fb::ClientBody::GetPresenceReq, o.as_union_value())
        }
        ClientMsg::SetPrivacy { hide_last_seen } => {
            let o =
                fb::SetPrivacyReq::create(&mut b, &fb::SetPrivacyReqArgs { hide_last_seen: *hide_last_seen });
            (fb::ClientBody::SetPrivacyReq, o.as_union_value())
        }
        ClientMsg::GetReceipts { conversation_id } => {
            let o = fb::GetReceiptsReq::create(
                &mut b,
                &fb::GetReceiptsReqArgs { conversation_id: *conversation_id },
            );
            (fb::ClientBody::GetReceiptsReq, o.as_union_value())
        }
    };
    let root = fb::ClientFrame::create(
        &mut b,
        &fb::ClientFrameArgs { id: frame.id, body_type: ty, body: Some(body) },
    );
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

/// The id of a client frame whose body may not decode (0 if even that is unreadable).
pub fn decode_request_id(buf: &[u8]) -> u64 {
    flatbuffers::root::<fb::ClientFrameHead>(buf).map_or(0, |h| h.id())
}

pub fn decode_client(buf: &[u8]) -> Result<ClientFrame, DecodeError> {
    let f = flatbuffers::root::<fb::ClientFrame>(buf)
        .map_err(|e| DecodeError::malformed(format!("flatbuffers verification failed: {e}")))?;
    let id = f.id();
    let body = match f.body_type() {
        fb::ClientBody::SyncReq => {
            let r = f.body_as_sync_req().ok_or_else(missing_body)?;
            let positions = r
                .positions()
                .map(|v| {
                    v.iter()
                        .map(|p| Position { conversation_id: p.conversation_id(), seq: p.seq() })
                        .collect()
                })
                .unwrap_or_default();
            ClientMsg::Sync { positions }
        }
        fb::ClientBody::SendReq => {
            let r = f.body_as_send_req().ok_or_else(missing_body)?;
            ClientMsg::Send {
                conversation_id: r.conversation_id(),
                client_msg_id: req_str(r.client_msg_id(), "client_msg_id")?.to_owned(),
                body: r.body().unwrap_or_default().to_owned(),
                attachment: r.attachment().map(|a| AttachmentRef {
                    attachment_id: a.attachment_id().unwrap_or_default().to_owned(),
                    width: a.width(),
                    height: a.height(),
                    preview: a.preview().unwrap_or_default().to_owned(),
                }),
            }
        }
        fb::ClientBody::CreateDirectReq => {
            let r = f.body_as_create_direct_req().ok_or_else(missing_body)?;
            ClientMsg::CreateDirect { user_id: r.user_id() }
        }
        fb::ClientBody::CreateGroupReq => {
            let r = f.body_as_create_group_req().ok_or_else(missing_body)?;
            ClientMsg::CreateGroup {
                title: r.title().unwrap_or_default().to_owned(),
                members: ids(r.members()),
            }
        }
        fb::ClientBody::AddMembersReq => {
            let r = f.body_as_add_members_req().ok_or_else(missing_body)?;
            ClientMsg::AddMembers { conversation_id: r.conversation_id(), user_ids: ids(r.user_ids()) }
        }
        fb::ClientBody::RemoveMemberReq => {
            let r = f.body_as_remove_member_req().ok_or_else(missing_body)?;
            ClientMsg::RemoveMember { conversation_id: r.conversation_id(), user_id: r.user_id() }
        }
        fb::ClientBody::LeaveReq => {
            let r = f.body_as_leave_req().ok_or_else(missing_body)?;
            ClientMsg::Leave { conversation_id: r.conversation_id() }
        }
        fb::ClientBody::SetRoleReq => {
            let r = f.body_as_set_role_req().ok_or_else(missing_body)?;
            ClientMsg::SetRole {
                conversation_id: r.conversation_id(),
                user_id: r.user_id(),
                role: role_from_fb(r.role())?,
            }
        }
        fb::ClientBody::GetConversationReq => {
            let r = f.body_as_get_conversation_req().ok_or_else(missing_body)?;
            ClientMsg::GetConversation { conversation_id: r.conversation_id() }
        }
        fb::ClientBody::HistoryReq => {
            let r = f.body_as_history_req().ok_or_else(missing_body)?;
            ClientMsg::History {
                conversation_id: r.conversation_id(),
                before: r.before(),
                after: r.after(),
                limit: r.limit(),
            }
        }
        fb::ClientBody::ListConversationsReq => {
            let r = f.body_as_list_conversations_req().ok_or_else(missing_body)?;
            ClientMsg::ListConversations { limit: r.limit(), cursor: r.cursor().map(str::to_owned) }
        }
        fb::ClientBody::PingReq => ClientMsg::Ping,
        fb::ClientBody::TypingReq => {
            let r = f.body_as_typing_req().ok_or_else(missing_body)?;
            ClientMsg::Typing { conversation_id: r.conversation_id(), typing: r.typing() }
        }
        fb::ClientBody::MarkDeliveredReq => {
            let r = f.body_as_mark_delivered_req().ok_or_else(missing_body)?;
            ClientMsg::MarkDelivered { conversation_id: r.conversation_id(), seq: r.seq() }
        }
        fb::ClientBody::MarkReadReq => {
            let r = f.body_as_mark_read_req().ok_or_else(missing_body)?;
            ClientMsg::MarkRead { conversation_id: r.conversation_id(), seq: r.seq() }
        }
        fb::ClientBody::EditReq => {
            let r = f.body_as_edit_req().ok_or_else(missing_body)?;
            ClientMsg::Edit {
                conversation_id: r.conversation_id(),
                seq: r.seq(),
                body: r.body().unwrap_or_default().to_owned(),
            }
        }
        fb::ClientBody::MuteReq => {
            let r = f.body_as_mute_req().ok_or_else(missing_body)?;
            ClientMsg::Mute { conversation_id: r.conversation_id(), muted: r.muted() }
        }
        fb::ClientBody::DeleteReq => {
            let r = f.body_as_delete_req().ok_or_else(missing_body)?;
            ClientMsg::Delete { conversation_id: r.conversation_id(), seq: r.seq() }
        }
        fb::ClientBody::ReactReq => {
            let r = f.body_as_react_req().ok_or_else(missing_body)?;
            ClientMsg::React {
                conversation_id: r.conversation_id(),
                seq: r.seq(),
                emoji: r.emoji().unwrap_or_default().to_owned(),
            }
        }
        fb::ClientBody::GetPresenceReq => {
            let r = f.body_as_get_presence_req().ok_or_else(missing_body)?;
            ClientMsg::GetPresence { user_ids: ids(r.user_ids()) }
        }
        fb::ClientBody::SetPrivacyReq => {
            let r = f.body_as_set_privacy_req().ok_or_else(missing_body)?;
            ClientMsg::SetPrivacy { hide_last_seen: r.hide_last_seen() }
        }
        fb::ClientBody::GetReceiptsReq => {
            let r = f.body_as_get_receipts_req().ok_or_else(missing_body)?;
            ClientMsg::GetReceipts { conversation_id: r.conversation_id() }
        }
        _ => return Err(DecodeError::UnknownType),
    };
    Ok(ClientFrame { id, body })
}

fn missing_body() -> DecodeError {
    DecodeError::malformed("frame has no body")
}

// ---------------------------------------------------------------- server frames

fn reactions_fb<'b>(
    b: &mut FlatBufferBuilder<'b>,
    rs: &[ReactionCount],
) -> Option<WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<fb::ReactionCount<'b>>>>> {
    if rs.is_empty() {
        return None;
    }
    let v: Vec<_> = rs
        .iter()
        .map(|r| {
            let emoji = Some(b.create_string(&r.emoji));
            fb::ReactionCount::create(b, &fb::ReactionCountArgs { emoji, count: r.count })
        })
        .collect();
    Some(b.create_vector(&v))
}

fn reactions_from_fb(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::ReactionCount<'_>>>>,
) -> Vec<ReactionCount> {
    v.map(|v| {
        v.iter()
            .map(|r| ReactionCount { emoji: r.emoji().unwrap_or_default().to_owned(), count: r.count() })
            .collect()
    })
    .unwrap_or_default()
}

fn presence_fb<'b>(b: &mut FlatBufferBuilder<'b>, p: &PresenceInfo) -> WIPOffset<fb::PresenceInfo<'b>> {
    fb::PresenceInfo::create(
        b,
        &fb::PresenceInfoArgs { user_id: p.user_id, online: p.online, last_seen_ms: p.last_seen_ms },
    )
}

fn presence_from_fb(p: fb::PresenceInfo<'_>) -> PresenceInfo {
    PresenceInfo { user_id: p.user_id(), online: p.online(), last_seen_ms: p.last_seen_ms() }
}

fn message_fb<'b>(b: &mut FlatBufferBuilder<'b>, m: &Message) -> WIPOffset<fb::Message<'b>> {
    let client_msg_id = Some(b.create_string(&m.client_msg_id));
    let body = Some(b.create_string(&m.body));
    let reactions = reactions_fb(b, &m.reactions);
    let my_reaction = m.my_reaction.as_deref().map(|r| b.create_string(r));
    let attachment = m.attachment.as_ref().map(|a| {
        let args = fb::AttachmentArgs {
            attachment_id: Some(b.create_string(&a.attachment_id)),
            file_name: Some(b.create_string(&a.file_name)),
            media_type: Some(b.create_string(&a.media_type)),
            size: a.size,
            sha256: Some(b.create_string(&a.sha256)),
            width: a.width,
            height: a.height,
            preview: Some(b.create_string(&a.preview)),
        };
        fb::Attachment::create(b, &args)
    });
    fb::Message::create(
        b,
        &fb::MessageArgs {
            conversation_id: m.conversation_id,
            seq: m.seq,
            ts_ms: m.ts_ms,
            sender_id: m.sender_id,
            client_msg_id,
            kind: kind_to_fb(m.kind),
            body,
            target_user_id: m.target_user_id,
            role: m.role.map(role_to_fb),
            target_seq: m.target_seq,
            edited_ms: m.edited_ms,
            reactions,
            my_reaction,
            attachment,
        },
    )
}

fn message_from_fb(m: fb::Message<'_>) -> Result<Message, DecodeError> {
    Ok(Message {
        conversation_id: m.conversation_id(),
        seq: m.seq(),
        ts_ms: m.ts_ms(),
        sender_id: m.sender_id(),
        client_msg_id: m.client_msg_id().unwrap_or_default().to_owned(),
        kind: kind_from_fb(m.kind())?,
        body: m.body().unwrap_or_default().to_owned(),
        target_user_id: m.target_user_id(),
        role: m.role().map(role_from_fb).transpose()?,
        target_seq: m.target_seq(),
        edited_ms: m.edited_ms(),
        reactions: reactions_from_fb(m.reactions()),
        my_reaction: m.my_reaction().map(str::to_owned),
        attachment: m.attachment().map(|a| {
            Box::new(Attachment {
                attachment_id: a.attachment_id().unwrap_or_default().to_owned(),
                file_name: a.file_name().unwrap_or_default().to_owned(),
                media_type: a.media_type().unwrap_or_default().to_owned(),
                size: a.size(),
                sha256: a.sha256().unwrap_or_default().to_owned(),
                width: a.width(),
                height: a.height(),
                preview: a.preview().unwrap_or_default().to_owned(),
            })
        }),
    })
}

/// Appends the FlatBuffers encoding of `frame` to a fresh buffer.
pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(256);
    let (ty, body) = match &frame.body {
        ServerMsg::Welcome { user_id, connection_id, server_time_ms, max_frame_bytes } => {
            let o = fb::Welcome::create(
                &mut b,
                &fb::WelcomeArgs {
                    user_id: *user_id,
                    connection_id: *connection_id,
                    server_time_ms: *server_time_ms,
                    max_frame_bytes: *max_frame_bytes,
                },
            );
            (fb::ServerBody::Welcome, o.as_union_value())
        }
        ServerMsg::Ack { conversation_id, client_msg_id, seq, ts_ms } => {
            let client_msg_id = Some(b.create_string(client_msg_id));
            let o = fb::Ack::create(
                &mut b,
                &fb::AckArgs { conversation_id: *conversation_id, client_msg_id, seq: *seq, ts_ms: *ts_ms },
            );
            (fb::ServerBody::Ack, o.as_union_value())
        }
        ServerMsg::Message { message } => {
            let o = message_fb(&mut b, message);
            (fb::ServerBody::Message, o.as_union_value())
        }
        ServerMsg::Conversation { conversation: c } => {
            let title = Some(b.create_string(&c.title));
            let ms: Vec<_> = c
                .members
                .iter()
                .map(|m| {
                    fb::Member::create(
                        &mut b,
                        &fb::MemberArgs { user_id: m.user_id, role: role_to_fb(m.role) },
                    )
                })
                .collect();
            let members = Some(b.create_vector(&ms));
            let o = fb::Conversation::create(
                &mut b,
                &fb::ConversationArgs {
                    conversation_id: c.conversation_id,
                    kind: ckind_to_fb(c.kind),
                    title,
                    members,
                    last_seq: c.last_seq,
                    last_ts_ms: c.last_ts_ms,
                    created_ms: c.created_ms,
                },
            );
            (fb::ServerBody::Conversation, o.as_union_value())
        }
        ServerMsg::History { conversation_id, messages, has_more } => {
            let ms: Vec<_> = messages.iter().map(|m| message_fb(&mut b, m)).collect();
            let messages = Some(b.create_vector(&ms));
            let o = fb::HistoryPage::create(
                &mut b,
                &fb::HistoryPageArgs { conversation_id: *conversation_id, messages, has_more: *has_more },
            );
            (fb::ServerBody::HistoryPage, o.as_union_value())
        }
        ServerMsg::Conversations { items, next_cursor } => {
            let its: Vec<_> = items
                .iter()
                .map(|s| {
                    let title = Some(b.create_string(&s.title));
                    let last_message = s.last_message.as_ref().map(|m| message_fb(&mut b, m));
                    fb::ConversationSummary::create(
                        &mut b,
                        &fb::ConversationSummaryArgs {
                            conversation_id: s.conversation_id,
                            kind: ckind_to_fb(s.kind),
                            title,
                            last_seq: s.last_seq,
                            last_ts_ms: s.last_ts_ms,
                            read_seq: s.read_seq,
                            unread: s.unread,
                            muted: s.muted,
                            last_message,
                        },
                    )
                })
                .collect();
            let items = Some(b.create_vector(&its));
            let next_cursor = next_cursor.as_deref().map(|c| b.create_string(c));
            let o = fb::ConversationList::create(&mut b, &fb::ConversationListArgs { items, next_cursor });
            (fb::ServerBody::ConversationList, o.as_union_value())
        }
        ServerMsg::SyncDone { conversations, messages } => {
            let o = fb::SyncDone::create(
                &mut b,
                &fb::SyncDoneArgs { conversations: *conversations, messages: *messages },
            );
            (fb::ServerBody::SyncDone, o.as_union_value())
        }
        ServerMsg::Error { code, name, message, client_msg_id } => {
            let name = Some(b.create_string(name));
            let message = Some(b.create_string(message));
            let client_msg_id = client_msg_id.as_deref().map(|c| b.create_string(c));
            let o = fb::Error::create(&mut b, &fb::ErrorArgs { code: *code, name, message, client_msg_id });
            (fb::ServerBody::Error, o.as_union_value())
        }
        ServerMsg::Ok => {
            let o = fb::Ok::create(&mut b, &fb::OkArgs {});
            (fb::ServerBody::Ok, o.as_union_value())
        }
        ServerMsg::Pong => {
            let o = fb::Pong::create(&mut b, &fb::PongArgs {});
            (fb::ServerBody::Pong, o.as_union_value())
        }
        ServerMsg::Typing { conversation_id, user_id, typing, expires_ms } => {
            let o = fb::Typing::create(
                &mut b,
                &fb::TypingArgs {
                    conversation_id: *conversation_id,
                    user_id: *user_id,
                    typing: *typing,
                    expires_ms: *expires_ms,
                },
            );
            (fb::ServerBody::Typing, o.as_union_value())
        }
        ServerMsg::Receipt { conversation_id, user_id, delivered_seq, read_seq } => {
            let o = fb::Receipt::create(
                &mut b,
                &fb::ReceiptArgs {
                    conversation_id: *conversation_id,
                    user_id: *user_id,
                    delivered_seq: *delivered_seq,
                    read_seq: *read_seq,
                },
            );
            (fb::ServerBody::Receipt, o.as_union_value())
        }
        ServerMsg::Receipts { conversation_id, members } => {
            let ms: Vec<_> = members
                .iter()
                .map(|m| {
                    fb::MemberPositions::create(
                        &mut b,
                        &fb::MemberPositionsArgs {
                            user_id: m.user_id,
                            delivered_seq: m.delivered_seq,
                            read_seq: m.read_seq,
                        },
                    )
                })
                .collect();
            let members = Some(b.create_vector(&ms));
            let o = fb::Receipts::create(
                &mut b,
                &fb::ReceiptsArgs { conversation_id: *conversation_id, members },
            );
            (fb::ServerBody::Receipts, o.as_union_value())
        }
        ServerMsg::Presence { presence } => {
            let presence = Some(presence_fb(&mut b, presence));
            let o = fb::Presence::create(&mut b, &fb::PresenceArgs { presence });
            (fb::ServerBody::Presence, o.as_union_value())
        }
        ServerMsg::PresenceList { users } => {
            let v: Vec<_> = users.iter().map(|p| presence_fb(&mut b, p)).collect();
            let users = Some(b.create_vector(&v));
            let o = fb::PresenceList::create(&mut b, &fb::PresenceListArgs { users });
            (fb::ServerBody::PresenceList, o.as_union_value())
        }
        ServerMsg::Reaction { conversation_id, seq, user_id, emoji, reactions } => {
            let emoji = Some(b.create_string(emoji));
            let reactions = reactions_fb(&mut b, reactions);
            let o = fb::Reaction::create(
                &mut b,
                &fb::ReactionArgs {
                    conversation_id: *conversation_id,
                    seq: *seq,
                    user_id: *user_id,
                    emoji,
                    reactions,
                },
            );
            (fb::ServerBody::Reaction, o.as_union_value())
        }
    };
    let root = fb::ServerFrame::create(
        &mut b,
        &fb::ServerFrameArgs { id: frame.id, body_type: ty, body: Some(body) },
    );
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

pub fn decode_server(buf: &[u8]) -> Result<ServerFrame, DecodeError> {
    let f = flatbuffers::root::<fb::ServerFrame>(buf)
        .map_err(|e| DecodeError::malformed(format!("flatbuffers verification failed: {e}")))?;
    let id = f.id();
    let body = match f.body_type() {
        fb::ServerBody::Welcome => {
            let r = f.body_as_welcome().ok_or_else(missing_body)?;
            ServerMsg::Welcome {
                user_id: r.user_id(),
                connection_id: r.connection_id(),
                server_time_ms: r.server_time_ms(),
                max_frame_bytes: r.max_frame_bytes(),
            }
        }
        fb::ServerBody::Ack => {
            let r = f.body_as_ack().ok_or_else(missing_body)?;
            ServerMsg::Ack {
                conversation_id: r.conversation_id(),
                client_msg_id: r.client_msg_id().unwrap_or_default().to_owned(),
                seq: r.seq(),
                ts_ms: r.ts_ms(),
            }
        }
        fb::ServerBody::Message => {
            let r = f.body_as_message().ok_or_else(missing_body)?;
            ServerMsg::Message { message: message_from_fb(r)? }
        }
        fb::ServerBody::Conversation => {
            let c = f.body_as_conversation().ok_or_else(missing_body)?;
            let members = c
                .members()
                .map(|v| {
                    v.iter()
                        .map(|m| Ok(Member { user_id: m.user_id(), role: role_from_fb(m.role())? }))
                        .collect::<Result<Vec<_>, DecodeError>>()
                })
                .transpose()?
                .unwrap_or_default();
            ServerMsg::Conversation {
                conversation: Conversation {
                    conversation_id: c.conversation_id(),
                    kind: ckind_from_fb(c.kind())?,
                    title: c.title().unwrap_or_default().to_owned(),
                    members,
                    last_seq: c.last_seq(),
                    last_ts_ms: c.last_ts_ms(),
                    created_ms: c.created_ms(),
                },
            }
        }
        fb::ServerBody::HistoryPage => {
            let r = f.body_as_history_page().ok_or_else(missing_body)?;
            let messages = r
                .messages()
                .map(|v| v.iter().map(message_from_fb).collect::<Result<Vec<_>, _>>())
                .transpose()?
                .unwrap_or_default();
            ServerMsg::History { conversation_id: r.conversation_id(), messages, has_more: r.has_more() }
        }
        fb::ServerBody::ConversationList => {
            let r = f.body_as_conversation_list().ok_or_else(missing_body)?;
            let items = r
                .items()
                .map(|v| {
                    v.iter()
                        .map(|s| {
                            Ok(ConversationSummary {
                                conversation_id: s.conversation_id(),
                                kind: ckind_from_fb(s.kind())?,
                                title: s.title().unwrap_or_default().to_owned(),
                                last_seq: s.last_seq(),
                                last_ts_ms: s.last_ts_ms(),
                                read_seq: s.read_seq(),
                                unread: s.unread(),
                                muted: s.muted(),
                                last_message: s.last_message().map(message_from_fb).transpose()?,
                            })
                        })
                        .collect::<Result<Vec<_>, DecodeError>>()
                })
                .transpose()?
                .unwrap_or_default();
            ServerMsg::Conversations { items, next_cursor: r.next_cursor().map(str::to_owned) }
        }
        fb::ServerBody::SyncDone => {
            let r = f.body_as_sync_done().ok_or_else(missing_body)?;
            ServerMsg::SyncDone { conversations: r.conversations(), messages: r.messages() }
        }
        fb::ServerBody::Error => {
            let r = f.body_as_error().ok_or_else(missing_body)?;
            ServerMsg::Error {
                code: r.code(),
                name: r.name().unwrap_or_default().to_owned(),
                message: r.message().unwrap_or_default().to_owned(),
                client_msg_id: r.client_msg_id().map(str::to_owned),
            }
        }
        fb::ServerBody::Ok => ServerMsg::Ok,
        fb::ServerBody::Pong => ServerMsg::Pong,
        fb::ServerBody::Typing => {
            let r = f.body_as_typing().ok_or_else(missing_body)?;
            ServerMsg::Typing {
                conversation_id: r.conversation_id(),
                user_id: r.user_id(),
                typing: r.typing(),
                expires_ms: r.expires_ms(),
            }
        }
        fb::ServerBody::Receipt => {
            let r = f.body_as_receipt().ok_or_else(missing_body)?;
            ServerMsg::Receipt {
                conversation_id: r.conversation_id(),
                user_id: r.user_id(),
                delivered_seq: r.delivered_seq(),
                read_seq: r.read_seq(),
            }
        }
        fb::ServerBody::Receipts => {
            let r = f.body_as_receipts().ok_or_else(missing_body)?;
            let members = r
                .members()
                .map(|v| {
                    v.iter()
                        .map(|m| MemberPositions {
                            user_id: m.user_id(),
                            delivered_seq: m.delivered_seq(),
                            read_seq: m.read_seq(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            ServerMsg::Receipts { conversation_id: r.conversation_id(), members }
        }
        fb::ServerBody::Presence => {
            let r = f.body_as_presence().ok_or_else(missing_body)?;
            let p = r.presence().ok_or_else(|| DecodeError::malformed("missing field `presence`"))?;
            ServerMsg::Presence { presence: presence_from_fb(p) }
        }
        fb::ServerBody::PresenceList => {
            let r = f.body_as_presence_list().ok_or_else(missing_body)?;
            let users = r.users().map(|v| v.iter().map(presence_from_fb).collect()).unwrap_or_default();
            ServerMsg::PresenceList { users }
        }
        fb::ServerBody::Reaction => {
            let r = f.body_as_reaction().ok_or_else(missing_body)?;
            ServerMsg::Reaction {
                conversation_id: r.conversation_id(),
                seq: r.seq(),
                user_id: r.user_id(),
                emoji: r.emoji().unwrap_or_default().to_owned(),
                reactions: reactions_from_fb(r.reactions()),
            }
        }
        _ => return Err(DecodeError::UnknownType),
    };
    Ok(ServerFrame { id, body })
}
