//! The conformance suite against the embedded (fjall) backend.

use std::sync::Arc;
use storage::{FjallStore, Store, conformance};

#[test]
fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Arc::new(FjallStore::open(dir.path()).expect("open")) as Arc<dyn Store>;
    conformance::run_all(&open);
}
