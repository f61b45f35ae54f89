//! The fleet's seams, proven before Redis: three gateway instances in this one
//! process share one store and an in-memory fleet (`fleet::memory`). Users whose
//! devices sit on different nodes chat 1:1 and in a group; commands go to the
//! conversation's owner, answers come back to the asking connection's node, and
//! events go only to nodes that host a recipient.

mod support;

use gateway::fleet::memory::MemoryFleet;
use gateway::server::{Parts, Running};
use protocol::{ClientMsg, ServerMsg, Subprotocol};
use router::{Key, NodeId, Ring};
use std::sync::Arc;
use support::{ADMIN, Client, SECRET, conversation_id, http_raw};

struct Fleet {
    nodes: Vec<Running>,
    mem: MemoryFleet,
    _dirs: Vec<tempfile::TempDir>,
}

const NODES: [NodeId; 3] = [1, 2, 3];

fn fleet() -> Fleet {
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn storage::Store> = Arc::new(storage::FjallStore::open(store_dir.path()).unwrap());
    let mem = MemoryFleet::new();
    let mut dirs = vec![store_dir];
    let mut nodes = Vec::new();
    for id in NODES {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "listen = \"127.0.0.1:0\"\nshards = 1\nnode_id = {id}\ndata_dir = {:?}\n[auth]\ntoken_secret = \"{SECRET}\"\nadmin_secret = \"{ADMIN}\"\nargon2_memory_kib = 256\nargon2_iterations = 1\n[limits]\ngroup_adds = \"anyone\"\n",
            dir.path()
        );
        let cfg: gateway::config::Config = toml::from_str(&text).unwrap();
        let parts = Parts { store: Some(store.clone()), links: Some(mem.links(id)) };
        nodes.push(gateway::server::start_with(cfg, parts).unwrap());
        dirs.push(dir);
    }
    // Every node's ring holds all three once each has beaten once more.
    support::eventually("every node sees the whole ring", || {
        nodes.iter().all(|n| n.shared.router.ring().nodes() == NODES)
    });
    Fleet { nodes, mem, _dirs: dirs }
}

impl Fleet {
    fn node(&self, id: NodeId) -> &Running {
        &self.nodes[NODES.iter().position(|n| *n == id).unwrap()]
    }

    /// Registers `name` on node 1 and returns its id and token (valid on every node).
    fn user(&self, name: &str) -> (u64, String) {
        let addr = self.nodes[0].addr;
        let body = serde_json::json!({"username": name, "password": "password123"}).to_string();
        let (s, r) = http_raw(addr, "POST", "/v1/register", &[], Some(&body));
        assert_eq!(s, 201, "{r}");
        let (s, r) = http_raw(addr, "POST", "/v1/login", &[], Some(&body));
        assert_eq!(s, 200, "{r}");
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        (v["user_id"].as_str().unwrap().parse().unwrap(), v["token"].as_str().unwrap().to_owned())
    }

    /// A synced device of `token` on node `on`.
    fn device(&self, token: &str, on: NodeId, proto: Subprotocol) -> Client {
        let mut c = Client::connect(self.node(on).addr, token, proto);
        c.sync(Vec::new());
        c
    }
}

fn owner(key: Key) -> NodeId {
    Ring::new(NODES).owner(key).unwrap()
}

