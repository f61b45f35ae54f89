//! A node's lifecycle as an operator drives it: readiness, the drain on SIGTERM,
//! the config reload on SIGHUP.

mod support;

use protocol::{ClientMsg, Subprotocol};
use support::*;

/// SIGTERM: `/readyz` fails first while the node still serves everyone (so the
/// balancer takes it out before anyone is closed), then every connection gets
/// 1001 telling it to reconnect, and the process exits by itself, successfully.
/// What was acknowledged, even during the drain, is in history after a restart.
#[test]
fn sigterm_fails_readiness_first_then_closes_with_1001_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[limits]\ndrain_notice_ms = 4000\nshutdown_grace_secs = 30\n";
    let g = TestGateway::start_in(tmp.path(), config);
    let (_, ta) = g.user("drainer");
    let (b, tb) = g.user("drainee");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    assert_eq!(g.readyz(), (200, String::new()), "ready before the signal");

    g.signal(libc::SIGTERM);
    eventually("readiness fails", || g.readyz() == (503, "draining for shutdown".into()));
    assert_eq!(g.http("GET", "/healthz", None).0, 200, "alive while draining");
    // Still serving during the notice: a send is acknowledged, a new device connects and syncs.
    a.send_text(conv, "during", "sent while draining");
    a.wait_ack("during");
    let mut other = g.connect(&tb, Subprotocol::FlatBuffers);
    let got: Vec<String> = other.sync(vec![]).into_iter().map(|m| m.body).collect();
    assert!(got.contains(&"sent while draining".to_string()), "{got:?}");

    for c in [&mut a, &mut other] {
        let (_, code, reason) = close_frame(c);
        assert_eq!(code, 1001);
        assert!(reason.contains("reconnect"), "the close says what to do: {reason:?}");
    }
    let status = g.wait_exit();
    assert!(status.success(), "{status:?}");

    let g = TestGateway::start_in(tmp.path(), config);
    let (_, l) = g.login("drainee", "password123");
    let mut c = g.connect(l["token"].as_str().unwrap(), Subprotocol::Json);
    let got: Vec<String> = c.sync(vec![]).into_iter().map(|m| m.body).collect();
    assert!(got.contains(&"sent while draining".to_string()), "acknowledged during the drain, kept: {got:?}");
}

fn metric(g: &TestGateway, line: &str) -> bool {
    http_raw(g.addr, "GET", "/metrics", &[], None).1.lines().any(|l| l == line)
}

/// SIGHUP rereads the file: new rate limits apply to connections already open,
/// a change that needs a restart is named (log and metric) and left alone, a
/// file that does not parse changes nothing, and the log filter reloads too.
#[test]
fn sighup_applies_rate_limits_and_names_what_needs_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[limits]\nsend_per_sec = 1\nsend_burst = 2\n");
    let (_, ta) = g.user("reloader");
    let (b, _) = g.user("reloadee");
    let mut a = g.connect(&ta, Subprotocol::Json);
    a.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    let send = |a: &mut Client, id: &str| {
        a.send_text(conv, id, "hello");
        a.ack_or_error(id)
    };
    assert!(send(&mut a, "m0").is_ok() && send(&mut a, "m1").is_ok());
    assert_eq!(send(&mut a, "m2"), Err(1021), "a burst of 2");

    let path = g.dir.join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("send_burst = 2"), "{text}");
    std::fs::write(&path, format!("node_id = 7\n{}", text.replace("send_burst = 2", "send_burst = 50")))
        .unwrap();
    g.signal(libc::SIGHUP);
    eventually("the reload", || metric(&g, r#"switchboard_config_reloads_total{result="applied"} 1"#));
    assert!(metric(&g, "switchboard_config_restart_pending 1"), "node_id waits for a restart");
    let log = g.log();
    assert!(log.contains("take effect only on a restart") && log.contains("node_id"), "{log}");
    for i in 0..10 {
        assert!(send(&mut a, &format!("n{i}")).is_ok(), "the new burst, on the same connection");
    }

    // A file that does not parse: nothing changes.
    std::fs::write(&path, "listen = 5\n").unwrap();
    g.signal(libc::SIGHUP);
    eventually("the failed reload", || metric(&g, r#"switchboard_config_reloads_total{result="failed"} 1"#));
    assert!(send(&mut a, "after-bad").is_ok(), "the limits in force stay");
    assert!(metric(&g, "switchboard_config_restart_pending 1"));

    // The log filter: at `warn`, the reload's own info line is no longer written.
    let quiet = format!("log = \"warn\"\nnode_id = 7\n{}", text.replace("send_burst = 2", "send_burst = 50"));
    std::fs::write(&path, quiet).unwrap();
    g.signal(libc::SIGHUP);
    eventually("the third reload", || metric(&g, r#"switchboard_config_reloads_total{result="applied"} 2"#));
    assert_eq!(g.log().matches("config reloaded (SIGHUP)").count(), 1, "{}", g.log());
    assert!(send(&mut a, "still").is_ok(), "the connection outlives every reload");
}

#[test]
fn check_config_says_what_reloads_and_what_needs_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = gateway_cmd(tmp.path(), "[limits]\nsend_burst = 7\n", &["--check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("send_burst = 7"), "{out}");
    assert!(err.contains("reloaded on SIGHUP") && err.contains("limits.send_burst"), "{err}");
    assert!(err.contains("only on a restart"), "{err}");
    let (ok, _, err) = gateway_cmd(tmp.path(), "log = \"[[[\"\n", &["--check-config"]);
    assert!(!ok && err.contains("not a log filter"), "{err}");
    let (ok, _, err) = gateway_cmd(
        tmp.path(),
        "[limits]\ndrain_notice_ms = 9000\nshutdown_grace_secs = 5\n",
        &["--check-config"],
    );
    assert!(!ok && err.contains("drain_notice_ms"), "{err}");
}

#[test]
fn health_answers_on_both_paths() {
    let g = TestGateway::start();
    assert_eq!(g.readyz(), (200, String::new()));
    let (status, body) = g.http("GET", "/healthz", None);
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
}

/// Under systemd (`Type=notify`, deploy/systemd): the gateway says READY=1 once
/// it serves, RELOADING=1 (with the monotonic time systemd 253+ needs) then
/// READY=1 around a SIGHUP, and STOPPING=1 when it starts draining.
#[test]
fn tells_systemd_ready_reloading_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let g = TestGateway::start_with_env(tmp.path(), "", &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    assert_eq!(next(), "READY=1\n");
    assert_eq!(g.http("GET", "/readyz", None).0, 200, "serving by the time it said so");
    g.signal(libc::SIGHUP);
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading:?}");
    assert_eq!(next(), "READY=1\n");
    g.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
    assert!(g.wait_exit().success());
}
