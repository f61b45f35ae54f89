//! The protocol's promises kept under abuse and at the edges: request ids on
//! errors, opaque cursors, sync positions, removal while offline, tokens, paced
//! replays, page sizes, per-command budgets, graceful closes.

mod support;

use protocol::{ClientMsg, MessageKind, Position, ServerMsg, Subprotocol};
use support::*;
use tungstenite::Message;

fn id_and_code(m: &ServerMsg) -> u16 {
    match m {
        ServerMsg::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn error_replies_to_decodable_frames_carry_the_request_id() {
    let g = TestGateway::start();
    let (_, token) = g.user("idecho");
    let mut c = g.connect(&token, Subprotocol::Json);
    for (frame, code) in [
        (r#"{"type":"fly","id":"41"}"#, 1002),
        (r#"{"type":"history","id":42,"conversation_id":"1","limit":"x"}"#, 1001),
        (r#"{"type":"set_role","id":"43","conversation_id":"1","user_id":"2","role":"king"}"#, 1001),
    ] {
        c.send_raw(Message::text(frame));
        let f = c.recv();
        assert_eq!(id_and_code(&f.body), code, "{frame}");
        let want: u64 = frame.split("\"id\":").nth(1).unwrap().trim_start_matches('"')[..2].parse().unwrap();
        assert_eq!(f.id, want, "the error to {frame} carries its id");
    }
    // FlatBuffers: an envelope that verifies, with a body type this server does not know.
    let mut fbc = g.connect(&token, Subprotocol::FlatBuffers);
    let mut b = flatbuffers::FlatBufferBuilder::new();
    use protocol::generated::switchboard::v_1 as fb;
    let body = fb::PingReq::create(&mut b, &fb::PingReqArgs {});
    let root = fb::ClientFrame::create(
        &mut b,
        &fb::ClientFrameArgs { id: 44, body_type: fb::ClientBody(200), body: Some(body.as_union_value()) },
    );
    b.finish_minimal(root);
    fbc.send_raw(Message::binary(b.finished_data().to_vec()));
    let f = fbc.recv();
    assert_eq!((f.id, id_and_code(&f.body)), (44, 1002));
}

#[test]
fn list_cursors_are_opaque_and_checked() {
    let g = TestGateway::start();
    let (_, token) = g.user("lister");
    let (_, other) = g.user("snooper");
    let mut c = g.connect(&token, Subprotocol::Json);
    c.sync(vec![]);
    for i in 0..3 {
        let (peer, _) = g.user(&format!("peer{i}"));
        c.request(ClientMsg::CreateDirect { user_id: peer });
    }
    let cursor = match c.request(ClientMsg::ListConversations { limit: Some(1), cursor: None }) {
        ServerMsg::Conversations { next_cursor: Some(n), .. } => n,
        other => panic!("{other:?}"),
    };
    assert!(!cursor.contains('.'), "not the old ts.id form: {cursor}");
    match c.request(ClientMsg::ListConversations { limit: Some(1), cursor: Some(cursor.clone()) }) {
        ServerMsg::Conversations { items, .. } => assert_eq!(items.len(), 1),
        other => panic!("{other:?}"),
    }
    let mut tampered = cursor.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    for bad in ["9999999999999.1".to_owned(), String::from_utf8(tampered).unwrap(), "x".into()] {
        let r = c.request(ClientMsg::ListConversations { limit: Some(1), cursor: Some(bad.clone()) });
        assert_eq!(error_code(r), 1014, "{bad}");
    }
    let mut s = g.connect(&other, Subprotocol::Json);
    s.sync(vec![]);
    let r = s.request(ClientMsg::ListConversations { limit: Some(1), cursor: Some(cursor) });
    assert_eq!(error_code(r), 1014, "a cursor is its user's only");
}

#[test]
fn a_sync_position_past_the_end_is_refused_and_loses_nothing() {
    let g = TestGateway::start();
    let (_, ta) = g.user("syncer");
    let (b, tb) = g.user("sender");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    a.send_text(conv, "m1", "one");
    assert_eq!(a.wait_ack("m1"), 1);

    let mut dev = g.connect(&ta, Subprotocol::Json);
    let r = dev.request(ClientMsg::Sync { positions: vec![Position { conversation_id: conv, seq: 5 }] });
    assert_eq!(error_code(r), 1014, "position 5 of a conversation at 1");
    let r = dev.request(ClientMsg::Sync { positions: vec![Position { conversation_id: 12345, seq: 0 }] });
    assert_eq!(error_code(r), 1014, "a conversation that does not exist");
    assert!(dev.sync(vec![Position { conversation_id: conv, seq: 1 }]).is_empty());
    let mut bc = g.connect(&tb, Subprotocol::Json);
    bc.sync(vec![]);
    bc.send_text(conv, "m2", "two");
    bc.wait_ack("m2");
    let m = dev.next_message();
    assert_eq!((m.seq, m.body.as_str()), (2, "two"), "live delivery after a refused sync is intact");
}

#[test]
fn an_offline_device_learns_it_was_removed_and_sees_nothing_after() {
    let g = TestGateway::start();
    let (_, to) = g.user("owner");
    let (u, tu) = g.user("removed");
    let mut owner = g.connect(&to, Subprotocol::Json);
    owner.sync(vec![]);
    let group =
        conversation_id(&owner.request(ClientMsg::CreateGroup { title: "g".into(), members: vec![u] }));
    let mut phone = g.connect(&tu, Subprotocol::FlatBuffers);
    let seen = phone.sync(vec![]);
    let at = seen.iter().filter(|m| m.conversation_id == group).map(|m| m.seq).max().unwrap();
    drop(phone);

    owner.send_text(group, "before", "said while you were away");
    owner.wait_ack("before");
    owner.request(ClientMsg::RemoveMember { conversation_id: group, user_id: u });
    owner.send_text(group, "after", "said after you left");
    owner.wait_ack("after");

    let mut phone = g.connect(&tu, Subprotocol::FlatBuffers);
    let replay = phone.sync(vec![Position { conversation_id: group, seq: at }]);
    let bodies: Vec<_> = replay.iter().map(|m| (m.kind, m.body.as_str(), m.target_user_id)).collect();
    assert_eq!(
        bodies,
        [(MessageKind::Text, "said while you were away", None), (MessageKind::MemberRemoved, "", Some(u))],
        "up to and including the removal, nothing after"
    );
}

#[test]
fn tokens_for_users_that_do_not_exist_are_refused() {
    let g = TestGateway::start();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"sub": "987654321", "iat": now, "exp": now + 3600});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let forged = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
    let (status, body) = upgrade_raw(g.addr, &forged);
    assert_eq!(status, 401, "{body}");
    // A real user's token with a "not before" an hour away.
    let (id, _) = g.user("early");
    let claims = serde_json::json!({"sub": id.to_string(), "iat": now, "exp": now + 7200, "nbf": now + 3600});
    let early = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
    let (status, _) = upgrade_raw(g.addr, &early);
    assert_eq!(status, 401, "nbf is honoured");
}

#[test]
fn a_new_device_syncs_however_large_the_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\nmax_body_bytes = 60000\n");
    let (_, ta) = g.user("bigsender");
    let (b, tb) = g.user("newdevice");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    let body = "x".repeat(59_000);
    for i in 0..150 {
        a.send_text(conv, &format!("big{i}"), &body);
    }
    a.wait_ack("big149");
    let mut dev = g.connect(&tb, Subprotocol::Json);
    let got = dev.sync(vec![]);
    assert_eq!(got.len(), 150, "every message, paced by the socket, no 4008");
    assert!(got.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1 && m.body.len() == 59_000));
}

#[test]
fn history_pages_are_bounded_by_bytes_too() {
    let g = TestGateway::start();
    let (_, ta) = g.user("pager");
    let (b, _) = g.user("pagee");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    let body = "y".repeat(16_000);
    for i in 0..100 {
        a.send_text(conv, &format!("p{i}"), &body);
    }
    a.wait_ack("p99");
    // The reply must fit the 1 MiB frame limit of common clients (tungstenite's default is
    // 16 MiB, so measure the frame itself).
    let id =
        a.send(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: Some(100) });
    let (size, msg) = loop {
        if let Message::Text(t) = a.ws.read().unwrap() {
            let f = a.proto.decode_server(t.as_bytes()).unwrap();
            if f.id == id {
                break (t.len(), f.body);
            }
        }
    };
    assert!(size < 1024 * 1024, "history frame of {size} bytes");
    let ServerMsg::History { messages, has_more, .. } = msg else { panic!("{msg:?}") };
    assert!(messages.len() < 100 && has_more, "{} messages, has_more {has_more}", messages.len());
    assert_eq!(messages[0].seq, 100, "newest first, from the newest");
}

