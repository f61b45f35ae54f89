//! Bad input gets a coded error and harms nothing else.

mod support;

use protocol::{ClientMsg, ServerMsg, Subprotocol};
use std::io::Write;
use support::*;
use tungstenite::Message;

fn error_code(m: &ServerMsg) -> u16 {
    match m {
        ServerMsg::Error { code, .. } => *code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// A masked client frame with an arbitrary payload, written straight to the socket.
fn raw_frame(c: &mut Client, opcode: u8, payload: &[u8]) {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    c.ws.get_mut().write_all(&f).unwrap();
}

struct World {
    g: TestGateway,
    _tmp: tempfile::TempDir,
    bystander: (Client, Client, u64),
    token: String,
    conv: u64,
}

/// A gateway, a user under test with one stored message, and two bystanders chatting.
fn world(extra: &str) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), extra);
    let (_, token) = g.user("tester");
    let (peer, _) = g.user("peer");
    let (_, t1) = g.user("by1");
    let (b2, t2) = g.user("by2");
    let mut c = g.connect(&token, Subprotocol::Json);
    c.sync(vec![]);
    let conv = conversation_id(&c.request(ClientMsg::CreateDirect { user_id: peer }));
    c.send_text(conv, "keep", "stored before the abuse");
    c.wait_ack("keep");
    let mut by1 = g.connect(&t1, Subprotocol::FlatBuffers);
    let mut by2 = g.connect(&t2, Subprotocol::Json);
    by1.sync(vec![]);
    by2.sync(vec![]);
    let bconv = conversation_id(&by1.request(ClientMsg::CreateDirect { user_id: b2 }));
    World { g, _tmp: tmp, bystander: (by1, by2, bconv), token, conv }
}

impl World {
    /// The bystanders still chat and the tester's stored message is intact.
    fn unharmed(&mut self, round: &str) {
        let (by1, by2, bconv) = &mut self.bystander;
        by1.send_text(*bconv, round, "still fine");
        by1.wait_ack(round);
        assert_eq!(by2.next_message().body, "still fine");
        let mut c = self.g.connect(&self.token, Subprotocol::FlatBuffers);
        match c.request(ClientMsg::History {
            conversation_id: self.conv,
            before: None,
            after: None,
            limit: Some(10),
        }) {
            ServerMsg::History { messages, .. } => {
                assert_eq!(messages.len(), 1);
                assert_eq!(messages[0].body, "stored before the abuse");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bad_json_frames_get_codes_and_the_connection_stays_usable() {
    let mut w = world("");
    let mut c = w.g.connect(&w.token, Subprotocol::Json);
    let cases: Vec<(Message, u16)> = vec![
        (Message::text("not json"), 1001),
        (Message::text(r#"{"type":"teleport"}"#), 1002),
        (Message::text(r#"{"type":"send","conversation_id":"1"}"#), 1001),
        (Message::text(r#"{"type":"history","conversation_id":"x"}"#), 1001),
        (Message::binary(vec![b'{', 0xff, 0xfe, b'}']), 1003),
        (Message::text(r#"[1,2,3]"#), 1001),
    ];
    for (msg, code) in cases {
        c.send_raw(msg.clone());
        assert_eq!(error_code(&c.recv().body), code, "{msg:?}");
        assert_eq!(c.request(ClientMsg::Ping), ServerMsg::Pong, "still usable after {msg:?}");
    }
    // Field-level errors on a send name the client_msg_id.
    c.send_text(w.conv, "", "empty id");
    assert_eq!(error_code(&c.recv().body), 1004);
    c.send(ClientMsg::Send {
        conversation_id: w.conv,
        client_msg_id: "big".into(),
        body: "x".repeat(16 * 1024 + 1),
        attachment: None,
    });
    match c.recv().body {
        ServerMsg::Error { code, client_msg_id, .. } => {
            assert_eq!((code, client_msg_id.as_deref()), (1005, Some("big")))
        }
        other => panic!("{other:?}"),
    }
    c.send_text(999, "nowhere", "hi");
    assert_eq!(error_code(&c.recv().body), 1010);
    w.unharmed("json");
}

#[test]
fn bad_flatbuffers_frames_get_codes_and_never_panic() {
    let mut w = world("");
    let mut c = w.g.connect(&w.token, Subprotocol::FlatBuffers);
    let mut junk = Vec::new();
    let mut x: u32 = 12345;
    for len in [0usize, 1, 3, 4, 8, 17, 64, 300] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        junk.push(bytes);
    }
    // A valid frame with every byte flipped in turn.
    let good = Subprotocol::FlatBuffers.encode_client(&protocol::ClientFrame {
        id: 9,
        body: ClientMsg::History { conversation_id: w.conv, before: Some(3), after: None, limit: Some(5) },
    });
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0xff;
        junk.push(b);
    }
    for bytes in junk {
        c.send_raw(Message::binary(bytes.clone()));
        // Each frame gets exactly one reply (the ping at the end proves none went missing):
        // an error, or the answer to a request that a flipped byte left valid.
        let f = c.recv();
        assert!(f.id != 0 || matches!(f.body, ServerMsg::Error { .. }), "{f:?}");
    }
    c.send_raw(Message::text("{\"type\":\"ping\"}"));
    assert_eq!(error_code(&c.recv().body), 1001, "text frames are not part of the binary subprotocol");
    // An unknown union member: a newer client's message type.
    let mut b = flatbuffers::FlatBufferBuilder::new();
    let body = protocol::generated::switchboard::v_1::PingReq::create(&mut b, &Default::default());
    let root = protocol::generated::switchboard::v_1::ClientFrame::create(
        &mut b,
        &protocol::generated::switchboard::v_1::ClientFrameArgs {
            id: 0,
            body_type: protocol::generated::switchboard::v_1::ClientBody(77),
            body: Some(body.as_union_value()),
        },
    );
    b.finish_minimal(root);
    c.send_raw(Message::binary(b.finished_data().to_vec()));
    assert_eq!(error_code(&c.recv().body), 1002);
    assert_eq!(c.request(ClientMsg::Ping), ServerMsg::Pong);
    w.unharmed("fb");
}

#[test]
fn invalid_utf8_text_frame_closes_with_1007_after_an_error_frame() {
    let mut w = world("");
    let mut c = w.g.connect(&w.token, Subprotocol::Json);
    raw_frame(&mut c, 0x1, &[b'{', 0xc3, 0x28, b'}']);
    let (before, code) = close_code(&mut c);
    assert_eq!(code, 1007);
    assert_eq!(before.iter().map(error_code).collect::<Vec<_>>(), vec![1003]);
    w.unharmed("utf8");
}

#[test]
fn oversized_frames_close_with_1009() {
    let mut w = world("[limits]\nmax_frame_bytes = 4096\nmax_body_bytes = 1024\n");
    for p in both() {
        let mut c = w.g.connect(&w.token, p);
        raw_frame(&mut c, if p == Subprotocol::Json { 0x1 } else { 0x2 }, &vec![b'a'; 5000]);
        let (before, code) = close_code(&mut c);
        assert_eq!(code, 1009, "{p:?}");
        assert_eq!(before.iter().map(error_code).collect::<Vec<_>>(), vec![1006], "{p:?}");
    }
    w.unharmed("big");
}
