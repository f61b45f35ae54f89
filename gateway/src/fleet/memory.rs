//! An in-process fleet: the [`Links`] of several gateway instances
//! in one process, joined by channels. It proves the seams (routing, answers
//! addressed to an origin, fan-out once per batch per node, the inbound hand-off)
//! without Redis; the Redis links (`fleet::redis`) replace it in a real fleet.
//! Its streams are unbounded: it is for tests, never for serving.

use super::{Links, Locate, Members, Reap, Received, Wire, WireIn};
use protocol::UserId;
use router::NodeId;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A node's stream: both ends of an unbounded channel.
type Stream = (crossbeam_channel::Sender<Vec<u8>>, crossbeam_channel::Receiver<Vec<u8>>);

#[derive(Default)]
struct Hub {
    streams: Mutex<HashMap<NodeId, Stream>>,
    located: Mutex<HashMap<UserId, BTreeSet<NodeId>>>,
    /// Presence grace marks (they do not expire here: tests clear or replace them).
    marks: Mutex<HashMap<UserId, String>>,
    live: Mutex<BTreeSet<NodeId>>,
    /// Entries sent, per destination (what a test counts).
    sent: Mutex<HashMap<NodeId, u64>>,
}

impl Hub {
    fn stream(&self, node: NodeId) -> Stream {
        self.streams.lock().unwrap().entry(node).or_insert_with(crossbeam_channel::unbounded).clone()
    }
}

/// The shared medium of an in-process fleet.
#[derive(Clone, Default)]
pub struct MemoryFleet {
    hub: Arc<Hub>,
}

impl MemoryFleet {
    pub fn new() -> MemoryFleet {
        MemoryFleet::default()
    }

    /// Node `me`'s links; it is live from its first heartbeat.
    pub fn links(&self, me: NodeId) -> Links {
        let part = || Part { hub: self.hub.clone(), me };
        Links {
            wire: Box::new(part()),
            inbound: Box::new(part()),
            locate: Box::new(part()),
            locate_conns: Box::new(part()),
            locate_presence: Some(Box::new(part())),
            members: Box::new(part()),
            reap: Box::new(part()),
            heartbeat: Duration::from_millis(100),
        }
    }

    /// How many entries have been sent to `node` so far.
    pub fn sent_to(&self, node: NodeId) -> u64 {
        self.hub.sent.lock().unwrap().get(&node).copied().unwrap_or(0)
    }
}

struct Part {
    hub: Arc<Hub>,
    me: NodeId,
}

impl Wire for Part {
    fn send(&mut self, to: NodeId, payloads: &[&[u8]]) -> anyhow::Result<()> {
        let (tx, _) = self.hub.stream(to);
        for p in payloads {
            tx.send(p.to_vec())?;
        }
        *self.hub.sent.lock().unwrap().entry(to).or_default() += payloads.len() as u64;
        Ok(())
    }
}

impl WireIn for Part {
    fn recv(&mut self, max: usize, block: Duration) -> anyhow::Result<Vec<Received>> {
        let (_, rx) = self.hub.stream(self.me);
        let mut v = Vec::new();
        if let Ok(p) = rx.recv_timeout(block) {
            v.push(p);
            while v.len() < max {
                match rx.try_recv() {
                    Ok(p) => v.push(p),
                    Err(_) => break,
                }
            }
        }
        Ok(v.into_iter().map(|payload| Received::Entry { id: String::new(), payload }).collect())
    }

    fn ack(&mut self, _ids: &[String]) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Locate for Part {
    fn arrive(&mut self, users: &[UserId]) -> anyhow::Result<()> {
        let mut l = self.hub.located.lock().unwrap();
        for u in users {
            l.entry(*u).or_default().insert(self.me);
        }
        Ok(())
    }

    fn depart(&mut self, users: &[UserId]) -> anyhow::Result<()> {
        let mut l = self.hub.located.lock().unwrap();
        for u in users {
            if let Some(s) = l.get_mut(u) {
                s.remove(&self.me);
            }
        }
        Ok(())
    }

    fn nodes_of(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, Vec<NodeId>>> {
        let l = self.hub.located.lock().unwrap();
        Ok(users.iter().filter_map(|u| l.get(u).map(|s| (*u, s.iter().copied().collect()))).collect())
    }

    fn marks(&mut self, users: &[UserId]) -> anyhow::Result<HashMap<UserId, String>> {
        let m = self.hub.marks.lock().unwrap();
        Ok(users.iter().filter_map(|u| m.get(u).map(|t| (*u, t.clone()))).collect())
    }

    fn set_mark(&mut self, user: UserId, token: &str, _ttl: Duration) -> anyhow::Result<()> {
        self.hub.marks.lock().unwrap().insert(user, token.to_owned());
        Ok(())
    }

    fn users_of(&mut self, node: NodeId) -> anyhow::Result<Vec<UserId>> {
        let l = self.hub.located.lock().unwrap();
        Ok(l.iter().filter(|(_, nodes)| nodes.contains(&node)).map(|(u, _)| *u).collect())
    }

    fn forget(&mut self, node: NodeId) -> anyhow::Result<()> {
        for nodes in self.hub.located.lock().unwrap().values_mut() {
            nodes.remove(&node);
        }
        Ok(())
    }

    fn clear_mark(&mut self, user: UserId, token: &str) -> anyhow::Result<()> {
        let mut m = self.hub.marks.lock().unwrap();
        if m.get(&user).is_some_and(|t| t == token) {
            m.remove(&user);
        }
        Ok(())
    }
}

impl Members for Part {
    fn beat(&mut self) -> anyhow::Result<(Vec<NodeId>, bool)> {
        let mut live = self.hub.live.lock().unwrap();
        let fresh = live.insert(self.me);
        Ok((live.iter().copied().collect(), fresh))
    }

    fn leave(&mut self) -> anyhow::Result<()> {
        self.hub.live.lock().unwrap().remove(&self.me);
        Ok(())
    }
}

impl Reap for Part {
    fn take_dead(&mut self, dead: NodeId) -> anyhow::Result<Vec<Vec<u8>>> {
        let (_, rx) = self.hub.stream(dead);
        Ok(rx.try_iter().collect())
    }

    fn tell(&mut self, dead: NodeId, payload: &[u8]) -> anyhow::Result<()> {
        self.hub.stream(dead).0.send(payload.to_vec())?;
        Ok(())
    }
}
