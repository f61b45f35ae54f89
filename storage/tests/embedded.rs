//! The conformance suite against the embedded (fjall) backend.

use std::sync::Arc;
use storage::conformance::{files_containing, vault_keys};
use storage::{FjallStore, Store, conformance};

#[test]
fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Arc::new(FjallStore::open(dir.path()).expect("open")) as Arc<dyn Store>;
    conformance::run_all(&open);
}

/// Text never reaches the LSM files in the clear, and a delete destroys the only
/// key that opens the deleted text and its edits: after a reopen, neither the
/// texts nor that key are anywhere in the data directory, while the message
/// that was not deleted still reads back.
#[test]
fn a_deleted_message_is_gone_from_the_disk() {
    use storage::{Message, MessageKind, Mutation, conformance::msg, message_at};
    let dir = tempfile::tempdir().unwrap();
    let c = 77;
    let kept = Message { body: "kept-5b1d0c7e".into(), ..msg(c, 1, 1000, 7) };
    let doomed = Message { body: "doomed-9f3a44e2".into(), ..msg(c, 2, 1001, 7) };
    let edited = Message { body: "edited-c08e1d35".into(), edited_ms: Some(1003), ..doomed.clone() };
    let edit = Message { kind: MessageKind::Edit, target_seq: Some(2), ..msg(c, 3, 1003, 7) };
    let edit = Message { body: edited.body.clone(), ..edit };
    {
        let s = FjallStore::open(dir.path()).unwrap();
        let bucket = storage::BucketRef { bucket: storage::bucket_of(1000), first_seq: 1 };
        s.commit(&[
            Mutation::PutBucket { conversation: c, bucket },
            Mutation::PutMessage(kept.clone()),
            Mutation::PutMessage(doomed.clone()),
        ])
        .unwrap();
        s.commit(&[Mutation::PutMessage(edited.clone()), Mutation::PutMessage(edit.clone())]).unwrap();
        assert_eq!(message_at(&s, c, 2).unwrap().unwrap().body, "edited-c08e1d35");
        assert_eq!(
            message_at(&s, c, 3).unwrap().unwrap().body,
            "edited-c08e1d35",
            "the edit event reads back"
        );
        for text in ["kept-5b1d0c7e", "doomed-9f3a44e2", "edited-c08e1d35"] {
            assert_eq!(files_containing(dir.path(), text.as_bytes()), Vec::<std::path::PathBuf>::new());
        }
        let before = vault_keys(dir.path());
        assert_eq!(before.len(), 2, "one key per text message, edits reuse it");
        let tombstone =
            Message { kind: MessageKind::Deleted, body: String::new(), edited_ms: None, ..edited };
        let delete = Message {
            kind: MessageKind::Delete,
            body: String::new(),
            target_seq: Some(2),
            ..msg(c, 4, 1004, 7)
        };
        s.commit(&[Mutation::PutMessage(tombstone), Mutation::PutMessage(delete)]).unwrap();
        let after = vault_keys(dir.path());
        let erased: Vec<_> = before.iter().filter(|k| !after.contains(k)).collect();
        assert_eq!(erased.len(), 1, "the deleted message's key is erased");
        drop(s);
        let s = FjallStore::open(dir.path()).unwrap();
        for key in erased {
            assert_eq!(
                files_containing(dir.path(), key),
                Vec::<std::path::PathBuf>::new(),
                "the key is nowhere"
            );
        }
        assert_eq!(message_at(&s, c, 1).unwrap().unwrap(), kept, "the kept message reads back");
        assert_eq!(message_at(&s, c, 2).unwrap().unwrap().body, "");
        assert_eq!(message_at(&s, c, 3).unwrap().unwrap().body, "", "its edit events lost their text too");

        // Sent and deleted within one commit: the key never reaches the disk.
        let brief = Message { body: "brief-77e0a1b3".into(), ..msg(c, 5, 1005, 7) };
        let gone = Message { kind: MessageKind::Deleted, body: String::new(), ..brief.clone() };
        s.commit(&[Mutation::PutMessage(brief), Mutation::PutMessage(gone)]).unwrap();
        assert_eq!(vault_keys(dir.path()), after, "no key was added");
        assert_eq!(message_at(&s, c, 5).unwrap().unwrap().kind, MessageKind::Deleted);
    }
}
