mod support;
use protocol::{ClientMsg, ServerMsg, Subprotocol};
use support::*;

#[test]
fn smoke() {
    let g = TestGateway::start();
    let (a, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let mut ca = g.connect(&ta, Subprotocol::Json);
    let mut cb = g.connect(&tb, Subprotocol::FlatBuffers);
    assert!(ca.sync(vec![]).is_empty());
    assert!(cb.sync(vec![]).is_empty());
    let conv = conversation_id(&ca.request(ClientMsg::CreateDirect { user_id: b }));
    ca.send_text(conv, "m1", "hello bob");
    assert_eq!(ca.wait_ack("m1"), 1);
    let m = cb.next_message();
    assert_eq!((m.body.as_str(), m.sender_id, m.seq), ("hello bob", a, 1));
    let _ = ServerMsg::Ok;
}
