//! Accounts, tokens and the WebSocket upgrade, through the real gateway.

mod support;

use protocol::{ClientMsg, ServerMsg, Subprotocol};
use support::*;

#[test]
fn register_login_and_their_errors() {
    let g = TestGateway::start();
    let (s, r) = g.register("Alice", "password123");
    assert_eq!(s, 201);
    let id: u64 = r["user_id"].as_str().unwrap().parse().unwrap();

    let (s, r) = g.register("alice", "otherpassword");
    assert_eq!(
        (s, r["error"]["name"].as_str()),
        (409, Some("username_taken")),
        "usernames are case-insensitive"
    );
    let (s, r) = g.register("a b", "password123");
    assert_eq!((s, r["error"]["code"].as_u64()), (400, Some(2002)));
    let (s, r) = g.register("bob", "short");
    assert_eq!((s, r["error"]["name"].as_str()), (400, Some("weak_password")));
    let (s, r) = g.http("POST", "/v1/register", Some("{not json"));
    assert_eq!((s, r["error"]["name"].as_str()), (400, Some("invalid_request")));

    let (s, r) = g.login("ALICE", "password123");
    assert_eq!(s, 200);
    assert_eq!(r["user_id"].as_str().unwrap().parse::<u64>().unwrap(), id);
    assert!(r["token"].as_str().unwrap().len() > 20);
    let (s, r) = g.login("alice", "wrongpassword");
    assert_eq!((s, r["error"]["name"].as_str()), (401, Some("invalid_credentials")));
    let (s, r) = g.login("nobody", "password123");
    assert_eq!((s, r["error"]["name"].as_str()), (401, Some("invalid_credentials")), "no user enumeration");
}

#[test]
fn health_and_unknown_endpoints() {
    let g = TestGateway::start();
    assert_eq!(g.http("GET", "/healthz", None), (200, serde_json::json!({"status": "ok"})));
    let (s, r) = g.http("GET", "/nope", None);
    assert_eq!((s, r["error"]["code"].as_u64()), (404, Some(2007)));
    let (s, _) = g.http("GET", "/v1/register", None);
    assert_eq!(s, 405);
}

fn upgrade_headers(token: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("upgrade", "websocket".to_owned()),
        ("connection", "Upgrade".to_owned()),
        ("sec-websocket-version", "13".to_owned()),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
    ];
    if let Some(t) = token {
        h.push(("authorization", format!("Bearer {t}")));
    }
    h
}

fn upgrade(g: &TestGateway, path: &str, headers: &[(&'static str, String)]) -> (u16, String) {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http_raw(g.addr, "GET", path, &h, None)
}

#[test]
fn bad_missing_or_expired_tokens_get_401_and_no_socket() {
    let g = TestGateway::start();
    let (id, token) = g.user("carol");

    let (s, body) = upgrade(&g, "/v1/ws", &upgrade_headers(None));
    assert_eq!(s, 401, "{body}");
    let (s, _) = upgrade(&g, "/v1/ws", &upgrade_headers(Some("not.a.token")));
    assert_eq!(s, 401);
    let mut tampered = token.clone();
    tampered.pop();
    let (s, _) = upgrade(&g, "/v1/ws", &upgrade_headers(Some(&tampered)));
    assert_eq!(s, 401);

    // A token signed with the right key but expired.
    #[derive(serde::Serialize)]
    struct Claims {
        sub: String,
        iat: u64,
        exp: u64,
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: id.to_string(), iat: now - 100, exp: now - 10 },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (s, body) = upgrade(&g, "/v1/ws", &upgrade_headers(Some(&expired)));
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("unauthorized"));

    // The same claims unexpired are accepted: the 401 above was for expiry.
    let fresh = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: id.to_string(), iat: now, exp: now + 60 },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (s, _) = upgrade(&g, "/v1/ws", &upgrade_headers(Some(&fresh)));
    assert_eq!(s, 101);
}

#[test]
fn token_in_query_string_and_subprotocol_choice() {
    let g = TestGateway::start();
    let (_, token) = g.user("dave");
    // Browsers cannot set headers on a WebSocket: ?token= works too.
    let (s, resp) = upgrade(&g, &format!("/v1/ws?token={token}"), &upgrade_headers(None));
    assert_eq!(s, 101, "{resp}");

    let mut h = upgrade_headers(Some(&token));
    h.push(("sec-websocket-protocol", "chat.v9, switchboard.v1.fb".to_owned()));
    let (s, _) = upgrade(&g, "/v1/ws", &h);
    assert_eq!(s, 101);

    let mut h = upgrade_headers(Some(&token));
    h.push(("sec-websocket-protocol", "chat.v9".to_owned()));
    let (s, body) = upgrade(&g, "/v1/ws", &h);
    assert_eq!(s, 400);
    assert!(body.contains("bad_subprotocol"), "{body}");
}

