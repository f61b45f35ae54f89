//! The fleet layer of Switchboard: which gateway node owns each conversation.
//!
//! A leaf crate: the gateway depends on it, never the reverse. So far it holds
//! the ring ([`ring`]) and membership in Redis ([`membership`]); the Redis
//! Streams transport comes next (issue 14).

pub mod membership;
pub mod ring;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use membership::{Beat, Member, MembershipError, MembershipOptions};
pub use ring::{Key, NodeId, Ring};
