//! Location against a real redis-server and a real Redis Cluster: which live
//! nodes hold each user's devices; a dead or restarted node's entries are
//! ignored and cleaned up.

use router::testkit::TestRedis;
use router::{Location, LocationOptions, Member, MembershipOptions};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn membership(redis: &TestRedis) -> MembershipOptions {
    MembershipOptions {
        ttl: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(300),
        ..MembershipOptions::new(redis.options())
    }
}

fn location(redis: &TestRedis, m: &Member) -> Location {
    Location::new(LocationOptions::new(redis.options()), m.id(), m.instance())
}

fn users_on_two_nodes(redis: TestRedis) {
    let (mut a, _) = Member::join(membership(&redis), 1).unwrap();
    let (b, _) = Member::join(membership(&redis), 2).unwrap();
    let (mut la, mut lb) = (location(&redis, &a), location(&redis, &b));
    la.arrive(&[10, 11]).unwrap();
    lb.arrive(&[11, 12]).unwrap();
    let live = a.heartbeat().unwrap().instances;
    assert_eq!(live.len(), 2);
    let at = la.nodes_of(&[10, 11, 12, 13], &live).unwrap();
    assert_eq!(at, HashMap::from([(10, vec![1]), (11, vec![1, 2]), (12, vec![2])]), "13 is nowhere");
    la.depart(&[11]).unwrap();
    assert_eq!(lb.nodes_of(&[11], &live).unwrap(), HashMap::from([(11, vec![2])]));
}

#[test]
fn users_are_found_on_the_nodes_that_hold_their_devices() {
    users_on_two_nodes(TestRedis::start());
}

#[test]
fn on_a_redis_cluster_users_are_found_on_their_nodes() {
    users_on_two_nodes(TestRedis::start_cluster());
}

#[test]
fn a_dead_or_restarted_nodes_entries_are_ignored_and_removed() {
    let redis = TestRedis::start();
    let (mut a, _) = Member::join(membership(&redis), 1).unwrap();
    let (b, _) = Member::join(membership(&redis), 2).unwrap();
    let mut lb = location(&redis, &b);
    lb.arrive(&[20, 21]).unwrap();
    let mut la = location(&redis, &a);

    // Node 2 dies: once its registration expires, its entries do not count.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let live = loop {
        let beat = a.heartbeat().unwrap();
        if !beat.instances.contains_key(&2) {
            break beat.instances;
        }
        assert!(Instant::now() < deadline, "node 2 never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(la.nodes_of(&[20], &live).unwrap(), HashMap::new(), "nobody holds user 20");
    let mut c = redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap();
    let left: Vec<String> = redis::cmd("SMEMBERS").arg("{sb:u:20}:at").query(&mut c).unwrap();
    assert_eq!(left, Vec::<String>::new(), "the stale entry was removed by the lookup");

    // Node 2 comes back as a new process: its old entry for user 21 is stale too.
    let (b2, _) = Member::join(membership(&redis), 2).unwrap();
    let live = a.heartbeat().unwrap().instances;
    assert_eq!(live.get(&2).map(String::as_str), Some(b2.instance()));
    assert_eq!(la.nodes_of(&[21], &live).unwrap(), HashMap::new(), "the old process's entry does not count");
    location(&redis, &b2).arrive(&[21]).unwrap();
    assert_eq!(la.nodes_of(&[21], &live).unwrap(), HashMap::from([(21, vec![2])]));
}
