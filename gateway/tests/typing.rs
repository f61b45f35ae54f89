//! Typing indicators through the real gateway, in both subprotocols.

mod support;

use protocol::{ClientMsg, ServerMsg};
use support::*;

fn typing_event(c: &mut Client) -> (u64, u64, bool, u32) {
    match c.wait_for(|m| matches!(m, ServerMsg::Typing { .. })) {
        ServerMsg::Typing { conversation_id, user_id, typing, expires_ms } => {
            (conversation_id, user_id, typing, expires_ms)
        }
        _ => unreachable!(),
    }
}

#[test]
fn typing_reaches_every_device_of_the_other_members_in_order_and_is_never_stored() {
    let g = TestGateway::start();
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (_, tc) = g.user("carol");
    for (round, p) in both().into_iter().enumerate() {
        let mut alice = g.connect(&ta, p);
        let mut bob: Vec<_> = (0..2).map(|_| g.connect(&tb, p)).collect();
        let mut carol = g.connect(&tc, p);
        alice.sync(vec![]);
        carol.sync(vec![]);
        for d in &mut bob {
            d.sync(vec![]);
        }
        let conv = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));

        alice.send(ClientMsg::Typing { conversation_id: conv, typing: true });
        for d in &mut bob {
            assert_eq!(typing_event(d), (conv, a, true, 5000));
        }
        alice.send(ClientMsg::Typing { conversation_id: conv, typing: false });
        for d in &mut bob {
            assert_eq!(typing_event(d), (conv, a, false, 5000));
        }

        // Typing then sending: both arrive, in that order (the message ends the indicator).
        alice.send(ClientMsg::Typing { conversation_id: conv, typing: true });
        alice.send_text(conv, &format!("{p:?}-m"), "hi");
        for d in &mut bob {
            let first = d.wait_for(|m| matches!(m, ServerMsg::Typing { .. } | ServerMsg::Message { .. }));
            assert!(matches!(first, ServerMsg::Typing { typing: true, .. }), "typing first, got {first:?}");
            assert_eq!(d.next_message().client_msg_id, format!("{p:?}-m"));
        }
        alice.wait_ack(&format!("{p:?}-m"));

        // Nothing of it is stored: the conversation holds the one message.
        let h = alice.request(ClientMsg::History {
            conversation_id: conv,
            before: None,
            after: None,
            limit: None,
        });
        let ServerMsg::History { messages, .. } = h else { panic!("expected history, got {h:?}") };
        // (The direct chat is the same in both rounds: one message per round so far.)
        assert_eq!(messages.len(), round + 1, "{messages:?}");

        // Not a member, or no such conversation: a coded error for that request only.
        match carol.request(ClientMsg::Typing { conversation_id: conv, typing: true }) {
            ServerMsg::Error { code, .. } => assert_eq!(code, 1011),
            other => panic!("expected not_member, got {other:?}"),
        }
        match carol.request(ClientMsg::Typing { conversation_id: 424242, typing: true }) {
            ServerMsg::Error { code, .. } => assert_eq!(code, 1010),
            other => panic!("expected not_found, got {other:?}"),
        }
        assert!(matches!(carol.request(ClientMsg::Ping), ServerMsg::Pong));
    }
}
