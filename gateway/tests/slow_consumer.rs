//! A client that stops reading is cut off; nobody else waits for it.

mod support;

use protocol::{ClientMsg, Subprotocol};
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use support::*;

#[test]
fn slow_consumer_is_closed_and_others_are_unaffected() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\nmax_out_bytes = 4194304\n");
    let (slow_id, ts) = g.user("slowpoke");
    let (fast_id, tf) = g.user("speedy");
    let (_, tw) = g.user("writer");
    let mut writer = g.connect(&tw, Subprotocol::FlatBuffers);
    writer.sync(vec![]);
    let gid = conversation_id(
        &writer.request(ClientMsg::CreateGroup { title: "firehose".into(), members: vec![slow_id, fast_id] }),
    );
    let mut slow = g.connect(&ts, Subprotocol::FlatBuffers);
    slow.sync(vec![]);
    let mut fast = g.connect(&tf, Subprotocol::FlatBuffers);
    fast.sync(vec![]);
    // From here on `slow` reads nothing.

    let n = 12_000u64;
    // 24 MB: more than the slow socket's kernel buffers plus its 4 MiB queue.
    let body = "x".repeat(2000);
    // The writer stays at most WINDOW messages (1 MB) ahead of the fast reader,
    // so `fast` is a reader that keeps up however slow this test client is; only
    // `slow` falls behind, by the whole 24 MB.
    const WINDOW: u64 = 500;
    let read = Arc::new((Mutex::new(0u64), Condvar::new()));
    let seen = read.clone();
    let pump = std::thread::spawn(move || {
        for i in 0..n {
            let (lock, cv) = &*seen;
            let _g = cv.wait_while(lock.lock().unwrap(), |r| i >= *r + WINDOW).unwrap();
            writer.send_text(gid, &format!("f{i}"), &body);
        }
        writer.wait_ack(&format!("f{}", n - 1))
    });
    let mut expect = 2;
    while expect <= n + 1 {
        let m = fast.next_message();
        assert_eq!(m.seq, expect, "the fast reader gets everything, in order");
        expect += 1;
        let (lock, cv) = &*read;
        *lock.lock().unwrap() += 1;
        cv.notify_one();
    }
    assert_eq!(pump.join().unwrap(), n + 1, "the sender was never held up");

    // The slow socket ends (4008 close frame, or a bare close if it was cut mid-frame).
    let mut stream = slow.ws.get_ref().try_clone().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                tail.extend_from_slice(&buf[..k]);
                if tail.len() > 64 {
                    tail.drain(..tail.len() - 64);
                }
            }
        }
    }
    let log = g.log();
    assert_eq!(log.matches("slow consumer").count(), 1, "one log line:\n{log}");
    // Reconnecting and syncing brings back everything, in order.
    let mut again = g.connect(&ts, Subprotocol::Json);
    let replay = again.sync(vec![]);
    assert_eq!(replay.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=n + 1).collect::<Vec<_>>());
}
