//! Acknowledged means durable: survives kill -9 and restart.

mod support;

use protocol::{ClientMsg, ServerMsg, Subprotocol};
use support::*;

#[test]
fn acked_messages_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "");
    let (_, ta) = g.user("anna");
    let (b, _) = g.user("boris");
    let mut c = g.connect(&ta, Subprotocol::FlatBuffers);
    c.sync(vec![]);
    let conv = conversation_id(&c.request(ClientMsg::CreateDirect { user_id: b }));
    let n = 500;
    for i in 0..n {
        c.send_text(conv, &format!("k{i}"), &format!("body {i}"));
    }
    let acked: Vec<u64> = (0..n).map(|i| c.wait_ack(&format!("k{i}"))).collect();
    assert_eq!(acked, (1..=n as u64).collect::<Vec<_>>());
    g.kill9();

    let g = TestGateway::start_in(tmp.path(), "");
    // Accounts survived too.
    let (s, l) = g.login("anna", "password123");
    assert_eq!(s, 200, "{l}");
    let mut c = g.connect(l["token"].as_str().unwrap(), Subprotocol::Json);
    c.sync(vec![protocol::Position { conversation_id: conv, seq: n as u64 }]);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        match c.request(ClientMsg::History {
            conversation_id: conv,
            before: None,
            after: Some(after),
            limit: Some(100),
        }) {
            ServerMsg::History { messages, has_more, .. } => {
                for m in messages {
                    assert_eq!(m.body, format!("body {}", m.seq - 1));
                    after = m.seq;
                    seen.push(m.seq);
                }
                if !has_more {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, acked, "every acknowledged message is there after kill -9");
    // Idempotency survived: resending an acked id returns its original position.
    c.send_text(conv, "k7", "body 7");
    assert_eq!(c.wait_ack("k7"), 8);
    // And the conversation continues where it was.
    c.send_text(conv, "new", "after restart");
    assert_eq!(c.wait_ack("new"), n as u64 + 1);
}

/// A store without cross-partition transactions (Cassandra) can keep a message
/// whose commit failed part-way: the message row landed, the conversation head
/// did not. The sender was told the send failed and will resend; the stored
/// message must keep its position, never be overwritten by the next send, and
/// the resend must be acked at that position rather than stored again.
#[test]
fn a_stored_message_beyond_the_head_keeps_its_position() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "");
    let (_, ta) = g.user("anna");
    let (b, _) = g.user("boris");
    let mut c = g.connect(&ta, Subprotocol::FlatBuffers);
    c.sync(vec![]);
    let conv = conversation_id(&c.request(ClientMsg::CreateDirect { user_id: b }));
    c.send_text(conv, "k1", "one");
    assert_eq!(c.wait_ack("k1"), 1);
    g.kill9();

    // What a half-applied commit leaves: the message at the next position, the head unmoved.
    {
        let store = open_store(tmp.path());
        let head = store.conversation(conv).unwrap().unwrap();
        let first = storage::message_at(&*store, conv, 1).unwrap().unwrap();
        let orphan = protocol::Message {
            seq: 2,
            client_msg_id: "k2".into(),
            body: "landed, but its commit failed".into(),
            ts_ms: head.last_ts_ms,
            ..first
        };
        store.commit(&[storage::Mutation::PutMessage(orphan)]).unwrap();
        assert_eq!(store.conversation(conv).unwrap().unwrap().last_seq, 1);
    }

    let g = TestGateway::start_in(tmp.path(), "");
    let (_, ta) = g.login("anna", "password123");
    let mut c = g.connect(ta["token"].as_str().unwrap(), Subprotocol::Json);
    // The client has seen position 1 only: the orphan was never acked or delivered.
    c.sync(vec![protocol::Position { conversation_id: conv, seq: 1 }]);
    c.send_text(conv, "k3", "three");
    assert_eq!(c.wait_ack("k3"), 3, "the next send continues after the stored message");
    let ServerMsg::History { messages, .. } =
        c.request(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: Some(10) })
    else {
        panic!("expected history")
    };
    let got: Vec<(u64, &str)> = messages.iter().map(|m| (m.seq, m.body.as_str())).collect();
    assert_eq!(got, [(3, "three"), (2, "landed, but its commit failed"), (1, "one")]);
    // Its sender, told the send failed, resends it: acked at the stored position, not stored twice.
    c.send_text(conv, "k2", "landed, but its commit failed");
    assert_eq!(c.wait_ack("k2"), 2, "the resend is acked at the stored message's position");
    c.send_text(conv, "k4", "four");
    assert_eq!(c.wait_ack("k4"), 4, "and nothing was stored twice");
}
