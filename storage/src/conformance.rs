//! One conformance suite, run against every backend.
//!
//! A backend's test file supplies an `open` function that opens the same backing
//! store each time it is called (after the previous handle is dropped), and calls
//! [`run_all`]. Every check asserts behaviour the gateway relies on.

use crate::*;
use std::sync::Arc;

pub type Open<'a> = &'a dyn Fn() -> Arc<dyn Store>;

/// Runs every check in order on fresh ids, so one backing store serves them all.
pub fn run_all(open: Open<'_>) {
    users(open);
    conversations_and_members(open);
    pages_cross_buckets_both_ways(open);
    idempotent_reappend(open);
    positions_strictly_increase(open);
    edits_and_deletes(open);
    attachments(open);
    idempotency_keys(open);
    member_positions(open);
    unread_counts_and_list_order(open);
    concurrent_writers_to_one_conversation(open);
    mutes(open);
    reactions(open);
    presence(open);
    fencing(open);
    claims_name_their_node(open);
    survives_restart(open);
}

/// A text message at `seq` (client id `c<seq>`, body `message <seq>`).
/// Every file under `dir` whose bytes contain `needle` (files that vanish or
/// cannot be read while searched are skipped): how the erasure tests look for
/// text and keys left on disk.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

/// The non-zero (not erased) 32-byte key slots of the embedded store in `store_dir`.
pub fn vault_keys(store_dir: &std::path::Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(store_dir.join("message-keys.vault")).expect("reading the key vault");
    bytes.chunks(32).filter(|k| k.iter().any(|&b| b != 0)).map(<[u8]>::to_vec).collect()
}

pub fn msg(conv: ConversationId, seq: Seq, ts_ms: u64, sender: UserId) -> Message {
    Message {
        conversation_id: conv,
        seq,
        ts_ms,
        sender_id: sender,
        client_msg_id: format!("c{seq}"),
        kind: MessageKind::Text,
        body: format!("message {seq}"),
        target_user_id: None,
        role: None,
        target_seq: None,
        edited_ms: None,
        reactions: Vec::new(),
        my_reaction: None,
        attachment: None,
    }
}

fn conv_record(id: ConversationId, last_seq: Seq, last_ts_ms: u64) -> ConversationRecord {
    ConversationRecord {
        id,
        kind: ConversationKind::Group,
        title: format!("group {id}"),
        created_ms: 1,
        created_by: 1,
        last_seq,
        last_ts_ms,
    }
}

/// Appends `n` messages to `conv`, `per_bucket` per time bucket, as the sequencer would.
pub fn append(store: &dyn Store, conv: ConversationId, n: u64, per_bucket: u64) {
    let mut batch = Vec::new();
    let mut last_bucket = None;
    for seq in 1..=n {
        let ts = 1_700_000_000_000 + ((seq - 1) / per_bucket) * BUCKET_MS + seq;
        let b = bucket_of(ts);
        if last_bucket != Some(b) {
            batch.push(Mutation::PutBucket {
                conversation: conv,
                bucket: BucketRef { bucket: b, first_seq: seq },
            });
            last_bucket = Some(b);
        }
        batch.push(Mutation::PutMessage(msg(conv, seq, ts, 7)));
        if batch.len() >= 64 {
            store.commit(&batch).expect("commit");
            batch.clear();
        }
    }
    batch.push(Mutation::PutConversation(conv_record(conv, n, 0)));
    store.commit(&batch).expect("commit");
}

pub fn users(open: Open<'_>) {
    let s = open();
    let u = UserRecord { id: 1001, username: "Alice".into(), password_hash: "h".into(), created_ms: 5 };
    s.create_user(&u).unwrap();
    assert_eq!(s.user(1001).unwrap(), Some(u.clone()));
    assert_eq!(s.user_by_name("alice").unwrap(), Some(u.clone()), "usernames are case-insensitive");
    let dup = UserRecord { id: 1002, username: "ALICE".into(), ..u };
    let err = s.create_user(&dup).unwrap_err();
    assert_eq!(err.kind, ErrorKind::UsernameTaken);
    assert_eq!(s.user(1002).unwrap(), None, "a refused registration stores nothing");
    assert_eq!(s.user_by_name("nobody").unwrap(), None);
}