/// Every command draws on a budget: past its burst, `rate_limited` with the request's id.
#[test]
fn every_command_has_a_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(
        tmp.path(),
        "[limits]\nedits_burst = 2\ngroups_burst = 2\nsettings_burst = 2\nreads_burst = 3\npings_burst = 2\n\
         edits_per_sec = 1\nreads_per_sec = 1\n",
    );
    let (_, ta) = g.user("budgeted");
    let (b, _) = g.user("budgetpeer");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]); // one read
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b })); // one group change
    a.send_text(conv, "e", "to edit");
    let seq = a.wait_ack("e");
    type Make = Box<dyn Fn() -> ClientMsg>;
    let history =
        move || ClientMsg::History { conversation_id: conv, before: None, after: None, limit: None };
    // (name, request, how many the burst leaves, trailing request on the same budget)
    let cases: Vec<(&str, Make, usize, Option<Make>)> = vec![
        ("ping", Box::new(|| ClientMsg::Ping), 2, None),
        (
            "edit",
            Box::new(move || ClientMsg::Edit { conversation_id: conv, seq, body: "edited".into() }),
            2,
            Some(Box::new(move || ClientMsg::Delete { conversation_id: conv, seq })),
        ),
        (
            "create_group",
            Box::new(move || ClientMsg::CreateGroup { title: "spam".into(), members: vec![b] }),
            1,
            Some(Box::new(move || ClientMsg::AddMembers { conversation_id: conv, user_ids: vec![b] })),
        ),
        ("mute", Box::new(move || ClientMsg::Mute { conversation_id: conv, muted: true }), 2, None),
        (
            "get_presence",
            Box::new(move || ClientMsg::GetPresence { user_ids: vec![b] }),
            2,
            Some(Box::new(history)),
        ),
    ];
    // Each budget's requests are pipelined, so its slow refill (1/s) cannot top it up
    // between them: the burst passes, the next ones are refused with their own ids, and
    // so is another request type drawing on the same budget.
    for (name, make, allowed, same_budget) in cases {
        let within: Vec<u64> = (0..allowed).map(|_| a.send(make())).collect();
        let past: Vec<u64> = (0..3).map(|_| a.send(make())).collect();
        let other = same_budget.map(|m| a.send(m()));
        for id in within {
            let r = a.wait_reply(id);
            assert!(!matches!(r, ServerMsg::Error { code: 1021, .. }), "{name} within its burst: {r:?}");
        }
        let refused =
            past.iter().filter(|&&id| matches!(a.wait_reply(id), ServerMsg::Error { code: 1021, .. }));
        assert!(refused.count() >= 2, "{name} past its burst is rate_limited, with its id");
        if let Some(id) = other {
            assert_eq!(error_code(a.wait_reply(id)), 1021, "{name}'s budget is shared");
        }
    }
}

