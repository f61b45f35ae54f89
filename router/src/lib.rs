//! The fleet layer of Switchboard: which gateway node owns each conversation.
//!
//! A leaf crate: the gateway depends on it, never the reverse. So far it holds
//! the ring ([`ring`]), membership in Redis ([`membership`]), where users'
//! devices are ([`location`]) and the Redis Streams transport of opaque
//! payloads ([`transport`]); the envelope codec and
//! the gateway's use of all three come with the gateway's seams (issue 14).

mod link;
pub mod location;
pub mod membership;
pub mod ring;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;

pub use link::RedisOptions;
pub use location::{Location, LocationOptions};
pub use membership::{Beat, Member, MembershipError, MembershipOptions, Observer};
pub use ring::{Key, NodeId, Ring};
pub use transport::{Delivery, Entry, Inbound, Outbound, TransportError, TransportOptions};
