//! The node: what every thread of one gateway process shares (all `Send + Sync`),
//! built by `server` and handed to each shard.

use crate::auth::Auth;
use crate::capacity::Capacity;
use crate::config::Config;
use crate::health::Health;
use crate::ids::IdGen;
use crate::mailbox::Registry;
use crate::metrics::Metrics;
use crate::pool::{FairPool, Pool};
use crate::presence::Presence;
use crate::sequencer::Sequencer;
use crate::throttle::Throttle;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use storage::Store;

/// What every shard shares (all `Send + Sync`).
pub struct Shared {
    pub cfg: Config,
    pub auth: Auth,
    pub attachments: Arc<crate::attachments::Attachments>,
    pub store: Arc<dyn Store>,
    pub sequencer: Sequencer,
    /// Routes commands to the node that owns them (this one, alone).
    pub router: Arc<crate::fleet::Router>,
    pub presence: Presence,
    pub registry: Arc<Registry>,
    pub readers: Arc<Pool>,
    /// Password hashing and account writes, shared fairly between client addresses.
    pub hashers: Arc<FairPool<IpAddr>>,
    /// Failed-login lockouts by account and by client address.
    pub logins: LoginThrottles,
    pub ids: Arc<IdGen>,
    pub next_conn: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub capacity: Arc<Capacity>,
    pub health: Arc<Health>,
    /// Every request budget's rate, from `limits`.
    pub rates: crate::ratelimit::Rates,
}

pub struct LoginThrottles {
    pub account: Throttle,
    pub address: Throttle,
}
