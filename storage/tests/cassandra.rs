//! The conformance suite against Apache Cassandra or ScyllaDB, when one is
//! reachable: `SWITCHBOARD_CASSANDRA=host:port[,host:port...]`, with the local
//! datacenter's name in `SWITCHBOARD_CASSANDRA_DC` (default `datacenter1`, what a
//! stock Cassandra calls its first datacenter). No Cassandra server can be
//! installed from this machine's package sources, so without the variable the
//! test says so and checks nothing; `scripts/test` prints the same.
//! Each run creates its own keyspace (replication factor 1) and drops it.

use std::sync::Arc;
use storage::{CassandraOptions, CassandraStore, Store, conformance};

fn options() -> Option<CassandraOptions> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    storage::testkit::cassandra_from_env(&format!("sb_conformance_{}", nanos % 1_000_000_000_000))
}

#[test]
fn cassandra_store_conforms() {
    let Some(opts) = options() else {
        eprintln!(
            "SKIPPED: the Cassandra conformance run needs a server; set SWITCHBOARD_CASSANDRA=host:port \
             (no Cassandra or ScyllaDB package exists in this machine's package sources)"
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
