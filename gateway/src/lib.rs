//! Switchboard's thread-per-core WebSocket gateway.
//!
//! - [`server::start`]: opens the store, starts the [`sequencer`], the blocking
//!   [`pool`]s and one [`shard`] per core, each with its own SO_REUSEPORT listener.
//! - [`shard::ShardCtx`]: a shard's `!Send` state: its users' mailboxes and connections.
//! - [`mailbox::Mailbox`] / [`mailbox::Registry`]: lock-free per-user queues any
//!   thread can push into, found by `(user, shard)`.
//! - [`conn::Conn`]: one WebSocket connection (device).
//! - [`sequencer::Sequencer`]: the single writer that orders, persists and fans out.
//!
//! ## Why a sequencer thread rather than sequencing on shards
//! Positions must be gap-free and every recipient must see one order. One thread
//! that assigns positions, commits a batch with one fsync and then pushes the
//! batch's events into mailboxes in position order gives both, and batches
//! naturally as load rises (docs/design/why-one-sequencer.md).
//!
//! See docs/architecture.md for one message's path and CONCURRENCY.md for who
//! talks to whom.

pub mod auth;
pub mod capacity;
pub mod config;
pub mod conn;
pub mod fleet;
pub mod frame;
pub mod health;
pub mod http;
pub mod ids;
pub mod mailbox;
pub mod metrics;
pub mod netio;
pub mod pool;
pub mod presence;
pub mod push;
pub mod ratelimit;
pub mod sequencer;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod throttle;
