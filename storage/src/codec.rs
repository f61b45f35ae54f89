//! Encodings shared by the backends: byte keys and rows for the embedded store,
//! integer conversions for the SQL and CQL ones.
//!
//! Keys are big-endian so that lexicographic order is numeric order. Message
//! rows have a hand-written, versioned encoding: they are the hottest value and
//! the wire model's serde attributes (string ids) are not meant for disk.

use crate::{ConversationKind, ErrorKind, Message, MessageKind, Role, StorageError};

const MESSAGE_V1: u8 = 1;

pub fn key2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

pub fn message_key(conv: u64, bucket: u32, seq: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&conv.to_be_bytes());
    k[8..12].copy_from_slice(&bucket.to_be_bytes());
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `(conversation, seq, user)`: a reaction row, clustered by message then user.
pub fn reaction_key(conv: u64, seq: u64, user: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&conv.to_be_bytes());
    k[8..16].copy_from_slice(&seq.to_be_bytes());
    k[16..].copy_from_slice(&user.to_be_bytes());
    k
}

pub fn bucket_key(conv: u64, bucket: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&conv.to_be_bytes());
    k[8..].copy_from_slice(&bucket.to_be_bytes());
    k
}

pub fn u64_at(b: &[u8], at: usize) -> Result<u64, StorageError> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt("short integer"))
}

pub fn u32_at(b: &[u8], at: usize) -> Result<u32, StorageError> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| corrupt("short integer"))
}

pub fn corrupt(what: &'static str) -> StorageError {
    StorageError::new(ErrorKind::Corrupt, "decoding a stored row", what)
}

pub fn role_to_u8(r: Role) -> u8 {
    match r {
        Role::Member => 0,
        Role::Admin => 1,
        Role::Owner => 2,
    }
}

pub fn role_from_u8(v: u8) -> Result<Role, StorageError> {
    Ok(match v {
        0 => Role::Member,
        1 => Role::Admin,
        2 => Role::Owner,
        _ => return Err(corrupt("unknown role")),
    })
}

pub(crate) fn kind_to_u8(k: MessageKind) -> u8 {
    match k {
        MessageKind::Text => 0,
        MessageKind::GroupCreated => 1,
        MessageKind::MemberAdded => 2,
        MessageKind::MemberRemoved => 3,
        MessageKind::MemberLeft => 4,
        MessageKind::RoleChanged => 5,
        MessageKind::Edit => 6,
        MessageKind::Delete => 7,
        MessageKind::Deleted => 8,
    }
}

pub(crate) fn kind_from_u8(v: u8) -> Result<MessageKind, StorageError> {
    Ok(match v {
        0 => MessageKind::Text,
        1 => MessageKind::GroupCreated,
        2 => MessageKind::MemberAdded,
        3 => MessageKind::MemberRemoved,
        4 => MessageKind::MemberLeft,
        5 => MessageKind::RoleChanged,
        6 => MessageKind::Edit,
        7 => MessageKind::Delete,
        8 => MessageKind::Deleted,
        _ => return Err(corrupt("unknown message kind")),
    })
}

/// `v1 | ts | sender | kind | flags | [target] | [role] | [edited] | [slot] | len cmid | cmid | len body | body`
/// (conversation and seq live in the key). Flag `0x10`: the body is sealed under
/// the key in vault slot `slot` (see `seal`).
pub fn encode_message(m: &Message) -> Vec<u8> {
    encode_row(m, None)
}

/// A message row whose body is `sealed` (`(slot, sealed bytes)`) instead of `m.body`.
pub(crate) fn encode_row(m: &Message, sealed: Option<(u64, &[u8])>) -> Vec<u8> {
    let body = sealed.map_or(m.body.as_bytes(), |(_, b)| b);
    let mut v = Vec::with_capacity(40 + m.client_msg_id.len() + body.len());
    v.push(MESSAGE_V1);
    v.extend_from_slice(&m.ts_ms.to_be_bytes());
    v.extend_from_slice(&m.sender_id.to_be_bytes());
    v.push(kind_to_u8(m.kind));
    v.push(
        u8::from(m.target_user_id.is_some())
            | (u8::from(m.role.is_some()) << 1)
            | (u8::from(m.target_seq.is_some()) << 2)
            | (u8::from(m.edited_ms.is_some()) << 3)
            | (u8::from(sealed.is_some()) << 4),
    );
    if let Some(t) = m.target_user_id {
        v.extend_from_slice(&t.to_be_bytes());
    }
    if let Some(r) = m.role {
        v.push(role_to_u8(r));
    }
    for x in [m.target_seq, m.edited_ms, sealed.map(|(slot, _)| slot)].into_iter().flatten() {
        v.extend_from_slice(&x.to_be_bytes());
    }
    for s in [m.client_msg_id.as_bytes(), body] {
        v.extend_from_slice(&(s.len() as u32).to_be_bytes());
        v.extend_from_slice(s);
    }
    v
}

/// A sealed body as stored: the vault slot of its key, and the sealed bytes.
pub(crate) type SealedBody = (u64, Vec<u8>);

/// A decoded message row: a sealed body comes back beside a message with an empty body.
pub(crate) type Row = (Message, Option<SealedBody>);

