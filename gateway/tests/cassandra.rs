//! The Cassandra backend from an operator's side. Always: its settings are
//! validated, and a node that cannot reach the cluster refuses to start and
//! says why. With `SWITCHBOARD_CASSANDRA=host:port` (a real Apache Cassandra or
//! ScyllaDB; `scripts/test` starts one with `scripts/cassandra`): `gateway
//! migrate`, the schema check, and a second node serving the first node's history.

mod support;

use support::*;

#[test]
fn bad_settings_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = ["127.0.0.1:9042".to_owned()];
    let cases = [
        (storage_toml(&nodes, "dc1", "chat-eu", false, ""), "keyspace"),
        (storage_toml(&nodes, "dc1", "chat", false, "consistency = \"most\"\n"), "consistency"),
        (
            storage_toml(&nodes, "dc1", "chat", false, "")
                .replace("local_dc = \"dc1\"", "local_dc = \"dc9\""),
            "local_dc",
        ),
        (storage_toml(&[], "dc1", "chat", false, ""), "contact_points"),
    ];
    for (config, what) in cases {
        let (ok, _, err) = gateway_cmd(tmp.path(), &config, &["--check-config"]);
        assert!(!ok, "accepted bad {what}");
        assert!(err.contains("storage.cassandra") && err.contains(what), "{what}: {err}");
    }
    let (ok, _, err) =
        gateway_cmd(tmp.path(), &storage_toml(&nodes, "dc1", "chat", false, ""), &["--check-config"]);
    assert!(ok, "{err}");
}

#[test]
fn an_unreachable_cluster_stops_start_and_migrate_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = storage_toml(&[format!("127.0.0.1:{port}")], "dc1", "chat", true, "");
    for args in [&["--listen", "127.0.0.1:0"][..], &["migrate"][..]] {
        let (ok, _, err) = gateway_cmd(tmp.path(), &config, args);
        assert!(!ok, "{args:?} succeeded without a cluster");
        assert!(err.contains("connecting to Cassandra"), "{args:?}: {err}");
    }
}

fn cluster() -> Option<(Vec<String>, String)> {
    let opts = storage::testkit::cassandra_from_env("unused")?;
    Some((opts.contact_points, opts.local_dc.unwrap_or_default()))
}

#[test]
fn on_a_real_cluster_a_second_node_serves_the_shared_history() {
    let Some((nodes, dc)) = cluster() else {
        eprintln!(
            "SKIPPED: needs a Cassandra or ScyllaDB server; set SWITCHBOARD_CASSANDRA=host:port \
             (scripts/cassandra start prints it)"
        );
        return;
    };
    let ks = format!("sb_gateway_{}", std::process::id());
    let dir_a = tempfile::tempdir().unwrap();
    let (ok, _, err) =
        gateway_cmd(dir_a.path(), &storage_toml(&nodes, &dc, &ks, false, ""), &["--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("schema version 0") && err.contains("gateway migrate"), "{err}");
    let (ok, out, err) = gateway_cmd(dir_a.path(), &storage_toml(&nodes, &dc, &ks, false, ""), &["migrate"]);
    let version = format!("schema at version {}", storage::CASSANDRA_SCHEMA_VERSION);
    assert!(ok && out.contains(&version), "{out} {err}");

    let b = second_node_serves_the_history(&storage_toml(&nodes, &dc, &ks, false, ""));
    assert_eq!(b.register("ZOE", "password123").0, 409, "usernames are unique, case-insensitively");
}