pub fn conversations_and_members(open: Open<'_>) {
    let s = open();
    let c = 2001;
    s.commit(&[
        Mutation::PutConversation(conv_record(c, 0, 0)),
        Mutation::PutMember { conversation: c, user: 11, role: Role::Owner },
        Mutation::PutMember { conversation: c, user: 12, role: Role::Member },
        Mutation::PutDirect { a: 12, b: 11, conversation: 2002 },
    ])
    .unwrap();
    assert_eq!(s.conversation(c).unwrap(), Some(conv_record(c, 0, 0)));
    let mut m = s.members(c).unwrap();
    m.sort_by_key(|(u, _)| *u);
    assert_eq!(m, vec![(11, Role::Owner), (12, Role::Member)]);
    assert_eq!(s.member_role(c, 12).unwrap(), Some(Role::Member));
    assert_eq!(s.user_conversations(11).unwrap(), vec![c]);
    assert_eq!(s.direct(11, 12).unwrap(), Some(2002), "pair lookup is unordered");
    assert_eq!(s.direct(12, 11).unwrap(), Some(2002));
    s.commit(&[Mutation::RemoveMember { conversation: c, user: 12 }]).unwrap();
    assert_eq!(s.member_role(c, 12).unwrap(), None);
    assert!(s.user_conversations(12).unwrap().is_empty());
}

pub fn pages_cross_buckets_both_ways(open: Open<'_>) {
    let s = open();
    let c = 3001;
    // 250 messages, 40 per bucket: 7 buckets.
    append(&*s, c, 250, 40);
    assert_eq!(s.buckets(c).unwrap().len(), 7);
    let seqs = |p: &Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let latest = page(&*s, c, Anchor::Latest, 100).unwrap();
    assert_eq!(seqs(&latest), (151..=250).rev().collect::<Vec<_>>());
    assert!(latest.has_more);

    let before = page(&*s, c, Anchor::Before(151), 100).unwrap();
    assert_eq!(seqs(&before), (51..=150).rev().collect::<Vec<_>>());
    assert!(before.has_more);
    let last = page(&*s, c, Anchor::Before(51), 100).unwrap();
    assert_eq!(seqs(&last), (1..=50).rev().collect::<Vec<_>>());
    assert!(!last.has_more);

    let after = page(&*s, c, Anchor::After(0), 100).unwrap();
    assert_eq!(seqs(&after), (1..=100).collect::<Vec<_>>());
    assert!(after.has_more);
    let after = page(&*s, c, Anchor::After(195), 100).unwrap();
    assert_eq!(seqs(&after), (196..=250).collect::<Vec<_>>());
    assert!(!after.has_more);

    assert!(page(&*s, c, Anchor::After(250), 10).unwrap().messages.is_empty());
    assert!(page(&*s, c, Anchor::Before(1), 10).unwrap().messages.is_empty());
    assert!(page(&*s, 999_999, Anchor::Latest, 10).unwrap().messages.is_empty());
    assert_eq!(message_at(&*s, c, 81).unwrap().unwrap().body, "message 81");
    assert_eq!(message_at(&*s, c, 251).unwrap(), None);
}

/// Every position from `start` on, following each page's cursor in its direction.
fn walk(s: &dyn Store, c: ConversationId, start: Anchor, limit: usize) -> Vec<Seq> {
    let mut seqs = Vec::new();
    let mut anchor = start;
    loop {
        let p = page(s, c, anchor, limit).unwrap();
        seqs.extend(p.messages.iter().map(|m| m.seq));
        match (p.messages.last(), anchor) {
            (Some(m), Anchor::After(_)) if p.has_more => anchor = Anchor::After(m.seq),
            (Some(m), _) if p.has_more => anchor = Anchor::Before(m.seq),
            _ => return seqs,
        }
    }
}

