//! The fleet's links over Redis (the `router` crate): membership with a heartbeat
//! and TTL, users' locations, and one inbound stream per node.

use super::{Links, Locate, Members, Reap, Received, Wire, WireIn};
use crate::config::Config;
use anyhow::Context;
use protocol::UserId;
use router::{
    Delivery, Inbound, Location, LocationOptions, Member, MembershipOptions, NodeId, Observer, Outbound,
    RedisOptions, TransportOptions,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Membership options from `[fleet]` (its Redis must be set).
pub fn options(cfg: &Config) -> MembershipOptions {
    let f = &cfg.fleet;
    let redis = RedisOptions {
        redis_url: f.redis_url.clone().unwrap_or_default(),
        cluster: f.redis_cluster,
        prefix: f.redis_prefix.clone(),
        timeout: Duration::from_millis(f.redis_timeout_ms.get()),
    };
    MembershipOptions {
        redis,
        ttl: Duration::from_millis(f.ttl_ms.get()),
        heartbeat: Duration::from_millis(f.heartbeat_ms.get()),
    }
}

/// Joins the fleet `[fleet]` names and returns this node's links and its node id
/// (`cfg.node_id`, or with `fleet.auto_node_id` the first id no live process
/// holds); `None` when no fleet is configured. Fails if a live process holds
/// this node's id (every id, with `auto_node_id`).
pub fn links(cfg: &Config) -> anyhow::Result<Option<(Links, NodeId)>> {
    if cfg.fleet.redis_url.is_none() {
        return Ok(None);
    }
    let opts = options(cfg);
    let heartbeat = opts.heartbeat;
    let redis = opts.redis.clone();
    let observed = opts.clone();
    let (me, (member, beat)) = if cfg.fleet.auto_node_id {
        // From a random start, so nodes starting together rarely race for one id.
        let start = rand::random::<u16>() % crate::ids::MAX_NODE_ID;
        let mut joined = None;
        for i in 0..crate::ids::MAX_NODE_ID {
            let id = 1 + (start + i) % crate::ids::MAX_NODE_ID;
            match Member::join(opts.clone(), id) {
                Ok(j) => {
                    joined = Some((id, j));
                    break;
                }
                Err(router::MembershipError::IdTaken(_)) => continue,
                Err(e) => return Err(e).context("joining the fleet's membership in Redis"),
            }
        }
        let joined =
            joined.context("fleet.auto_node_id: every node id (1..=1023) is held by a live process")?;
        tracing::info!(node_id = joined.0, "fleet.auto_node_id: claimed a node id");
        joined
    } else {
        let me = cfg.node_id;
        (me, Member::join(opts, me).context("joining the fleet's membership in Redis")?)
    };
    let live = Arc::new(Mutex::new(Routable::default()));
    live.lock().expect("live lock").saw(&beat.instances, 3 * cfg.fleet.ttl_ms.get());
    let transport =
        TransportOptions { max_len: cfg.fleet.stream_max_len.get(), ..TransportOptions::new(redis.clone()) };
    let inbound = Inbound::open(transport.clone(), me).context("opening this node's inbound stream")?;
    let located = || RedisLocate {
        location: Location::new(LocationOptions::new(redis.clone()), me, member.instance()),
        live: live.clone(),
        observer: Observer::new(observed.clone()),
        grace_ms: 3 * cfg.fleet.ttl_ms.get(),
    };
    let (locate, locate_conns, locate_presence) = (located(), located(), located());
    let links = Links {
        wire: Box::new(RedisWire(Outbound::new(transport.clone(), me))),
        inbound: Box::new(RedisIn(inbound)),
        locate: Box::new(locate),
        locate_conns: Box::new(locate_conns),
        locate_presence: Some(Box::new(locate_presence)),
        reap: Box::new(RedisReap {
            transport: transport.clone(),
            me,
            out: Outbound::new(transport.clone(), me),
        }),
        members: Box::new(RedisMembers {
            member: Some(member),
            live,
            grace_ms: 3 * cfg.fleet.ttl_ms.get(),
            first: Some(beat.ring.nodes().to_vec()),
        }),
        heartbeat,
    };
    Ok(Some((links, me)))
}

struct RedisWire(Outbound);

impl Wire for RedisWire {
    fn send(&mut self, to: NodeId, payloads: &[&[u8]]) -> anyhow::Result<()> {
        Ok(self.0.send(to, payloads)?)
    }
}

struct RedisIn(Inbound);

impl WireIn for RedisIn {
    fn recv(&mut self, max: usize, block: Duration) -> anyhow::Result<Vec<Received>> {
        Ok(self
            .0
            .read(max, block)?
            .into_iter()
            .map(|d| match d {
                Delivery::Entry(e) => Received::Entry { id: e.id, payload: e.payload },
                Delivery::Gap { from, missed } => {
                    tracing::warn!(from, missed, "entries from a node were lost before this node read them");
                    Received::Gap
                }
            })
            .collect())
    }

    fn ack(&mut self, ids: &[String]) -> anyhow::Result<()> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
        Ok(self.0.ack(&ids)?)
    }
}