#[test]
fn users_on_different_nodes_chat_through_the_owner() {
    let f = fleet();
    let (a_id, a) = f.user("alice");
    let (b_id, b) = f.user("bob");
    // Each user on a node that does not own their pair, where possible.
    let pair_owner = owner(Key::pair(a_id, b_id));
    let others: Vec<NodeId> = NODES.iter().copied().filter(|n| *n != pair_owner).collect();
    let mut alice = f.device(&a, others[0], Subprotocol::Json);
    let mut bob = f.device(&b, others[1], Subprotocol::FlatBuffers);

    let conv = conversation_id(&alice.request(ClientMsg::CreateDirect { user_id: b_id }));
    // The same conversation from the other end, asked on the other node.
    assert_eq!(conversation_id(&bob.request(ClientMsg::CreateDirect { user_id: a_id })), conv);

    for i in 0..20 {
        alice.send_text(conv, &format!("a{i}"), &format!("hello {i}"));
    }
    let acked: Vec<u64> = (0..20).map(|i| alice.wait_ack(&format!("a{i}"))).collect();
    assert_eq!(acked, (1..=20).collect::<Vec<_>>(), "acks cross back to alice's node in order");
    let got: Vec<(u64, String)> = (0..20)
        .map(|_| {
            let m = bob.next_message();
            (m.seq, m.body)
        })
        .collect();
    assert_eq!(got, (1..=20).map(|i| (i, format!("hello {}", i - 1))).collect::<Vec<_>>());

    bob.send_text(conv, "b0", "hi alice");
    assert_eq!(bob.wait_ack("b0"), 21);
    let m = alice.next_message();
    assert_eq!((m.seq, m.body.as_str(), m.sender_id), (21, "hi alice", b_id));

    // Receipts and typing reach the other node; a refusal comes back to its asker.
    alice.send(ClientMsg::MarkRead { conversation_id: conv, seq: 21 });
    let r = bob.wait_for(|m| matches!(m, ServerMsg::Receipt { user_id, .. } if *user_id == a_id));
    assert!(matches!(r, ServerMsg::Receipt { read_seq: 21, .. }), "{r:?}");
    alice.send(ClientMsg::Typing { conversation_id: conv, typing: true });
    let t = bob.wait_for(|m| matches!(m, ServerMsg::Typing { .. }));
    assert!(matches!(t, ServerMsg::Typing { user_id, typing: true, .. } if user_id == a_id), "{t:?}");
    let refused = bob.request(ClientMsg::MarkRead { conversation_id: conv, seq: 99 });
    assert_eq!(support::error_code(refused), 1014, "a position past the end is refused from the owner");
    let edited = alice.request(ClientMsg::Edit { conversation_id: conv, seq: 1, body: "edited".into() });
    assert_eq!(edited, ServerMsg::Ok);
    let e = bob.next_message();
    assert_eq!((e.target_seq, e.body.as_str()), (Some(1), "edited"));
}

#[test]
fn a_group_spread_over_nodes_has_one_order_and_only_hosting_nodes_hear_it() {
    let f = fleet();
    let users: Vec<(u64, String)> = ["carol", "dave", "erin"].iter().map(|n| f.user(n)).collect();
    // Pick a group id whose owner is node 1, with every device on nodes 1 and 2:
    // node 3 hosts nobody and owns nothing here, so it must hear nothing.
    let mut c1 = f.device(&users[0].1, 1, Subprotocol::Json);
    let c2 = f.device(&users[0].1, 2, Subprotocol::FlatBuffers);
    let d = f.device(&users[1].1, 2, Subprotocol::Json);
    let e = f.device(&users[2].1, 1, Subprotocol::FlatBuffers);
    // Groups are created until one lands on an owner other than node 3 (ids are the asker's).
    let mut conv;
    loop {
        let r =
            c1.request(ClientMsg::CreateGroup { title: "g".into(), members: vec![users[1].0, users[2].0] });
        conv = conversation_id(&r);
        if owner(Key::Conversation(conv)) != 3 {
            break;
        }
    }
    let before = f.mem.sent_to(3);
    let mut devices = [c1, c2, d, e];
    // Everyone sends at once, from both nodes.
    for (i, dev) in devices.iter_mut().enumerate() {
        for j in 0..10 {
            dev.send_text(conv, &format!("{i}-{j}"), &format!("{i}-{j}"));
        }
    }
    for (i, dev) in devices.iter_mut().enumerate() {
        for j in 0..10 {
            dev.wait_ack(&format!("{i}-{j}"));
        }
    }
    // Every device, whatever its node, sees the others' 30 messages in one order.
    let orders: Vec<Vec<String>> = devices
        .iter_mut()
        .map(|dev| {
            let mut seen = Vec::new();
            while seen.len() < 30 {
                let m = dev.next_message();
                if m.kind == protocol::MessageKind::Text {
                    seen.push(m.body);
                }
            }
            seen
        })
        .collect();
    // A device gets acks for its own sends, not messages: what each saw must be
    // history's order with that device's own sends left out.
    let mut hist = Client::connect(f.node(1).addr, &users[1].1, Subprotocol::Json);
    let all: Vec<String> = hist
        .sync(Vec::new())
        .into_iter()
        .filter(|m| m.conversation_id == conv && m.kind == protocol::MessageKind::Text)
        .map(|m| m.body)
        .collect();
    assert_eq!(all.len(), 40);
    for seen in &orders {
        let filtered: Vec<&String> = all.iter().filter(|b| seen.contains(b)).collect();
        assert_eq!(seen.iter().collect::<Vec<_>>(), filtered, "each device sees history's order");
    }
    assert_eq!(f.mem.sent_to(3), before, "node 3 hosts no member and owns nothing: it gets no traffic");
}
