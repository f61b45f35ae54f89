//! Conversations are ordered by several sequencer partitions (one per shard, by the
//! conversation's key): what that must not break. The test gateway runs 2 shards,
//! so 2 partitions.

mod support;

use protocol::{ClientMsg, MessageKind, ServerMsg, Subprotocol};
use router::Key;
use std::collections::{BTreeMap, HashMap};
use support::*;

/// The partition that orders conversation `id` on the test gateway.
fn partition(id: u64) -> usize {
    Key::Conversation(id).partition(2)
}

/// Open connections per shard, from `/metrics`.
fn shard_connections(g: &TestGateway) -> BTreeMap<String, f64> {
    let (s, text) = http_raw(g.addr, "GET", "/metrics", &[], None);
    assert_eq!(s, 200);
    text.lines()
        .filter_map(|l| l.strip_prefix("switchboard_shard_connections{shard=\""))
        .map(|l| {
            let (shard, value) = l.split_once("\"} ").unwrap();
            (shard.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn conversations_on_both_partitions_reach_every_device_on_both_shards_in_order_once() {
    let g = TestGateway::start();
    let users: Vec<(u64, String)> = (0..6).map(|i| g.user(&format!("part{i}"))).collect();
    // Three devices a user: the kernel spreads sockets over both shards' listeners.
    let mut devices: Vec<Vec<Client>> = users
        .iter()
        .map(|(_, t)| {
            (0..3)
                .map(|_| {
                    let mut c = g.connect(t, Subprotocol::Json);
                    c.sync(Vec::new());
                    c
                })
                .collect()
        })
        .collect();
    let shards = shard_connections(&g);
    assert!(shards.len() == 2 && shards.values().all(|&n| n > 0.0), "devices on both shards: {shards:?}");

    // A group of all six and user 0's direct chats with the others; more groups until
    // both partitions order at least one conversation.
    let mut convs: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, (peer, _)) in users.iter().enumerate().skip(1) {
        let id = conversation_id(&devices[0][0].request(ClientMsg::CreateDirect { user_id: *peer }));
        convs.push((id, vec![0, i]));
    }
    while convs.iter().map(|(c, _)| partition(*c)).collect::<std::collections::HashSet<_>>().len() < 2
        || convs.len() < 7
    {
        let id = conversation_id(&devices[0][0].request(ClientMsg::CreateGroup {
            title: format!("g{}", convs.len()),
            members: users.iter().skip(1).map(|u| u.0).collect(),
        }));
        convs.push((id, (0..6).collect()));
    }

    // Every member's first device sends 30 messages into each of its conversations,
    // all six users at once, each pipelining its sends.
    let per = 30;
    let mut senders: Vec<Client> = devices.iter_mut().map(|d| d.remove(0)).collect();
    let acked: Vec<HashMap<String, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .iter_mut()
            .enumerate()
            .map(|(u, c)| {
                let mine: Vec<u64> =
                    convs.iter().filter(|(_, members)| members.contains(&u)).map(|(c, _)| *c).collect();
                s.spawn(move || {
                    let ids: Vec<String> =
                        mine.iter().flat_map(|c| (0..per).map(move |j| format!("u{u}-c{c}-{j}"))).collect();
                    for (k, id) in ids.iter().enumerate() {
                        c.send_text(mine[k / per], id, id);
                    }
                    ids.iter().map(|id| (id.clone(), c.wait_ack(id))).collect::<HashMap<_, _>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let acked: HashMap<String, u64> = acked.into_iter().flatten().collect();

    // Every other device of every member was shown each of its conversations whole:
    // positions 1, 2, 3... with nothing twice, each send at the position its ack named.
    for (u, devs) in devices.iter_mut().enumerate() {
        let mine: Vec<u64> = convs.iter().filter(|(_, m)| m.contains(&u)).map(|(c, _)| *c).collect();
        let expected: usize = convs
            .iter()
            .filter(|(_, m)| m.contains(&u))
            .map(|(_, m)| m.len() * per + usize::from(m.len() > 2))
            .sum();
        for d in devs.iter_mut() {
            let mut shown: HashMap<u64, Vec<protocol::Message>> = HashMap::new();
            for _ in 0..expected {
                let m = d.next_message();
                shown.entry(m.conversation_id).or_default().push(m);
            }
            for c in &mine {
                let got = &shown[c];
                let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>(), "conversation {c} for user {u}");
                for m in got.iter().filter(|m| m.kind == MessageKind::Text) {
                    assert_eq!(
                        acked[&m.client_msg_id], m.seq,
                        "{} shown where it was acked",
                        m.client_msg_id
                    );
                }
            }
        }
    }
}

#[test]
fn a_direct_chat_created_from_both_ends_at_once_is_one_conversation() {
    let g = TestGateway::start();
    let pairs: Vec<((u64, String), (u64, String))> =
        (0..16).map(|i| (g.user(&format!("left{i}")), g.user(&format!("right{i}")))).collect();
    let mut crossed = 0;
    for (a, b) in &pairs {
        let mut ca = g.connect(&a.1, Subprotocol::Json);
        let mut cb = g.connect(&b.1, Subprotocol::Json);
        ca.sync(Vec::new());
        cb.sync(Vec::new());
        let barrier = std::sync::Barrier::new(2);
        let (x, y) = std::thread::scope(|s| {
            let ha = s.spawn(|| {
                barrier.wait();
                conversation_id(&ca.request(ClientMsg::CreateDirect { user_id: b.0 }))
            });
            let hb = s.spawn(|| {
                barrier.wait();
                conversation_id(&cb.request(ClientMsg::CreateDirect { user_id: a.0 }))
            });
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert_eq!(x, y, "one conversation for the pair");
        ca.send_text(x, "hi", "hi");
        assert_eq!(ca.wait_ack("hi"), 1);
        assert_eq!(cb.next_message().seq, 1);
        // Asked again, from a new device: the conversation as it stands now. When the
        // pair's partition is not the conversation's, that one only reads it; it must
        // not take the conversation from the partition that orders it.
        crossed += usize::from(Key::pair(a.0, b.0).partition(2) != partition(x));
        let mut again = g.connect(&a.1, Subprotocol::Json);
        again.sync(Vec::new());
        match again.request(ClientMsg::CreateDirect { user_id: b.0 }) {
            ServerMsg::Conversation { conversation } => {
                assert_eq!((conversation.conversation_id, conversation.last_seq), (x, 1));
                assert_eq!(conversation.members.len(), 2);
            }
            other => panic!("expected the conversation, got {other:?}"),
        }
        cb.send_text(x, "back", "back");
        assert_eq!(cb.wait_ack("back"), 2, "the conversation's writer kept it");
        assert_eq!(ca.next_message().seq, 2);
    }
    assert!(crossed > 0, "some pair's conversation is ordered by the other partition");
}

#[test]
fn a_cold_cache_burst_after_restart_continues_every_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "");
    let (_, ta) = g.user("burster");
    let (b, tb) = g.user("reader");
    let mut c = g.connect(&ta, Subprotocol::Json);
    c.sync(Vec::new());
    let n = 400;
    let convs: Vec<u64> = (0..n)
        .map(|i| {
            conversation_id(&c.request(ClientMsg::CreateGroup { title: format!("t{i}"), members: vec![b] }))
        })
        .collect();
    assert!(convs.iter().any(|&c| partition(c) == 0) && convs.iter().any(|&c| partition(c) == 1));
    for (i, &conv) in convs.iter().enumerate() {
        c.send_text(conv, &format!("before{i}"), "x");
    }
    for i in 0..n {
        assert_eq!(c.wait_ack(&format!("before{i}")), 2);
    }
    drop(c);
    g.terminate();

    // Restarted: every conversation's first message arrives at once, from two devices.
    let g = TestGateway::start_in(tmp.path(), "");
    let mut r = g.connect(&tb, Subprotocol::Json);
    r.sync(convs.iter().map(|&c| protocol::Position { conversation_id: c, seq: 2 }).collect());
    let mut senders = [g.connect(&ta, Subprotocol::Json), g.connect(&ta, Subprotocol::Json)];
    for s in &mut senders {
        s.sync(convs.iter().map(|&c| protocol::Position { conversation_id: c, seq: 2 }).collect());
    }
    for (i, &conv) in convs.iter().enumerate() {
        senders[i % 2].send_text(conv, &format!("after{i}"), "y");
    }
    for i in 0..n {
        assert_eq!(senders[i % 2].wait_ack(&format!("after{i}")), 3, "after{i} continues its conversation");
    }
    let mut shown: HashMap<u64, Vec<u64>> = HashMap::new();
    for _ in 0..n {
        let m = r.next_message();
        shown.entry(m.conversation_id).or_default().push(m.seq);
    }
    assert_eq!(shown.len(), n);
    assert!(shown.values().all(|s| s == &[3]), "each conversation once, at 3");
}