/// A retried commit (the same rows again) leaves one copy of each.
pub fn idempotent_reappend(open: Open<'_>) {
    let s = open();
    let c = 3101;
    append(&*s, c, 10, 4);
    append(&*s, c, 10, 4);
    let p = page(&*s, c, Anchor::After(0), 100).unwrap();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(s.buckets(c).unwrap().len(), 3);
    assert_eq!(s.conversation(c).unwrap().unwrap().last_seq, 10);
}

/// Walking the whole history with small pages, both ways, yields every position
/// once, strictly ordered, across bucket boundaries.
pub fn positions_strictly_increase(open: Open<'_>) {
    let s = open();
    let c = 3201;
    append(&*s, c, 97, 10);
    assert_eq!(walk(&*s, c, Anchor::After(0), 7), (1..=97).collect::<Vec<_>>());
    assert_eq!(walk(&*s, c, Anchor::Latest, 7), (1..=97).rev().collect::<Vec<_>>());
}

/// Edits rewrite the original row and append an `edit` message; deletes leave a
/// tombstone. The same row written twice in one batch keeps the later write.
pub fn edits_and_deletes(open: Open<'_>) {
    let s = open();
    let c = 3301;
    append(&*s, c, 3, 10);
    let original = message_at(&*s, c, 2).unwrap().unwrap();
    let first = Message { body: "edited once".into(), edited_ms: Some(50), ..original.clone() };
    let second = Message { body: "edited twice".into(), edited_ms: Some(60), ..original.clone() };
    let edit = |seq, target| Message {
        seq,
        kind: MessageKind::Edit,
        target_seq: Some(target),
        ..msg(c, seq, original.ts_ms + seq, 7)
    };
    s.commit(&[
        Mutation::PutMessage(first),
        Mutation::PutMessage(edit(4, 2)),
        Mutation::PutMessage(second.clone()),
        Mutation::PutMessage(edit(5, 2)),
    ])
    .unwrap();
    assert_eq!(message_at(&*s, c, 2).unwrap().unwrap(), second, "the later write of one batch wins");
    let three = message_at(&*s, c, 3).unwrap().unwrap();
    let tombstone = Message { kind: MessageKind::Deleted, body: String::new(), edited_ms: None, ..three };
    let delete = Message { kind: MessageKind::Delete, body: String::new(), ..edit(6, 3) };
    s.commit(&[Mutation::PutMessage(tombstone.clone()), Mutation::PutMessage(delete)]).unwrap();
    assert_eq!(message_at(&*s, c, 3).unwrap().unwrap(), tombstone);
    let p = page(&*s, c, Anchor::Latest, 10).unwrap();
    let kinds: Vec<_> = p.messages.iter().map(|m| (m.seq, m.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (6, MessageKind::Delete),
            (5, MessageKind::Edit),
            (4, MessageKind::Edit),
            (3, MessageKind::Deleted),
            (2, MessageKind::Text),
            (1, MessageKind::Text)
        ]
    );
    assert_eq!(p.messages[0].target_seq, Some(3));
}