#[test]
fn welcome_names_the_user_in_both_subprotocols() {
    let g = TestGateway::start();
    let (id, token) = g.user("erin");
    for p in both() {
        let mut c = g.connect(&token, p);
        assert_eq!(c.user_id, id);
        assert_eq!(c.request(ClientMsg::Ping), ServerMsg::Pong);
    }
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "listen = \"127.0.0.1:9999\"\n[limits]\nmax_frame_bytes = 100000\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_frame_bytes = 100000"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "lisen = \"127.0.0.1:9999\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    let _ = Subprotocol::Json;
}

#[test]
fn admin_users_endpoint_mints_capacity_test_users() {
    let g = TestGateway::start();
    let body = r#"{"prefix":"lg","count":50}"#;
    let auth = format!("Bearer {ADMIN}");
    let (s, _) =
        http_raw(g.addr, "POST", "/v1/admin/users", &[("authorization", "Bearer wrong")], Some(body));
    assert_eq!(s, 401);
    let (s, r) = http_raw(g.addr, "POST", "/v1/admin/users", &[("authorization", &auth)], Some(body));
    assert_eq!(s, 201, "{r}");
    let r: serde_json::Value = serde_json::from_str(&r).unwrap();
    let users = r["users"].as_array().unwrap();
    assert_eq!(users.len(), 50);
    assert_eq!(users[7]["username"], "lg7");
    // The tokens work.
    let c = g.connect(users[7]["token"].as_str().unwrap(), Subprotocol::FlatBuffers);
    assert_eq!(c.user_id.to_string(), users[7]["user_id"].as_str().unwrap());
    // Asking again finds the same users.
    let (_, again) = http_raw(g.addr, "POST", "/v1/admin/users", &[("authorization", &auth)], Some(body));
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["users"][7]["user_id"], users[7]["user_id"]);
    // They cannot log in: they have no password.
    assert_eq!(g.login("lg7", "").0, 401);
    assert_eq!(g.login("lg7", "!").0, 401);
}

#[test]
fn admin_users_endpoint_is_absent_without_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TestGateway::start_with_config(tmp.path(), "shards = 1\n", &[]);
    let (s, _) = http_raw(g.addr, "POST", "/v1/admin/users", &[("authorization", "Bearer x")], Some("{}"));
    assert_eq!(s, 404);
}

#[test]
fn metrics_count_what_happened() {
    let g = TestGateway::start();
    let (_, ta) = g.user("mia");
    let (b, tb) = g.user("max");
    let mut a = g.connect(&ta, Subprotocol::Json);
    let mut bb = g.connect(&tb, Subprotocol::Json);
    a.sync(vec![]);
    bb.sync(vec![]);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: b }));
    for i in 0..5 {
        a.send_text(conv, &format!("m{i}"), "x");
    }
    a.wait_ack("m4");
    for _ in 0..5 {
        bb.next_message();
    }
    a.send_text(424242, "bad", "x");
    a.wait_for(|m| matches!(m, ServerMsg::Error { .. }));
    let (s, text) = http_raw(g.addr, "GET", "/metrics", &[], None);
    assert_eq!(s, 200);
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("switchboard_messages_stored_total"), 5.0);
    assert_eq!(value("switchboard_deliveries_total"), 5.0);
    assert_eq!(value("switchboard_acks_total"), 5.0);
    assert_eq!(value("switchboard_connections"), 2.0);
    assert_eq!(value("switchboard_errors_total{code=\"not_found\"}"), 1.0);
    assert_eq!(value("switchboard_delivery_seconds_count"), 5.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_cpu_seconds_total") >= 0.0);
}

#[test]
fn users_are_found_by_name_and_named_by_id_with_a_token() {
    let g = TestGateway::start();
    let (alice, token) = g.user("alice");
    let (bob, _) = g.user("Bob");
    let get = |path: &str, token: &str| {
        let auth = format!("Bearer {token}");
        let (s, body) = http_raw(g.addr, "GET", path, &[("authorization", &auth)], None);
        (s, serde_json::from_str::<serde_json::Value>(&body).unwrap())
    };

    let (s, r) = get("/v1/users?username=bob", &token);
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r,
        serde_json::json!({"user_id": bob.to_string(), "username": "Bob"}),
        "found case-insensitively"
    );
    let (s, r) = get("/v1/users?username=nobody", &token);
    assert_eq!((s, r["error"]["name"].as_str()), (404, Some("user_not_found")));

    let (s, r) = get(&format!("/v1/users?ids={bob},12345,{alice}"), &token);
    assert_eq!(s, 200, "{r}");
    let names: Vec<_> =
        r["users"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["Bob", "alice"], "the known users, in the order asked");

    let too_many = vec!["1"; 101].join(",");
    for bad in ["/v1/users", "/v1/users?ids=", "/v1/users?ids=1,x", &format!("/v1/users?ids={too_many}")] {
        let (s, r) = get(bad, &token);
        assert_eq!((s, r["error"]["name"].as_str()), (400, Some("invalid_request")), "{bad}");
    }
    let (s, r) = get("/v1/users?username=a%20b", &token);
    assert_eq!((s, r["error"]["name"].as_str()), (400, Some("invalid_username")));
    let (s, r) = get("/v1/users?username=bob", "not-a-token");
    assert_eq!(
        (s, r["error"]["name"].as_str()),
        (401, Some("unauthorized")),
        "no lookups without an account"
    );
}
