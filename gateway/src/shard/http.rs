//! HTTP/1.1 on the gateway's port: accounts, health, and the WebSocket upgrade.
//!
//! Requests are parsed with httparse. Every error is a JSON body
//! `{"error": {"code", "name", "message"}}` with the status from the code catalogue.

use crate::auth::{valid_password, valid_username};
use crate::capacity::SocketSlot;
use crate::shard::blobs;
use crate::shard::http1::{ReadError, Request, error_body, error_response, read_request, response};
use crate::shard::netio::send_all;
use crate::shard::{Listener, ShardCtx};
use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::ErrorCode;
use serde::Deserialize;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;
use storage::UserRecord;

/// `/healthz` (liveness) or `/readyz` (readiness): 200 `{"status":"ok"}`, or 503
/// `{"status":"failing","reason"}`.
fn health(shard: &ShardCtx, ready: bool) -> (u16, serde_json::Value) {
    let h = &shard.shared.health;
    let r = if ready {
        h.ready(&shard.shared.capacity).and_then(|()| shard.shared.router.joined())
    } else {
        h.live()
    };
    match r {
        Ok(()) => (200, serde_json::json!({"status": "ok"})),
        Err(reason) => (503, serde_json::json!({"status": "failing", "reason": reason})),
    }
}

/// Serves HTTP requests on a fresh connection until it upgrades, closes or errs.
/// `slot` is the socket's place under the cap, held as long as the socket is.
///
/// Runs on: the shard that accepted the connection.
pub async fn serve(shard: Rc<ShardCtx>, stream: TcpStream, slot: SocketSlot, kind: Listener, source: IpAddr) {
    let timeout = Duration::from_secs(shard.shared.cfg.limits.http_header_timeout_secs.get());
    let metrics_here = match kind {
        Listener::Public => shard.shared.cfg.metrics_listen.is_none(),
        Listener::Management => true,
    };
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&stream, &mut buf, timeout).await {
            Ok(r) => r,
            Err(ReadError::Gone) => return,
            Err(ReadError::Reject(code, msg)) => {
                let _ = send_all(&stream, error_response(code, msg, false)).await;
                return;
            }
        };
        let keep = req.keep_alive;
        let public = kind == Listener::Public;
        let (status, body) = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/ws") if public => {
                // The connection gets its own task, and this one ends: an HTTP exchange's
                // state is several KiB that an idle WebSocket must not keep.
                // Right-sized: tungstenite keeps this allocation as its read buffer.
                let leftover = buf.to_vec();
                monoio::spawn(crate::shard::conn::upgrade(shard, stream, req, leftover, slot));
                return;
            }
            ("GET", "/healthz") => health(&shard, false),
            ("GET", "/readyz") => health(&shard, true),
            ("POST", "/v1/register") if public => register(&shard, &req.body, source).await,
            ("POST", "/v1/login") if public => login(&shard, &req.body, source).await,
            ("GET", "/metrics") if metrics_here => {
                let body = shard.shared.metrics.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n",
                    body.len(),
                    if keep { "keep-alive" } else { "close" }
                );
                if send_all(&stream, Bytes::from(head + &body)).await.is_err() || !keep {
                    return;
                }
                continue;
            }
            ("POST", "/v1/admin/users") if public => admin_users(&shard, &req, source).await,
            ("GET", "/v1/users") if public => users(&shard, &req).await,
            ("POST", "/v1/attachments") if public => blobs::slot(&shard, &req).await,
            ("GET", p) if public && p.starts_with("/v1/attachments/") => {
                blobs::download_url(&shard, &req).await
            }
            ("PUT", p) if public && p.starts_with("/v1/blobs/") => {
                let (reply, consumed) = blobs::upload(&shard, &stream, &req, &mut buf).await;
                let keep = keep && consumed;
                if send_all(&stream, response(reply.0, &reply.1, keep)).await.is_err() {
                    return;
                }
                if !consumed {
                    blobs::linger(&stream, &mut buf).await;
                }
                if !keep {
                    return;
                }
                continue;
            }
            ("GET" | "HEAD", p) if public && p.starts_with("/v1/blobs/") => {
                if !blobs::download(&shard, &stream, &req).await {
                    return;
                }
                continue;
            }
            (
                _,
                "/v1/ws" | "/v1/register" | "/v1/login" | "/v1/admin/users" | "/v1/users" | "/v1/attachments",
            ) if public => err(ErrorCode::MethodNotAllowed, "method not allowed here"),
            (_, "/metrics") if metrics_here => err(ErrorCode::MethodNotAllowed, "method not allowed here"),
            (_, "/healthz" | "/readyz") => err(ErrorCode::MethodNotAllowed, "method not allowed here"),
            _ => err(ErrorCode::HttpNotFound, "no such endpoint"),
        };
        // A streamed body (a blob upload) that no route read is still on the socket.
        let keep = keep && !(crate::shard::http1::streamed(&req.method, &req.path) && req.content_length > 0);
        if send_all(&stream, response(status, &body, keep)).await.is_err() || !keep {
            return;
        }
    }
}

