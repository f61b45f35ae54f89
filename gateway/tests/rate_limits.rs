//! Per-connection send limits through the real gateway, in both subprotocols.

mod support;

use protocol::{ClientMsg, ServerMsg};
use support::*;
use tungstenite::Message;

type User = (u64, String);

/// Alice and Bob, connected and synced, and their direct chat.
fn alice_and_bob(
    g: &TestGateway,
    p: protocol::Subprotocol,
    (alice, bob): &(User, User),
) -> (Client, Client, u64) {
    let b = bob.0;
    let mut alice = g.connect(&alice.1, p);
    let mut bob = g.connect(&bob.1, p);
    alice.sync(vec![]);
    bob.sync(vec![]);
    let conv = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));
    (alice, bob, conv)
}

#[test]
fn sends_over_the_limit_are_refused_and_persisting_closes_only_that_connection() {
    let tmp = tempfile::tempdir().unwrap();
    // A burst of 5, then one send a second; 20 refusals (refilled at the same rate) before the cut.
    let g =
        TestGateway::start_in(tmp.path(), "[limits]\nsend_per_sec = 1\nsend_burst = 5\nabuse_budget = 20\n");
    let users = (g.user("alice"), g.user("bob"));
    for p in both() {
        let (mut alice, mut bob, conv) = alice_and_bob(&g, p, &users);

        let ids: Vec<String> = (0..10).map(|i| format!("{p:?}-{i}")).collect();
        for id in &ids {
            alice.send_text(conv, id, "hello");
        }
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        while acked.len() + refused.len() < ids.len() {
            match alice.recv().body {
                ServerMsg::Ack { client_msg_id, .. } => acked.push(client_msg_id),
                ServerMsg::Error { code, client_msg_id: Some(id), .. } => {
                    assert_eq!(code, 1021, "refused as rate_limited");
                    refused.push(id);
                }
                _ => {}
            }
        }
        // The burst passes in order (a slow machine may see one more refill).
        assert!((5..=6).contains(&acked.len()), "acked {acked:?}");
        assert_eq!(acked[..5], ids[..5]);
        assert_eq!(acked.len() + refused.len(), 10);

        // Bob gets exactly the accepted ones, in order, and history holds nothing else.
        for id in &acked {
            assert_eq!(&bob.next_message().client_msg_id, id);
        }
        let h =
            bob.request(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: None });
        let ServerMsg::History { mut messages, .. } = h else { panic!("expected history, got {h:?}") };
        messages.sort_by_key(|m| m.seq);
        let stored: Vec<_> =
            messages.iter().map(|m| &m.client_msg_id).filter(|c| c.starts_with(&format!("{p:?}-"))).collect();
        assert_eq!(stored, acked.iter().collect::<Vec<_>>());

        // Refusals do not cost the connection: it still answers, and Bob still sends.
        assert!(matches!(alice.request(ClientMsg::Ping), ServerMsg::Pong));
        bob.send_text(conv, &format!("{p:?}-bob"), "still here");
        bob.wait_ack(&format!("{p:?}-bob"));

        // Hammering on: once the abuse budget is spent the connection is closed with 1008.
        for i in 0..60 {
            let flood = ClientMsg::Send {
                conversation_id: conv,
                client_msg_id: format!("{p:?}-flood-{i}"),
                body: "x".into(),
                attachment: None,
            };
            if !alice.try_send(flood) {
                break; // already cut off
            }
        }
        let code = loop {
            match alice.ws.read() {
                Ok(Message::Close(Some(c))) => break u16::from(c.code),
                Ok(_) => {}
                Err(e) => panic!("closed without a close frame: {e}"),
            }
        };
        assert_eq!(code, 1008);

        // Bob's connection is untouched.
        bob.send_text(conv, &format!("{p:?}-bob-after"), "and still");
        bob.wait_ack(&format!("{p:?}-bob-after"));
    }
}

#[test]
fn typing_over_its_limit_is_refused_without_closing() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\ntyping_per_sec = 1\ntyping_burst = 2\n");
    let users = (g.user("alice"), g.user("bob"));
    for p in both() {
        let (mut alice, mut bob, conv) = alice_and_bob(&g, p, &users);
        let ids: Vec<u64> = (0..6)
            .map(|i| alice.send(ClientMsg::Typing { conversation_id: conv, typing: i % 2 == 0 }))
            .collect();
        // The answer to a typing request is silence (relayed) or an error; a ping after them
        // is answered after all of them, since a connection handles its requests in order.
        let ping = alice.send(ClientMsg::Ping);
        let mut refused = Vec::new();
        loop {
            let f = alice.recv();
            match f.body {
                ServerMsg::Pong if f.id == ping => break,
                ServerMsg::Error { code: 1021, .. } => refused.push(f.id),
                _ => {}
            }
        }
        assert!(refused.len() >= 3, "refused {refused:?} of {ids:?}");
        assert!(refused.iter().all(|id| ids[2..].contains(id)), "the burst of 2 passes: {refused:?}");
        // Bob saw the first two, in order.
        let got: Vec<bool> = (0..2)
            .map(|_| match bob.wait_for(|m| matches!(m, ServerMsg::Typing { .. })) {
                ServerMsg::Typing { typing, .. } => typing,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(got, [true, false]);
    }
}
