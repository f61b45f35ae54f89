//! The PostgreSQL backend from an operator's side: `gateway migrate`, the schema
//! check at start-up, and a second node taking over on the same database. Runs
//! a real PostgreSQL server (see `storage::testkit`); the whole end-to-end suite
//! also runs on PostgreSQL under `SWITCHBOARD_TEST_STORE=postgres`.

mod support;

use storage::testkit::TestPostgres;
use support::*;

fn storage_toml(url: &str, migrate_on_start: bool) -> String {
    format!(
        "[storage]\nbackend = \"postgres\"\nmigrate_on_start = {migrate_on_start}\n[storage.postgres]\nurl = \"{url}\"\n"
    )
}

#[test]
fn migrate_applies_the_schema_once_and_start_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let url = TestPostgres::shared().fresh_database();

    // Without the schema and without migrate_on_start, the node refuses to start and says why.
    let (ok, _, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["--listen", "127.0.0.1:0"]);
    assert!(!ok, "started on an empty database");
    assert!(err.contains("schema is at version 0") && err.contains("gateway migrate"), "{err}");

    let (ok, out, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("applied [1, 2, 3, 4]") && out.contains("version 4"), "{out}");
    let (ok, out, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("applied []"), "a second migrate applies nothing: {out}");

    // Now it starts without migrating, and works.
    let g = TestGateway::start_in(tmp.path(), &storage_toml(&url, false));
    let (status, _) = g.register("petra", "password123");
    assert_eq!(status, 201);

    // A bad URL is a config error, before anything connects.
    let (ok, _, err) = gateway_cmd(tmp.path(), &storage_toml("nonsense://x", false), &["--check-config"]);
    assert!(!ok && err.contains("storage.postgres.url"), "{err}");
}

/// Node A stores history and dies; node B, another process on another data
/// directory, serves it from the shared database and continues the positions.
#[test]
fn a_second_node_serves_the_shared_history() {
    let url = TestPostgres::shared().fresh_database();
    second_node_serves_the_history(&storage_toml(&url, true));
}

/// docs/protocol.md, "edit and delete", on PostgreSQL: through the real gateway,
/// a message is sent, edited and deleted; after `gateway erase`, neither its
/// texts nor its key are anywhere in the server's files, while a live key is
/// (so the search would find one), and the message that was kept reads back.
#[test]
fn gateway_erase_removes_a_deleted_message_from_the_database_files() {
    use storage::conformance::files_containing;
    let tmp = tempfile::tempdir().unwrap();
    let pg = TestPostgres::shared();
    let url = pg.fresh_database();
    let g = TestGateway::start_in(tmp.path(), &storage_toml(&url, true));
    let mut e = Erasure::start(&g);
    let (doomed_key, kept_key) =
        (pg.message_key(&url, e.conv, e.seq), pg.message_key(&url, e.conv, e.kept_seq));
    e.delete();

    let (ok, out, err) = gateway_cmd(tmp.path(), &storage_toml(&url, false), &["erase"]);
    assert!(ok, "{err}");
    assert!(out.contains("rewritten") && out.contains("checkpointed"), "{out}");
    for text in e.texts() {
        assert_eq!(files_containing(pg.dir(), text.as_bytes()), Vec::<std::path::PathBuf>::new(), "{text}");
    }
    let found = files_containing(pg.dir(), &doomed_key);
    assert_eq!(found, Vec::<std::path::PathBuf>::new(), "the key is nowhere");
    assert!(!files_containing(pg.dir(), &kept_key).is_empty(), "a live key is found by the same search");
    e.check_history();
}
