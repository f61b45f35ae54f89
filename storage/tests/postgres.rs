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
    assert_eq!(store.migrate().unwrap(), vec![1]);
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new(), "migrations apply once");
    assert_eq!(store.schema_version().unwrap(), 1);
    drop(store);
    let open = || Arc::new(PostgresStore::connect(&options(url.clone())).expect("connect")) as Arc<dyn Store>;
    conformance::run_all(&open);
}