/// A flooding client gets acks for everything stored, then a 1008 close frame, not a reset.
#[test]
fn a_flood_close_is_graceful_and_acks_what_was_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(
        tmp.path(),
        "[limits]\nsend_per_sec = 1\nsend_burst = 50\nabuse_budget = 100\n",
    );
    let (_, ta) = g.user("flooder");
    let (b, tb) = g.user("floodee");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    // Written without reading, as a flooding client does.
    let frames: Vec<u8> = (0..2000)
        .flat_map(|i| {
            let f = protocol::ClientFrame {
                id: 0,
                body: ClientMsg::Send {
                    conversation_id: conv,
                    client_msg_id: format!("f{i}"),
                    body: "flood".into(),
                    attachment: None,
                },
            };
            let mut raw = Vec::new();
            let payload = Subprotocol::Json.encode_client(&f);
            raw.push(0x81);
            let mask = [9u8, 8, 7, 6];
            raw.push(0x80 | 126);
            raw.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            raw.extend_from_slice(&mask);
            raw.extend(payload.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]));
            raw
        })
        .collect();
    use std::io::Write;
    // The server may close before taking it all; that is the point.
    let _ = a.ws.get_mut().write_all(&frames);
    let (before, code) = close_code(&mut a);
    assert_eq!(code, 1008);
    let acked = before.iter().filter(|m| matches!(m, ServerMsg::Ack { .. })).count();
    let mut reader = g.connect(&tb, Subprotocol::Json);
    let stored = reader.sync(vec![]).into_iter().filter(|m| m.kind == MessageKind::Text).count();
    assert!(stored >= 50, "the burst was stored ({stored})");
    assert_eq!(acked, stored, "every stored send was acked before the close");
}

