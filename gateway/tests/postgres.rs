//! The PostgreSQL backend from an operator's side: `gateway migrate`, the schema
//! check at start-up, and a second node taking over on the same database. Runs
//! a real PostgreSQL server (see `storage::testkit`); the whole end-to-end suite
//! also runs on PostgreSQL under `SWITCHBOARD_TEST_STORE=postgres`.

mod support;

use protocol::{ClientMsg, ServerMsg, Subprotocol};
use storage::testkit::TestPostgres;
use support::*;

fn storage_toml(url: &str, migrate_on_start: bool) -> String {
    format!(
        "[storage]\nbackend = \"postgres\"\nmigrate_on_start = {migrate_on_start}\n[storage.postgres]\nurl = \"{url}\"\n"
    )
}

#[test]
fn migrate_applies_the_schema_once_and_start_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let url = TestPostgres::shared().fresh_database();

    // Without the schema and without migrate_on_start, the node refuses to start and says why.
    let (ok, _, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["--listen", "127.0.0.1:0"]);
    assert!(!ok, "started on an empty database");
    assert!(err.contains("schema is at version 0") && err.contains("gateway migrate"), "{err}");

    let (ok, out, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("applied [1]") && out.contains("version 1"), "{out}");
    let (ok, out, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("applied []"), "a second migrate applies nothing: {out}");

    // Now it starts without migrating, and works.
    let g = TestGateway::start_in(tmp.path(), &storage_toml(&url, false));
    let (status, _) = g.register("petra", "password123");
    assert_eq!(status, 201);

    // A bad URL is a config error, before anything connects.
    let (ok, _, err) = gateway_cmd(tmp.path(), &storage_toml("nonsense://x", false), &["--check-config"]);
    assert!(!ok && err.contains("storage.postgres.url"), "{err}");
}

/// Node A stores history and dies; node B, another process on another data
/// directory, serves it from the shared database and continues the positions.
#[test]
fn a_second_node_serves_the_shared_history() {
    let url = TestPostgres::shared().fresh_database();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestGateway::start_in(dir_a.path(), &storage_toml(&url, true));
    let (_, tz) = a.user("zoe");
    let (y, _) = a.user("yuri");
    let mut c = a.connect(&tz, Subprotocol::FlatBuffers);
    c.sync(vec![]);
    let conv = conversation_id(&c.request(ClientMsg::CreateDirect { user_id: y }));
    for i in 0..120 {
        c.send_text(conv, &format!("m{i}"), &format!("body {i}"));
    }
    for i in 0..120 {
        c.wait_ack(&format!("m{i}"));
    }
    a.kill9();

    let b = TestGateway::start_in(dir_b.path(), &storage_toml(&url, true));
    let (status, l) = b.login("zoe", "password123");
    assert_eq!(status, 200, "accounts are shared: {l}");
    let mut c = b.connect(l["token"].as_str().unwrap(), Subprotocol::Json);
    c.sync(vec![protocol::Position { conversation_id: conv, seq: 120 }]);
    let ServerMsg::History { messages, has_more, .. } =
        c.request(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: Some(100) })
    else {
        panic!("expected history")
    };
    assert!(has_more);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (21..=120).rev().collect::<Vec<_>>());
    assert_eq!(messages[0].body, "body 119");
    // Idempotency keys are shared too: a resend of m5 is acked with its old position.
    c.send_text(conv, "m5", "body 5");
    assert_eq!(c.wait_ack("m5"), 6);
    c.send_text(conv, "new", "after the move");
    assert_eq!(c.wait_ack("new"), 121, "positions continue where node A stopped");
}
