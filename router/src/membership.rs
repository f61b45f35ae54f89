//! Membership: which gateway nodes are live, as every node sees it.
//!
//! Each node registers in Redis and renews its registration on a heartbeat;
//! a registration that is not renewed within its TTL expires, so every node
//! notices a join at its next heartbeat, a graceful leave likewise, and a death
//! within the TTL plus one heartbeat.
//!
//! Two keys, under one hash tag (`{prefix}`) so that they sit in one slot of a
//! Redis Cluster and one script can touch both:
//! - `{prefix}:members`, a sorted set: node id → expiry (ms, Redis's clock);
//! - `{prefix}:instances`, a hash: node id → the token of the process that
//!   holds it, so a second process started with a live node's id is refused
//!   instead of silently sharing its identity.
//!
//! One Lua script does a heartbeat in one round trip: it takes the time from
//! Redis (`TIME`, so node clocks do not matter), drops expired members,
//! refuses an id held by another live process, renews this node and returns the
//! live set and whether this node had to be registered anew (a join, or a
//! return after it was declared dead: its conversations have moved meanwhile).

use crate::link::{Link, RedisOptions};
use crate::{NodeId, Ring};
use std::collections::HashMap;
use std::time::Duration;

/// Where the fleet registers, and how fast it notices changes.
#[derive(Debug, Clone)]
pub struct MembershipOptions {
    pub redis: RedisOptions,
    /// A registration not renewed for this long expires.
    pub ttl: Duration,
    /// How often a node renews (a third of the TTL or less: two missed beats
    /// are survived).
    pub heartbeat: Duration,
}

impl MembershipOptions {
    pub fn new(redis: RedisOptions) -> MembershipOptions {
        MembershipOptions { redis, ttl: Duration::from_secs(5), heartbeat: Duration::from_secs(1) }
    }

    pub fn check(&self) -> Result<(), String> {
        self.redis.check()?;
        if self.heartbeat.is_zero() || self.heartbeat * 3 > self.ttl {
            return Err(format!(
                "heartbeat ({:?}) must be non-zero and at most a third of ttl ({:?})",
                self.heartbeat, self.ttl
            ));
        }
        if self.redis.timeout > self.heartbeat.max(Duration::from_millis(100)) * 2 {
            return Err(format!("timeout ({:?}) must be at most two heartbeats", self.redis.timeout));
        }
        Ok(())
    }

    fn keys(&self) -> [String; 2] {
        [format!("{{{}}}:members", self.redis.prefix), format!("{{{}}}:instances", self.redis.prefix)]
    }
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Another live process holds this node id.
    #[error("node id {0} is held by another live process; give each node its own node_id")]
    IdTaken(NodeId),
    /// Redis could not be reached or answered with an error (retryable).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("membership options: {0}")]
    Options(String),
}

const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local holder = redis.call('HGET', KEYS[2], ARGV[1])
local live = redis.call('ZSCORE', KEYS[1], ARGV[1])
if live and holder and holder ~= ARGV[2] then
  return redis.error_reply('IDTAKEN node id held by another live process')
end
local fresh = 0
if not live or holder ~= ARGV[2] then fresh = 1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
return {fresh, members, redis.call('HMGET', KEYS[2], unpack(members))}
"#;

/// The live set now, without renewing anything: `{members, tokens}`.
const LIVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
if #members == 0 then return {{}, {}} end
return {members, redis.call('HMGET', KEYS[2], unpack(members))}
"#;

const LEAVE: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 0
"#;

/// Reads the live set between heartbeats, for a node whose view (its last
/// heartbeat's) may lag a join by up to one heartbeat.
pub struct Observer {
    opts: MembershipOptions,
    conn: Option<Link>,
    script: redis::Script,
}

impl Observer {
    pub fn new(opts: MembershipOptions) -> Observer {
        Observer { opts, conn: None, script: redis::Script::new(LIVE) }
    }

