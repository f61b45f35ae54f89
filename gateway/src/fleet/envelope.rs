//! What nodes send each other: one envelope per stream entry.
//!
//! JSON (serde_json) over the in-process types: self-describing, so a node of
//! the next release can read this one's entries during a rolling upgrade (fields
//! it does not know are ignored, fields it misses take their defaults), and
//! inspectable with `redis-cli XRANGE`. It costs a few microseconds per entry
//! against a Redis round trip of a hundred or more (benches: `envelope_codec`).

use crate::mailbox::EventKind;
use crate::sequencer::Command;
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
