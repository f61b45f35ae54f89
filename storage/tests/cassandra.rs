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
