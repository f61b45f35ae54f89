//! HTTP/1.1 on the gateway's port: accounts, health, and the WebSocket upgrade.
//!
//! Requests are parsed with httparse. Every error is a JSON body
//! `{"error": {"code", "name", "message"}}` with the status from the code catalogue.

use crate::auth::{valid_password, valid_username};
use crate::capacity::SocketSlot;
use crate::netio::{recv_into, send_all};
use crate::shard::{Listener, ShardCtx};
use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::{ErrorCode, Subprotocol};
use serde::Deserialize;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;
use storage::UserRecord;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 16 * 1024;
/// Most header fields a request may carry (browsers send 10-20; proxies add a few).
const MAX_HEADERS: usize = 100;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    pub keep_alive: bool,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

#[derive(Debug)]
pub enum ReadError {
    /// The peer closed or the socket failed; just drop the connection.
    Gone,
    /// Answer with this error, then close.
    Reject(ErrorCode, &'static str),
}

/// A parsed request head: the request (body still empty), the head's length in
/// the buffer, and the body length it declares.
#[derive(Debug)]
pub struct Head {
    pub request: Request,
    pub head_len: usize,
    pub body_len: usize,
}

/// Parses the request head at the start of `buf`, by RFC 9112's framing rules.
/// `Ok(None)`: incomplete, read more. Pure (no I/O), so the fuzzer drives it.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            let mut r = Request {
                method: req.method.unwrap_or("").to_owned(),
                path: path.to_owned(),
                query: query.to_owned(),
                keep_alive: req.version == Some(1),
                headers,
                body: Vec::new(),
            };
            if let Some(c) = r.header("connection") {
                let c = c.to_ascii_lowercase();
                if c.contains("close") {
                    r.keep_alive = false;
                } else if c.contains("keep-alive") {
                    r.keep_alive = true;
                }
            }
            let body_len = framing(&r, req.version == Some(1))?;
            Ok(Some(Head { request: r, head_len, body_len }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Err(ReadError::Reject(ErrorCode::PayloadTooLarge, "request head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(ReadError::Reject(ErrorCode::HeadersTooLarge, "more than 100 header fields"))
        }
        Err(_) => Err(ReadError::Reject(ErrorCode::InvalidRequest, "malformed HTTP request")),
    }
}

/// Reads one request (head and body) from `buf` + the socket. On success, `buf`
/// keeps only the bytes after this request (the start of WebSocket traffic, or
/// a pipelined request).
pub async fn read_request(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Request, ReadError> {
    let read = async {
        loop {
            match parse_head(buf)? {
                Some(Head { mut request, head_len, body_len }) => {
                    while buf.len() < head_len + body_len {
                        if recv_into(stream, buf, 4096).await.map_err(|_| ReadError::Gone)? == 0 {
                            return Err(ReadError::Gone);
                        }
                    }
                    request.body = buf[head_len..head_len + body_len].to_vec();
                    buf.drain(..head_len + body_len);
                    return Ok(request);
                }
                None => {
                    if recv_into(stream, buf, 2048).await.map_err(|_| ReadError::Gone)? == 0 {
                        return Err(ReadError::Gone);
                    }
                }
            }
        }
    };
    match monoio::time::timeout(timeout, read).await {
        Ok(r) => r,
        // An idle keep-alive connection or a slow sender: drop it quietly.
        Err(_) => Err(ReadError::Gone),
    }
}

/// The body length a request's head declares, by RFC 9112's rules for a server
/// that may sit behind a proxy: anything ambiguous is refused rather than guessed,
/// because a proxy that guessed differently would read the rest as another request.
fn framing(r: &Request, http11: bool) -> Result<usize, ReadError> {
    let reject = |m| Err(ReadError::Reject(ErrorCode::InvalidRequest, m));
    if r.header("transfer-encoding").is_some() {
        return reject("chunked bodies are not supported");
    }
    // §3.2: a 1.1 request has exactly one Host.
    let hosts = r.headers.iter().filter(|(n, _)| n == "host").count();
    if (http11 && hosts == 0) || hosts > 1 {
        return reject("an HTTP/1.1 request needs exactly one Host header");
    }
    // §6.3: Content-Length is 1*DIGIT; several (or a list) must all agree.
    let mut len = None;
    for v in r.headers.iter().filter(|(n, _)| n == "content-length").flat_map(|(_, v)| v.split(',')) {
        let v = v.trim_matches([' ', '\t']);
        if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return reject("bad content-length");
        }
        let n: usize =
            v.parse().map_err(|_| ReadError::Reject(ErrorCode::InvalidRequest, "bad content-length"))?;
        if len.is_some_and(|l| l != n) {
            return reject("conflicting content-length headers");
        }
        len = Some(n);
    }
    match len.unwrap_or(0) {
        n if n <= MAX_BODY => Ok(n),
        _ => Err(ReadError::Reject(ErrorCode::PayloadTooLarge, "body too large")),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

pub fn response(status: u16, body: &serde_json::Value, keep_alive: bool) -> Bytes {
    let retry = match body.pointer("/error/retry_after_secs").and_then(serde_json::Value::as_u64) {
        Some(s) => format!("retry-after: {s}\r\n"),
        None => String::new(),
    };
    let body = body.to_string();
    let conn = if keep_alive { "keep-alive" } else { "close" };
    Bytes::from(format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {conn}\r\n{retry}\r\n{body}",
        reason(status),
        body.len()
    ))
}

pub fn error_body(code: ErrorCode, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code.code(), "name": code.name(), "message": message}})
}

