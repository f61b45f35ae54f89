//! The epoll fallback driver serves the same protocol.

mod support;

use protocol::{ClientMsg, Subprotocol};
use support::*;

#[test]
fn epoll_driver_serves_chat_and_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_with_args(tmp.path(), "", &["--io-driver", "epoll"]);
    assert!(g.log().contains("io_driver=\"epoll\"") || g.log().contains("epoll"), "{}", g.log());
    let (_, ta) = g.user("anna");
    let (b, tb) = g.user("boris");
    let mut ca = g.connect(&ta, Subprotocol::Json);
    ca.sync(vec![]);
    let conv = conversation_id(&ca.request(ClientMsg::CreateDirect { user_id: b }));
    for i in 0..300 {
        ca.send_text(conv, &format!("e{i}"), "over epoll");
    }
    ca.wait_ack("e299");
    let mut cb = g.connect(&tb, Subprotocol::FlatBuffers);
    let replay = cb.sync(vec![]);
    assert_eq!(replay.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=300).collect::<Vec<_>>());
}
