//! Switchboard's thread-per-core WebSocket gateway, laid out by the threads that
//! run the code:
//!
//! - [`server::start`]: assembles a node: opens the store, starts the
//!   [`sequencer`], the blocking [`pool`]s, [`presence`], [`push`], the [`fleet`]
//!   threads and one [`shard`] per core, each with its own SO_REUSEPORT listener.
//!   Nothing depends on it.
//! - [`node::Shared`]: what every thread of the node shares.
//! - [`shard`]: a shard's loop and its `!Send` state ([`shard::ShardCtx`]), its
//!   WebSocket connections ([`shard::conn::Conn`], one per device) and HTTP routes.
//! - [`sequencer::Sequencer`]: the partitions (one thread per shard) that order,
//!   persist and fan out, each the single writer of its conversations.
//! - [`fleet`]: routing to the node that owns a conversation, the streams between nodes.
//! - [`mailbox::Mailbox`] / [`mailbox::Registry`]: lock-free per-user queues any
//!   thread can push into, found by `(user, shard)`.
//! - [`vocab`]: the vocabulary they share (events, commands, the clock, frames),
//!   which depends on none of them.
//!
//! ## Why sequencer partitions beside the shards
//! Positions must be gap-free and every recipient must see one order. One thread
//! per conversation that assigns positions, commits a batch with one fsync and
//! then pushes the batch's events into mailboxes in position order gives both,
//! and batches naturally as load rises. Conversations are split over one such
//! thread per shard by the fleet ring's key, so no one thread caps the node
//! (docs/design/why-sequencer-partitions.md).
//!
//! See docs/architecture.md for one message's path and CONCURRENCY.md for who
//! talks to whom.

pub mod attachments;
pub mod auth;
pub mod capacity;
pub mod config;
pub mod fleet;
pub mod health;
pub mod ids;
pub mod mailbox;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod presence;
pub mod push;
pub mod queue;
pub mod ratelimit;
pub mod reload;
pub mod sequencer;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod throttle;
pub mod vocab;

/// The environment variable whose log filter wins over the config's `log`.
pub const LOG_ENV: &str = "SWITCHBOARD_LOG";
