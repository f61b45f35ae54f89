//! A real fleet: three gateway processes sharing one store (a PostgreSQL
//! database; the test Cassandra with `SWITCHBOARD_TEST_STORE=cassandra`) and
//! one redis-server or a Redis Cluster of three masters (started by the test
//! on free loopback ports). Users whose
//! devices sit on different nodes chat 1:1 and in a group, and a device
//! reconnects to another node and syncs what it missed.

mod support;

use protocol::{ClientMsg, Position, ServerMsg, Subprotocol};
use router::testkit::TestRedis;
use router::{Key, Ring};
use support::{Client, TestGateway, conversation_id, eventually, http_raw, online, presence, query_presence};

struct Fleet {
    nodes: Vec<TestGateway>,
    redis: std::sync::Mutex<TestRedis>,
    _dirs: Vec<tempfile::TempDir>,
}

/// The store the fleet shares: the test Cassandra with `SWITCHBOARD_TEST_STORE=cassandra`
/// (one keyspace for the three nodes), else a fresh PostgreSQL database (the
/// embedded store belongs to one process, so a fleet cannot share it).
fn shared_store() -> String {
    if std::env::var("SWITCHBOARD_TEST_STORE").as_deref() == Ok("cassandra") {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ks = format!("sb_fleet_{}_{n}", std::process::id());
        let c = storage::testkit::cassandra_from_env(&ks).expect("SWITCHBOARD_CASSANDRA is set");
        return support::storage_toml(
            &c.contact_points,
            c.local_dc.as_deref().unwrap_or_default(),
            &ks,
            true,
            "",
        );
    }
    let url = storage::testkit::TestPostgres::shared().fresh_database();
    format!(
        "[storage]\nbackend = \"postgres\"\nmigrate_on_start = true\n[storage.postgres]\nurl = {url:?}\npool_size = 4\n"
    )
}

fn fleet(redis: TestRedis) -> Fleet {
    fleet_with(redis, "")
}

/// A fleet whose nodes get `extra` config sections too.
fn fleet_with(redis: TestRedis, extra_sections: &str) -> Fleet {
    fleet_ttl(redis, 1000, extra_sections)
}