#[test]
fn an_unsynced_connection_is_closed_at_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\nsync_deadline_secs = 3\n");
    let (_, t) = g.user("lurker");
    let mut lurker = g.connect(&t, Subprotocol::Json);
    let mut fine = g.connect(&t, Subprotocol::Json);
    fine.sync(vec![]);
    let (_, code) = close_code(&mut lurker);
    assert_eq!(code, 4010);
    assert!(matches!(fine.request(ClientMsg::Ping), ServerMsg::Pong), "a synced connection stays");
}

#[test]
fn one_user_has_a_connection_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\nmax_connections_per_user = 2\n");
    let (_, t) = g.user("hoarder");
    let (_, other) = g.user("bystander");
    let first = g.connect(&t, Subprotocol::Json);
    let _second = g.connect(&t, Subprotocol::Json);
    let upgrade = |token: &str| upgrade_raw(g.addr, token);
    let (status, body) = upgrade(&t);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    assert_eq!(upgrade(&other).0, 101, "other users are not affected");
    drop(first);
    eventually("a freed place", || upgrade(&t).0 == 101);
}

#[test]
fn sigterm_closes_connections_with_1001() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "");
    let (_, ta) = g.user("stayer");
    let (b, _) = g.user("stayee");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    a.send_text(conv, "last", "before shutdown");
    a.wait_ack("last");
    let status = g.terminate();
    assert!(status.success(), "{status:?}");
    let (_, code) = close_code(&mut a);
    assert_eq!(code, 1001);
}

