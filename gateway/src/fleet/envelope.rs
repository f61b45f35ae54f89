//! What nodes send each other: one envelope per stream entry.
//!
//! JSON (serde_json) over the in-process types: self-describing, so a node of
//! the next release can read this one's entries during a rolling upgrade (fields
//! it does not know are ignored, fields it misses take their defaults), and
//! inspectable with `redis-cli XRANGE`. It costs a few microseconds per entry
//! against a Redis round trip of a hundred or more (benches: `envelope_codec`).

use crate::vocab::command::Command;
use crate::vocab::event::EventKind;
use protocol::UserId;
use serde::{Deserialize, Serialize};

/// The format's version, first field of every envelope. A node refuses (logs and
/// drops) an envelope of a newer major version than it knows.
pub const VERSION: u8 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Body {
    /// A command for the receiving node's sequencer (it owns the command's key).
    Command { cmd: Box<Command> },
    /// One commit batch's events for users with devices on the receiving node, in order.
    Events { events: Vec<Addressed> },
    /// Events for these users' devices on the receiving node were lost on the way
    /// (a full queue, the link down past its retry bound): their connections there
    /// must resync. `all`: every connection there.
    Resync {
        #[serde(default)]
        users: Vec<UserId>,
        #[serde(default)]
        all: bool,
    },
}

/// An event and the users on the receiving node it is for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Addressed {
    pub event: EventKind,
    pub to: Vec<UserId>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<B> {
    v: u8,
    #[serde(flatten)]
    body: B,
}

/// Borrowing twin of [`Body::Events`], so an event is encoded without a copy.
#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum EventsRef<'a> {
    Events { events: &'a [AddressedRef<'a>] },
}

#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum CommandRef<'a> {
    Command { cmd: &'a Command },
}

#[derive(Serialize)]
pub struct AddressedRef<'a> {
    pub event: &'a EventKind,
    pub to: &'a [UserId],
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("envelope version {0} is newer than this node's {VERSION}")]
    Version(u8),
}

pub fn encode(body: &Body) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: VERSION, body }).expect("envelopes serialize")
}

/// A command for its owner.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: VERSION, body: CommandRef::Command { cmd } })
        .expect("envelopes serialize")
}

/// One batch's events for one node.
pub fn encode_events(events: &[AddressedRef<'_>]) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: VERSION, body: EventsRef::Events { events } })
        .expect("envelopes serialize")
}

pub fn decode(bytes: &[u8]) -> Result<Body, DecodeError> {
    #[derive(Deserialize)]
    struct Head {
        v: u8,
    }
    let Head { v } = serde_json::from_slice(bytes)?;
    if v > VERSION {
        return Err(DecodeError::Version(v));
    }
    let e: Envelope<Body> = serde_json::from_slice(bytes)?;
    Ok(e.body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::command::SendCmd;
    use crate::vocab::event::{Answer, Origin};
    use proptest::prelude::*;
    use protocol::{ErrorCode, Message, MessageKind};

    fn message(seq: u64, body: String, cmid: String) -> Message {
        Message {
            conversation_id: 250_583_497_679_306_752,
            seq,
            ts_ms: 1_795_433_361_481,
            sender_id: 250_582_937_072_828_416,
            client_msg_id: cmid,
            kind: MessageKind::Text,
            body,
            target_user_id: None,
            role: None,
            target_seq: None,
            edited_ms: Some(5),
            reactions: Vec::new(),
            my_reaction: None,
            attachment: None,
        }
    }

    /// Debug forms compare the whole value (the types hold no floats or pointers).
    fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    proptest! {
        // Any send (ids across the 63-bit range, any text) survives the trip, and so
        // does one batch's events for a node.
        #[test]
        fn commands_and_events_survive_the_trip(
            conv in 0u64..(1 << 63),
            conn in any::<u64>(),
            request in any::<u64>(),
            hops in 0u8..4,
            body in "\\PC{0,200}",
            cmid in "[a-zA-Z0-9-]{1,64}",
            seq in 1u64..(1 << 53),
            users in proptest::collection::vec(0u64..(1 << 63), 0..20),
        ) {
            let cmd = Command::Send(SendCmd {
                conversation: conv,
                sender: 7,
                client_msg_id: cmid.clone(),
                body: body.clone(),
                origin: Origin { conn, request, hops },
                submitted: std::time::Instant::now(), attachment: None, });
            let Body::Command { cmd: back } = decode(&encode_command(&cmd)).unwrap() else { panic!("a command") };
            // `submitted` is local to a process: the rest must match.
            let (Command::Send(a), Command::Send(b)) = (&cmd, &*back) else { panic!("a send") };
            prop_assert_eq!((a.conversation, a.sender, &a.client_msg_id, &a.body, a.origin),
                (b.conversation, b.sender, &b.client_msg_id, &b.body, b.origin));

            let events = [
                EventKind::Message { message: message(seq, body.clone(), cmid.clone()), origin: Some(conn), to_others: true },
                EventKind::SendFailed { origin: conn, conversation_id: conv, client_msg_id: cmid, code: ErrorCode::Unavailable },
                EventKind::Reply { origin: Origin { conn, request, hops }, result: Err(ErrorCode::NotMember), settles: true },
                EventKind::Typing { conversation_id: conv, user: 3, typing: true },
                EventKind::Resync,
            ];
            let refs: Vec<AddressedRef<'_>> = events.iter().map(|event| AddressedRef { event, to: &users }).collect();
            let Body::Events { events: back } = decode(&encode_events(&refs)).unwrap() else { panic!("events") };
            prop_assert_eq!(back.len(), events.len());
            for (a, b) in events.iter().zip(&back) {
                prop_assert!(same(a, &b.event), "{:?} came back as {:?}", a, b.event);
                prop_assert_eq!(&b.to, &users);
            }
        }
    }

    #[test]
    fn every_answer_and_notice_survives_the_trip() {
        let conv = protocol::Conversation {
            conversation_id: 9,
            kind: protocol::ConversationKind::Group,
            title: "g".into(),
            members: vec![protocol::Member { user_id: 1, role: protocol::Role::Owner }],
            last_seq: 3,
            last_ts_ms: 4,
            created_ms: 5,
        };
        let origin = Origin::new(1 << 48, 2);
        for result in [Ok(Answer::Ok), Ok(Answer::Conversation(conv)), Err(ErrorCode::Unavailable)] {
            let ev = EventKind::Reply { origin, result, settles: true };
            let Body::Events { events } =
                decode(&encode_events(&[AddressedRef { event: &ev, to: &[1] }])).unwrap()
            else {
                panic!("events")
            };
            assert!(same(&ev, &events[0].event));
        }
        let notice = Body::Resync { users: vec![1, 2], all: false };
        assert!(same(&notice, &decode(&encode(&notice)).unwrap()));
    }

    #[test]
    fn a_newer_or_broken_envelope_is_refused_not_misread() {
        assert!(matches!(decode(br#"{"v":2,"t":"resync","all":true}"#), Err(DecodeError::Version(2))));
        assert!(matches!(decode(b"not json"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(br#"{"v":1,"t":"no_such_body"}"#), Err(DecodeError::Malformed(_))));
        // Fields a later version adds are ignored; fields it drops take defaults.
        assert!(matches!(
            decode(br#"{"v":1,"t":"resync","all":true,"reason":"later"}"#),
            Ok(Body::Resync { all: true, .. })
        ));
    }
}