/// The client address that per-address limits count: the IP, or an IPv6 address's
/// /64 (one subscriber's usual allocation, which they can cycle through freely).
/// Behind a proxy this is the proxy's address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// A hashing job's refusal as an HTTP reply.
fn refused(r: crate::pool::Refused) -> (u16, serde_json::Value) {
    match r {
        crate::pool::Refused::Full => {
            err(ErrorCode::HttpOverloaded, "too many logins and registrations in flight; retry")
        }
        crate::pool::Refused::SourceBusy => retry_later(
            "too many logins and registrations in flight from your address; retry",
            Duration::from_secs(1),
        ),
    }
}

/// 429 `too_many_attempts` with `retry_after_secs` (also sent as `Retry-After`).
fn retry_later(message: &str, after: Duration) -> (u16, serde_json::Value) {
    retry_after(ErrorCode::TooManyAttempts, message, after)
}

/// `code` (a 429 or 503) with `retry_after_secs` (also sent as `Retry-After`).
pub(super) fn retry_after(code: ErrorCode, message: &str, after: Duration) -> (u16, serde_json::Value) {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    let body = serde_json::json!({"error": {
        "code": code.code(), "name": code.name(), "message": message, "retry_after_secs": secs,
    }});
    (code.http_status(), body)
}

/// The user of the request's bearer token, or 401 `unauthorized`.
pub(super) fn bearer(shard: &ShardCtx, req: &Request) -> Result<u64, (u16, serde_json::Value)> {
    let token = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    shard
        .shared
        .auth
        .verify(token)
        .map_err(|_| err(ErrorCode::Unauthorized, "a bearer token from /v1/login is required"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminUsers {
    prefix: String,
    #[serde(default)]
    start: u32,
    count: u32,
}

/// Most users one admin call creates.
const ADMIN_USERS_MAX: u32 = 20_000;

/// Creates (or finds) users `<prefix><start>` .. `<prefix><start+count-1>` and returns a
/// token for each. The users get no password (login is impossible): they exist for
/// capacity tests, whose tools cannot wait for thousands of argon2 hashes.
async fn admin_users(shard: &ShardCtx, req: &Request, source: IpAddr) -> (u16, serde_json::Value) {
    let Some(secret) = shard.shared.cfg.auth.admin_secret.clone() else {
        return err(ErrorCode::HttpNotFound, "no such endpoint");
    };
    let presented = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    // Constant-time comparison: the secret must not leak through timing.
    let same = presented.len() == secret.len()
        && presented.bytes().zip(secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return err(ErrorCode::Unauthorized, "admin secret required");
    }
    let a: AdminUsers = match serde_json::from_slice(&req.body) {
        Ok(a) => a,
        Err(_) => return err(ErrorCode::InvalidRequest, "expected {\"prefix\", \"count\", \"start\"?}"),
    };
    if a.count == 0 || a.count > ADMIN_USERS_MAX || !valid_username(&format!("{}{}", a.prefix, a.start)) {
        return err(ErrorCode::InvalidRequest, "count must be 1..=20000 and prefix a valid username start");
    }
    let shared = shard.shared.clone();
    let job = move || -> Result<Vec<serde_json::Value>, ErrorCode> {
        let mut out = Vec::with_capacity(a.count as usize);
        for i in a.start..a.start + a.count {
            let username = format!("{}{i}", a.prefix);
            if !valid_username(&username) {
                return Err(ErrorCode::InvalidRequest);
            }
            let id = match shared.store.user_by_name(&username).map_err(|_| ErrorCode::HttpInternal)? {
                Some(u) => u.id,
                None => {
                    let u = UserRecord {
                        id: shared.ids.next(),
                        username: username.clone(),
                        // Not a PHC string: no password verifies against it.
                        password_hash: "!".into(),
                        created_ms: crate::vocab::clock::now_ms(),
                    };
                    shared.store.create_user(&u).map_err(|_| ErrorCode::HttpInternal)?;
                    u.id
                }
            };
            out.push(serde_json::json!({"username": username, "user_id": id.to_string(), "token": shared.auth.issue(id)}));
        }
        Ok(out)
    };
    match shard.shared.hashers.run(source, job).await {
        Ok(Ok(users)) => (201, serde_json::json!({ "users": users })),
        Ok(Err(code)) => err(code, code.description()),
        Err(r) => refused(r),
    }
}

/// Most ids one `GET /v1/users?ids=` names.
const USERS_PER_LOOKUP: usize = 100;

/// `GET /v1/users?username=NAME` (one user, or 404 `user_not_found`) or
/// `GET /v1/users?ids=ID,ID,...` (the known ones among at most 100, in the order
/// asked): how a client finds whom to chat with and shows names for ids. Needs a
/// bearer token, like the WebSocket.
async fn users(shard: &ShardCtx, req: &Request) -> (u16, serde_json::Value) {
    if let Err(r) = bearer(shard, req) {
        return r;
    }
    enum Lookup {
        Name(String),
        Ids(Vec<u64>),
    }
    let lookup = match (req.query_param("username"), req.query_param("ids")) {
        (Some(name), None) if valid_username(name) => Lookup::Name(name.to_owned()),
        (Some(_), None) => return err(ErrorCode::InvalidUsername, ErrorCode::InvalidUsername.description()),
        (None, Some(list)) => {
            let ids: Result<Vec<u64>, _> = list.split(',').map(str::parse::<u64>).collect();
            match ids {
                Ok(ids) if !ids.is_empty() && ids.len() <= USERS_PER_LOOKUP => Lookup::Ids(ids),
                _ => {
                    return err(
                        ErrorCode::InvalidRequest,
                        "ids must be 1 to 100 decimal user ids, comma-separated",
                    );
                }
            }
        }
        _ => return err(ErrorCode::InvalidRequest, "give exactly one of ?username= or ?ids="),
    };
    let store = shard.shared.store.clone();
    let job = move || -> Result<Vec<UserRecord>, storage::StorageError> {
        match lookup {
            Lookup::Name(name) => Ok(store.user_by_name(&name)?.into_iter().collect()),
            Lookup::Ids(ids) => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    out.extend(store.user(id)?);
                }
                Ok(out)
            }
        }
    };
    let single = req.query_param("username").is_some();
    let found = match shard.shared.readers.run(job).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "a user lookup failed");
            return err(ErrorCode::HttpInternal, "try again");
        }
        Err(_) => return err(ErrorCode::HttpOverloaded, "busy; retry"),
    };
    let json = |u: &UserRecord| serde_json::json!({"user_id": u.id.to_string(), "username": u.username});
    match (single, found.first()) {
        (true, Some(u)) => (200, json(u)),
        (true, None) => err(ErrorCode::UserNotFound, ErrorCode::UserNotFound.description()),
        (false, _) => (200, serde_json::json!({"users": found.iter().map(json).collect::<Vec<_>>()})),
    }
}