pub fn error_response(code: ErrorCode, message: &str, keep_alive: bool) -> Bytes {
    response(code.http_status(), &error_body(code, message), keep_alive)
}

/// Answers a socket accepted past the cap: one non-blocking write of a 503, then close.
///
/// Runs on: the accepting shard.
pub fn refuse_full(stream: &TcpStream) {
    let resp = error_response(ErrorCode::HttpOverloaded, "server at its connection capacity; retry", false);
    let _ = crate::netio::try_send(stream, &std::collections::VecDeque::from([resp]), 0);
}

/// `/healthz` (liveness) or `/readyz` (readiness): 200 `{"status":"ok"}`, or 503
/// `{"status":"failing","reason"}`.
fn health(shard: &ShardCtx, ready: bool) -> (u16, serde_json::Value) {
    let h = &shard.shared.health;
    let r = if ready { h.ready(&shard.shared.capacity) } else { h.live() };
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
                monoio::spawn(crate::conn::upgrade(shard, stream, req, leftover, slot));
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
            (_, "/v1/ws" | "/v1/register" | "/v1/login" | "/v1/admin/users") if public => {
                err(ErrorCode::MethodNotAllowed, "method not allowed here")
            }
            (_, "/metrics") if metrics_here => err(ErrorCode::MethodNotAllowed, "method not allowed here"),
            (_, "/healthz" | "/readyz") => err(ErrorCode::MethodNotAllowed, "method not allowed here"),
            _ => err(ErrorCode::HttpNotFound, "no such endpoint"),
        };
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
    let code = ErrorCode::TooManyAttempts;
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    let body = serde_json::json!({"error": {
        "code": code.code(), "name": code.name(), "message": message, "retry_after_secs": secs,
    }});
    (code.http_status(), body)
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
                        created_ms: crate::auth::now_ms(),
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

fn err(code: ErrorCode, message: &str) -> (u16, serde_json::Value) {
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
            created_ms: crate::auth::now_ms(),
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

/// Picks our subprotocol from a `Sec-WebSocket-Protocol` offer.
/// `Ok(None)`: no offer (JSON is used, and no protocol header is answered).
pub fn choose_subprotocol(offer: Option<&str>) -> Result<Option<Subprotocol>, ErrorCode> {
    match offer {
        None => Ok(None),
        Some(list) => {
            list.split(',').find_map(Subprotocol::from_name).map(Some).ok_or(ErrorCode::BadSubprotocol)
        }
    }
}
