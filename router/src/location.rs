//! Location: which live nodes hold each user's devices, for routing events,
//! fleet-wide presence (online = a device on any node) and push (only when
//! the user has a device on no node).
//!
//! One set per user, `{prefix:u:ID}:at`, under the user's own hash tag (users
//! spread over a Redis Cluster's slots), of `NODE:INSTANCE` entries: a node adds
//! itself when a user's first device connects to it and removes itself when the
//! last one leaves (it counts devices itself). An entry outlives a node that
//! dies; readers ignore entries whose instance is not the node's live one (from
//! membership's heartbeat, [`crate::Beat::instances`]) and delete them as they
//! go, so a dead node's entries disappear as its users are looked up. A set
//! with no add for `idle` expires, which bounds what is left of users nobody
//! looks up.
//!
//! Each node also keeps the set of users it holds, `{prefix:n:NODE}:users`, so
//! that when it dies or leaves, the node that takes its work over can find its
//! users and tell their contacts they went offline (unless they came back).
//!
//! Grace marks, `{prefix:u:ID}:away`: when a user's last device on the fleet
//! leaves a node, that node marks the user for the presence grace period (the
//! token names the departure). A device arriving on any node meanwhile sees the
//! mark and announces nothing (the user never looked offline); when the grace
//! ends, the marking node announces `offline` only if no node holds a device and
//! the mark is still its own (else a later departure's node announces).

use crate::NodeId;
use crate::link::{Link, RedisOptions};
use std::collections::HashMap;
use std::time::Duration;

/// A user id (as the gateway's).
pub type UserId = u64;

#[derive(Debug, Clone)]
pub struct LocationOptions {
    pub redis: RedisOptions,
    /// A user's set expires this long after its last add.
    pub idle: Duration,
}

impl LocationOptions {
    pub fn new(redis: RedisOptions) -> LocationOptions {
        LocationOptions { redis, idle: Duration::from_secs(30 * 86_400) }
    }

    fn key(&self, user: UserId) -> String {
        format!("{{{}:u:{user}}}:at", self.redis.prefix)
    }

    fn node_key(&self, node: NodeId) -> String {
        format!("{{{}:n:{node}}}:users", self.redis.prefix)
    }

    fn away_key(&self, user: UserId) -> String {
        format!("{{{}:u:{user}}}:away", self.redis.prefix)
    }
}

/// One node's view and updates of where users are.
pub struct Location {
    opts: LocationOptions,
    /// This node's entry, `NODE:INSTANCE`.
    me: String,
    node: NodeId,
    conn: Option<Link>,
}

impl Location {
    /// `instance` is this process's membership token ([`crate::Member::instance`]).
    pub fn new(opts: LocationOptions, me: NodeId, instance: &str) -> Location {
        Location { opts, me: format!("{me}:{instance}"), node: me, conn: None }
    }

    fn link(&mut self) -> Result<&mut Link, redis::RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.opts.redis.connect()?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn run(&mut self, cmds: Vec<redis::Cmd>) -> Result<(), redis::RedisError> {
        if cmds.is_empty() {
            return Ok(());
        }
        self.link()?.pipeline::<Vec<redis::Value>>(cmds).map(drop).inspect_err(|_| self.conn = None)
    }

    /// These users now have a device on this node (their first): one round trip.
    pub fn arrive(&mut self, users: &[UserId]) -> Result<(), redis::RedisError> {
        let idle = self.opts.idle.as_secs().max(1);
        let mut cmds = Vec::with_capacity(users.len() * 2 + 2);
        if !users.is_empty() {
            let key = self.opts.node_key(self.node);
            let mut add = redis::cmd("SADD");
            add.arg(&key).arg(users);
            let mut exp = redis::cmd("EXPIRE");
            exp.arg(&key).arg(idle);
            cmds.extend([add, exp]);
        }
        for &u in users {
            let key = self.opts.key(u);
            let mut add = redis::cmd("SADD");
            add.arg(&key).arg(&self.me);
            let mut exp = redis::cmd("EXPIRE");
            exp.arg(&key).arg(idle);
            cmds.extend([add, exp]);
        }
        self.run(cmds)
    }

    /// These users have no device on this node any more: one round trip.
    pub fn depart(&mut self, users: &[UserId]) -> Result<(), redis::RedisError> {
        let mut cmds: Vec<redis::Cmd> = users
            .iter()
            .map(|&u| {
                let mut c = redis::cmd("SREM");
                c.arg(self.opts.key(u)).arg(&self.me);
                c
            })
            .collect();
        if !users.is_empty() {
            let mut c = redis::cmd("SREM");
            c.arg(self.opts.node_key(self.node)).arg(users);
            cmds.push(c);
        }
        self.run(cmds)
    }