/// Writes `raw` as one request and returns the status line's code and the whole answer.
fn raw_request(addr: std::net::SocketAddr, raw: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn http_framing_follows_rfc_9112() {
    let g = TestGateway::start();
    let body = r#"{"username":"nobody","password":"whatever1"}"#;
    let n = body.len();
    let login =
        |extra: &str| format!("POST /v1/login HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n{body}");
    // Conflicting lengths: the first must not win with the rest read as a second request.
    let (s, text) = raw_request(g.addr, &login(&format!("content-length: {n}\r\ncontent-length: 5\r\n")));
    assert_eq!(s, 400, "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "one answer, no smuggled second request: {text}");
    let (s, _) = raw_request(g.addr, &login(&format!("content-length: {n}, 5\r\n")));
    assert_eq!(s, 400, "a list of different lengths");
    let (s, _) = raw_request(g.addr, &login(&format!("content-length: +{n}\r\n")));
    assert_eq!(s, 400, "+N is not 1*DIGIT");
    let (s, text) = raw_request(g.addr, &login(&format!("content-length: {n}\r\ncontent-length: {n}\r\n")));
    assert_eq!(s, 401, "repeated equal lengths are one length: {text}");
    let (s, _) = raw_request(g.addr, "GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n");
    assert_eq!(s, 400, "HTTP/1.1 without Host");
    let (s, _) =
        raw_request(g.addr, "GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n");
    assert_eq!(s, 400, "two Hosts");
    let many: String = (0..60).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (s, text) =
        raw_request(g.addr, &format!("GET /healthz HTTP/1.1\r\nhost: a\r\n{many}connection: close\r\n\r\n"));
    assert_eq!(s, 200, "60 headers are fine: {text}");
    let lots: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (s, _) =
        raw_request(g.addr, &format!("GET /healthz HTTP/1.1\r\nhost: a\r\n{lots}connection: close\r\n\r\n"));
    assert_eq!(s, 431, "past 100 headers");
}

#[test]
fn metrics_can_live_on_their_own_address() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "metrics_listen = \"127.0.0.1:0\"\n");
    let m = g.metrics_addr.expect("the readiness line names the metrics address");
    assert_eq!(http_raw(g.addr, "GET", "/metrics", &[], None).0, 404, "not on the public port");
    let (s, text) = http_raw(m, "GET", "/metrics", &[], None);
    assert_eq!(s, 200);
    assert!(text.contains("switchboard_"), "{text}");
    assert_eq!(http_raw(m, "GET", "/readyz", &[], None).0, 200);
    assert_eq!(http_raw(m, "POST", "/v1/login", &[], Some("{}")).0, 404, "only metrics and health there");
    assert_eq!(http_raw(g.addr, "GET", "/healthz", &[], None).0, 200);
}

/// By default only someone a user has chatted with may add them to a group.
#[test]
fn group_adds_need_the_added_users_consent() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\ngroup_adds = \"contacts\"\n");
    let (_, ts) = g.user("spammer");
    let (v, tv) = g.user("victim");
    let (f, tf) = g.user("friend");
    let mut spammer = g.connect(&ts, Subprotocol::Json);
    spammer.sync(vec![]);
    let r = spammer.request(ClientMsg::CreateGroup { title: "buy now".into(), members: vec![v] });
    assert_eq!(error_code(r), 1015, "a stranger cannot add you");
    // Opening a direct chat is not consent either.
    let dm = conversation_id(&spammer.request(ClientMsg::CreateDirect { user_id: v }));
    spammer.send_text(dm, "hi", "hello friend");
    spammer.wait_ack("hi");
    let r = spammer.request(ClientMsg::CreateGroup { title: "buy now".into(), members: vec![v] });
    assert_eq!(error_code(r), 1015);
    let mut victim = g.connect(&tv, Subprotocol::Json);
    let listed = victim.sync(vec![]);
    assert!(listed.iter().all(|m| m.kind == MessageKind::Text), "no group was created: {listed:?}");

    // A friend the victim has written to may add them, with create_group or add_members.
    let mut friend = g.connect(&tf, Subprotocol::FlatBuffers);
    friend.sync(vec![]);
    let fdm = conversation_id(&victim.request(ClientMsg::CreateDirect { user_id: f }));
    victim.send_text(fdm, "yo", "hey");
    victim.wait_ack("yo");
    let group =
        conversation_id(&friend.request(ClientMsg::CreateGroup { title: "pals".into(), members: vec![v] }));
    let spam_group =
        conversation_id(&spammer.request(ClientMsg::CreateGroup { title: "ads".into(), members: vec![] }));
    let r = spammer.request(ClientMsg::AddMembers { conversation_id: spam_group, user_ids: vec![v] });
    assert_eq!(error_code(r), 1015, "add_members is held to the same rule");
    // Reading the spammer's message is consent: now they may.
    victim.send(ClientMsg::MarkRead { conversation_id: dm, seq: 1 });
    eventually("the read position to be stored", || {
        matches!(
            spammer.request(ClientMsg::AddMembers { conversation_id: spam_group, user_ids: vec![v] }),
            ServerMsg::Conversation { .. }
        )
    });
    assert!(group > 0);
}