    /// Each live node's instance token, now. A failure drops the connection;
    /// the next call reconnects.
    pub fn instances(&mut self) -> Result<HashMap<NodeId, String>, MembershipError> {
        let [members, instances] = self.opts.keys();
        if self.conn.is_none() {
            self.conn = Some(self.opts.redis.connect()?);
        }
        let conn = self.conn.as_mut().expect("just set").conn();
        let r: redis::RedisResult<(Vec<NodeId>, Vec<Option<String>>)> =
            self.script.key(&members).key(&instances).invoke(conn);
        match r {
            Ok((nodes, tokens)) => {
                Ok(nodes.into_iter().zip(tokens).filter_map(|(n, t)| Some((n, t?))).collect())
            }
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }
}

/// One node's registration. [`Member::heartbeat`] renews it and reads the
/// live set; call it every `heartbeat` (the gateway's router thread does).
pub struct Member {
    opts: MembershipOptions,
    me: NodeId,
    token: String,
    conn: Option<Link>,
    heartbeat: redis::Script,
    /// The Redis servers' run ids at the last beat.
    run_ids: Option<Vec<String>>,
}

/// What one heartbeat saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The live nodes, this one included.
    pub ring: Ring,
    /// This node was registered anew: its first beat, or it had expired (it
    /// was declared dead, and the fleet moved its work meanwhile).
    pub fresh: bool,
    /// Each live node's instance token (which process holds the id): what
    /// [`crate::Location`] entries are checked against.
    pub instances: HashMap<NodeId, String>,
    /// A Redis server restarted (or, in a cluster, a master was replaced) since
    /// the last beat: what the fleet kept there (locations, streams) may be gone.
    pub redis_lost: bool,
}

impl Member {
    /// Joins the fleet as `me` (one heartbeat). Fails with
    /// [`MembershipError::IdTaken`] if a live process holds `me`.
    pub fn join(opts: MembershipOptions, me: NodeId) -> Result<(Member, Beat), MembershipError> {
        opts.check().map_err(MembershipError::Options)?;
        let token = format!("{:032x}", rand::random::<u128>());
        let mut m =
            Member { opts, me, token, conn: None, heartbeat: redis::Script::new(HEARTBEAT), run_ids: None };
        let beat = m.heartbeat()?;
        Ok((m, beat))
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    /// This process's instance token (random, per process).
    pub fn instance(&self) -> &str {
        &self.token
    }

    pub fn options(&self) -> &MembershipOptions {
        &self.opts
    }

    fn conn(&mut self) -> Result<&mut dyn redis::ConnectionLike, MembershipError> {
        if self.conn.is_none() {
            self.conn = Some(self.opts.redis.connect()?);
        }
        Ok(self.conn.as_mut().expect("just set").conn())
    }

    /// Renews this node's registration and returns the live set. A kept
    /// connection that turns out dead (Redis restarted since the last beat) is
    /// replaced once; any other failure drops the connection, and the next
    /// beat reconnects.
    pub fn heartbeat(&mut self) -> Result<Beat, MembershipError> {
        let reused = self.conn.is_some();
        match self.beat_once() {
            Err(MembershipError::Redis(e)) if reused && (e.is_connection_dropped() || e.is_io_error()) => {
                self.beat_once()
            }
            r => r,
        }
    }

    fn beat_once(&mut self) -> Result<Beat, MembershipError> {
        let [members, instances] = self.opts.keys();
        let ttl_ms = self.opts.ttl.as_millis() as u64;
        let (me, token) = (self.me, self.token.clone());
        let script = self.heartbeat.clone();
        let conn = self.conn()?;
        let r: redis::RedisResult<(u8, Vec<NodeId>, Vec<String>)> =
            script.key(&members).key(&instances).arg(me).arg(&token).arg(ttl_ms).invoke(conn);
        match r {
            Ok((fresh, nodes, tokens)) => {
                let ids = match self.conn.as_mut().expect("connected above").run_ids() {
                    Ok(ids) => ids,
                    Err(e) => {
                        self.conn = None;
                        return Err(e.into());
                    }
                };
                let redis_lost =
                    self.run_ids.as_ref().is_some_and(|old| old.iter().any(|id| !ids.contains(id)));
                self.run_ids = Some(ids);
                Ok(Beat {
                    instances: nodes.iter().copied().zip(tokens).collect(),
                    ring: Ring::new(nodes),
                    fresh: fresh == 1,
                    redis_lost,
                })
            }
            Err(e) if e.code() == Some("IDTAKEN") => Err(MembershipError::IdTaken(self.me)),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// Leaves the fleet at once (the others see it at their next heartbeat).
    pub fn leave(mut self) -> Result<(), MembershipError> {
        let [members, instances] = self.opts.keys();
        let (me, token) = (self.me, self.token.clone());
        let conn = self.conn()?;
        redis::Script::new(LEAVE).key(&members).key(&instances).arg(me).arg(&token).invoke::<i64>(conn)?;
        Ok(())
    }
}
