//! The Redis Streams transport against a real redis-server (one per test, on a
//! free loopback port): order, acknowledgement and redelivery, a dead node's
//! leftovers, bounded streams with gaps reported, a Redis restart.

use router::testkit::TestRedis;
use router::transport::{drain_dead, forget_dead};
use router::{Delivery, Inbound, Outbound, TransportOptions};
use std::time::Duration;

fn opts(redis: &TestRedis) -> TransportOptions {
    TransportOptions::new(redis.options())
}

fn payloads(range: std::ops::RangeInclusive<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("p{i}").into_bytes()).collect()
}

fn send(out: &mut Outbound, to: u16, range: std::ops::RangeInclusive<u32>) {
    let p = payloads(range);
    out.send(to, &p.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
}

/// Reads until `n` entries came (or fails after 10 s), gaps included.
fn read_n(inbound: &mut Inbound, n: usize) -> Vec<Delivery> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.iter().filter(|d| matches!(d, Delivery::Entry(_))).count() < n {
        assert!(std::time::Instant::now() < deadline, "only {got:?}");
        got.extend(inbound.read(1000, Duration::from_millis(200)).unwrap());
    }
    got
}

fn bodies(d: &[Delivery]) -> Vec<String> {
    d.iter()
        .filter_map(|d| match d {
            Delivery::Entry(e) => Some(String::from_utf8(e.payload.clone()).unwrap()),
            Delivery::Gap { .. } => None,
        })
        .collect()
}

fn ids(d: &[Delivery]) -> Vec<&str> {
    d.iter()
        .filter_map(|d| match d {
            Delivery::Entry(e) => Some(e.id.as_str()),
            Delivery::Gap { .. } => None,
        })
        .collect()
}

#[test]
fn entries_arrive_in_order_from_their_sender_and_unacknowledged_ones_come_back() {
    in_order_and_redelivered(TestRedis::start());
}

/// The same on a Redis Cluster of three masters, with each node's stream on the
/// slot of its own hash tag.
#[test]
fn on_a_redis_cluster_entries_arrive_in_order_and_dead_nodes_are_drained() {
    let redis = TestRedis::start_cluster();
    let mut out = Outbound::new(opts(&redis), 1);
    let mut inbound: Vec<Inbound> = (2..=4).map(|n| Inbound::open(opts(&redis), n).unwrap()).collect();
    for to in 2..=4 {
        send(&mut out, to, 1..=50);
    }
    for i in &mut inbound {
        assert_eq!(bodies(&read_n(i, 50)), (1..=50).map(|i| format!("p{i}")).collect::<Vec<_>>());
    }
    drop(inbound);
    let left = drain_dead(&opts(&redis), 3, 1).unwrap();
    assert_eq!(left.len(), 50, "read, never acknowledged: all drained");
    in_order_and_redelivered(redis);
}

/// Node 11 sends to node 12 (ids no other test here uses).
fn in_order_and_redelivered(redis: TestRedis) {
    let mut inbound = Inbound::open(opts(&redis), 12).unwrap();
    let mut out = Outbound::new(opts(&redis), 11);
    send(&mut out, 12, 1..=3);
    send(&mut out, 12, 4..=5);
    let got = read_n(&mut inbound, 5);
    assert_eq!(bodies(&got), ["p1", "p2", "p3", "p4", "p5"]);
    assert!(got.iter().all(|d| matches!(d, Delivery::Entry(e) if e.from == 11)));
    assert!(inbound.read(10, Duration::from_millis(50)).unwrap().is_empty(), "each entry once");

    // Acknowledge two; the node restarts: the other three come back first.
    inbound.ack(&ids(&got)[..2]).unwrap();
    drop(inbound);
    send(&mut out, 12, 6..=6);
    let mut inbound = Inbound::open(opts(&redis), 12).unwrap();
    let got = read_n(&mut inbound, 4);
    assert_eq!(bodies(&got), ["p3", "p4", "p5", "p6"]);
}

#[test]
fn a_dead_nodes_pending_and_unread_entries_are_drained_by_another() {
    let redis = TestRedis::start();
    let mut inbound = Inbound::open(opts(&redis), 3).unwrap();
    let mut out = Outbound::new(opts(&redis), 1);
    send(&mut out, 3, 1..=4);
    let got = read_n(&mut inbound, 4);
    inbound.ack(&ids(&got)[..1]).unwrap();
    send(&mut out, 3, 5..=10);
    drop(inbound); // node 3 dies: p2-p4 read but not handed off, p5-p10 never read

    let left = drain_dead(&opts(&redis), 3, 1).unwrap();
    let left: Vec<String> = left.iter().map(|e| String::from_utf8(e.payload.clone()).unwrap()).collect();
    assert_eq!(left, (2..=10).map(|i| format!("p{i}")).collect::<Vec<_>>());
    assert!(drain_dead(&opts(&redis), 3, 1).unwrap().is_empty(), "drained once");
    forget_dead(&opts(&redis), 3).unwrap();
    let mut c = redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(opts(&redis).stream(3)).query(&mut c).unwrap();
    assert_eq!(exists, 0);
}

#[test]
fn streams_are_bounded_and_a_reader_that_fell_behind_is_told() {
    let redis = TestRedis::start();
    let o = TransportOptions { max_len: 100, ..opts(&redis) };
    let mut inbound = Inbound::open(o.clone(), 2).unwrap();
    let mut out = Outbound::new(o.clone(), 1);
    send(&mut out, 2, 1..=10);
    assert_eq!(bodies(&read_n(&mut inbound, 10)).len(), 10);
    for chunk in 0..10 {
        send(&mut out, 2, 11 + chunk * 100..=10 + (chunk + 1) * 100);
    }
    let mut c = redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap();
    let len: usize = redis::cmd("XLEN").arg(o.stream(2)).query(&mut c).unwrap();
    assert!(len <= 300, "trimmed to about max_len: {len}");
    let got = inbound.read(10_000, Duration::from_millis(200)).unwrap();
    let missed: u64 = got
        .iter()
        .map(|d| match d {
            Delivery::Gap { from: 1, missed } => *missed,
            _ => 0,
        })
        .sum();
    assert!(missed > 0, "the reader is told it missed entries");
    assert_eq!(missed as usize + bodies(&got).len(), 1000, "every entry is delivered or counted missing");
    assert_eq!(bodies(&got).last().map(String::as_str), Some("p1010"), "the newest survive");
}

#[test]
fn a_redis_restart_fails_sends_retryably_and_both_ends_recover() {
    let mut redis = TestRedis::start();
    let mut inbound = Inbound::open(opts(&redis), 2).unwrap();
    let mut out = Outbound::new(opts(&redis), 1);
    send(&mut out, 2, 1..=2);
    assert_eq!(bodies(&read_n(&mut inbound, 2)), ["p1", "p2"]);
    redis.kill();
    assert!(out.send(2, &[b"lost"]).is_err(), "a send without Redis fails");
    assert!(inbound.read(10, Duration::from_millis(50)).is_err());
    redis.restart();
    send(&mut out, 2, 3..=3);
    let got = read_n(&mut inbound, 1);
    assert_eq!(bodies(&got), ["p3"]);
    assert_eq!(
        got.iter().find(|d| matches!(d, Delivery::Gap { .. })),
        Some(&Delivery::Gap { from: 1, missed: 1 }),
        "the failed send shows as a gap"
    );
}
