//! Delivered and read receipts, read positions and unread counts, through the
//! real gateway in both subprotocols.

mod support;

use protocol::{ClientMsg, ConversationSummary, MemberPositions, ServerMsg, Subprotocol};
use support::*;

/// The next receipt event: (user, delivered, read).
fn receipt(c: &mut Client, conv: u64) -> (u64, u64, u64) {
    match c.wait_for(|m| matches!(m, ServerMsg::Receipt { conversation_id, .. } if *conversation_id == conv))
    {
        ServerMsg::Receipt { user_id, delivered_seq, read_seq, .. } => (user_id, delivered_seq, read_seq),
        _ => unreachable!(),
    }
}

fn receipts(c: &mut Client, conv: u64) -> Vec<(u64, u64, u64)> {
    match c.request(ClientMsg::GetReceipts { conversation_id: conv }) {
        ServerMsg::Receipts { members, .. } => members
            .into_iter()
            .map(|MemberPositions { user_id, delivered_seq, read_seq }| (user_id, delivered_seq, read_seq))
            .collect(),
        other => panic!("expected receipts, got {other:?}"),
    }
}

fn summary(c: &mut Client, conv: u64) -> ConversationSummary {
    match c.request(ClientMsg::ListConversations { limit: Some(100), cursor: None }) {
        ServerMsg::Conversations { items, .. } => {
            items.into_iter().find(|i| i.conversation_id == conv).expect("conversation listed")
        }
        other => panic!("expected conversations, got {other:?}"),
    }
}

