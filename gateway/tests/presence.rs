//! Presence through the real gateway, in both subprotocols: online while any
//! device is connected, offline with `last_seen` after a grace period, only to
//! users who share a conversation (in events and queries), and `last_seen` hideable.

mod support;

use protocol::{ClientMsg, PresenceInfo, ServerMsg, Subprotocol};
use support::*;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A synced connection.
fn device(g: &TestGateway, token: &str, p: Subprotocol) -> Client {
    let mut c = g.connect(token, p);
    c.sync(vec![]);
    c
}

fn other(p: Subprotocol) -> Subprotocol {
    if p == Subprotocol::Json { Subprotocol::FlatBuffers } else { Subprotocol::Json }
}

#[test]
fn presence_reaches_contacts_only_and_goes_offline_after_the_last_device() {
    for p in both() {
        let tmp = tempfile::tempdir().unwrap();
        let g = TestGateway::start_in(tmp.path(), "[presence]\ngrace_ms = 200\n");
        let (a, ta) = g.user("alice");
        let (b, tb) = g.user("bob");
        let (c, tc) = g.user("carol");
        let (d, td) = g.user("dave");
        // alice-bob, bob-dave and carol-dave share conversations; carol never shares one with alice.
        let mut setup = device(&g, &tb, p);
        setup.request(ClientMsg::CreateDirect { user_id: a });
        setup.request(ClientMsg::CreateDirect { user_id: d });
        let mut setup2 = device(&g, &tc, p);
        setup2.request(ClientMsg::CreateDirect { user_id: d });
        let mut bob = setup;
        let mut carol = setup2;

        // alice's first device: bob hears she is online.
        let t0 = now_ms();
        let mut alice1 = device(&g, &ta, other(p));
        assert_eq!(presence(&mut bob), online(a));
        // A second device, then the first one leaving: still online, nobody hears a thing.
        let alice2 = device(&g, &ta, p);
        drop(alice1);
        // dave's arrival is the marker: it is the next thing bob and carol hear.
        let dave = device(&g, &td, p);
        assert_eq!(presence(&mut bob), online(d), "no flap for alice while a device remains");
        assert_eq!(presence(&mut carol), online(d), "carol never hears about alice");
        assert_eq!(query_presence(&mut bob, vec![a])[0], online(a));

        // The last device leaves: after the grace period bob hears offline with last_seen.
        drop(alice2);
        let off = presence(&mut bob);
        assert_eq!((off.user_id, off.online), (a, false));
        let seen = off.last_seen_ms.expect("last_seen shown");
        assert!(seen >= t0 && seen <= now_ms(), "last_seen {seen} is when the device left");

        // Fetching a set: in the order asked; contacts as they are, yourself too, and
        // everyone else (strangers, unknown ids) as offline and never seen.
        let never = |user_id| PresenceInfo { user_id, online: false, last_seen_ms: None };
        assert_eq!(
            query_presence(&mut bob, vec![a, d, b]),
            vec![PresenceInfo { user_id: a, online: false, last_seen_ms: Some(seen) }, online(d), online(b)]
        );
        let got = query_presence(&mut carol, vec![a, b, c, d, 987_654_321]);
        assert_eq!(got, vec![never(a), never(b), online(c), online(d), never(987_654_321)]);
        assert_eq!(error_code(carol.request(ClientMsg::GetPresence { user_ids: (0..101).collect() })), 1004);

        // Hidden last_seen: offline without it, in events and queries alike.
        alice1 = device(&g, &ta, p);
        assert_eq!(presence(&mut bob), online(a));
        assert_eq!(alice1.request(ClientMsg::SetPrivacy { hide_last_seen: true }), ServerMsg::Ok);
        drop(alice1);
        assert_eq!(presence(&mut bob), PresenceInfo { user_id: a, online: false, last_seen_ms: None });
        assert_eq!(
            query_presence(&mut bob, vec![a])[0],
            PresenceInfo { user_id: a, online: false, last_seen_ms: None }
        );
        // Shown again once she says so.
        let mut alice3 = device(&g, &ta, other(p));
        assert_eq!(presence(&mut bob), online(a));
        assert_eq!(alice3.request(ClientMsg::SetPrivacy { hide_last_seen: false }), ServerMsg::Ok);
        drop(alice3);
        let off = presence(&mut bob);
        assert!(!off.online && off.last_seen_ms.is_some(), "{off:?}");
        drop(dave);
    }
}

#[test]
fn a_device_that_reconnects_within_the_grace_period_does_not_flap() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_in(tmp.path(), "[presence]\ngrace_ms = 600000\n");
    let (a, ta) = g.user("alice");
    let (_, tb) = g.user("bob");
    let (d, td) = g.user("dave");
    let mut bob = device(&g, &tb, Subprotocol::Json);
    bob.request(ClientMsg::CreateDirect { user_id: a });
    bob.request(ClientMsg::CreateDirect { user_id: d });

    let phone = device(&g, &ta, Subprotocol::FlatBuffers);
    assert_eq!(presence(&mut bob), online(a));
    drop(phone);
    let mut phone = device(&g, &ta, Subprotocol::FlatBuffers);
    let _dave = device(&g, &td, Subprotocol::Json);
    assert_eq!(presence(&mut bob), online(d), "no offline/online pair for alice's reconnect");
    // Gone, but within the grace period: still shown online.
    phone.ws.close(None).unwrap();
    drop(phone);
    assert_eq!(query_presence(&mut bob, vec![a])[0], online(a));
}
