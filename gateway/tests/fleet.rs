//! A real fleet: three gateway processes sharing one PostgreSQL database and one
//! redis-server (each started by the test on a free loopback port). Users whose
//! devices sit on different nodes chat 1:1 and in a group, and a device
//! reconnects to another node and syncs what it missed.

mod support;

use protocol::{ClientMsg, Position, ServerMsg, Subprotocol};
use router::testkit::TestRedis;
use support::{Client, TestGateway, conversation_id, eventually, http_raw};

struct Fleet {
    nodes: Vec<TestGateway>,
    _redis: TestRedis,
    _dirs: Vec<tempfile::TempDir>,
}

fn fleet(redis: TestRedis) -> Fleet {
    let url = storage::testkit::TestPostgres::shared().fresh_database();
    let o = redis.options();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=3u16 {
        let dir = tempfile::tempdir().unwrap();
        let extra = format!(
            "node_id = {id}\n[storage]\nbackend = \"postgres\"\nmigrate_on_start = true\n[storage.postgres]\nurl = {url:?}\npool_size = 4\n\
             [fleet]\nredis_url = {:?}\nredis_cluster = {}\nheartbeat_ms = 200\nttl_ms = 1000\nredis_timeout_ms = 400\n",
            o.redis_url, o.cluster
        );
        // One at a time: the first applies the schema.
        nodes.push(TestGateway::start_in(dir.path(), &extra));
        dirs.push(dir);
    }
    for n in &nodes {
        eventually("every node sees three live nodes", || {
            http_raw(n.addr, "GET", "/metrics", &[], None).1.contains("switchboard_fleet_nodes 3")
        });
    }
    Fleet { nodes, _redis: redis, _dirs: dirs }
}

impl Fleet {
    fn device(&self, token: &str, node: usize, proto: Subprotocol) -> Client {
        let mut c = self.nodes[node].connect(token, proto);
        c.sync(Vec::new());
        c
    }
}

/// 1:1 and group chat across nodes, then a reconnect to another node.
fn chat_across_nodes(f: &Fleet) {
    let (a_id, a) = f.nodes[0].user("alice");
    let (b_id, b) = f.nodes[1].user("bob");
    let (c_id, c) = f.nodes[2].user("carol");
    let mut alice = f.device(&a, 0, Subprotocol::Json);
    let mut bob = f.device(&b, 1, Subprotocol::FlatBuffers);
    let mut carol = f.device(&c, 2, Subprotocol::Json);
    let carol2 = f.device(&c, 0, Subprotocol::FlatBuffers);

    let direct = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b_id }));
    assert_eq!(conversation_id(&bob.request(ClientMsg::CreateDirect { user_id: a_id })), direct);
    for i in 0..20 {
        alice.send_text(direct, &format!("a{i}"), &format!("hello {i}"));
    }
    let acks: Vec<u64> = (0..20).map(|i| alice.wait_ack(&format!("a{i}"))).collect();
    assert_eq!(acks, (1..=20).collect::<Vec<_>>());
    let got: Vec<String> = (0..20).map(|_| bob.next_message().body).collect();
    assert_eq!(got, (0..20).map(|i| format!("hello {i}")).collect::<Vec<_>>(), "in order, once each");

    // Receipts, typing and reactions cross nodes.
    bob.send(ClientMsg::MarkRead { conversation_id: direct, seq: 20 });
    let r = alice.wait_for(|m| matches!(m, ServerMsg::Receipt { user_id, .. } if *user_id == b_id));
    assert!(matches!(r, ServerMsg::Receipt { read_seq: 20, .. }), "{r:?}");
    bob.send(ClientMsg::Typing { conversation_id: direct, typing: true });
    let t = alice.wait_for(|m| matches!(m, ServerMsg::Typing { .. }));
    assert!(matches!(t, ServerMsg::Typing { user_id, typing: true, .. } if user_id == b_id), "{t:?}");
    let ok = bob.request(ClientMsg::React { conversation_id: direct, seq: 3, emoji: "👍".into() });
    assert_eq!(ok, ServerMsg::Ok);
    let re = alice.wait_for(|m| matches!(m, ServerMsg::Reaction { .. }));
    assert!(matches!(re, ServerMsg::Reaction { seq: 3, user_id, .. } if user_id == b_id), "{re:?}");

    // A group with a member on every node (and carol on two): one order for all.
    let group = conversation_id(
        &carol.request(ClientMsg::CreateGroup { title: "fleet".into(), members: vec![a_id, b_id] }),
    );
    let mut devices = [alice, bob, carol, carol2];
    for (i, d) in devices.iter_mut().enumerate() {
        for j in 0..10 {
            d.send_text(group, &format!("g{i}-{j}"), &format!("g{i}-{j}"));
        }
    }
    for (i, d) in devices.iter_mut().enumerate() {
        for j in 0..10 {
            d.wait_ack(&format!("g{i}-{j}"));
        }
    }
    let mut reader = f.nodes[1].connect(&a, Subprotocol::Json);
    let history: Vec<String> = reader
        .sync(Vec::new())
        .into_iter()
        .filter(|m| m.conversation_id == group && m.kind == protocol::MessageKind::Text)
        .map(|m| m.body)
        .collect();
    assert_eq!(history.len(), 40, "every acknowledged send is stored once");
    for (i, d) in devices.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < 30 {
            let m = d.next_message();
            if m.conversation_id == group && m.kind == protocol::MessageKind::Text {
                seen.push(m.body);
            }
        }
        let own = format!("g{i}-");
        let expected: Vec<&String> = history.iter().filter(|b| !b.starts_with(&own)).collect();
        assert_eq!(seen.iter().collect::<Vec<_>>(), expected, "device {i} sees history's order");
    }

    // Bob leaves node 2; alice writes; bob comes back on node 3 and syncs from where he was.
    let [mut alice, bob, ..] = devices;
    drop(bob);
    for i in 0..5 {
        alice.send_text(direct, &format!("late{i}"), &format!("late {i}"));
        alice.wait_ack(&format!("late{i}"));
    }
    let mut bob = f.nodes[2].connect(&b, Subprotocol::Json);
    let missed: Vec<String> = bob
        .sync(vec![
            Position { conversation_id: direct, seq: 20 },
            Position { conversation_id: group, seq: history.len() as u64 + 1 },
        ])
        .into_iter()
        .filter(|m| m.conversation_id == direct && m.kind == protocol::MessageKind::Text)
        .map(|m| m.body)
        .collect();
    assert_eq!(missed, (0..5).map(|i| format!("late {i}")).collect::<Vec<_>>());
    // And live again, now through node 3.
    alice.send_text(direct, "live", "live");
    alice.wait_ack("live");
    assert_eq!(bob.next_message().body, "live");
    let _ = c_id;
}

#[test]
fn users_on_different_nodes_chat_over_one_redis() {
    let f = fleet(TestRedis::start());
    chat_across_nodes(&f);
}

#[test]
fn users_on_different_nodes_chat_over_a_redis_cluster() {
    let f = fleet(TestRedis::start_cluster());
    chat_across_nodes(&f);
}