/// The nodes whose location entries count: each live node's instance token, and
/// for a while those of nodes missing from the last heartbeats. A node can be
/// missing from one heartbeat without being dead (the members set was lost
/// with a Redis restart, or this node beat first after it): its users' entries
/// are still routed to, not deleted, until it has been gone for three TTLs.
/// An entry with another instance of a live node (it restarted) is stale at once.
#[derive(Default)]
struct Routable {
    nodes: HashMap<NodeId, (String, std::time::Instant)>,
}

impl Routable {
    fn saw(&mut self, instances: &HashMap<NodeId, String>, grace_ms: u64) {
        let now = std::time::Instant::now();
        for (n, inst) in instances {
            self.nodes.insert(*n, (inst.clone(), now));
        }
        let grace = Duration::from_millis(grace_ms);
        self.nodes.retain(|_, (_, seen)| now.duration_since(*seen) <= grace);
    }

    fn instances(&self) -> HashMap<NodeId, String> {
        self.nodes.iter().map(|(n, (inst, _))| (*n, inst.clone())).collect()
    }
}

struct RedisLocate {
    location: Location,
    live: Arc<Mutex<Routable>>,
    /// The live set now, for entries the last heartbeat's view does not confirm.
    observer: Observer,
    grace_ms: u64,
}

impl Locate for RedisLocate {
    fn arrive(&mut self, users: &[UserId]) -> anyhow::Result<()> {
        Ok(self.location.arrive(users)?)
    }

    fn depart(&mut self, users: &[UserId]) -> anyhow::Result<()> {
        Ok(self.location.depart(users)?)
    }

    fn nodes_of(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, Vec<NodeId>>> {
        let live = self.live.lock().expect("live lock").instances();
        let (observer, shared, grace_ms) = (&mut self.observer, &self.live, self.grace_ms);
        // A node may have (re)joined since this node's last heartbeat, and its
        // users' entries are already there: ask Redis before judging them.
        let refresh = || match observer.instances() {
            Ok(now) => {
                shared.lock().expect("live lock").saw(&now, grace_ms);
                Some(now)
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the live set failed; unconfirmed locations wait");
                None
            }
        };
        Ok(self.location.nodes_of(users, &live, refresh)?)
    }

    fn marks(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, String>> {
        Ok(self.location.marks(users)?)
    }

    fn set_mark(&mut self, user: UserId, token: &str, ttl: Duration) -> anyhow::Result<()> {
        Ok(self.location.set_mark(user, token, ttl)?)
    }

    fn clear_mark(&mut self, user: UserId, token: &str) -> anyhow::Result<()> {
        Ok(self.location.clear_mark(user, token)?)
    }

    fn users_of(&mut self, node: NodeId) -> anyhow::Result<Vec<UserId>> {
        Ok(self.location.users_of(node)?)
    }

    fn forget(&mut self, node: NodeId) -> anyhow::Result<()> {
        Ok(self.location.forget(node)?)
    }
}

struct RedisMembers {
    /// `None` once left.
    member: Option<Member>,
    live: Arc<Mutex<Routable>>,
    /// How long a node missing from heartbeats keeps its location entries, ms.
    grace_ms: u64,
    /// The joining beat's ring, given out by the first `beat`.
    first: Option<Vec<NodeId>>,
}

impl Members for RedisMembers {
    fn beat(&mut self) -> anyhow::Result<(Vec<NodeId>, bool)> {
        if let Some(nodes) = self.first.take() {
            return Ok((nodes, false));
        }
        let member = self.member.as_mut().context("this node has left the fleet")?;
        let beat = member.heartbeat()?;
        if beat.fresh {
            tracing::warn!("this node's membership had expired or was lost: it registered again");
        }
        if beat.redis_lost {
            tracing::warn!(
                "a Redis server restarted (or a master was replaced): the fleet's records there may be gone"
            );
        }
        self.live.lock().expect("live lock").saw(&beat.instances, self.grace_ms);
        Ok((beat.ring.nodes().to_vec(), beat.fresh || beat.redis_lost))
    }

    fn leave(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.member.take() {
            m.leave()?;
        }
        Ok(())
    }
}

struct RedisReap {
    transport: TransportOptions,
    me: NodeId,
    /// Its own sender (its own counters), for the notices.
    out: Outbound,
}

impl Reap for RedisReap {
    fn take_dead(&mut self, dead: NodeId) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(router::transport::drain_dead(&self.transport, dead, self.me)?
            .into_iter()
            .map(|e| e.payload)
            .collect())
    }

    fn tell(&mut self, dead: NodeId, payload: &[u8]) -> anyhow::Result<()> {
        Ok(self.out.send(dead, &[payload])?)
    }
}