pub(super) fn err(code: ErrorCode, message: &str) -> (u16, serde_json::Value) {
    (code.http_status(), error_body(code, message))
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

fn credentials(body: &[u8]) -> Result<Credentials, (u16, serde_json::Value)> {
    serde_json::from_slice(body)
        .map_err(|_| err(ErrorCode::InvalidRequest, "expected a JSON object {\"username\", \"password\"}"))
}

async fn register(shard: &ShardCtx, body: &[u8], source: IpAddr) -> (u16, serde_json::Value) {
    let c = match credentials(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if !valid_username(&c.username) {
        return err(ErrorCode::InvalidUsername, ErrorCode::InvalidUsername.description());
    }
    if !valid_password(&c.password) {
        return err(ErrorCode::WeakPassword, ErrorCode::WeakPassword.description());
    }
    let shared = shard.shared.clone();
    let job = move || -> Result<u64, ErrorCode> {
        // Cheap check first so a taken name costs no hash; create_user enforces it atomically.
        match shared.store.user_by_name(&c.username) {
            Ok(Some(_)) => return Err(ErrorCode::UsernameTaken),
            Ok(None) => {}
            Err(_) => return Err(ErrorCode::HttpInternal),
        }
        let hash = shared.auth.hash_password(&c.password).map_err(|_| ErrorCode::HttpInternal)?;
        let user = UserRecord {
            id: shared.ids.next(),
            username: c.username,
            password_hash: hash,
            created_ms: crate::vocab::clock::now_ms(),
        };
        match shared.store.create_user(&user) {
            Ok(()) => Ok(user.id),
            Err(e) if e.kind == storage::ErrorKind::UsernameTaken => Err(ErrorCode::UsernameTaken),
            Err(e) => {
                tracing::error!(error = %e, "registration failed");
                Err(ErrorCode::HttpInternal)
            }
        }
    };
    match shard.shared.hashers.run(source, job).await {
        Ok(Ok(id)) => (201, serde_json::json!({"user_id": id.to_string()})),
        Ok(Err(code)) => err(code, code.description()),
        Err(r) => refused(r),
    }
}

async fn login(shard: &ShardCtx, body: &[u8], source: IpAddr) -> (u16, serde_json::Value) {
    let c = match credentials(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    // Locked accounts and addresses are answered before any hashing: a guesser costs nothing.
    let throttles = &shard.shared.logins;
    let (account, address) = (c.username.to_ascii_lowercase(), source.to_string());
    let now = std::time::Instant::now();
    if let Err(wait) = throttles.address.check(&address, now) {
        return retry_later("too many failed logins from your address; retry later", wait);
    }
    if let Err(wait) = throttles.account.check(&account, now) {
        return retry_later("too many failed logins for this account; retry later", wait);
    }
    let shared = shard.shared.clone();
    let job = move || -> Result<u64, ErrorCode> {
        let user = shared.store.user_by_name(&c.username).map_err(|_| ErrorCode::HttpInternal)?;
        let ok = shared.auth.verify_password(user.as_ref().map(|u| u.password_hash.as_str()), &c.password);
        match user {
            Some(u) if ok => Ok(u.id),
            _ => Err(ErrorCode::InvalidCredentials),
        }
    };
    match shard.shared.hashers.run(source, job).await {
        Ok(Ok(id)) => {
            throttles.account.succeeded(&account);
            let token = shard.shared.auth.issue(id);
            (
                200,
                serde_json::json!({
                    "token": token,
                    "user_id": id.to_string(),
                    "expires_in": shard.shared.cfg.auth.token_ttl_secs.get(),
                }),
            )
        }
        Ok(Err(code)) => {
            if code == ErrorCode::InvalidCredentials {
                let now = std::time::Instant::now();
                throttles.account.failed(&account, now);
                throttles.address.failed(&address, now);
            }
            err(code, code.description())
        }
        Err(r) => refused(r),
    }
}