/// A message's attachment is stored with it (sealed with its caption), kept
/// through an edit of the caption, and gone from its tombstone.
pub fn attachments(open: Open<'_>) {
    let s = open();
    let c = 3401;
    let a = protocol::Attachment {
        attachment_id: format!("{c}.7.00000000000000aa"),
        file_name: "report \"final\" ☀.pdf".into(),
        media_type: "application/pdf".into(),
        size: 12345,
        sha256: "ab".repeat(32),
        width: None,
        height: Some(10),
        preview: "data".into(),
    };
    append(&*s, c, 2, 10);
    let (one, two) = (message_at(&*s, c, 1).unwrap().unwrap(), message_at(&*s, c, 2).unwrap().unwrap());
    let with = Message { body: String::new(), attachment: Some(Box::new(a.clone())), ..one };
    let caption_starting_like_an_envelope = Message { body: "{\"body\":\"x\"}".into(), ..two };
    s.commit(&[
        Mutation::PutMessage(with.clone()),
        Mutation::PutMessage(caption_starting_like_an_envelope.clone()),
    ])
    .unwrap();
    assert_eq!(message_at(&*s, c, 1).unwrap().unwrap(), with);
    assert_eq!(
        message_at(&*s, c, 2).unwrap().unwrap(),
        caption_starting_like_an_envelope,
        "plain text stays text"
    );
    let edited = Message { body: "new caption".into(), edited_ms: Some(1_500), ..with.clone() };
    s.commit(&[Mutation::PutMessage(edited.clone())]).unwrap();
    let p = page(&*s, c, Anchor::Latest, 10).unwrap();
    assert_eq!(p.messages.iter().find(|m| m.seq == 1), Some(&edited), "an edit keeps the attachment");
    let tombstone = Message {
        kind: MessageKind::Deleted,
        body: String::new(),
        edited_ms: None,
        attachment: None,
        ..edited
    };
    s.commit(&[Mutation::PutMessage(tombstone.clone())]).unwrap();
    assert_eq!(message_at(&*s, c, 1).unwrap().unwrap(), tombstone);
}

pub fn idempotency_keys(open: Open<'_>) {
    let s = open();
    s.commit(&[Mutation::PutIdempotency {
        conversation: 4001,
        sender: 5,
        client_msg_id: "x".into(),
        seq: 9,
    }])
    .unwrap();
    assert_eq!(s.idempotent_seq(4001, 5, "x").unwrap(), Some(9));
    assert_eq!(s.idempotent_seq(4001, 6, "x").unwrap(), None, "keys are per sender");
    assert_eq!(s.idempotent_seq(4001, 5, "y").unwrap(), None);
}

pub fn member_positions(open: Open<'_>) {
    let s = open();
    assert_eq!(s.positions(4101, 5).unwrap(), Positions::default(), "none stored: zeros");
    let p = |delivered, read| Positions { delivered, read };
    s.commit(&[
        Mutation::PutPositions { conversation: 4101, user: 6, positions: p(9, 4) },
        Mutation::PutPositions { conversation: 4101, user: 5, positions: p(3, 3) },
        Mutation::PutPositions { conversation: 4102, user: 5, positions: p(1, 0) },
    ])
    .unwrap();
    s.commit(&[Mutation::PutPositions { conversation: 4101, user: 5, positions: p(7, 5) }]).unwrap();
    assert_eq!(s.positions(4101, 5).unwrap(), p(7, 5), "positions move forward");
    s.commit(&[Mutation::PutPositions { conversation: 4101, user: 5, positions: p(6, 6) }]).unwrap();
    assert_eq!(s.positions(4101, 5).unwrap(), p(7, 6), "each position only moves forward");
    s.commit(&[
        Mutation::PutPositions { conversation: 4101, user: 6, positions: p(12, 4) },
        Mutation::PutPositions { conversation: 4101, user: 6, positions: p(10, 8) },
    ])
    .unwrap();
    assert_eq!(s.positions(4101, 6).unwrap(), p(12, 8), "also within one batch");
    assert_eq!(
        s.all_positions(4101).unwrap(),
        vec![(5, p(7, 6)), (6, p(12, 8))],
        "by user, this conversation only"
    );
    assert_eq!(s.all_positions(4103).unwrap(), vec![]);
}

