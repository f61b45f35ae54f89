//! Editing and deleting messages through the real gateway, in both subprotocols.

mod support;

use protocol::{ClientMsg, Message, MessageKind, Role, ServerMsg};
use storage::conformance::{files_containing, vault_keys};
use support::*;

fn ok(m: ServerMsg) {
    assert!(matches!(m, ServerMsg::Ok), "expected ok, got {m:?}");
}

fn history(c: &mut Client, conv: u64) -> Vec<Message> {
    match c.request(ClientMsg::History {
        conversation_id: conv,
        before: None,
        after: Some(0),
        limit: Some(100),
    }) {
        ServerMsg::History { messages, .. } => messages,
        other => panic!("expected history, got {other:?}"),
    }
}

#[test]
fn edits_and_deletions_are_events_in_order_and_leave_the_final_state_in_history() {
    let g = TestGateway::start();
    let (_, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (c, tc) = g.user("carol");
    let (_, td) = g.user("dave");
    for p in both() {
        let mut alice = g.connect(&ta, p);
        let mut bob = g.connect(&tb, p);
        let mut carol = g.connect(&tc, p);
        let mut dave = g.connect(&td, p);
        for cl in [&mut alice, &mut bob, &mut carol, &mut dave] {
            cl.sync(vec![]);
        }
        let conv = match alice.request(ClientMsg::CreateGroup { title: "t".into(), members: vec![b, c] }) {
            ServerMsg::Conversation { conversation } => conversation.conversation_id,
            other => panic!("{other:?}"),
        };
        let id = |s: &str| format!("{p:?}-{s}");
        bob.send_text(conv, &id("typo"), "teh typo");
        let s1 = bob.wait_ack(&id("typo"));
        bob.send_text(conv, &id("secret"), "secret");
        let s2 = bob.wait_ack(&id("secret"));

        // Only the sender edits.
        assert_eq!(
            error_code(alice.request(ClientMsg::Edit { conversation_id: conv, seq: s1, body: "x".into() })),
            1012
        );
        ok(bob.request(ClientMsg::Edit { conversation_id: conv, seq: s1, body: "the typo".into() }));

        // In groups, the sender or an admin/owner deletes; a plain member may not delete others'.
        assert_eq!(error_code(carol.request(ClientMsg::Delete { conversation_id: conv, seq: s2 })), 1012);
        ok(alice.request(ClientMsg::Delete { conversation_id: conv, seq: s2 }));

        // Every member sees the messages, then the edit, then the deletion, in order.
        for cl in [&mut alice, &mut carol] {
            let got: Vec<_> =
                std::iter::repeat_with(|| cl.next_message()).filter(|m| m.seq >= s1).take(4).collect();
            assert_eq!(got[0].seq, s1);
            assert_eq!(got[1].seq, s2);
            assert_eq!(
                (got[2].kind, got[2].target_seq, got[2].body.as_str()),
                (MessageKind::Edit, Some(s1), "the typo")
            );
            assert_eq!(
                (got[3].kind, got[3].target_seq, got[3].body.as_str()),
                (MessageKind::Delete, Some(s2), "")
            );
            assert!(got[3].seq > got[2].seq && got[2].seq > s2);
        }

        // History (and so every replay) holds the final state: the edited text, and a
        // tombstone without the deleted body.
        let h = history(&mut carol, conv);
        let m1 = h.iter().find(|m| m.seq == s1).unwrap();
        assert_eq!((m1.kind, m1.body.as_str()), (MessageKind::Text, "the typo"));
        assert!(m1.edited_ms.is_some());
        let m2 = h.iter().find(|m| m.seq == s2).unwrap();
        assert_eq!((m2.kind, m2.body.as_str()), (MessageKind::Deleted, ""));
        assert!(h.iter().all(|m| m.body != "secret"), "the deleted body is gone");
        let mut fresh = g.connect(&tc, p);
        let replay = fresh.sync(vec![]);
        let r2 = replay.iter().find(|m| m.conversation_id == conv && m.seq == s2).unwrap();
        assert_eq!((r2.kind, r2.body.as_str()), (MessageKind::Deleted, ""));

        // Errors, each for its request only.
        let group_created = 1;
        assert_eq!(
            error_code(bob.request(ClientMsg::Edit { conversation_id: conv, seq: s2, body: "y".into() })),
            1010
        );
        assert_eq!(error_code(bob.request(ClientMsg::Delete { conversation_id: conv, seq: 999 })), 1010);
        assert_eq!(
            error_code(alice.request(ClientMsg::Delete { conversation_id: conv, seq: group_created })),
            1004
        );
        assert_eq!(
            error_code(bob.request(ClientMsg::Edit { conversation_id: conv, seq: s1, body: String::new() })),
            1004
        );
        assert_eq!(error_code(dave.request(ClientMsg::Delete { conversation_id: conv, seq: s1 })), 1011);

        // An admin may delete too.
        let promoted =
            alice.request(ClientMsg::SetRole { conversation_id: conv, user_id: c, role: Role::Admin });
        assert!(matches!(promoted, ServerMsg::Conversation { .. }), "{promoted:?}");
        ok(carol.request(ClientMsg::Delete { conversation_id: conv, seq: s1 }));
    }
}

/// docs/protocol.md: a deleted message's text, and every edited version of it,
/// is erased from the server's disk. After a delete and a restart, neither text
/// nor the one key that opened them is anywhere in the gateway's directory; the
/// embedded store never held any text in the clear, and what was not deleted
/// still reads back. (The embedded store; PostgreSQL and Cassandra are checked
/// in storage/tests.)
#[test]
fn a_deleted_message_is_erased_from_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let embedded = "[storage]\nbackend = \"embedded\"\n";
    let g = TestGateway::start_in(tmp.path(), embedded);
    let mut e = Erasure::start(&g);
    let store = tmp.path().join("data/store");
    let keys = vault_keys(&store);
    e.delete();
    let gone: Vec<_> = keys.iter().filter(|k| !vault_keys(&store).contains(k)).cloned().collect();
    assert_eq!(gone.len(), 1, "the deleted message's key is erased at once");
    assert!(g.terminate().success());

    let g = TestGateway::start_in(tmp.path(), embedded);
    for text in e.texts() {
        assert_eq!(files_containing(tmp.path(), text.as_bytes()), Vec::<std::path::PathBuf>::new(), "{text}");
    }
    let found = files_containing(tmp.path(), &gone[0]);
    assert_eq!(found, Vec::<std::path::PathBuf>::new(), "the key is nowhere");
    e.reconnect(&g);
    e.check_history();
}
