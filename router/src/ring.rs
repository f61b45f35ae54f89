//! Ownership: rendezvous (highest random weight) hashing over the live nodes.
//!
//! Every node computes, for a key, a score per live node and picks the highest;
//! all nodes that see the same live set agree without talking to each other.
//! Why rendezvous rather than ketama or jump hashing
//! (docs/design/why-rendezvous-ring.md): a join moves exactly the keys the new
//! node wins (about 1/(n+1) of them) and a leave only the leaver's, with no
//! virtual nodes to tune and no skew from token placement; node ids need not be
//! dense (jump hashing needs buckets 0..n, so a node leaving from the middle
//! would move everything after it). The cost is one hash per live node per
//! lookup, about 13 ns each (`ring_owner` in benches): a fleet has tens of nodes, and the gateway
//! caches a conversation's owner until the live set changes.
//!
//! The score is XXH3-64 (a fixed, versioned algorithm: every build and platform
//! agrees, which the golden vectors below pin) of the key's bytes, seeded with
//! the node id.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A gateway node's id (`node_id` in its config, 0..=1023).
pub type NodeId = u16;

/// What ownership is decided for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// Everything about one conversation: sends, edits, receipts, members.
    Conversation(u64),
    /// Creating the direct conversation of two users (before its id exists),
    /// so that two nodes never create two conversations for one pair. Build it
    /// with [`Key::pair`].
    Pair(u64, u64),
}

impl Key {
    /// The key of the pair `{a, b}`, in either order.
    pub fn pair(a: u64, b: u64) -> Key {
        Key::Pair(a.min(b), a.max(b))
    }

    /// A tag byte, then the ids little-endian: the two kinds never collide.
    fn bytes(self, buf: &mut [u8; 17]) -> &[u8] {
        match self {
            Key::Conversation(id) => {
                buf[0] = 0;
                buf[1..9].copy_from_slice(&id.to_le_bytes());
                &buf[..9]
            }
            Key::Pair(lo, hi) => {
                buf[0] = 1;
                buf[1..9].copy_from_slice(&lo.to_le_bytes());
                buf[9..17].copy_from_slice(&hi.to_le_bytes());
                &buf[..17]
            }
        }
    }
}

impl Key {
    /// Which of a node's `parts` sequencer partitions (one per shard) orders `key`:
    /// the same key bytes the ring scores, hashed once with a seed no node id takes
    /// (ids stop at 1023), so the partition does not lean on which node won the key.
    /// A partition count is fixed for a process's life; a restart with another
    /// count only moves caches (the store holds the state).
    pub fn partition(self, parts: usize) -> usize {
        if parts <= 1 {
            return 0;
        }
        let mut buf = [0u8; 17];
        (xxh3_64_with_seed(self.bytes(&mut buf), PARTITION_SEED) % parts as u64) as usize
    }
}

/// The seed of [`Key::partition`]: above every [`NodeId`].
const PARTITION_SEED: u64 = 1 << 32;

/// Node `node`'s score for `key`; the highest score owns the key.
pub fn score(node: NodeId, key: Key) -> u64 {
    let mut buf = [0u8; 17];
    xxh3_64_with_seed(key.bytes(&mut buf), u64::from(node))
}

/// The live nodes, as one node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted, without repeats.
    nodes: Vec<NodeId>,
}

impl Ring {
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Ring {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort_unstable();
        nodes.dedup();
        Ring { nodes }
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.binary_search(&node).is_ok()
    }

