//! Resource exhaustion: the open-files limit, and floods of logins and registrations.

mod support;

use protocol::{ClientMsg, Subprotocol};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use support::*;

/// Lets this test process hold many sockets (the soft limit up to the hard one).
fn raise_own_nofile() {
    // SAFETY: get/setrlimit on a valid, initialised rlimit.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// What a socket has said so far without blocking: `None` while it is silent and open.
fn said(s: &mut TcpStream) -> Option<String> {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => Some(format!("error: {e}")),
    }
}

#[test]
fn at_the_open_files_limit_the_store_keeps_writing() {
    raise_own_nofile();
    let tmp = tempfile::tempdir().unwrap();
    // 1024 descriptors, 512 kept back for the store and the rest: at most 512 sockets.
    let g = TestGateway::start_with_nofile(tmp.path(), "[limits]\nhttp_header_timeout_secs = 300\n", 1024);
    let (_, ta) = g.user("steady");
    let (b, tb) = g.user("steadypeer");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let mut bc = g.connect(&tb, Subprotocol::Json);
    bc.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));

    // Idle sockets, no login needed: far more than the cap.
    let mut idle: Vec<TcpStream> = (0..800).map(|_| TcpStream::connect(g.addr).unwrap()).collect();
    let mut refused = vec![false; idle.len()];
    eventually("the sockets past the cap to be answered", || {
        for (s, r) in idle.iter_mut().zip(refused.iter_mut()) {
            if !*r && let Some(text) = said(s) {
                assert!(text.starts_with("HTTP/1.1 503"), "a refused socket is told why: {text:?}");
                *r = true;
            }
        }
        refused.iter().filter(|r| **r).count() >= 800 + 2 - 512
    });
    let fds = open_fds(g.pid());
    assert!(fds <= 1024 - 256, "the reserve stays free: {fds} descriptors open");

    // The store still writes, and the chat still works.
    a.send_text(conv, "during", "sent at the cap");
    assert_eq!(a.wait_ack("during"), 1);
    assert_eq!(bc.next_message().body, "sent at the cap");
    let warnings = g.log().matches("at the socket cap").count();
    assert!((1..=3).contains(&warnings), "rate-limited logging, not a line per refusal: {warnings}");

    drop(idle);
    eventually("readiness once the sockets leave", || http_raw(g.addr, "GET", "/readyz", &[], None).0 == 200);
    let (_, tc) = g.user("latecomer");
    let mut c = g.connect(&tc, Subprotocol::Json);
    c.sync(vec![]);
    a.send_text(conv, "after", "sent after");
    assert_eq!(a.wait_ack("after"), 2);
    assert_eq!(http_raw(g.addr, "GET", "/healthz", &[], None).0, 200);
}

/// One request from `from` (a loopback address of our choosing).
fn post_from(from: &str, addr: SocketAddr, path: &str, body: &str) -> u16 {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn failed_logins_lock_the_account_with_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(
        tmp.path(),
        "[auth]\nlogin_free_failures_per_account = 3\nlogin_backoff_ms = 3000\n",
    );
    g.user("victim");
    g.user("neighbour");
    for i in 0..4 {
        assert_eq!(g.login("victim", "wrongwrong").0, 401, "attempt {i} is judged");
    }
    let (s, r) = g.login("Victim", "password123");
    assert_eq!(s, 429, "locked, even with the right password, and case does not dodge it: {r}");
    assert_eq!(r["error"]["name"], "too_many_attempts");
    assert!(r["error"]["retry_after_secs"].as_u64().unwrap() >= 1);
    assert_eq!(g.login("neighbour", "password123").0, 200, "other accounts are unaffected");
    eventually("the lock to expire", || g.login("victim", "password123").0 == 200);
    assert_eq!(g.login("victim", "wrongwrong").0, 401, "a success starts the count afresh");
}

#[test]
fn failed_logins_lock_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(
        tmp.path(),
        "[auth]\nlogin_free_failures_per_address = 5\nlogin_backoff_ms = 60000\n",
    );
    g.user("someone");
    let guess = |i: u32| format!(r#"{{"username":"guess{i}","password":"wrongwrong"}}"#);
    for i in 0..6 {
        assert_eq!(post_from("127.0.0.2", g.addr, "/v1/login", &guess(i)), 401);
    }
    assert_eq!(
        post_from("127.0.0.2", g.addr, "/v1/login", &guess(99)),
        429,
        "the guessing address is locked"
    );
    let ok = r#"{"username":"someone","password":"password123"}"#;
    assert_eq!(post_from("127.0.0.3", g.addr, "/v1/login", ok), 200, "other addresses are not");
}

/// 300 connections from one address hammer registration with production-cost hashing;
/// logins from elsewhere still succeed, because the hashing queue is shared fairly.
#[test]
fn a_flood_from_one_address_does_not_starve_other_logins() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[auth]\nargon2_memory_kib = 19456\nargon2_iterations = 2\n");
    g.user("legit");
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, too_many) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let addr = g.addr;
    let flood: Vec<_> = (0..300)
        .map(|t| {
            let (stop, sent, too_many) = (stop.clone(), sent.clone(), too_many.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!(r#"{{"username":"fl{t}x{i}","password":"password123"}}"#);
                    if post_from("127.0.0.2", addr, "/v1/register", &body) == 429 {
                        too_many.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    eventually("the flood to be under way", || sent.load(Ordering::Relaxed) >= 600);
    let ok = r#"{"username":"legit","password":"password123"}"#;
    let answers: Vec<u16> = (0..5).map(|_| post_from("127.0.0.1", addr, "/v1/login", ok)).collect();
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    assert_eq!(answers, [200; 5], "every legitimate login during the flood succeeds");
    assert!(too_many.load(Ordering::Relaxed) > 0, "the flooding address was held to its share");
}