/// A fleet whose nodes count one dead after `ttl_ms` without heartbeats.
fn fleet_ttl(redis: TestRedis, ttl_ms: u64, extra_sections: &str) -> Fleet {
    let store = shared_store();
    let o = redis.options();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=3u16 {
        let dir = tempfile::tempdir().unwrap();
        let extra = format!(
            "node_id = {id}\n{store}\n[fleet]\nredis_url = {:?}\nredis_cluster = {}\nheartbeat_ms = 200\nttl_ms = {ttl_ms}\nredis_timeout_ms = 400\n{extra_sections}",
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
        assert_eq!(n.readyz(), (200, String::new()), "in the ring: ready");
    }
    Fleet { nodes, redis: std::sync::Mutex::new(redis), _dirs: dirs }
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
    // And edits and deletes.
    let ok = alice.request(ClientMsg::Edit { conversation_id: direct, seq: 2, body: "edited".into() });
    assert_eq!(ok, ServerMsg::Ok);
    let e = bob.next_message();
    assert_eq!((e.kind, e.target_seq, e.body.as_str()), (protocol::MessageKind::Edit, Some(2), "edited"));
    assert_eq!(alice.request(ClientMsg::Delete { conversation_id: direct, seq: 4 }), ServerMsg::Ok);
    let d = bob.next_message();
    assert_eq!((d.kind, d.target_seq), (protocol::MessageKind::Delete, Some(4)));

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

/// Presence across nodes: online while a device is on any node, one grace period
/// for the whole fleet, announcements and queries reaching contacts on every node.
fn presence_across_nodes(f: &Fleet) {
    let (a, ta) = f.nodes[0].user("alice");
    let (_, tb) = f.nodes[1].user("bob");
    let (c, tc) = f.nodes[0].user("carol");
    let mut bob = f.device(&tb, 1, Subprotocol::Json);
    bob.request(ClientMsg::CreateDirect { user_id: a });
    bob.request(ClientMsg::CreateDirect { user_id: c });
    let offline_of = |p: &protocol::PresenceInfo| (p.user_id, p.online);
    // Events carry state: two nodes may both see alice arrive first and both say
    // she is online (docs/protocol.md). Repeats of that are skipped; anything
    // else about her before the marker is a flap.
    let next_but_online_a = |bob: &mut Client| loop {
        let p = presence(bob);
        if p != online(a) {
            return p;
        }
    };

    // alice's first device, on node 1: bob, on node 2, hears it and sees it asked.
    let alice1 = f.device(&ta, 0, Subprotocol::Json);
    assert_eq!(presence(&mut bob), online(a));
    assert_eq!(query_presence(&mut bob, vec![a]), vec![online(a)], "node 2 sees alice's device on node 1");

    // A second device on node 3, then the first one leaving: nobody hears a thing.
    // carol's arrival and departure on node 1 afterwards are the marker: an
    // offline for alice from node 1 would reach bob before carol's.
    let alice2 = f.device(&ta, 2, Subprotocol::FlatBuffers);
    drop(alice1);
    let carol = f.device(&tc, 0, Subprotocol::Json);
    assert_eq!(next_but_online_a(&mut bob), online(c));
    drop(carol);
    assert_eq!(
        offline_of(&next_but_online_a(&mut bob)),
        (c, false),
        "no offline for alice while node 3 holds a device"
    );

    // The last device leaves node 3 and alice is back on node 2 within the grace
    // period: no flap (node 2 sees node 3's grace mark; node 3 sees the device on node 2).
    let t0 = std::time::SystemTime::now();
    drop(alice2);
    let alice3 = f.device(&ta, 1, Subprotocol::Json);
    let carol = f.device(&tc, 2, Subprotocol::Json);
    assert_eq!(next_but_online_a(&mut bob), online(c), "no offline for alice's move");
    drop(carol);
    assert_eq!(offline_of(&next_but_online_a(&mut bob)), (c, false), "alice is still online");
    assert_eq!(query_presence(&mut bob, vec![a]), vec![online(a)]);

    // Gone from every node: one offline, with last_seen, after the grace period.
    drop(alice3);
    let off = next_but_online_a(&mut bob);
    assert_eq!(offline_of(&off), (a, false));
    let seen = off.last_seen_ms.expect("last_seen shown");
    let t0_ms = t0.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(seen >= t0_ms, "last_seen {seen} is when the last device left");
    assert_eq!(
        query_presence(&mut bob, vec![a]),
        vec![protocol::PresenceInfo { user_id: a, online: false, last_seen_ms: Some(seen) }]
    );

    // alice's only device is on a node that dies: it cannot tell anyone, so the
    // node that takes its work over announces her offline once the fleet has
    // noticed the death and the grace period has run.
    let _alice4 = f.device(&ta, 2, Subprotocol::Json);
    assert_eq!(presence(&mut bob), online(a));
    signal(&f.nodes[2], libc::SIGKILL);
    let off = next_but_online_a(&mut bob);
    assert_eq!(offline_of(&off), (a, false), "announced offline after her node died");
    assert!(off.last_seen_ms.is_some_and(|t| t > seen));
}

#[test]
fn presence_is_fleet_wide() {
    presence_across_nodes(&fleet_with(TestRedis::start(), "[presence]\ngrace_ms = 1500\n"));
}

#[test]
fn presence_is_fleet_wide_on_a_redis_cluster() {
    presence_across_nodes(&fleet_with(TestRedis::start_cluster(), "[presence]\ngrace_ms = 1500\n"));
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

/// One user's device in a fault run: sends its messages to the group one at a
/// time, each until acknowledged (an error or a dead connection resends it with
/// the same client id after reconnecting to a live node and syncing), and
/// records every group message it is shown.
struct Rider {
    token: String,
    node: usize,
    client: Option<Client>,
    /// Group messages shown to it (live or replayed), by position.
    seen: std::collections::BTreeMap<u64, String>,
    /// Its sends' acknowledged positions, by client id.
    acked: Vec<(String, u64)>,
    /// The last group position its current connection showed (message or ack).
    shown: u64,
    /// Where a connection broke the group's order: a position shown twice or skipped.
    breaks: Vec<String>,
}

/// Nodes a rider may connect to (a killed or stopped node is not).
type Alive = std::sync::Arc<Vec<std::sync::atomic::AtomicBool>>;

impl Rider {
    /// Positions up to which it has seen every group message (its own included).
    fn upto(&self) -> u64 {
        let mut n = 0;
        while self.seen.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }

    fn note(&mut self, group: u64, m: protocol::Message) {
        if m.conversation_id == group {
            if m.seq != self.shown + 1 {
                self.breaks.push(format!("position {} after {} on node {}", m.seq, self.shown, self.node));
            }
            self.shown = self.shown.max(m.seq);
            self.seen.insert(m.seq, m.body);
        }
    }

    /// An ack takes its place in the connection's order too (one for a resend may
    /// name a position shown already).
    fn note_ack(&mut self, seq: u64) {
        if seq > self.shown + 1 {
            self.breaks.push(format!("ack of position {seq} after {} on node {}", self.shown, self.node));
        }
        self.shown = self.shown.max(seq);
    }

    /// Connects to the first live node from its current one on, and syncs.
    fn connect(&mut self, addrs: &[std::net::SocketAddr], alive: &Alive, group: u64) {
        loop {
            for k in 0..addrs.len() {
                let n = (self.node + k) % addrs.len();
                if !alive[n].load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                // Refused or closed at once (its node going down, a fail-over's resync): on.
                let Some(mut c) = Client::try_connect(addrs[n], &self.token, Subprotocol::Json) else {
                    continue;
                };
                c.ws.get_mut().set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
                self.shown = self.upto();
                self.node = n;
                let id = c.send(ClientMsg::Sync {
                    positions: vec![Position { conversation_id: group, seq: self.upto() }],
                });
                while let Some(f) = read(&mut c) {
                    match f.body {
                        ServerMsg::Message { message } => self.note(group, message),
                        ServerMsg::SyncDone { .. } if f.id == id => break,
                        _ => {}
                    }
                }
                self.node = n;
                self.client = Some(c);
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Sends `id` until it is acknowledged.
    fn send(&mut self, addrs: &[std::net::SocketAddr], alive: &Alive, group: u64, id: &str) {
        loop {
            if self.client.is_none() {
                self.connect(addrs, alive, group);
            }
            let c = self.client.as_mut().unwrap();
            let sent = c.try_send(ClientMsg::Send {
                conversation_id: group,
                client_msg_id: id.into(),
                body: id.into(),
                attachment: None,
            });
            let mut answer = None;
            while sent && answer.is_none() {
                let Some(f) = read(self.client.as_mut().unwrap()) else { break };
                match f.body {
                    ServerMsg::Message { message } => self.note(group, message),
                    ServerMsg::Ack { client_msg_id, seq, .. } if client_msg_id == id => {
                        answer = Some(Ok(seq))
                    }
                    ServerMsg::Error { client_msg_id: Some(c), code, .. } if c == id => {
                        answer = Some(Err(code))
                    }
                    _ => {}
                }
            }
            match answer {
                Some(Ok(seq)) => {
                    self.note_ack(seq);
                    self.seen.insert(seq, id.into());
                    self.acked.push((id.into(), seq));
                    return;
                }
                // Retryable refusals while ownership moves: resend on this connection.
                Some(Err(code)) => {
                    assert!([1000, 1020, 1022].contains(&code), "send {id} refused for good with {code}");
                }
                // A dead, stopped or closed node: another one.
                None => {
                    self.client = None;
                    self.node += 1;
                }
            }
        }
    }
}

/// Why a connection gave no frame.
#[derive(Debug, PartialEq)]
enum Gone {
    /// Closed by the server, or broken (its node died).
    Closed,
    /// Nothing for 3 s (its node is stopped, or an event never came).
    Silent,
}

/// The next frame.
fn next(c: &mut Client) -> Result<protocol::ServerFrame, Gone> {
    loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Ok(c.proto.decode_server(t.as_bytes()).unwrap()),
            Ok(tungstenite::Message::Binary(b)) => return Ok(c.proto.decode_server(&b).unwrap()),
            Ok(tungstenite::Message::Close(_)) => return Err(Gone::Closed),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                return Err(Gone::Silent);
            }
            Err(_) => return Err(Gone::Closed),
            Ok(_) => {}
        }
    }
}

/// The next frame, or `None` once the connection is closed, broken or silent.
fn read(c: &mut Client) -> Option<protocol::ServerFrame> {
    next(c).ok()
}

/// Six users, two per node, all in one group, each sending `per_user` messages
/// while `fault` runs against the node that owns the group (given its index),
/// once a third of the messages are acknowledged. Then: every send was
/// acknowledged exactly once at the position history gives it, each user's sends
/// are in its order, and every device was shown the whole group, in order.
fn traffic_through(f: &Fleet, per_user: usize, fault: impl FnOnce(usize, &Alive)) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let users: Vec<(u64, String)> = (0..6).map(|i| f.nodes[i % 3].user(&format!("rider{i}"))).collect();
    let mut owner_dev = f.nodes[0].connect(&users[0].1, Subprotocol::Json);
    owner_dev.sync(Vec::new());
    let group = conversation_id(&owner_dev.request(ClientMsg::CreateGroup {
        title: "riders".into(),
        members: users.iter().skip(1).map(|u| u.0).collect(),
    }));
    drop(owner_dev);
    let owner = usize::from(Ring::new([1u16, 2, 3]).owner(Key::Conversation(group)).unwrap()) - 1;
    let addrs: Vec<std::net::SocketAddr> = f.nodes.iter().map(|n| n.addr).collect();
    let alive: Alive = std::sync::Arc::new((0..3).map(|_| AtomicBool::new(true)).collect());
    let acks = std::sync::Arc::new(AtomicUsize::new(0));
    let riders: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            let (addrs, alive, acks, token) = (addrs.clone(), alive.clone(), acks.clone(), token.clone());
            std::thread::spawn(move || {
                let mut r = Rider {
                    token,
                    node: i % 3,
                    client: None,
                    seen: Default::default(),
                    acked: Vec::new(),
                    shown: 0,
                    breaks: Vec::new(),
                };
                for j in 0..per_user {
                    r.send(&addrs, &alive, group, &format!("r{i}-{j}"));
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                r
            })
        })
        .collect();
    eventually("a third of the messages are acknowledged", || acks.load(Ordering::SeqCst) >= per_user * 2);
    fault(owner, &alive);
    let mut riders: Vec<Rider> = riders.into_iter().map(|t| t.join().expect("a rider failed")).collect();

    // History, read through a node that stayed up (again if a late resync closes
    // the reading connection).
    let up = (owner + 1) % 3;
    let history: Vec<(u64, String)> = loop {
        let mut c = f.nodes[up].connect(&users[0].1, Subprotocol::Json);
        let id = c.send(ClientMsg::Sync { positions: Vec::new() });
        let mut got = Vec::new();
        let done = loop {
            match next(&mut c) {
                Ok(fr) => match fr.body {
                    ServerMsg::Message { message } => got.push(message),
                    ServerMsg::SyncDone { .. } if fr.id == id => break true,
                    _ => {}
                },
                Err(Gone::Closed) => break false,
                Err(Gone::Silent) => panic!("a sync went silent"),
            }
        };
        if done {
            break got
                .into_iter()
                .filter(|m| m.conversation_id == group && m.kind == protocol::MessageKind::Text)
                .map(|m| (m.seq, m.body))
                .collect();
        }
    };
    assert_eq!(history.len(), 6 * per_user, "every send stored exactly once: {history:?}");
    let at: std::collections::HashMap<&str, u64> = history.iter().map(|(s, b)| (b.as_str(), *s)).collect();
    assert_eq!(at.len(), history.len(), "no send stored twice");
    let head = history.last().unwrap().0;
    for (i, r) in riders.iter_mut().enumerate() {
        let mut prev = 0;
        for (id, seq) in &r.acked {
            assert_eq!(at.get(id.as_str()), Some(seq), "{id}'s ack names its stored position");
            assert!(*seq > prev, "rider {i}'s sends are stored in its order");
            prev = *seq;
        }
        // Every device is shown everything, in order: live, or by a sync after its
        // connection was closed (its node died, or resynced it). A device left
        // waiting on an open connection missed a live event: that fails.
        while r.upto() < head {
            let got = match r.client.as_mut() {
                Some(c) => next(c),
                None => Err(Gone::Closed),
            };
            match got {
                Ok(fr) => {
                    if let ServerMsg::Message { message } = fr.body {
                        r.note(group, message);
                    }
                }
                Err(Gone::Closed) => {
                    r.client = None;
                    r.node += 1;
                    r.connect(&addrs, &alive, group);
                }
                Err(Gone::Silent) => {
                    panic!("rider {i} waits on an open connection for position {} of {head}", r.upto() + 1)
                }
            }
        }
        for (seq, body) in &history {
            assert_eq!(r.seen.get(seq), Some(body), "rider {i} was shown position {seq} as stored");
        }
        // Each connection showed the group in order, nothing twice (a new owner's
        // re-shown tail included), nothing skipped.
        assert!(r.breaks.is_empty(), "rider {i}'s connections broke the group's order: {:?}", r.breaks);
    }
}

fn signal(g: &TestGateway, sig: i32) {
    g.signal(sig);
}

fn wait_nodes(f: &Fleet, alive: &Alive, n: usize) {
    for (i, g) in f.nodes.iter().enumerate() {
        if alive[i].load(std::sync::atomic::Ordering::SeqCst) {
            eventually("the live nodes see the new ring", || {
                http_raw(g.addr, "GET", "/metrics", &[], None)
                    .1
                    .contains(&format!("switchboard_fleet_nodes {n}"))
            });
        }
    }
}

#[test]
fn killing_the_owner_under_traffic_loses_and_repeats_nothing() {
    let f = fleet(TestRedis::start());
    traffic_through(&f, 30, |owner, alive| {
        alive[owner].store(false, std::sync::atomic::Ordering::SeqCst);
        signal(&f.nodes[owner], libc::SIGKILL);
        wait_nodes(&f, alive, 2);
    });
}

/// SIGTERM on the owner under traffic: it drains (its clients get 1001 and go to
/// the other nodes) and leaves the ring, and the others take its conversations
/// over at once: the TTL here is a minute, longer than any wait of this test, so
/// only the node's leaving can make them do it.
#[test]
fn draining_the_owner_under_traffic_hands_its_conversations_over() {
    let f = fleet_ttl(TestRedis::start(), 60_000, "[limits]\ndrain_notice_ms = 300\n");
    traffic_through(&f, 30, |owner, alive| {
        alive[owner].store(false, std::sync::atomic::Ordering::SeqCst);
        signal(&f.nodes[owner], libc::SIGTERM);
        wait_nodes(&f, alive, 2);
    });
}

#[test]
fn a_stopped_owner_is_fenced_when_it_wakes() {
    let f = fleet(TestRedis::start());
    traffic_through(&f, 30, |owner, alive| {
        alive[owner].store(false, std::sync::atomic::Ordering::SeqCst);
        signal(&f.nodes[owner], libc::SIGSTOP);
        // The others take its conversations over and go on writing.
        wait_nodes(&f, alive, 2);
        // It wakes with its old ring and its cached epochs: what it still tries to
        // write is fenced (traffic_through checks that nothing it wrote reused or
        // overwrote a position), and it rejoins.
        signal(&f.nodes[owner], libc::SIGCONT);
        alive[owner].store(true, std::sync::atomic::Ordering::SeqCst);
        wait_nodes(&f, alive, 3);
    });
}

/// A node whose ring still has a dead node forwards it commands after the
/// lowest live node took its stream over: those are taken over too (each
/// heartbeat for a while), not left in a stream nobody reads with their sender
/// waiting for an answer. The late append is made by hand here (a copy of a
/// send the dead node never read); a lagging node makes the same one.
#[test]
fn a_command_sent_to_a_dead_node_after_its_takeover_is_answered() {
    let f = fleet(TestRedis::start());
    let (_, dan) = f.nodes[0].user("dan");
    let (eve_id, _) = f.nodes[0].user("eve");
    let mut setup = f.device(&dan, 0, Subprotocol::Json);
    let direct = conversation_id(&setup.request(ClientMsg::CreateDirect { user_id: eve_id }));
    drop(setup);
    let owner = usize::from(Ring::new([1u16, 2, 3]).owner(Key::Conversation(direct)).unwrap()) - 1;
    let mut dan_dev = f.device(&dan, (owner + 1) % 3, Subprotocol::Json);

    let url = f.redis.lock().unwrap().url.clone();
    let mut redis = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let stream = format!("{{sb:node:{}}}:in", owner + 1);
    // The stream already holds what the owner was sent (the conversation's creation).
    let before: Vec<(String, Vec<Vec<u8>>)> =
        redis::cmd("XREVRANGE").arg(&stream).arg("+").arg("-").arg("COUNT").arg(1).query(&mut redis).unwrap();
    let after = before.first().map_or("-".to_string(), |(id, _)| format!("({id}"));
    // The owner stops: dan's send waits in its stream, unread.
    signal(&f.nodes[owner], libc::SIGSTOP);
    dan_dev.send_text(direct, "late-1", "hello");
    // The entry's fields (sender, instance, counter, payload), as XRANGE gives them.
    let mut fields = Vec::new();
    eventually("the send in the stopped owner's stream", || {
        let r: Vec<(String, Vec<Vec<u8>>)> =
            redis::cmd("XRANGE").arg(&stream).arg(&after).arg("+").query(&mut redis).unwrap();
        assert!(r.len() <= 1, "only dan's send was sent to the stopped owner: {}", r.len());
        r.into_iter().next().map(|(_, f)| fields = f).is_some()
    });
    // It dies; the others take its stream over and the send is answered.
    signal(&f.nodes[owner], libc::SIGKILL);
    let seq = dan_dev.wait_ack("late-1");
    // Now the same send lands in the dead node's stream once more, as from a
    // node that had not yet seen it die. Its answer (the same position: a resend)
    // must still come.
    let mut add = redis::cmd("XADD");
    add.arg(&stream).arg("*");
    for v in &fields {
        add.arg(v.as_slice());
    }
    let _: String = add.query(&mut redis).unwrap();
    assert_eq!(dan_dev.wait_ack("late-1"), seq, "the late copy is answered, at the send's position");
}

/// The owner acknowledges a message, then dies before its `fleet-out` sends the
/// event to the node of the other member (here: that node's stream is held
/// aside, so any append to it fails, until the owner is dead). The node that
/// takes the conversation over shows it to that member anyway: acknowledged
/// means every member gets it.
#[test]
fn a_message_its_dead_owner_acked_but_never_sent_on_reaches_every_member() {
    let f = fleet(TestRedis::start());
    let (_, dan) = f.nodes[0].user("dan");
    let (eve_id, eve) = f.nodes[0].user("eve");
    let mut setup = f.device(&dan, 0, Subprotocol::Json);
    let direct = conversation_id(&setup.request(ClientMsg::CreateDirect { user_id: eve_id }));
    drop(setup);
    let owner = usize::from(Ring::new([1u16, 2, 3]).owner(Key::Conversation(direct)).unwrap()) - 1;
    let other = (owner + 1) % 3;
    let mut dan_dev = f.device(&dan, owner, Subprotocol::Json);
    let mut eve_dev = f.device(&eve, other, Subprotocol::Json);

    let url = f.redis.lock().unwrap().url.clone();
    let mut redis = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let stream = format!("{{sb:node:{}}}:in", other + 1);
    let held = format!("{{sb:node:{}}}:held", other + 1);
    // eve's node's stream moves aside and a plain value takes its name: every
    // append to it fails (the senders retry) until it is back.
    let _: () = redis::cmd("RENAME").arg(&stream).arg(&held).query(&mut redis).unwrap();
    let _: () = redis::cmd("SET").arg(&stream).arg("held").query(&mut redis).unwrap();
    dan_dev.send_text(direct, "m-1", "acked, then the owner died");
    dan_dev.wait_ack("m-1");
    // Killed while its fan-out to eve's node was still failing.
    signal(&f.nodes[owner], libc::SIGKILL);
    let _: () = redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(&stream)
        .ignore()
        .cmd("RENAME")
        .arg(&held)
        .arg(&stream)
        .ignore()
        .query(&mut redis)
        .unwrap();
    let m = eve_dev.next_message();
    assert_eq!((m.conversation_id, m.body.as_str()), (direct, "acked, then the owner died"));
}

#[test]
fn a_redis_restart_under_traffic_loses_and_repeats_nothing() {
    let f = fleet(TestRedis::start());
    traffic_through(&f, 30, |_, alive| {
        // Empty when it comes back: membership, locations and streams in flight are
        // gone. Every node registers again and its connections resync.
        f.redis.lock().unwrap().restart();
        wait_nodes(&f, alive, 3);
    });
}

#[test]
fn a_redis_cluster_master_restart_under_traffic_loses_and_repeats_nothing() {
    let f = fleet(TestRedis::start_cluster());
    traffic_through(&f, 30, |_, alive| {
        f.redis.lock().unwrap().restart_master(0);
        wait_nodes(&f, alive, 3);
    });
}

/// Redis unreachable for a while (`stop` to `start`): a node's own conversations
/// go on (acknowledged, and delivered to devices on that node); a command for a
/// conversation another node owns is refused retryably (1022) within
/// `fleet.send_retry_ms`; once Redis is back the fleet re-forms by itself, the
/// refused send goes through when retried, and history holds every acknowledged
/// message once.
fn redis_outage(stop: fn(&mut TestRedis), start: fn(&mut TestRedis)) {
    let f = fleet(TestRedis::start());
    let ring = Ring::new([1u16, 2, 3]);
    let owner = |conv: u64| usize::from(ring.owner(Key::Conversation(conv)).unwrap()) - 1;
    let (_, ta) = f.nodes[0].user("alice");
    let (b_id, tb) = f.nodes[0].user("bob");
    let (c_id, tc) = f.nodes[0].user("carol");
    let mut setup = f.device(&ta, 0, Subprotocol::Json);
    let direct = conversation_id(&setup.request(ClientMsg::CreateDirect { user_id: b_id }));
    let home = owner(direct);
    // A group that another node owns.
    let group = loop {
        let g = conversation_id(
            &setup.request(ClientMsg::CreateGroup { title: "elsewhere".into(), members: vec![c_id] }),
        );
        if owner(g) != home {
            break g;
        }
    };
    drop(setup);
    // alice and bob on the node that owns their direct conversation; carol elsewhere.
    let mut alice = f.device(&ta, home, Subprotocol::Json);
    let mut bob = f.device(&tb, home, Subprotocol::FlatBuffers);
    let _carol = f.device(&tc, owner(group), Subprotocol::Json);

    stop(&mut f.redis.lock().unwrap());
    for i in 0..5 {
        alice.send_text(direct, &format!("d{i}"), &format!("down {i}"));
        assert_eq!(alice.wait_ack(&format!("d{i}")), i + 1, "acknowledged with Redis down");
    }
    let got: Vec<String> = (0..5).map(|_| bob.next_message().body).collect();
    assert_eq!(got, (0..5).map(|i| format!("down {i}")).collect::<Vec<_>>(), "delivered on the same node");
    alice.send_text(group, "x", "across");
    assert_eq!(alice.ack_or_error("x"), Err(1022), "a command for another node is refused retryably");
    // Presence still answers, from what the node holds itself.
    assert_eq!(query_presence(&mut alice, vec![b_id]), vec![online(b_id)], "bob is here, so online");
    // Without heartbeats for a TTL, the others count this node dead: not ready.
    eventually("readiness fails without heartbeats", || f.nodes[home].readyz().1.contains("heartbeat"));

    start(&mut f.redis.lock().unwrap());
    let alive: Alive =
        std::sync::Arc::new((0..3).map(|_| std::sync::atomic::AtomicBool::new(true)).collect());
    wait_nodes(&f, &alive, 3);
    for n in &f.nodes {
        eventually("ready again", || n.readyz().0 == 200);
    }
    // Retried (same client id) until it goes through: the fleet has healed itself.
    let addrs: Vec<std::net::SocketAddr> = f.nodes.iter().map(|n| n.addr).collect();
    let mut rider = Rider {
        token: ta.clone(),
        node: home,
        client: None,
        seen: Default::default(),
        acked: Vec::new(),
        shown: 0,
        breaks: Vec::new(),
    };
    drop(alice);
    rider.send(&addrs, &alive, group, "x");
    rider.send(&addrs, &alive, direct, "after");
    let mut reader = f.nodes[owner(group)].connect(&tc, Subprotocol::Json);
    let history: Vec<(u64, String)> = reader
        .sync(Vec::new())
        .into_iter()
        .filter(|m| m.kind == protocol::MessageKind::Text)
        .map(|m| (m.conversation_id, m.body))
        .collect();
    assert_eq!(history, vec![(group, "x".to_string())], "the refused send stored once, after it was retried");
    let mut reader = f.nodes[(home + 1) % 3].connect(&tb, Subprotocol::Json);
    let history: Vec<String> = reader
        .sync(Vec::new())
        .into_iter()
        .filter(|m| m.conversation_id == direct && m.kind == protocol::MessageKind::Text)
        .map(|m| m.body)
        .collect();
    let mut want: Vec<String> = (0..5).map(|i| format!("down {i}")).collect();
    want.push("after".into());
    assert_eq!(history, want, "everything acknowledged is stored once, in order");
}

#[test]
fn with_redis_down_a_node_serves_its_own_and_refuses_the_rest_retryably() {
    // Killed: gone, and back empty.
    redis_outage(TestRedis::kill, TestRedis::revive);
}

#[test]
fn with_redis_stuck_a_node_serves_its_own_and_refuses_the_rest_retryably() {
    // Frozen: connections open, nothing answered; back with everything it held.
    redis_outage(TestRedis::pause, TestRedis::resume);
}

/// Nodes that are all alike (one config, as in a Kubernetes Deployment) with
/// `fleet.auto_node_id`: each claims an id no live node holds, and they chat.
#[test]
fn alike_nodes_claim_their_own_ids() {
    let redis = TestRedis::start();
    let o = redis.options();
    let config = format!(
        "{}\n[fleet]\nredis_url = {:?}\nauto_node_id = true\nheartbeat_ms = 200\nttl_ms = 1000\nredis_timeout_ms = 400\n",
        shared_store(),
        o.redis_url
    );
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<TestGateway> = dirs.iter().map(|d| TestGateway::start_in(d.path(), &config)).collect();
    for n in &nodes {
        eventually("both nodes in the ring", || {
            http_raw(n.addr, "GET", "/metrics", &[], None).1.contains("switchboard_fleet_nodes 2")
        });
        assert!(n.log().contains("claimed a node id"), "{}", n.log());
    }
    let (_, ta) = nodes[0].user("amy");
    let (b, tb) = nodes[0].user("ben");
    let mut amy = nodes[0].connect(&ta, Subprotocol::Json);
    amy.sync(Vec::new());
    let mut ben = nodes[1].connect(&tb, Subprotocol::Json);
    ben.sync(Vec::new());
    let conv = conversation_id(&amy.request(ClientMsg::CreateDirect { user_id: b }));
    amy.send_text(conv, "hi", "across alike nodes");
    amy.wait_ack("hi");
    assert_eq!(ben.next_message().body, "across alike nodes");
}
