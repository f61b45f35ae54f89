//! HTTP/1.1 as the gateway speaks it: request heads and bodies read from a
//! socket (parsed with httparse, bounded), responses, and the JSON error body
//! `{"error": {"code", "name", "message"}}` with the status from the code
//! catalogue. Shared by the routes (`http`) and the WebSocket upgrade (`conn`).

use crate::shard::netio::recv_into;
use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::{ErrorCode, Subprotocol};
use std::time::Duration;

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
    /// The body length the head declares. For a streamed body (a blob upload) the
    /// body is not read into `body`: its handler reads it from the socket.
    pub content_length: u64,
}

/// A request whose body is streamed by its handler rather than buffered: a
/// blob upload (`PUT /v1/blobs/...`), up to `attachments.max_bytes`.
pub fn streamed(method: &str, path: &str) -> bool {
    method == "PUT" && path.starts_with("/v1/blobs/")
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
                content_length: 0,
            };
            if let Some(c) = r.header("connection") {
                let c = c.to_ascii_lowercase();
                if c.contains("close") {
                    r.keep_alive = false;
                } else if c.contains("keep-alive") {
                    r.keep_alive = true;
                }
            }
            let declared = framing(&r, req.version == Some(1))?;
            r.content_length = declared;
            // A streamed body stays on the socket: no buffered body at all.
            let body_len = if streamed(&r.method, &r.path) {
                0
            } else if declared <= MAX_BODY as u64 {
                declared as usize
            } else {
                return Err(ReadError::Reject(ErrorCode::PayloadTooLarge, "body too large"));
            };
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
fn framing(r: &Request, http11: bool) -> Result<u64, ReadError> {
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
        let n: u64 =
            v.parse().map_err(|_| ReadError::Reject(ErrorCode::InvalidRequest, "bad content-length"))?;
        if len.is_some_and(|l| l != n) {
            return reject("conflicting content-length headers");
        }
        len = Some(n);
    }
    Ok(len.unwrap_or(0))
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
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
    let _ = crate::shard::netio::try_send(stream, &std::collections::VecDeque::from([resp]), 0);
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
