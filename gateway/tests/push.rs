//! Push fallback through the real gateway, against a real local HTTP receiver:
//! offline members only, muted conversations skipped, a burst coalesced into one
//! notification with a count, retries with one idempotency key, and the log backend.

mod support;

use protocol::{ClientMsg, PresenceInfo, ServerMsg, Subprotocol};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use support::*;

/// One POST the receiver got: its `Idempotency-Key` and JSON body.
type Received = (String, serde_json::Value);

/// A real HTTP/1.1 server on a free loopback port. Answers each request with the
/// next scripted status (200 once the script is used up) and reports every request.
struct Receiver_ {
    url: String,
    got: Receiver<Received>,
}

fn receiver(script: Vec<u16>) -> Receiver_ {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/notify", l.local_addr().unwrap());
    let (tx, got) = channel();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut len, mut key, mut line) = (0usize, String::new(), String::new());
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("POST /notify "), "{line}");
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "idempotency-key" => key = v.trim().to_owned(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let status = script.lock().unwrap().pop_front().unwrap_or(200);
            let mut w = s;
            write!(w, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            let _ = tx.send((key, serde_json::from_slice(&body).unwrap()));
        }
    });
    Receiver_ { url, got }
}

impl Receiver_ {
    fn next(&self) -> Received {
        self.got.recv_timeout(TIMEOUT).expect("a notification within the timeout")
    }
}

fn webhook(url: &str, coalesce_ms: u64) -> String {
    format!(
        "[push]\nbackend = \"webhook\"\nwebhook_url = \"{url}\"\ncoalesce_ms = {coalesce_ms}\nbackoff_ms = 20\n[presence]\ngrace_ms = 50\n"
    )
}

/// Waits until `watcher` hears that `user` went offline: the gateway has let go of its devices.
fn wait_offline(watcher: &mut Client, user: u64) {
    watcher.wait_for(|m| {
        matches!(m, ServerMsg::Presence { presence: PresenceInfo { user_id, online: false, .. } } if *user_id == user)
    });
}

fn id(v: &serde_json::Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn offline_members_get_one_notification_per_burst_and_muted_conversations_none() {
    let rx = receiver(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), &webhook(&rx.url, 2000));
    let (_, ta) = g.user("alice");
    let (b, tb) = g.user("bob");
    let (c, tc) = g.user("carol");
    let mut alice = g.connect(&ta, Subprotocol::Json);
    alice.sync(vec![]);
    let mut carol = g.connect(&tc, Subprotocol::FlatBuffers);
    carol.sync(vec![]);
    let group =
        conversation_id(&alice.request(ClientMsg::CreateGroup { title: "g".into(), members: vec![b, c] }));
    let muted =
        conversation_id(&alice.request(ClientMsg::CreateGroup { title: "m".into(), members: vec![b] }));
    let direct = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));
    // bob mutes one group from his phone, then goes offline.
    let mut bob = g.connect(&tb, Subprotocol::FlatBuffers);
    bob.sync(vec![]);
    assert_eq!(bob.request(ClientMsg::Mute { conversation_id: muted, muted: true }), ServerMsg::Ok);
    drop(bob);
    wait_offline(&mut carol, b);

    // A burst: 50 messages to the group, 5 to the muted one, interleaved.
    for i in 0..50 {
        alice.send_text(group, &format!("g{i}"), &format!("burst {i}"));
        if i % 10 == 0 {
            alice.send_text(muted, &format!("m{i}"), "muted");
        }
    }
    let last = alice.wait_ack("g49");
    let (key, n) = rx.next();
    assert_eq!(id(&n["user_id"]), b, "only bob is offline: {n}");
    assert_eq!(n["count"], 50, "one notification for the burst, muted messages left out: {n}");
    assert_eq!(n["conversations"].as_array().unwrap().len(), 1, "{n}");
    assert_eq!(id(&n["conversations"][0]["conversation_id"]), group);
    assert_eq!(n["conversations"][0]["count"], 50);
    assert_eq!(n["conversations"][0]["last_seq"], last);
    assert_eq!(id(&n["latest"]["conversation_id"]), group);
    assert_eq!(n["latest"]["seq"], last);
    assert_eq!(n["latest"]["preview"], "burst 49");
    assert_eq!(key, n["id"].as_str().unwrap(), "the idempotency key is the notification id");

    // The next message after the window is a notification of its own, with a count of 1.
    alice.send_text(direct, "d1", "are you there?");
    let d = alice.wait_ack("d1");
    let (_, n) = rx.next();
    assert_eq!((id(&n["user_id"]), n["count"].as_u64()), (b, Some(1)), "{n}");
    assert_eq!((id(&n["latest"]["conversation_id"]), n["latest"]["seq"].as_u64()), (direct, Some(d)));
    // carol, connected throughout, was never notified (every notification so far was bob's).
    assert!(rx.got.try_recv().is_err());
}

#[test]
fn failed_deliveries_are_retried_with_one_idempotency_key() {
    let rx = receiver(vec![503, 500]);
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), &webhook(&rx.url, 100));
    let (_, ta) = g.user("alice");
    let (b, _) = g.user("bob");
    let mut alice = g.connect(&ta, Subprotocol::FlatBuffers);
    alice.sync(vec![]);
    let direct = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));
    alice.send_text(direct, "x", "hello");
    alice.wait_ack("x");
    let tries: Vec<Received> = (0..3).map(|_| rx.next()).collect();
    assert!(tries.iter().all(|t| t == &tries[0]), "the same notification, the same key: {tries:?}");
    assert_eq!(id(&tries[0].1["user_id"]), b);
    // The gateway counts the success once it has read the answer; wait for that.
    let metrics = || http_raw(g.addr, "GET", "/metrics", &[], None).1;
    eventually("the success to be counted", || metrics().contains("switchboard_push_webhook_sent_total 1"));
    let m = metrics();
    assert!(m.contains("switchboard_push_webhook_retries_total 2"), "{m}");
    assert!(m.contains("switchboard_push_webhook_failed_total 0"), "{m}");
}

#[test]
fn the_default_log_backend_writes_one_line_per_notification() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[push]\ncoalesce_ms = 1000\n");
    let (_, ta) = g.user("alice");
    let (b, _) = g.user("bob");
    let mut alice = g.connect(&ta, Subprotocol::Json);
    alice.sync(vec![]);
    let direct = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b }));
    for i in 0..3 {
        alice.send_text(direct, &format!("x{i}"), "hello");
    }
    alice.wait_ack("x2");
    eventually("a push line in the log", || g.log().contains("push notification"));
    let log = g.log();
    let line = log.lines().find(|l| l.contains("push notification")).unwrap();
    assert!(line.contains(&format!("user={b}")) && line.contains("count=3"), "{line}");
}