/// The conversation list: newest activity first (ties by id), cursor paging, and
/// each item's unread count from the member's read position.
pub fn unread_counts_and_list_order(open: Open<'_>) {
    let s = open();
    let me = 4501;
    let mut batch = Vec::new();
    // Five conversations; activity times 30, 10, 50, 50, 20 (a tie at 50).
    for (i, ts) in [30u64, 10, 50, 50, 20].into_iter().enumerate() {
        let c = 4510 + i as u64;
        batch.push(Mutation::PutConversation(conv_record(c, 0, ts)));
        batch.push(Mutation::PutMember { conversation: c, user: me, role: Role::Member });
    }
    batch.push(Mutation::PutConversation(conv_record(4599, 0, 99)));
    s.commit(&batch).unwrap();
    append(&*s, 4512, 8, 100);
    s.commit(&[
        Mutation::PutConversation(conv_record(4512, 8, 50)),
        Mutation::PutPositions {
            conversation: 4512,
            user: me,
            positions: Positions { delivered: 8, read: 3 },
        },
        Mutation::SetMuted { conversation: 4510, user: me, muted: true },
    ])
    .unwrap();
    let (first, more) = conversation_list(&*s, me, 3, None).unwrap();
    let ids = |v: &[protocol::ConversationSummary]| v.iter().map(|c| c.conversation_id).collect::<Vec<_>>();
    assert_eq!(ids(&first), vec![4513, 4512, 4510], "newest first, ties by id; non-members absent");
    assert!(more);
    let two = &first[1];
    assert_eq!((two.last_seq, two.read_seq, two.unread), (8, 3, 5), "unread = last - read");
    assert_eq!(two.last_message.as_ref().map(|m| m.seq), Some(8));
    assert_eq!(first[0].unread, 0);
    assert!(first[2].muted && !first[0].muted);
    let last = first.last().unwrap();
    let (rest, more) = conversation_list(&*s, me, 3, Some((last.last_ts_ms, last.conversation_id))).unwrap();
    assert_eq!(ids(&rest), vec![4514, 4511]);
    assert!(!more);
}

/// Several writers commit to one conversation at once (disjoint positions, and
/// positions of one member): nothing is lost and positions end at the maximum.
pub fn concurrent_writers_to_one_conversation(open: Open<'_>) {
    let s = open();
    let c = 4601;
    let writers = 4u64;
    let per = 50u64;
    std::thread::scope(|scope| {
        for w in 0..writers {
            let s = s.clone();
            scope.spawn(move || {
                for k in 0..per {
                    let seq = 1 + k * writers + w;
                    let ts = 1_700_000_000_000 + seq;
                    s.commit(&[
                        Mutation::PutMessage(msg(c, seq, ts, 7)),
                        Mutation::PutPositions {
                            conversation: c,
                            user: 9,
                            positions: Positions { delivered: seq, read: seq },
                        },
                    ])
                    .expect("concurrent commit");
                }
            });
        }
    });
    let n = writers * per;
    s.commit(&[
        Mutation::PutBucket {
            conversation: c,
            bucket: BucketRef { bucket: bucket_of(1_700_000_000_001), first_seq: 1 },
        },
        Mutation::PutConversation(conv_record(c, n, 0)),
    ])
    .unwrap();
    assert_eq!(walk(&*s, c, Anchor::After(0), 100), (1..=n).collect::<Vec<_>>());
    assert_eq!(s.positions(c, 9).unwrap(), Positions { delivered: n, read: n });
}

pub fn mutes(open: Open<'_>) {
    let s = open();
    assert!(!s.muted(4201, 5).unwrap());
    s.commit(&[Mutation::SetMuted { conversation: 4201, user: 5, muted: true }]).unwrap();
    assert!(s.muted(4201, 5).unwrap());
    assert!(!s.muted(4201, 6).unwrap(), "per member");
    assert!(!s.muted(4202, 5).unwrap(), "per conversation");
    s.commit(&[Mutation::SetMuted { conversation: 4201, user: 5, muted: false }]).unwrap();
    assert!(!s.muted(4201, 5).unwrap());
}

