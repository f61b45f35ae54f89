//! Chat semantics through the real gateway, in both subprotocols.

mod support;

use protocol::{ClientMsg, ConversationKind, MessageKind, Role, ServerMsg, Subprotocol};
use support::*;

fn err_name(m: &ServerMsg) -> &str {
    match m {
        ServerMsg::Error { name, .. } => name,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn conversation(m: ServerMsg) -> protocol::Conversation {
    match m {
        ServerMsg::Conversation { conversation } => conversation,
        other => panic!("expected a conversation, got {other:?}"),
    }
}

#[test]
fn direct_conversation_is_unique_per_pair() {
    let g = TestGateway::start();
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    for p in both() {
        let mut ca = g.connect(&ta, p);
        let mut cb = g.connect(&tb, p);
        let c1 = conversation(ca.request(ClientMsg::CreateDirect { user_id: b }));
        let c2 = conversation(ca.request(ClientMsg::CreateDirect { user_id: b }));
        let c3 = conversation(cb.request(ClientMsg::CreateDirect { user_id: a }));
        assert_eq!(c1.conversation_id, c2.conversation_id);
        assert_eq!(c1.conversation_id, c3.conversation_id, "same pair from the other side");
        assert_eq!(c1.kind, ConversationKind::Direct);
        let mut ids: Vec<_> = c1.members.iter().map(|m| m.user_id).collect();
        ids.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(err_name(&ca.request(ClientMsg::CreateDirect { user_id: 424242 })), "not_found");
        assert_eq!(err_name(&ca.request(ClientMsg::CreateDirect { user_id: a })), "invalid_field");
    }
}

#[test]
fn messages_reach_every_device_of_every_member_and_only_members_may_send_or_read() {
    let g = TestGateway::start();
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (_, tc) = g.user("carol");
    for (round, p) in both().into_iter().enumerate() {
        // Alice has three devices, Bob two; with two shards they spread over both.
        let mut alice: Vec<_> = (0..3).map(|_| g.connect(&ta, p)).collect();
        let mut bob: Vec<_> = (0..2).map(|_| g.connect(&tb, p)).collect();
        let mut carol = g.connect(&tc, p);
        for c in alice.iter_mut().chain(bob.iter_mut()).chain([&mut carol]) {
            c.sync(vec![]);
        }
        let conv = conversation(alice[0].request(ClientMsg::CreateDirect { user_id: b })).conversation_id;
        let cmid = format!("hello-{round}");
        alice[0].send_text(conv, &cmid, "hi bob");
        let seq = alice[0].wait_ack(&cmid);
        for c in alice[1..].iter_mut().chain(bob.iter_mut()) {
            let m = c.next_message();
            assert_eq!((m.conversation_id, m.seq, m.sender_id, m.body.as_str()), (conv, seq, a, "hi bob"));
            assert_eq!(m.client_msg_id, cmid, "other devices can match their own sends");
        }
        // Carol is not a member.
        carol.send_text(conv, "intrude", "let me in");
        match carol.wait_for(|m| matches!(m, ServerMsg::Error { .. })) {
            ServerMsg::Error { name, client_msg_id, .. } => {
                assert_eq!(name, "not_member");
                assert_eq!(client_msg_id.as_deref(), Some("intrude"));
            }
            _ => unreachable!(),
        }
        assert_eq!(
            err_name(&carol.request(ClientMsg::History {
                conversation_id: conv,
                before: None,
                after: None,
                limit: None
            })),
            "not_member"
        );
        assert_eq!(
            err_name(&carol.request(ClientMsg::GetConversation { conversation_id: conv })),
            "not_member"
        );
        // The intrusion stored nothing: Bob's next message is the next position.
        bob[0].send_text(conv, &format!("reply-{round}"), "hi alice");
        assert_eq!(bob[0].wait_ack(&format!("reply-{round}")), seq + 1);
    }
}

#[test]
fn resending_a_client_msg_id_returns_the_same_message_never_a_duplicate() {
    let g = TestGateway::start();
    let (_, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    for p in both() {
        let mut ca = g.connect(&ta, p);
        let mut cb = g.connect(&tb, p);
        cb.sync(vec![]);
        let conv = conversation(ca.request(ClientMsg::CreateDirect { user_id: b })).conversation_id;
        let cmid = format!("same-{p:?}");
        ca.send_text(conv, &cmid, "once");
        let s1 = ca.wait_ack(&cmid);
        ca.send_text(conv, &cmid, "once");
        let s2 = ca.wait_ack(&cmid);
        assert_eq!(s1, s2);
        let after = format!("after-{p:?}");
        ca.send_text(conv, &after, "next");
        assert_eq!(ca.wait_ack(&after), s1 + 1, "the resend took no position");
        let m1 = cb.next_message();
        let m2 = cb.next_message();
        assert_eq!((m1.seq, m2.seq), (s1, s1 + 1), "bob saw the message once");
    }
}

#[test]
fn groups_roles_and_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\ngroup_member_cap = 4\n");
    let (o, to) = g.user("owner");
    let (a, ta) = g.user("admin");
    let (m, tm) = g.user("member");
    let (x, _) = g.user("extra");
    let (y, _) = g.user("toomany");
    let p = Subprotocol::FlatBuffers;
    let mut co = g.connect(&to, p);
    let mut ca = g.connect(&ta, p);
    let mut cm = g.connect(&tm, p);
    for c in [&mut co, &mut ca, &mut cm] {
        c.sync(vec![]);
    }
    assert_eq!(
        err_name(&co.request(ClientMsg::CreateGroup { title: "  ".into(), members: vec![] })),
        "invalid_field"
    );
    assert_eq!(
        err_name(&co.request(ClientMsg::CreateGroup { title: "t".into(), members: vec![a, m, x, y] })),
        "member_cap"
    );
    let grp = conversation(co.request(ClientMsg::CreateGroup { title: "team".into(), members: vec![a, m] }));
    assert_eq!(grp.kind, ConversationKind::Group);
    assert_eq!(grp.members.iter().find(|mm| mm.user_id == o).unwrap().role, Role::Owner);
    let gid = grp.conversation_id;
    // Every member hears of the group as its first event.
    for c in [&mut ca, &mut cm] {
        let ev = c.next_message();
        assert_eq!((ev.seq, ev.kind, ev.body.as_str()), (1, MessageKind::GroupCreated, "team"));
    }

    // Plain members cannot manage; the owner can promote.
    assert_eq!(
        err_name(&cm.request(ClientMsg::AddMembers { conversation_id: gid, user_ids: vec![x] })),
        "forbidden"
    );
    assert_eq!(
        err_name(&ca.request(ClientMsg::SetRole { conversation_id: gid, user_id: a, role: Role::Admin })),
        "forbidden"
    );
    let c =
        conversation(co.request(ClientMsg::SetRole { conversation_id: gid, user_id: a, role: Role::Admin }));
    assert_eq!(c.members.iter().find(|mm| mm.user_id == a).unwrap().role, Role::Admin);
    // Admins add members, up to the cap.
    let c = conversation(ca.request(ClientMsg::AddMembers { conversation_id: gid, user_ids: vec![x] }));
    assert_eq!(c.members.len(), 4);
    assert_eq!(
        err_name(&ca.request(ClientMsg::AddMembers { conversation_id: gid, user_ids: vec![y] })),
        "member_cap"
    );
    assert_eq!(
        err_name(&ca.request(ClientMsg::AddMembers { conversation_id: gid, user_ids: vec![999] })),
        "member_cap"
    );
    // Admins cannot remove the owner; the owner removes anyone.
    assert_eq!(
        err_name(&ca.request(ClientMsg::RemoveMember { conversation_id: gid, user_id: o })),
        "forbidden"
    );
    let c = conversation(co.request(ClientMsg::RemoveMember { conversation_id: gid, user_id: x }));
    assert!(!c.members.iter().any(|mm| mm.user_id == x));
    // The member leaves, and can no longer send.
    assert_eq!(cm.request(ClientMsg::Leave { conversation_id: gid }), ServerMsg::Ok);
    cm.send_text(gid, "gone", "still here?");
    assert!(
        matches!(cm.wait_for(|m| matches!(m, ServerMsg::Error { .. })), ServerMsg::Error { name, .. } if name == "not_member")
    );
    // When the owner leaves, the admin inherits the group.
    assert_eq!(co.request(ClientMsg::Leave { conversation_id: gid }), ServerMsg::Ok);
    let c = conversation(ca.request(ClientMsg::GetConversation { conversation_id: gid }));
    assert_eq!(c.members.iter().map(|mm| (mm.user_id, mm.role)).collect::<Vec<_>>(), vec![(a, Role::Owner)]);

    // Membership changes are events in the conversation's order, seen in history.
    let h = ca.request(ClientMsg::History {
        conversation_id: gid,
        before: None,
        after: Some(0),
        limit: Some(100),
    });
    let ServerMsg::History { messages, .. } = h else { panic!() };
    let kinds: Vec<_> = messages.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds,
        vec![
            MessageKind::GroupCreated,
            MessageKind::RoleChanged,
            MessageKind::MemberAdded,
            MessageKind::MemberRemoved,
            MessageKind::MemberLeft,
            MessageKind::MemberLeft,
            MessageKind::RoleChanged,
        ]
    );
    assert!(messages.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // Direct conversations have no member management.
    let d = conversation(ca.request(ClientMsg::CreateDirect { user_id: m })).conversation_id;
    assert_eq!(
        err_name(&ca.request(ClientMsg::AddMembers { conversation_id: d, user_ids: vec![x] })),
        "forbidden"
    );
    assert_eq!(err_name(&ca.request(ClientMsg::Leave { conversation_id: d })), "forbidden");
}

#[test]
fn all_members_see_one_order_under_concurrent_senders() {
    let g = TestGateway::start();
    let users: Vec<_> = (0..4).map(|i| g.user(&format!("user{i}"))).collect();
    let mut owner = g.connect(&users[0].1, Subprotocol::Json);
    owner.sync(vec![]);
    let gid = conversation(owner.request(ClientMsg::CreateGroup {
        title: "busy".into(),
        members: users[1..].iter().map(|u| u.0).collect(),
    }))
    .conversation_id;
    let per_sender = 150;
    let senders: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            let addr = g.addr;
            let token = token.clone();
            std::thread::spawn(move || {
                let p = if i % 2 == 0 { Subprotocol::Json } else { Subprotocol::FlatBuffers };
                let mut c = Client::connect(addr, &token, p);
                // The group's creation event (seq 1) arrives in the sync replay.
                let mut seen: Vec<_> = c.sync(vec![]).into_iter().map(|m| (m.seq, m.client_msg_id)).collect();
                for n in 0..per_sender {
                    c.send_text(gid, &format!("{i}-{n}"), &format!("from {i} #{n}"));
                }
                // Every device of every member receives the others' messages: collect this one's view.
                let total = 1 + per_sender * 4;
                while seen.len() < total {
                    let f = c.recv();
                    match f.body {
                        ServerMsg::Message { message } => seen.push((message.seq, message.client_msg_id)),
                        ServerMsg::Ack { seq, client_msg_id, .. } => seen.push((seq, client_msg_id)),
                        ServerMsg::Error { .. } => panic!("send failed: {f:?}"),
                        _ => {}
                    }
                }
                seen
            })
        })
        .collect();
    let views: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    // Each view (messages and own acks, in arrival order) is 1..=N without gaps, and all views agree.
    for v in &views {
        let seqs: Vec<_> = v.iter().map(|(s, _)| *s).collect();
        let start = seqs[0];
        assert_eq!(
            seqs,
            (start..start + seqs.len() as u64).collect::<Vec<_>>(),
            "in order, no gaps, no duplicates"
        );
    }
    let by_seq = |v: &Vec<(u64, String)>| v.iter().filter(|(s, _)| *s > 1).cloned().collect::<Vec<_>>();
    for v in &views[1..] {
        assert_eq!(by_seq(v), by_seq(&views[0]), "every member saw the same order");
    }
}

