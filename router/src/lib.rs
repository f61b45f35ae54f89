//! The fleet layer of Switchboard: which gateway node owns each conversation.
//!
//! A leaf crate: the gateway depends on it, never the reverse. So far it holds
//! the ring ([`ring`]); membership and the Redis Streams transport come next
//! (issue 14).

pub mod ring;

pub use ring::{Key, NodeId, Ring};
