//! Membership against a real redis-server (started by each test on a free
//! loopback port): every node sees the same live set; a join, a graceful leave
//! and a death are noticed; a node id cannot be held twice; a Redis restart is
//! survived.

use router::testkit::TestRedis;
use router::{Member, MembershipError, MembershipOptions, NodeId, RedisOptions, Ring};
use std::time::{Duration, Instant};

fn opts(redis: &TestRedis) -> MembershipOptions {
    MembershipOptions {
        ttl: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(300),
        ..MembershipOptions::new(redis.options())
    }
}

/// Heartbeats every member until each sees `want` (or fails after 10 s).
fn converge(members: &mut [&mut Member], want: &[NodeId]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<Ring> = members.iter_mut().map(|m| m.heartbeat().expect("heartbeat").ring).collect();
        if seen.iter().all(|r| r.nodes() == want) {
            return;
        }
        assert!(Instant::now() < deadline, "wanted {want:?} everywhere, saw {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_see_joins_leaves_and_deaths() {
    joins_leaves_and_deaths(TestRedis::start());
}

#[test]
fn on_a_redis_cluster_nodes_see_joins_leaves_and_deaths() {
    joins_leaves_and_deaths(TestRedis::start_cluster());
}

fn joins_leaves_and_deaths(redis: TestRedis) {
    let (mut a, beat) = Member::join(opts(&redis), 1).unwrap();
    assert!(beat.fresh, "a first beat is a join");
    assert_eq!(beat.ring.nodes(), [1]);
    let (mut b, _) = Member::join(opts(&redis), 2).unwrap();
    let (mut c, _) = Member::join(opts(&redis), 3).unwrap();
    converge(&mut [&mut a, &mut b, &mut c], &[1, 2, 3]);
    assert!(!a.heartbeat().unwrap().fresh, "a renewal is not a join");

    // A graceful leave is seen at the others' next beat.
    c.leave().unwrap();
    let ring = a.heartbeat().unwrap().ring;
    assert_eq!(ring.nodes(), [1, 2], "the leaver is gone at once");

    // A death (no more beats, no leave) once its registration expires.
    drop(b);
    let died = Instant::now();
    converge(&mut [&mut a], &[1]);
    assert!(died.elapsed() >= Duration::from_millis(1000), "not before its TTL ran out");
}

#[test]
fn a_live_node_id_cannot_be_taken_twice() {
    let redis = TestRedis::start();
    let (mut first, _) = Member::join(opts(&redis), 7).unwrap();
    match Member::join(opts(&redis), 7) {
        Err(MembershipError::IdTaken(7)) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second process joined as node 7"),
    }
    first.heartbeat().expect("the holder goes on");
    // Once the holder is dead, the id is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (_, beat) = loop {
        match Member::join(opts(&redis), 7) {
            Ok(m) => break m,
            Err(MembershipError::IdTaken(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(beat.ring.nodes(), [7]);
}

#[test]
fn a_redis_restart_is_survived_and_noticed() {
    let mut redis = TestRedis::start();
    let (mut a, _) = Member::join(opts(&redis), 1).unwrap();
    let (mut b, _) = Member::join(opts(&redis), 2).unwrap();
    converge(&mut [&mut a, &mut b], &[1, 2]);
    redis.kill();
    assert!(matches!(a.heartbeat(), Err(MembershipError::Redis(_))), "a beat without Redis fails, retryably");
    redis.restart();
    // The restarted Redis is empty: each node's next beat registers it anew,
    // and says so (the node learns it had been unregistered and Redis restarted).
    let (ba, bb) = (a.heartbeat().unwrap(), b.heartbeat().unwrap());
    assert!(ba.fresh && ba.redis_lost && bb.fresh && bb.redis_lost);
    converge(&mut [&mut a, &mut b], &[1, 2]);
    assert!(!a.heartbeat().unwrap().redis_lost, "said once");
}

#[test]
fn a_restarted_cluster_master_is_noticed() {
    let mut redis = TestRedis::start_cluster();
    let (mut a, _) = Member::join(opts(&redis), 1).unwrap();
    assert!(!a.heartbeat().unwrap().redis_lost);
    for i in 0..3 {
        redis.restart_master(i);
        // Whichever master it was (holding the membership or other keys), the
        // beat after it came back says data may be gone.
        let beat = (0..100).find_map(|_| a.heartbeat().ok()).expect("a beat once the cluster is back");
        assert!(beat.redis_lost, "master {i}'s restart was noticed");
        assert!(!a.heartbeat().unwrap().redis_lost);
    }
}

#[test]
fn options_are_checked() {
    let base = MembershipOptions::new(RedisOptions::new("redis://127.0.0.1:1"));
    assert_eq!(base.check(), Ok(()));
    let bad = |f: fn(&mut MembershipOptions)| {
        let mut o = base.clone();
        f(&mut o);
        o.check().unwrap_err()
    };
    assert!(bad(|o| o.heartbeat = o.ttl).contains("third"));
    assert!(bad(|o| o.redis.prefix = "a}b".into()).contains("prefix"));
    assert!(bad(|o| o.redis.timeout = Duration::ZERO).contains("timeout"));
    assert!(bad(|o| o.redis.timeout = Duration::from_secs(9)).contains("two heartbeats"));
}