#[test]
fn history_pages_both_ways_and_rejects_bad_cursors() {
    let g = TestGateway::start();
    let (_, ta) = g.user("alice");
    let (b, _) = g.user("bob");
    for p in both() {
        let mut c = g.connect(&ta, p);
        c.sync(vec![]);
        let conv = conversation(c.request(ClientMsg::CreateDirect { user_id: b })).conversation_id;
        let base = match c.request(ClientMsg::History {
            conversation_id: conv,
            before: None,
            after: None,
            limit: Some(1),
        }) {
            ServerMsg::History { messages, .. } => messages.first().map(|m| m.seq).unwrap_or(0),
            other => panic!("{other:?}"),
        };
        for i in 0..250 {
            c.send_text(conv, &format!("{p:?}-{i}"), &format!("m{i}"));
        }
        c.wait_ack(&format!("{p:?}-249"));
        let page = |c: &mut Client, before, after, limit| match c.request(ClientMsg::History {
            conversation_id: conv,
            before,
            after,
            limit,
        }) {
            ServerMsg::History { messages, has_more, .. } => {
                (messages.iter().map(|m| m.seq).collect::<Vec<_>>(), has_more)
            }
            other => panic!("{other:?}"),
        };
        let head = base + 250;
        let (latest, more) = page(&mut c, None, None, Some(100));
        assert_eq!(latest, (head - 99..=head).rev().collect::<Vec<_>>(), "newest first by default");
        assert!(more);
        let (older, _) = page(&mut c, Some(head - 99), None, Some(100));
        assert_eq!(older, (head - 199..=head - 100).rev().collect::<Vec<_>>());
        let (fwd, more) = page(&mut c, None, Some(head - 10), Some(100));
        assert_eq!(fwd, (head - 9..=head).collect::<Vec<_>>(), "forwards is oldest first");
        assert!(!more);
        let (default_limit, _) = page(&mut c, None, None, None);
        assert_eq!(default_limit.len(), 50);

        for (before, after, limit, want) in [
            (Some(5), Some(1), Some(10), "bad_cursor"),
            (None, Some(head + 1), Some(10), "bad_cursor"),
            (Some(head + 2), None, Some(10), "bad_cursor"),
            (Some(0), None, Some(10), "bad_cursor"),
            (None, None, Some(101), "invalid_field"),
            (None, None, Some(0), "invalid_field"),
        ] {
            let r = c.request(ClientMsg::History { conversation_id: conv, before, after, limit });
            assert_eq!(err_name(&r), want, "before={before:?} after={after:?} limit={limit:?}");
        }
        assert_eq!(
            err_name(&c.request(ClientMsg::History {
                conversation_id: 12345,
                before: None,
                after: None,
                limit: None
            })),
            "not_found"
        );
        // The connection is still fine after all those errors.
        assert_eq!(c.request(ClientMsg::Ping), ServerMsg::Pong);
    }
}

