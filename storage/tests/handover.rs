//! The ownership hand-over protocol the gateway's sequencer follows, as a
//! property: nodes take a conversation from each other in any order (each
//! claims, then reads the head), each appends with the head and epoch it holds,
//! possibly long after it lost the conversation (a stopped node waking with its
//! cache). Whatever the interleaving, the stored order has no gap, no position
//! is ever overwritten, and every append that was acknowledged (committed) is
//! in it where it was acknowledged.

use proptest::prelude::*;
use std::collections::BTreeMap;
use storage::{Anchor, BucketRef, ConversationKind, ConversationRecord, FjallStore, Mutation, Store};

const CONV: u64 = 77;
const TS: u64 = 1_795_433_361_481;

fn record(last_seq: u64) -> ConversationRecord {
    ConversationRecord {
        id: CONV,
        kind: ConversationKind::Group,
        title: "g".into(),
        created_ms: 1,
        created_by: 1,
        last_seq,
        last_ts_ms: TS,
    }
}

/// What one node holds in its cache.
#[derive(Clone, Copy)]
struct Held {
    epoch: u64,
    head: u64,
}

#[derive(Debug, Clone)]
enum Step {
    /// Node `n` takes the conversation over: claims, then reads the head.
    TakeOver(usize),
    /// Node `n` appends one message with what it holds (if it ever took over).
    Append(usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![(0usize..3).prop_map(Step::TakeOver), (0usize..3).prop_map(Step::Append)],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn no_interleaving_of_owners_reuses_or_loses_a_position(steps in steps()) {
        let dir = tempfile::tempdir().unwrap();
        let s = FjallStore::open(dir.path()).unwrap();
        s.commit(&[
            Mutation::PutConversation(record(0)),
            Mutation::PutBucket { conversation: CONV, bucket: BucketRef { bucket: storage::bucket_of(TS), first_seq: 1 } },
        ])
        .unwrap();
        let mut held: [Option<Held>; 3] = [None; 3];
        let mut acked: BTreeMap<u64, String> = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Step::TakeOver(n) => {
                    let epoch = s.claim(CONV, 1).unwrap();
                    let head = s.conversation(CONV).unwrap().unwrap().last_seq;
                    held[n] = Some(Held { epoch, head });
                }
                Step::Append(n) => {
                    let Some(h) = held[n] else { continue };
                    let seq = h.head + 1;
                    let body = format!("node {n} step {i}");
                    let mut m = storage::conformance::msg(CONV, seq, TS, 7);
                    m.body = body.clone();
                    let r = s.commit(&[
                        Mutation::PutMessage(m),
                        Mutation::PutConversation(record(seq)),
                        Mutation::Fence { conversation: CONV, epoch: h.epoch },
                    ]);
                    match r {
                        Ok(()) => {
                            prop_assert!(acked.insert(seq, body).is_none(), "position {} acknowledged twice", seq);
                            held[n] = Some(Held { head: seq, ..h });
                        }
                        Err(e) => {
                            prop_assert_eq!(e.kind, storage::ErrorKind::Fenced);
                            // A fenced node drops what it held; it must take over again.
                            held[n] = None;
                        }
                    }
                }
            }
        }
        let head = s.conversation(CONV).unwrap().unwrap().last_seq;
        let stored = storage::page(&s, CONV, Anchor::After(0), 100).unwrap().messages;
        let stored: Vec<(u64, String)> = stored.into_iter().map(|m| (m.seq, m.body)).collect();
        prop_assert_eq!(stored.len() as u64, head, "no gap up to the head");
        prop_assert_eq!(stored, acked.into_iter().collect::<Vec<_>>(), "every acknowledged append, where it was acknowledged");
    }
}