pub fn reactions(open: Open<'_>) {
    let s = open();
    let c = 4301;
    append(&*s, c, 5, 5);
    let react =
        |seq, user, emoji: &str| Mutation::PutReaction { conversation: c, seq, user, emoji: emoji.into() };
    s.commit(&[react(2, 7, "👍"), react(2, 5, "❤️"), react(4, 5, "👍"), react(2, 6, "👍")]).unwrap();
    s.commit(&[react(4, 5, "😂")]).unwrap();
    assert_eq!(
        s.reactions(c, 1, 5).unwrap(),
        vec![(2, 5, "❤️".into()), (2, 6, "👍".into()), (2, 7, "👍".into()), (4, 5, "😂".into())],
        "by seq then user; one per user and message, the later write wins"
    );
    assert_eq!(s.reactions(c, 3, 5).unwrap(), vec![(4, 5, "😂".into())], "range bounds hold");
    s.commit(&[react(2, 6, "")]).unwrap();
    assert_eq!(s.reactions(c, 2, 2).unwrap().len(), 2, "an empty emoji removes");
    assert!(s.reactions(c + 1, 0, u64::MAX).unwrap().is_empty(), "per conversation");

    let mut p = page(&*s, c, Anchor::Latest, 10).unwrap();
    add_reactions(&*s, c, 5, &mut p.messages).unwrap();
    let two = p.messages.iter().find(|m| m.seq == 2).unwrap();
    assert_eq!(
        two.reactions,
        vec![
            protocol::ReactionCount { emoji: "❤️".into(), count: 1 },
            protocol::ReactionCount { emoji: "👍".into(), count: 1 }
        ]
    );
    assert_eq!(two.my_reaction.as_deref(), Some("❤️"));
    let one = p.messages.iter().find(|m| m.seq == 1).unwrap();
    assert!(one.reactions.is_empty() && one.my_reaction.is_none());
}

pub fn presence(open: Open<'_>) {
    let s = open();
    assert_eq!(s.presence(4401).unwrap(), PresenceRecord::default(), "never seen, not hidden");
    s.commit(&[
        Mutation::PutLastSeen { user: 4401, ms: 10 },
        Mutation::SetHideLastSeen { user: 4402, hide: true },
    ])
    .unwrap();
    s.commit(&[Mutation::PutLastSeen { user: 4401, ms: 20 }]).unwrap();
    assert_eq!(s.presence(4401).unwrap(), PresenceRecord { last_seen_ms: Some(20), hide_last_seen: false });
    assert_eq!(s.presence(4402).unwrap(), PresenceRecord { last_seen_ms: None, hide_last_seen: true });
    s.commit(&[Mutation::SetHideLastSeen { user: 4402, hide: false }]).unwrap();
    assert!(!s.presence(4402).unwrap().hide_last_seen);
}