#[test]
fn receipts_move_forward_reach_every_member_and_drive_unread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "");
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (c, tc) = g.user("carol");
    let (_, td) = g.user("dave");
    let mut convs = Vec::new();
    for p in both() {
        let mut alice = g.connect(&ta, p);
        let mut bob: Vec<_> = (0..2).map(|_| g.connect(&tb, p)).collect();
        let mut carol = g.connect(&tc, p);
        let mut dave = g.connect(&td, p);
        for cl in [&mut alice, &mut carol, &mut dave].into_iter().chain(bob.iter_mut()) {
            cl.sync(vec![]);
        }
        let conv = match alice.request(ClientMsg::CreateGroup { title: "t".into(), members: vec![b, c] }) {
            ServerMsg::Conversation { conversation } => conversation.conversation_id,
            other => panic!("{other:?}"),
        };
        // seq 1 is group_created; then 50 messages from Alice: seq 2..=51.
        for i in 0..50 {
            alice.send_text(conv, &format!("{p:?}-{i}"), "hi");
        }
        alice.wait_ack(&format!("{p:?}-49"));
        let last = 51;
        for d in &mut bob {
            for _ in 0..50 {
                d.next_message();
            }
        }

        // Nobody has marked anything: Bob has everything unread; Alice's own sends are read.
        assert_eq!((summary(&mut bob[0], conv).read_seq, summary(&mut bob[0], conv).unread), (0, last));
        assert_eq!(summary(&mut alice, conv).unread, 0);

        // One device acknowledges receipt of the lot: one update, seen by every member's devices.
        bob[0].send(ClientMsg::MarkDelivered { conversation_id: conv, seq: last });
        assert_eq!(receipt(&mut alice, conv), (b, last, 0));
        assert_eq!(receipt(&mut carol, conv), (b, last, 0));
        assert_eq!(receipt(&mut bob[1], conv), (b, last, 0));
        assert_eq!(receipt(&mut bob[0], conv), (b, last, 0), "the marking device too");
        assert_eq!(summary(&mut bob[1], conv).unread, last, "delivered is not read");

        // Reading 30 of them: one update, unread drops on both of Bob's devices.
        bob[1].send(ClientMsg::MarkRead { conversation_id: conv, seq: 30 });
        assert_eq!(receipt(&mut alice, conv), (b, last, 30));
        assert_eq!(receipt(&mut bob[0], conv), (b, last, 30));
        assert_eq!(receipt(&mut bob[1], conv), (b, last, 30));
        let s = summary(&mut bob[0], conv);
        assert_eq!((s.read_seq, s.unread), (30, last - 30));

        // Positions never move back; a backwards mark changes nothing and says nothing:
        // the next event from this connection's marks is the forward one after them.
        bob[1].send(ClientMsg::MarkRead { conversation_id: conv, seq: 10 });
        bob[1].send(ClientMsg::MarkDelivered { conversation_id: conv, seq: 5 });
        bob[1].send(ClientMsg::MarkRead { conversation_id: conv, seq: 31 });
        assert_eq!(receipt(&mut alice, conv), (b, last, 31));
        // Reading implies having received.
        carol.send(ClientMsg::MarkRead { conversation_id: conv, seq: 20 });
        assert_eq!(receipt(&mut alice, conv), (c, 20, 20));

        // Who has received and who has read message 25: Bob both, Carol neither (she is at 20).
        let r = receipts(&mut alice, conv);
        assert_eq!(r, {
            let mut want = vec![(a, last, last), (b, last, 31), (c, 20, 20)];
            want.sort();
            want
        });
        let received_25: Vec<u64> = r.iter().filter(|m| m.1 >= 25).map(|m| m.0).collect();
        let read_25: Vec<u64> = r.iter().filter(|m| m.2 >= 25).map(|m| m.0).collect();
        assert!(received_25.contains(&b) && !received_25.contains(&c));
        assert!(read_25.contains(&b) && !read_25.contains(&c));

        // Bad marks get a coded error for that request only.
        assert_eq!(
            error_code(bob[0].request(ClientMsg::MarkRead { conversation_id: conv, seq: last + 1 })),
            1014
        );
        assert_eq!(error_code(dave.request(ClientMsg::MarkRead { conversation_id: conv, seq: 1 })), 1011);
        assert_eq!(error_code(dave.request(ClientMsg::GetReceipts { conversation_id: conv })), 1011);
        assert_eq!(
            error_code(dave.request(ClientMsg::MarkDelivered { conversation_id: 424242, seq: 1 })),
            1010
        );
        convs.push((conv, r));
    }
    // Positions are durable.
    g.kill9();
    let g = TestGateway::start_in(tmp.path(), "");
    let mut alice = g.connect(&ta, Subprotocol::Json);
    for (conv, want) in convs {
        assert_eq!(receipts(&mut alice, conv), want);
    }
}

#[test]
fn the_conversation_list_previews_the_newest_message_and_shows_mutes() {
    let g = TestGateway::start();
    let (_, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (_, tc) = g.user("carol");
    for p in both() {
        let mut alice = g.connect(&ta, p);
        let mut bob = g.connect(&tb, p);
        let mut carol = g.connect(&tc, p);
        for cl in [&mut alice, &mut bob, &mut carol] {
            cl.sync(vec![]);
        }
        let conv = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));
        for body in ["first", "newest"] {
            alice.send_text(conv, &format!("{p:?}-{body}"), body);
            alice.wait_ack(&format!("{p:?}-{body}"));
        }
        let s = summary(&mut bob, conv);
        let preview = s.last_message.expect("a preview");
        assert_eq!((preview.seq, preview.body.as_str()), (s.last_seq, "newest"));
        assert!(!s.muted);

        assert!(matches!(bob.request(ClientMsg::Mute { conversation_id: conv, muted: true }), ServerMsg::Ok));
        assert!(summary(&mut bob, conv).muted);
        assert!(!summary(&mut alice, conv).muted, "a mute is per member");
        assert!(matches!(
            bob.request(ClientMsg::Mute { conversation_id: conv, muted: false }),
            ServerMsg::Ok
        ));
        assert!(!summary(&mut bob, conv).muted);
        assert_eq!(error_code(carol.request(ClientMsg::Mute { conversation_id: conv, muted: true })), 1011);
    }
}
