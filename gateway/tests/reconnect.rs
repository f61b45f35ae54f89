//! Reconnect-and-resync: everything missed arrives, in order, exactly once.

mod support;

use protocol::{ClientMsg, MessageKind, Position, ServerMsg, Subprotocol};
use std::collections::HashMap;
use support::*;

fn conv_of(m: ServerMsg) -> u64 {
    conversation_id(&m)
}

/// Sends `n` messages from `token` to `conv` and waits for every ack.
fn send_many(
    addr: std::net::SocketAddr,
    token: String,
    conv: u64,
    n: usize,
    tag: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client::connect(addr, &token, Subprotocol::FlatBuffers);
        for i in 0..n {
            c.send_text(conv, &format!("{tag}-{i}"), &format!("{tag} {i}"));
        }
        for i in 0..n {
            c.wait_ack(&format!("{tag}-{i}"));
        }
    })
}

fn resync_after_1000_missed(proto: Subprotocol) {
    let g = TestGateway::start();
    let (x, tx) = g.user("xavier");
    let (a, ta) = g.user("anna");
    let (b, tb) = g.user("boris");
    let (c, tc) = g.user("chloe");

    // Online: a direct chat and a group, a little traffic, positions noted.
    let mut cx = g.connect(&tx, proto);
    cx.sync(vec![]);
    let direct = conv_of(cx.request(ClientMsg::CreateDirect { user_id: a }));
    let group = conv_of(cx.request(ClientMsg::CreateGroup { title: "g1".into(), members: vec![a, b] }));
    cx.send_text(direct, "x-0", "before");
    cx.wait_ack("x-0");
    cx.send_text(group, "x-1", "before");
    let group_pos = cx.wait_ack("x-1");
    let direct_pos = 1;
    drop(cx);

    // Offline: 1,000 messages across the direct chat, the old group and a group
    // created while X was away, from three senders at once.
    let mut ca = g.connect(&ta, Subprotocol::Json);
    ca.sync(vec![]);
    let new_group = conv_of(ca.request(ClientMsg::CreateGroup { title: "g2".into(), members: vec![x, c] }));
    let senders = vec![
        send_many(g.addr, ta.clone(), direct, 400, "a"),
        send_many(g.addr, tb.clone(), group, 300, "b"),
        send_many(g.addr, tc.clone(), new_group, 300, "c"),
    ];
    for s in senders {
        s.join().unwrap();
    }

    // Reconnect with the positions X has; more traffic arrives while it syncs.
    let mut cx = g.connect(&tx, proto);
    let sync_id = cx.send(ClientMsg::Sync {
        positions: vec![
            Position { conversation_id: direct, seq: direct_pos },
            Position { conversation_id: group, seq: group_pos },
        ],
    });
    let live = send_many(g.addr, ta.clone(), direct, 50, "live");
    let want: HashMap<u64, Vec<u64>> = HashMap::from([
        (direct, (direct_pos + 1..=direct_pos + 450).collect()),
        (group, (group_pos + 1..=group_pos + 300).collect()),
        (new_group, (1..=301).collect()),
    ]);
    let total: usize = want.values().map(Vec::len).sum();
    let mut got: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut n = 0;
    let mut done = false;
    while n < total || !done {
        let f = cx.recv();
        match f.body {
            ServerMsg::Message { message } => {
                if message.conversation_id == new_group && message.seq == 1 {
                    assert_eq!(message.kind, MessageKind::GroupCreated);
                }
                got.entry(message.conversation_id).or_default().push(message.seq);
                n += 1;
            }
            ServerMsg::SyncDone { .. } if f.id == sync_id => done = true,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    live.join().unwrap();
    // Nothing more is on its way: a ping's pong is the next frame.
    let ping = cx.send(ClientMsg::Ping);
    let f = cx.recv();
    assert_eq!((f.id, f.body), (ping, ServerMsg::Pong), "no duplicate arrived after the expected messages");
    for (conv, seqs) in &want {
        assert_eq!(got.get(conv), Some(seqs), "conversation {conv}: every missed message, in order, once");
    }
    assert_eq!(n, 1051);
}

#[test]
fn resync_after_1000_missed_json() {
    resync_after_1000_missed(Subprotocol::Json);
}

#[test]
fn resync_after_1000_missed_flatbuffers() {
    resync_after_1000_missed(Subprotocol::FlatBuffers);
}

#[test]
fn events_wait_for_sync_and_unlisted_conversations_replay_from_the_start() {
    let g = TestGateway::start();
    let (_, ta) = g.user("anna");
    let (b, tb) = g.user("boris");
    let mut ca = g.connect(&ta, Subprotocol::Json);
    ca.sync(vec![]);
    let d = conv_of(ca.request(ClientMsg::CreateDirect { user_id: b }));
    for i in 0..3 {
        ca.send_text(d, &format!("m{i}"), "x");
        ca.wait_ack(&format!("m{i}"));
    }
    // Boris connects; a live message arrives before he syncs. He gets it only
    // after the replay, in order, once.
    let mut cb = g.connect(&tb, Subprotocol::FlatBuffers);
    ca.send_text(d, "m3", "x");
    ca.wait_ack("m3");
    let replay = cb.sync(vec![]);
    let seqs: Vec<_> = replay.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    ca.send_text(d, "m4", "x");
    assert_eq!(cb.next_message().seq, 5);
}
