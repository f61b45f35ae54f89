//! The conformance suite against PostgreSQL: a real server from Debian's
//! `postgresql` package on a free loopback port (see `storage::testkit`).

use std::sync::Arc;
use std::time::Duration;
use storage::testkit::TestPostgres;
use storage::{PostgresOptions, PostgresStore, Store, conformance};

fn options(url: String) -> PostgresOptions {
    PostgresOptions {
        url,
        pool_size: 8,
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(10),
    }
}

#[test]
fn postgres_store_conforms() {
    let url = TestPostgres::shared().fresh_database();
    let store = PostgresStore::connect(&options(url.clone())).expect("connect");
    assert_eq!(store.schema_version().unwrap(), 0, "a fresh database has no schema");
    assert_eq!(store.migrate().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new(), "migrations apply once");
    assert_eq!(store.schema_version().unwrap(), 4);
    drop(store);
    let open = || Arc::new(PostgresStore::connect(&options(url.clone())).expect("connect")) as Arc<dyn Store>;
    conformance::run_all(&open);
}

/// Text is stored sealed, and a delete removes the one key that opens the
/// deleted text and its edits; after `erase_deleted` (what `gateway erase` runs)
/// and a restart of the connection, that key is nowhere in the server's files,
/// while a key that was not deleted still is (so the search would find one).
#[test]
fn a_deleted_message_is_gone_from_the_database_files() {
    use storage::conformance::{files_containing, msg};
    use storage::{Message, MessageKind, Mutation, message_at};
    let pg = TestPostgres::shared();
    let url = pg.fresh_database();
    let s = PostgresStore::connect(&options(url.clone())).expect("connect");
    s.migrate().unwrap();
    let c = 77;
    let kept = Message { body: "kept-5b1d0c7e".into(), ..msg(c, 1, 1000, 7) };
    let doomed = Message { body: "doomed-9f3a44e2".into(), ..msg(c, 2, 1001, 7) };
    let edited = Message { body: "edited-c08e1d35".into(), edited_ms: Some(1003), ..doomed.clone() };
    let edit = Message {
        kind: MessageKind::Edit,
        target_seq: Some(2),
        body: edited.body.clone(),
        ..msg(c, 3, 1003, 7)
    };
    let bucket = storage::BucketRef { bucket: storage::bucket_of(1000), first_seq: 1 };
    s.commit(&[
        Mutation::PutBucket { conversation: c, bucket },
        Mutation::PutMessage(kept.clone()),
        Mutation::PutMessage(doomed),
    ])
    .unwrap();
    s.commit(&[Mutation::PutMessage(edited.clone()), Mutation::PutMessage(edit)]).unwrap();
    assert_eq!(message_at(&s, c, 2).unwrap().unwrap().body, "edited-c08e1d35");
    assert_eq!(message_at(&s, c, 3).unwrap().unwrap().body, "edited-c08e1d35", "the edit event reads back");
    let (kept_key, doomed_key) = (pg.message_key(&url, c, 1), pg.message_key(&url, c, 2));

    let tombstone = Message { kind: MessageKind::Deleted, body: String::new(), edited_ms: None, ..edited };
    let delete =
        Message { kind: MessageKind::Delete, body: String::new(), target_seq: Some(2), ..msg(c, 4, 1004, 7) };
    s.commit(&[Mutation::PutMessage(tombstone), Mutation::PutMessage(delete)]).unwrap();
    let report = s.erase_deleted().unwrap();
    assert!(report.contains("checkpointed") && !report.contains("wal_recycle"), "{report}");
    drop(s);

    for text in ["kept-5b1d0c7e", "doomed-9f3a44e2", "edited-c08e1d35"] {
        assert_eq!(files_containing(pg.dir(), text.as_bytes()), Vec::<std::path::PathBuf>::new(), "{text}");
    }
    assert_eq!(
        files_containing(pg.dir(), &doomed_key),
        Vec::<std::path::PathBuf>::new(),
        "the key is nowhere"
    );
    assert!(!files_containing(pg.dir(), &kept_key).is_empty(), "a live key is found by the same search");
    let s = PostgresStore::connect(&options(url)).expect("connect");
    assert_eq!(message_at(&s, c, 1).unwrap().unwrap(), kept, "the kept message reads back");
    assert_eq!(message_at(&s, c, 2).unwrap().unwrap().kind, MessageKind::Deleted);
    assert_eq!(message_at(&s, c, 3).unwrap().unwrap().body, "", "its edit events lost their text too");
}