    /// The users node `node` held a device of (as it recorded them).
    pub fn users_of(&mut self, node: NodeId) -> Result<Vec<UserId>, redis::RedisError> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(self.opts.node_key(node));
        let r: Vec<Vec<UserId>> = self.link()?.pipeline(vec![c]).inspect_err(|_| self.conn = None)?;
        Ok(r.into_iter().flatten().collect())
    }

    /// Forgets node `node`'s set of users (it is gone, and its users were seen to).
    pub fn forget(&mut self, node: NodeId) -> Result<(), redis::RedisError> {
        let mut c = redis::cmd("DEL");
        c.arg(self.opts.node_key(node));
        self.run(vec![c])
    }

    /// The live nodes holding a device of each of `users` (absent: none), given
    /// the live nodes' instances as the caller last saw them.
    ///
    /// That view may lag: a node that (re)joined since the caller's last
    /// heartbeat already records its users. So an entry the view does not
    /// confirm is judged against `refresh()` (the live set now; called at most
    /// once): live there, it counts; absent there too, it is stale and deleted.
    /// If `refresh` fails (`None`), such entries neither count nor are deleted.
    pub fn nodes_of(
        &mut self,
        users: &[UserId],
        live: &HashMap<NodeId, String>,
        refresh: impl FnOnce() -> Option<HashMap<NodeId, String>>,
    ) -> Result<HashMap<UserId, Vec<NodeId>>, redis::RedisError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<String> = users.iter().map(|&u| self.opts.key(u)).collect();
        let reads = keys
            .iter()
            .map(|k| {
                let mut c = redis::cmd("SMEMBERS");
                c.arg(k);
                c
            })
            .collect();
        let sets: Vec<Vec<String>> = self.link()?.pipeline(reads).inspect_err(|_| self.conn = None)?;
        let parse = |entry: &str| {
            let (n, inst) = entry.split_once(':')?;
            Some((n.parse::<NodeId>().ok()?, inst.to_owned()))
        };
        let holds = |view: &HashMap<NodeId, String>, entry: &str| {
            parse(entry).filter(|(n, inst)| view.get(n).is_some_and(|l| l == inst)).map(|(n, _)| n)
        };
        let mut out = HashMap::new();
        let mut doubtful = Vec::new();
        for ((&user, key), entries) in users.iter().zip(&keys).zip(sets) {
            for entry in entries {
                match holds(live, &entry) {
                    Some(n) => out.entry(user).or_insert_with(Vec::new).push(n),
                    None => doubtful.push((user, key, entry)),
                }
            }
        }
        let mut stale = Vec::new();
        if !doubtful.is_empty()
            && let Some(now) = refresh()
        {
            for (user, key, entry) in doubtful {
                match holds(&now, &entry) {
                    Some(n) => out.entry(user).or_insert_with(Vec::new).push(n),
                    None => {
                        let mut c = redis::cmd("SREM");
                        c.arg(key).arg(entry);
                        stale.push(c);
                    }
                }
            }
        }
        out.values_mut().for_each(|nodes| nodes.sort_unstable());
        // Cleaning up is best effort: the next lookup tries again.
        let _ = self.run(stale);
        Ok(out)
    }

    /// The grace mark of each of `users` that has one: one round trip.
    pub fn marks(&mut self, users: &[UserId]) -> Result<HashMap<UserId, String>, redis::RedisError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let reads = users
            .iter()
            .map(|&u| {
                let mut c = redis::cmd("GET");
                c.arg(self.opts.away_key(u));
                c
            })
            .collect();
        let marks: Vec<Option<String>> = self.link()?.pipeline(reads).inspect_err(|_| self.conn = None)?;
        Ok(users.iter().zip(marks).filter_map(|(&u, m)| Some((u, m?))).collect())
    }

    /// Marks `user` as in its grace period, with `token`, for `ttl`.
    pub fn set_mark(&mut self, user: UserId, token: &str, ttl: Duration) -> Result<(), redis::RedisError> {
        let mut c = redis::cmd("SET");
        c.arg(self.opts.away_key(user)).arg(token).arg("PX").arg(ttl.as_millis().max(1) as u64);
        self.run(vec![c])
    }

    /// Clears `user`'s grace mark if it is still `token` (a later one stays).
    pub fn clear_mark(&mut self, user: UserId, token: &str) -> Result<(), redis::RedisError> {
        const IF_SAME: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let mut c = redis::cmd("EVAL");
        c.arg(IF_SAME).arg(1).arg(self.opts.away_key(user)).arg(token);
        self.run(vec![c])
    }
}
