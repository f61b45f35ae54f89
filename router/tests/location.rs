//! Location against a real redis-server and a real Redis Cluster: which live
//! nodes hold each user's devices; a dead or restarted node's entries are
//! ignored and cleaned up.

use router::testkit::TestRedis;
use router::{Location, LocationOptions, Member, MembershipOptions, Observer};
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
    let at = la.nodes_of(&[10, 11, 12, 13], &live, || Some(live.clone())).unwrap();
    assert_eq!(at, HashMap::from([(10, vec![1]), (11, vec![1, 2]), (12, vec![2])]), "13 is nowhere");
    la.depart(&[11]).unwrap();
    assert_eq!(lb.nodes_of(&[11], &live, || Some(live.clone())).unwrap(), HashMap::from([(11, vec![2])]));
    // Each node's own set of users, for whoever takes over when it is gone.
    let sorted = |mut v: Vec<u64>| {
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(lb.users_of(1).unwrap()), vec![10], "node 1 holds 10 (11 left)");
    assert_eq!(sorted(la.users_of(2).unwrap()), vec![11, 12]);
    la.forget(2).unwrap();
    assert_eq!(la.users_of(2).unwrap(), Vec::<u64>::new());
}

#[test]
fn users_are_found_on_the_nodes_that_hold_their_devices() {
    users_on_two_nodes(TestRedis::start());
}

#[test]
fn on_a_redis_cluster_users_are_found_on_their_nodes() {
    users_on_two_nodes(TestRedis::start_cluster());
}

/// Grace marks: one per user, the latest wins, a node clears only its own, and
/// they expire by themselves.
fn grace_marks(redis: TestRedis) {
    let (a, _) = Member::join(membership(&redis), 1).unwrap();
    let (b, _) = Member::join(membership(&redis), 2).unwrap();
    let (mut la, mut lb) = (location(&redis, &a), location(&redis, &b));
    assert_eq!(la.marks(&[30, 31]).unwrap(), HashMap::new());
    la.set_mark(30, "1:first", Duration::from_secs(60)).unwrap();
    lb.set_mark(31, "2:only", Duration::from_secs(60)).unwrap();
    assert_eq!(
        lb.marks(&[30, 31, 32]).unwrap(),
        HashMap::from([(30, "1:first".to_string()), (31, "2:only".to_string())])
    );
    // A later departure on node 2 replaces node 1's mark; node 1 cannot clear it.
    lb.set_mark(30, "2:later", Duration::from_secs(60)).unwrap();
    la.clear_mark(30, "1:first").unwrap();
    assert_eq!(la.marks(&[30]).unwrap(), HashMap::from([(30, "2:later".to_string())]));
    lb.clear_mark(30, "2:later").unwrap();
    assert_eq!(la.marks(&[30]).unwrap(), HashMap::new());
    // A mark nobody clears ends with its time to live.
    la.set_mark(33, "1:short", Duration::from_millis(50)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !la.marks(&[33]).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the mark never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn grace_marks_are_per_user_and_the_latest_wins() {
    grace_marks(TestRedis::start());
}

#[test]
fn on_a_redis_cluster_grace_marks_are_per_user() {
    grace_marks(TestRedis::start_cluster());
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
    assert_eq!(
        la.nodes_of(&[20], &live, || Some(live.clone())).unwrap(),
        HashMap::new(),
        "nobody holds user 20"
    );
    let mut c = redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap();
    let left: Vec<String> = redis::cmd("SMEMBERS").arg("{sb:u:20}:at").query(&mut c).unwrap();
    assert_eq!(left, Vec::<String>::new(), "the stale entry was removed by the lookup");

    // Node 2 comes back as a new process: its old entry for user 21 is stale too.
    let (b2, _) = Member::join(membership(&redis), 2).unwrap();
    let live = a.heartbeat().unwrap().instances;
    assert_eq!(live.get(&2).map(String::as_str), Some(b2.instance()));
    assert_eq!(
        la.nodes_of(&[21], &live, || Some(live.clone())).unwrap(),
        HashMap::new(),
        "the old process's entry does not count"
    );
    location(&redis, &b2).arrive(&[21]).unwrap();
    assert_eq!(la.nodes_of(&[21], &live, || Some(live.clone())).unwrap(), HashMap::from([(21, vec![2])]));
}

/// A node that joined after the looker's last heartbeat already records its
/// users: the lookup checks the live set now before it judges such an entry,
/// so the user is found and the entry kept (deleting it would leave the user's
/// device there deaf to every later event, with nothing to tell it to resync).
fn a_join_newer_than_the_view(redis: TestRedis) {
    let (mut a, _) = Member::join(membership(&redis), 1).unwrap();
    let view = a.heartbeat().unwrap().instances;
    assert_eq!(view.len(), 1, "node 1 has seen only itself");
    let (b, _) = Member::join(membership(&redis), 2).unwrap();
    location(&redis, &b).arrive(&[40]).unwrap();
    let mut la = location(&redis, &a);
    let entries = || -> Vec<String> {
        let read = redis::cmd("SMEMBERS").arg("{sb:u:40}:at").clone();
        if redis.cluster {
            let urls: Vec<&str> = redis.url.split(',').collect();
            read.query(&mut redis::cluster::ClusterClient::new(urls).unwrap().get_connection().unwrap())
                .unwrap()
        } else {
            read.query(&mut redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap())
                .unwrap()
        }
    };
    // Without the live set now, the entry neither counts nor goes.
    assert_eq!(la.nodes_of(&[40], &view, || None).unwrap(), HashMap::new());
    assert_eq!(entries().len(), 1, "an unconfirmed entry is kept");
    let mut observer = Observer::new(membership(&redis));
    assert_eq!(
        la.nodes_of(&[40], &view, || observer.instances().ok()).unwrap(),
        HashMap::from([(40, vec![2])]),
        "found on the node that joined since node 1's heartbeat"
    );
    assert_eq!(entries().len(), 1, "and its entry kept");
    // Once node 2 is gone, the live set now says so and the entry goes.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while observer.instances().unwrap().contains_key(&2) {
        assert!(Instant::now() < deadline, "node 2 never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(la.nodes_of(&[40], &view, || observer.instances().ok()).unwrap(), HashMap::new());
    assert_eq!(entries(), Vec::<String>::new(), "the dead node's entry was removed");
}

#[test]
fn a_node_joined_since_the_last_heartbeat_is_found() {
    a_join_newer_than_the_view(TestRedis::start());
}

#[test]
fn on_a_redis_cluster_a_node_joined_since_the_last_heartbeat_is_found() {
    a_join_newer_than_the_view(TestRedis::start_cluster());
}
