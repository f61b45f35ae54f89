//! Reactions through the real gateway, in both subprotocols: one per user and
//! message, live to every member's devices, in history and replays with counts
//! and the reader's own.

mod support;

use protocol::{ClientMsg, Message, ReactionCount, ServerMsg};
use support::*;

fn rc(emoji: &str, count: u32) -> ReactionCount {
    ReactionCount { emoji: emoji.into(), count }
}

/// The next `reaction` event: (seq, user, emoji, totals).
fn reaction(c: &mut Client) -> (u64, u64, String, Vec<ReactionCount>) {
    match c.wait_for(|m| matches!(m, ServerMsg::Reaction { .. })) {
        ServerMsg::Reaction { seq, user_id, emoji, reactions, .. } => (seq, user_id, emoji, reactions),
        _ => unreachable!(),
    }
}

fn history(c: &mut Client, conv: u64) -> Vec<Message> {
    match c.request(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: None }) {
        ServerMsg::History { messages, .. } => messages,
        other => panic!("expected history, got {other:?}"),
    }
}

fn at(messages: &[Message], seq: u64) -> &Message {
    messages.iter().find(|m| m.seq == seq).expect("message in history")
}

fn react(c: &mut Client, conv: u64, seq: u64, emoji: &str) -> ServerMsg {
    c.request(ClientMsg::React { conversation_id: conv, seq, emoji: emoji.into() })
}

#[test]
fn reactions_are_live_for_every_device_and_in_history_with_my_own() {
    let g = TestGateway::start();
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (_, tc) = g.user("carol");
    for p in both() {
        let mut alice = g.connect(&ta, p);
        alice.sync(vec![]);
        let mut bob: Vec<_> = (0..2).map(|_| g.connect(&tb, p)).collect();
        for d in &mut bob {
            d.sync(vec![]);
        }
        let mut carol = g.connect(&tc, p);
        carol.sync(vec![]);
        let conv = conversation_id(
            &alice.request(ClientMsg::CreateGroup { title: format!("{p:?}"), members: vec![b] }),
        );
        alice.send_text(conv, "m1", "react to me");
        let seq = alice.wait_ack("m1");

        // Bob's first device reacts: every device of every member sees it, bob's own included.
        assert_eq!(react(&mut bob[0], conv, seq, "👍"), ServerMsg::Ok);
        let want = (seq, b, "👍".to_string(), vec![rc("👍", 1)]);
        assert_eq!(reaction(&mut alice), want);
        for d in &mut bob {
            assert_eq!(reaction(d), want);
        }

        assert_eq!(react(&mut alice, conv, seq, "❤️"), ServerMsg::Ok);
        let totals = vec![rc("❤️", 1), rc("👍", 1)];
        assert_eq!(reaction(&mut bob[1]), (seq, a, "❤️".into(), totals.clone()));

        // One reaction per user: bob's second device changes bob's reaction.
        assert_eq!(react(&mut bob[1], conv, seq, "❤️"), ServerMsg::Ok);
        assert_eq!(reaction(&mut bob[0]).3, totals, "alice's ❤️ first");
        assert_eq!(reaction(&mut bob[0]), (seq, b, "❤️".into(), vec![rc("❤️", 2)]));

        // Setting what is already set changes nothing and tells nobody.
        assert_eq!(react(&mut bob[0], conv, seq, "❤️"), ServerMsg::Ok);
        assert_eq!(react(&mut alice, conv, seq, "😂"), ServerMsg::Ok);
        let (_, who, emoji, _) = reaction(&mut bob[1]);
        let (_, who2, emoji2, _) = reaction(&mut bob[1]);
        assert_eq!((who, emoji.as_str()), (b, "❤️"), "bob's change from before");
        assert_eq!((who2, emoji2.as_str()), (a, "😂"), "next is alice's, not a repeat of bob's");

        // History: counts for everyone, and each reader's own.
        let h = history(&mut bob[0], conv);
        assert_eq!(at(&h, seq).reactions, vec![rc("❤️", 1), rc("😂", 1)]);
        assert_eq!(at(&h, seq).my_reaction.as_deref(), Some("❤️"));
        let h = history(&mut alice, conv);
        assert_eq!(at(&h, seq).my_reaction.as_deref(), Some("😂"));
        assert!(at(&h, 1).reactions.is_empty(), "nobody reacted to the group's creation");

        // A device that syncs later gets the counts with the replayed message.
        let mut late = g.connect(&tb, p);
        let replay = late.sync(vec![]);
        let m = replay.iter().find(|m| m.conversation_id == conv && m.seq == seq).unwrap();
        assert_eq!(m.reactions, vec![rc("❤️", 1), rc("😂", 1)]);
        assert_eq!(m.my_reaction.as_deref(), Some("❤️"));

        // An empty emoji removes mine.
        assert_eq!(react(&mut bob[0], conv, seq, ""), ServerMsg::Ok);
        assert_eq!(reaction(&mut bob[1]), (seq, b, String::new(), vec![rc("😂", 1)]));
        let h = history(&mut bob[0], conv);
        assert_eq!(at(&h, seq).my_reaction, None);
        assert_eq!(at(&h, seq).reactions, vec![rc("😂", 1)]);

        // Refusals are coded, for that request only.
        assert_eq!(error_code(react(&mut carol, conv, seq, "👍")), 1011, "not a member");
        assert_eq!(error_code(react(&mut alice, conv, seq + 100, "👍")), 1010, "no such message");
        assert_eq!(error_code(react(&mut alice, conv, 1, "👍")), 1004, "not a text message");
        assert_eq!(error_code(react(&mut alice, conv, seq, "thumbs up")), 1004, "no whitespace");
        assert_eq!(error_code(react(&mut alice, conv, seq, &"👍".repeat(9))), 1004, "too long");
        // A deleted message takes no reactions and shows none.
        assert_eq!(alice.request(ClientMsg::Delete { conversation_id: conv, seq }), ServerMsg::Ok);
        assert_eq!(error_code(react(&mut bob[0], conv, seq, "👍")), 1010);
        let h = history(&mut alice, conv);
        assert!(at(&h, seq).reactions.is_empty() && at(&h, seq).my_reaction.is_none());
        assert!(matches!(alice.request(ClientMsg::Ping), ServerMsg::Pong));
    }
}