/// A commit fenced with an epoch that a later claim replaced writes nothing (no
/// position reused or overwritten) and fails as fenced; the new owner's commits land.
pub fn fencing(open: Open<'_>) {
    let s = open();
    let conv = 9_100;
    assert_eq!(s.claim(conv, 1).unwrap(), 0, "nothing to own before the conversation exists");
    append(&*s, conv, 3, 100);
    let old = s.claim(conv, 1).unwrap();
    let new = s.claim(conv, 1).unwrap();
    assert!(new > old && old > 0, "each claim moves the epoch on: {old} then {new}");
    let ts = 1_700_000_000_000 + 4;
    let write = |seq: Seq, body: &str, epoch: u64| {
        let mut m = msg(conv, seq, ts, 7);
        m.body = body.into();
        s.commit(&[
            Mutation::PutMessage(m),
            Mutation::PutIdempotency { conversation: conv, sender: 7, client_msg_id: format!("x{seq}"), seq },
            Mutation::PutConversation(conv_record(conv, seq, ts)),
            Mutation::Fence { conversation: conv, epoch },
        ])
    };
    write(4, "from the new owner", new).expect("the owner's commit lands");
    let err = write(4, "from the deposed owner", old).expect_err("a deposed owner is fenced");
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    let err =
        write(5, "past the end, from the deposed owner", old).expect_err("fenced for new positions too");
    assert_eq!(err.kind, ErrorKind::Fenced, "{err}");
    let p = page(&*s, conv, Anchor::After(0), 10).unwrap();
    let bodies: Vec<(Seq, &str)> = p.messages.iter().map(|m| (m.seq, m.body.as_str())).collect();
    assert_eq!(bodies[3], (4, "from the new owner"), "position 4 was not overwritten");
    assert_eq!(p.messages.len(), 4, "nothing was written past it");
    assert_eq!(s.conversation(conv).unwrap().unwrap().last_seq, 4, "the head did not move");
    assert_eq!(s.idempotent_seq(conv, 7, "x5").unwrap(), None, "no part of a fenced commit lands");
    // A conversation nobody claimed yet: its creator writes with epoch 0 until a claim.
    let fresh = 9_101;
    append(&*s, fresh, 1, 100);
    let fenced0 = |seq: Seq| {
        s.commit(&[
            Mutation::PutConversation(conv_record(fresh, seq, ts)),
            Mutation::Fence { conversation: fresh, epoch: 0 },
        ])
    };
    fenced0(2).expect("the creator's epoch is 0 until someone claims");
    assert_eq!(s.claim(fresh, 1).unwrap(), 1);
    assert_eq!(fenced0(3).expect_err("claimed").kind, ErrorKind::Fenced);
    assert_eq!(s.conversation(fresh).unwrap().unwrap().last_seq, 2);
    // A claim after a claim, and the owner's next commit with the newest epoch.
    let newest = s.claim(conv, 1).unwrap();
    write(5, "five", newest).expect("the newest owner writes on");
    assert_eq!(s.conversation(conv).unwrap().unwrap().last_seq, 5);
}

/// A node's claimed conversations are listed while its claim is the latest and
/// their last message is recent enough: what the fleet shows again when it dies.
pub fn claims_name_their_node(open: Open<'_>) {
    let s = open();
    let (a, b, c) = (9_200, 9_201, 9_202);
    for conv in [a, b, c] {
        append(&*s, conv, 2, 100);
    }
    let sorted = |mut v: Vec<ConversationId>| {
        v.sort_unstable();
        v
    };
    let listed = |node: u16, since: u64| sorted(s.claimed_by(node, since).unwrap());
    assert_eq!(listed(61, 0), Vec::<ConversationId>::new(), "nothing claimed yet");
    s.claim(a, 61).unwrap();
    s.claim(b, 61).unwrap();
    s.claim(c, 62).unwrap();
    assert_eq!(listed(61, 0), [a, b]);
    assert_eq!(listed(62, 0), [c]);
    let epoch = s.claim(b, 62).unwrap();
    assert_eq!(listed(61, 0), [a], "a later claim by another node replaces the first");
    assert_eq!(listed(62, 0), [b, c]);
    // Only conversations written at or after `since`.
    let recent = 1_800_000_000_000;
    s.commit(&[
        Mutation::PutConversation(conv_record(b, 2, recent)),
        Mutation::Fence { conversation: b, epoch },
    ])
    .unwrap();
    assert_eq!(listed(62, recent), [b]);
    assert_eq!(listed(62, recent + 1), Vec::<ConversationId>::new());
    assert_eq!(listed(63, 0), Vec::<ConversationId>::new(), "a node that claimed nothing");
}

pub fn survives_restart(open: Open<'_>) {
    {
        let s = open();
        append(&*s, 5001, 30, 10);
    }
    let s = open();
    let p = page(&*s, 5001, Anchor::After(0), 100).unwrap();
    assert_eq!(p.messages.len(), 30);
    assert_eq!(s.conversation(5001).unwrap().unwrap().last_seq, 30);
}
