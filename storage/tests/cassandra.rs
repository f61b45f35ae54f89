//! The conformance suite against Apache Cassandra or ScyllaDB, when one is
//! reachable: `SWITCHBOARD_CASSANDRA=host:port[,host:port...]`, with the local
//! datacenter's name in `SWITCHBOARD_CASSANDRA_DC` (default `datacenter1`, what a
//! stock Cassandra calls its first datacenter). `scripts/test` starts a real
//! node from Cassandra's Maven Central jars (`scripts/cassandra`) and sets the
//! variable; without it the test says it was skipped and checks nothing.
//! Each run creates its own keyspace (replication factor
//! `SWITCHBOARD_CASSANDRA_RF`, default 1) and drops it.

use std::sync::Arc;
use storage::{CassandraOptions, CassandraStore, Store, conformance};

fn options() -> Option<CassandraOptions> {
    storage::testkit::cassandra_from_env(&format!("sb_conformance_{}", std::process::id()))
}

#[test]
fn cassandra_store_conforms() {
    let Some(opts) = options() else {
        eprintln!(
            "SKIPPED: the Cassandra conformance run needs a server; set SWITCHBOARD_CASSANDRA=host:port \
             (scripts/cassandra start runs one and prints it; scripts/test does so itself)"
        );
        return;
    };
    let store = CassandraStore::connect(&opts).expect("connect to Cassandra");
    assert_eq!(store.schema_version().unwrap(), 0, "a fresh keyspace has no schema");
    assert!(store.migrate().unwrap(), "migrate creates the keyspace");
    assert!(!store.migrate().unwrap(), "a second migrate changes nothing");
    assert_eq!(store.schema_version().unwrap(), storage::CASSANDRA_SCHEMA_VERSION);
    drop(store);
    let open = || Arc::new(CassandraStore::connect(&opts).expect("connect")) as Arc<dyn Store>;
    conformance::run_all(&open);
    CassandraStore::connect(&opts).unwrap().drop_keyspace().unwrap();
}

/// A keyspace made by schema version 1 (bodies in the clear, no key table, no
/// owner epochs) is brought up to date by `migrate`; its old messages read back
/// as they were, new ones are sealed, and its conversations can be claimed.
#[test]
fn a_version_1_keyspace_migrates_to_sealed_bodies() {
    use storage::conformance::msg;
    use storage::{Message, Mutation, message_at};
    let Some(opts) =
        storage::testkit::cassandra_from_env(&format!("sb_conformance_{}_v1", std::process::id()))
    else {
        eprintln!("SKIPPED: needs SWITCHBOARD_CASSANDRA (scripts/test sets it)");
        return;
    };
    let s = CassandraStore::connect(&opts).expect("connect to Cassandra");
    s.migrate().unwrap();
    // What version 1 left: no sealed column, no key table, a text in the clear.
    for cql in [
        "ALTER TABLE {ks}.messages DROP sealed",
        "ALTER TABLE {ks}.conversations DROP owner_epoch",
        "DROP TABLE {ks}.message_keys",
        "UPDATE {ks}.schema_version SET version = 1 WHERE id = 0",
        "INSERT INTO {ks}.message_buckets (conversation_id, bucket, first_seq) VALUES (5, 0, 1)",
        "INSERT INTO {ks}.messages (conversation_id, bucket, seq, ts_ms, sender_id, client_msg_id, kind, body) \
         VALUES (5, 0, 1, 1000, 7, 'c1', 0, 'written by version 1')",
    ] {
        s.execute_raw(cql).unwrap();
    }
    assert_eq!(s.schema_version().unwrap(), 1);
    drop(s);
    let s = CassandraStore::connect(&opts).expect("connect to Cassandra");
    assert!(s.migrate().unwrap(), "migrate brings version 1 up to date");
    assert_eq!(s.schema_version().unwrap(), storage::CASSANDRA_SCHEMA_VERSION);
    assert_eq!(message_at(&s, 5, 1).unwrap().unwrap().body, "written by version 1");
    let new = Message { body: "sealed now".into(), ..msg(5, 2, 1001, 7) };
    s.commit(&[Mutation::PutMessage(new.clone())]).unwrap();
    assert_eq!(message_at(&s, 5, 2).unwrap().unwrap(), new);
    assert!(s.message_key(5, 2).unwrap().is_some(), "the new message has a key");
    s.execute_raw(
        "INSERT INTO {ks}.conversations (id, kind, title, created_ms, created_by, last_seq, last_ts_ms) \
         VALUES (5, 1, 'g', 1, 7, 2, 1001)",
    )
    .unwrap();
    assert_eq!(s.claim(5, 1).unwrap(), 1, "an old conversation's first claim");
    s.drop_keyspace().unwrap();
}