/// A message row; a sealed body comes back as `(slot, sealed bytes)` beside a
/// message with an empty body.
pub(crate) fn decode_row(conv: u64, seq: u64, b: &[u8]) -> Result<Row, StorageError> {
    if b.first() != Some(&MESSAGE_V1) {
        return Err(corrupt("unknown message row version"));
    }
    let ts_ms = u64_at(b, 1)?;
    let sender_id = u64_at(b, 9)?;
    let kind = kind_from_u8(*b.get(17).ok_or_else(|| corrupt("short row"))?)?;
    let flags = *b.get(18).ok_or_else(|| corrupt("short row"))?;
    let mut at = 19;
    let target_user_id = if flags & 1 != 0 {
        at += 8;
        Some(u64_at(b, at - 8)?)
    } else {
        None
    };
    let role = if flags & 2 != 0 {
        at += 1;
        Some(role_from_u8(*b.get(at - 1).ok_or_else(|| corrupt("short row"))?)?)
    } else {
        None
    };
    let mut optional_u64 = |bit: u8| -> Result<Option<u64>, StorageError> {
        if flags & bit == 0 {
            return Ok(None);
        }
        at += 8;
        Ok(Some(u64_at(b, at - 8)?))
    };
    let target_seq = optional_u64(4)?;
    let edited_ms = optional_u64(8)?;
    let slot = optional_u64(16)?;
    let mut strs: [&[u8]; 2] = [&[], &[]];
    for s in &mut strs {
        let len = u32_at(b, at)? as usize;
        at += 4;
        *s = b.get(at..at + len).ok_or_else(|| corrupt("short string"))?;
        at += len;
    }
    let [cmid, body] = strs;
    let utf8 = |v: &[u8]| String::from_utf8(v.to_vec()).map_err(|_| corrupt("string not utf-8"));
    let (body, sealed) = match slot {
        Some(slot) => (String::new(), Some((slot, body.to_vec()))),
        None => (utf8(body)?, None),
    };
    let m = Message {
        conversation_id: conv,
        seq,
        ts_ms,
        sender_id,
        client_msg_id: utf8(cmid)?,
        kind,
        body,
        target_user_id,
        role,
        target_seq,
        edited_ms,
        reactions: Vec::new(),
        my_reaction: None,
        attachment: None,
    };
    Ok((m, sealed))
}

/// Ids and positions are u64 in Rust and BIGINT in SQL and CQL. Real ones fit (63-bit
/// snowflakes, positions far below 2^63); open range bounds saturate.
pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u(v: i64) -> u64 {
    v.max(0) as u64
}

pub(crate) fn conv_kind_to_i16(k: ConversationKind) -> i16 {
    match k {
        ConversationKind::Direct => 0,
        ConversationKind::Group => 1,
    }
}

pub(crate) fn conv_kind_from_i16(v: i16) -> Result<ConversationKind, StorageError> {
    match v {
        0 => Ok(ConversationKind::Direct),
        1 => Ok(ConversationKind::Group),
        _ => Err(corrupt("unknown conversation kind")),
    }
}

pub(crate) fn small(v: i16) -> Result<u8, StorageError> {
    u8::try_from(v).map_err(|_| corrupt("small integer out of range"))
}

/// A message row as the SQL and CQL stores select it (`seq, ts_ms, sender_id,
/// client_msg_id, kind, body, target_user_id, role, target_seq, edited_ms`).
pub(crate) type MessageColumns =
    (i64, i64, i64, String, i16, String, Option<i64>, Option<i16>, Option<i64>, Option<i64>);

pub(crate) fn message_from_columns(conv: u64, c: MessageColumns) -> Result<Message, StorageError> {
    Ok(Message {
        conversation_id: conv,
        seq: u(c.0),
        ts_ms: u(c.1),
        sender_id: u(c.2),
        client_msg_id: c.3,
        kind: kind_from_u8(small(c.4)?)?,
        body: c.5,
        target_user_id: c.6.map(u),
        role: c.7.map(|v| small(v).and_then(role_from_u8)).transpose()?,
        target_seq: c.8.map(u),
        edited_ms: c.9.map(u),
        reactions: Vec::new(),
        my_reaction: None,
        attachment: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_rows_round_trip() {
        let mut m = Message {
            conversation_id: 5,
            seq: 9,
            ts_ms: 123,
            sender_id: 7,
            client_msg_id: "abc".into(),
            kind: MessageKind::Text,
            body: "héllo".into(),
            target_user_id: None,
            role: None,
            target_seq: None,
            edited_ms: None,
            reactions: Vec::new(),
            my_reaction: None,
            attachment: None,
        };
        assert_eq!(decode_row(5, 9, &encode_message(&m)).unwrap().0, m);
        m.edited_ms = Some(456);
        assert_eq!(decode_row(5, 9, &encode_message(&m)).unwrap().0, m);
        m.kind = MessageKind::Delete;
        m.target_seq = Some(3);
        assert_eq!(decode_row(5, 9, &encode_message(&m)).unwrap().0, m);
        m.target_seq = None;
        m.edited_ms = None;
        m.kind = MessageKind::RoleChanged;
        m.target_user_id = Some(u64::MAX);
        m.role = Some(Role::Admin);
        let enc = encode_message(&m);
        assert_eq!(decode_row(5, 9, &enc).unwrap().0, m);
        for cut in 0..enc.len() {
            assert!(decode_row(5, 9, &enc[..cut]).is_err());
        }
        m.kind = MessageKind::Edit;
        m.edited_ms = Some(7);
        let enc = encode_row(&m, Some((42, b"\x00sealed\xff")));
        let (back, sealed) = decode_row(5, 9, &enc).unwrap();
        assert_eq!(back, Message { body: String::new(), ..m });
        assert_eq!(sealed, Some((42, b"\x00sealed\xff".to_vec())));
        for cut in 0..enc.len() {
            assert!(decode_row(5, 9, &enc[..cut]).is_err());
        }
    }

    #[test]
    fn keys_sort_numerically() {
        assert!(message_key(1, 2, 255) < message_key(1, 2, 256));
        assert!(message_key(1, 2, u64::MAX) < message_key(1, 3, 0));
        assert!(key2(1, u64::MAX) < key2(2, 0));
    }
}