#[test]
fn conversation_list_is_ordered_by_last_activity_and_pages() {
    let g = TestGateway::start();
    let (_, ta) = g.user("alice");
    let peers: Vec<_> = (0..5).map(|i| g.user(&format!("peer{i}")).0).collect();
    let mut c = g.connect(&ta, Subprotocol::Json);
    c.sync(vec![]);
    let convs: Vec<_> = peers
        .iter()
        .map(|&p| conversation(c.request(ClientMsg::CreateDirect { user_id: p })).conversation_id)
        .collect();
    // Activity order: 2, 0, 4 (4 newest); 1 and 3 have only their creation time.
    for (n, &i) in [2usize, 0, 4].iter().enumerate() {
        std::thread::sleep(std::time::Duration::from_millis(3)); // distinct millisecond timestamps
        c.send_text(convs[i], &format!("x{n}"), "hi");
        c.wait_ack(&format!("x{n}"));
    }
    let list = |c: &mut Client, limit, cursor| match c.request(ClientMsg::ListConversations { limit, cursor })
    {
        ServerMsg::Conversations { items, next_cursor } => (items, next_cursor),
        other => panic!("{other:?}"),
    };
    let (items, cursor) = list(&mut c, Some(3), None);
    let ids: Vec<_> = items.iter().map(|i| i.conversation_id).collect();
    assert_eq!(ids, vec![convs[4], convs[0], convs[2]]);
    assert_eq!(items[0].last_seq, 1);
    let (rest, end) = list(&mut c, Some(3), cursor);
    assert_eq!(rest.len(), 2);
    assert!(end.is_none());
    let mut all: Vec<_> = ids.into_iter().chain(rest.iter().map(|i| i.conversation_id)).collect();
    all.sort();
    let mut want = convs.clone();
    want.sort();
    assert_eq!(all, want, "every conversation exactly once across pages");
    assert_eq!(
        err_name(&c.request(ClientMsg::ListConversations { limit: None, cursor: Some("zzz".into()) })),
        "bad_cursor"
    );
}