    /// The node that owns `key`: the highest score, a tie (one in 2^64) going
    /// to the lower id. `None` on an empty ring.
    pub fn owner(&self, key: Key) -> Option<NodeId> {
        self.nodes.iter().copied().max_by_key(|&n| (score(n, key), std::cmp::Reverse(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_keys_evenly_and_do_not_follow_the_owner() {
        let ring = Ring::new([1u16, 2]);
        // counts[owner][partition]
        let mut counts = [[0u32; 4]; 2];
        for c in 0..40_000u64 {
            let key = Key::Conversation(c);
            let p = key.partition(4);
            assert_eq!(p, key.partition(4), "a key's partition is fixed");
            counts[usize::from(ring.owner(key).unwrap() - 1)][p] += 1;
        }
        // Each node's keys fall evenly over its 4 partitions (5,000 expected each).
        for n in counts {
            for c in n {
                assert!((4_500..5_500).contains(&c), "{counts:?}");
            }
        }
        assert_eq!(Key::pair(7, 9).partition(1), 0);
        assert_eq!(Key::pair(7, 9).partition(8), Key::pair(9, 7).partition(8));
    }
    use proptest::prelude::*;

    /// Golden vectors: these owners are part of the fleet's behaviour. Nodes of
    /// two builds must agree on every owner, so a change here (another hash,
    /// another encoding of keys) is a breaking change for a rolling upgrade.
    /// Computed independently with Python's `xxhash` package
    /// (`xxh3_64_intdigest(b"\x00" + struct.pack("<Q", c), seed=node)`).
    #[test]
    fn owners_are_pinned() {
        let ring = Ring::new([1, 2, 3]);
        let owners: Vec<NodeId> = (1..=12).map(|c| ring.owner(Key::Conversation(c)).unwrap()).collect();
        assert_eq!(owners, GOLDEN_CONVERSATIONS);
        assert_eq!(ring.owner(Key::pair(10, 20)), Some(GOLDEN_PAIR));
        assert_eq!(score(7, Key::Conversation(42)), GOLDEN_SCORE);
    }

    const GOLDEN_CONVERSATIONS: [NodeId; 12] = [3, 1, 2, 1, 1, 1, 3, 1, 1, 3, 2, 3];
    const GOLDEN_PAIR: NodeId = 1;
    const GOLDEN_SCORE: u64 = 4_766_432_515_177_652_464;

    #[test]
    fn pairs_are_unordered_and_apart_from_conversations() {
        assert_eq!(Key::pair(3, 9), Key::pair(9, 3));
        assert_ne!(score(1, Key::pair(0, 5)), score(1, Key::Conversation(5)));
        assert_eq!(Ring::default().owner(Key::Conversation(1)), None);
        assert_eq!(Ring::new([4, 4, 2]).nodes(), [2, 4]);
    }

    fn ring_and_newcomer() -> impl Strategy<Value = (Vec<NodeId>, NodeId)> {
        (proptest::collection::btree_set(0u16..1024, 1..40), 0u16..1024)
            .prop_filter("the newcomer is new", |(nodes, n)| !nodes.contains(n))
            .prop_map(|(nodes, n)| (nodes.into_iter().collect(), n))
    }

    proptest! {
        /// A join moves keys only to the node that joined; its leave moves
        /// them back, and nothing else moves.
        #[test]
        fn a_join_moves_keys_only_to_the_newcomer((nodes, newcomer) in ring_and_newcomer(), keys in proptest::collection::vec(any::<u64>(), 200)) {
            let before = Ring::new(nodes.iter().copied());
            let after = Ring::new(nodes.iter().copied().chain([newcomer]));
            for k in keys {
                let (b, a) = (before.owner(Key::Conversation(k)), after.owner(Key::Conversation(k)));
                prop_assert!(a == b || a == Some(newcomer), "key {k}: {b:?} -> {a:?}");
            }
        }
    }

    /// A join moves about 1/(n+1) of the keys, and the load is even: over
    /// 100,000 conversations, no node of 2 to 32 owns more than 10% above its
    /// share, and the moved fraction is within 10% of 1/(n+1).
    #[test]
    fn joins_move_their_share_and_load_is_even() {
        const KEYS: u64 = 100_000;
        for n in [2u16, 3, 5, 8, 16, 32] {
            let ring = Ring::new((0..n).map(|i| i * 7 + 1));
            let grown = Ring::new((0..n).map(|i| i * 7 + 1).chain([999]));
            let mut load = std::collections::HashMap::new();
            let mut moved = 0u64;
            for c in 0..KEYS {
                let owner = ring.owner(Key::Conversation(c)).unwrap();
                *load.entry(owner).or_insert(0u64) += 1;
                moved += u64::from(grown.owner(Key::Conversation(c)) != Some(owner));
            }
            let share = KEYS as f64 / f64::from(n);
            let max = *load.values().max().unwrap() as f64;
            assert!(max / share < 1.1, "{n} nodes: the busiest owns {max}, the share is {share}");
            let expected = KEYS as f64 / f64::from(n + 1);
            let ratio = moved as f64 / expected;
            assert!(
                (0.9..1.1).contains(&ratio),
                "{n} nodes: a join moved {moved}, expected about {expected}"
            );
        }
    }
}
