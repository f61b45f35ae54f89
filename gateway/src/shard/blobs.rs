//! Attachments over HTTP: upload slots and download URLs (bearer token), and the
//! embedded backend's presigned `PUT` and `GET` on `/v1/blobs/...` (with the
//! S3 backend, clients send those to the object store instead).
//!
//! An upload's body streams from the socket through the `blob-io` pool (hashed
//! and written there, 256 KiB at a time) into a partial file, and becomes the
//! object only once its length and SHA-256 match the slot. A download streams
//! the file back the same way. Neither holds more than one chunk in memory.
//!
//! Runs on: the shard that accepted the connection (file work on `blob-io`).

use crate::attachments::{Attachments, BlobMeta, Embedded, ObjectKey, content_disposition, hex};
use crate::shard::ShardCtx;
use crate::shard::http::{bearer, err, retry_after};
use crate::shard::http1::Request;
use crate::shard::netio::{recv_into, send_all};
use crate::vocab::clock::now_ms;
use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::ErrorCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// Bytes moved per hop to the `blob-io` pool.
const CHUNK: usize = 256 * 1024;

type Reply = (u16, serde_json::Value);

/// Runs a file operation on the `blob-io` pool.
async fn io<T: Send + 'static>(
    shard: &ShardCtx,
    f: impl FnOnce(&Attachments) -> std::io::Result<T> + Send + 'static,
) -> Result<T, Reply> {
    let shared = shard.shared.clone();
    match shard.shared.attachments.io.run(move || f(&shared.attachments)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "a blob operation failed");
            Err(err(ErrorCode::StorageUnavailable, "the attachment store failed; retry"))
        }
        Err(_) => Err(err(ErrorCode::HttpOverloaded, "too many attachment transfers in flight; retry")),
    }
}

/// Is `user` a member of `conv` now?
async fn member(shard: &ShardCtx, conv: u64, user: u64) -> Result<(), Reply> {
    let store = shard.shared.store.clone();
    match shard.shared.readers.run(move || store.member_role(conv, user)).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(err(ErrorCode::NotAMember, ErrorCode::NotAMember.description())),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading a membership failed");
            Err(err(ErrorCode::HttpInternal, "try again"))
        }
        Err(_) => Err(err(ErrorCode::HttpOverloaded, "busy; retry")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotRequest {
    conversation_id: String,
    size: u64,
    media_type: String,
    sha256: String,
    file_name: String,
}

/// `POST /v1/attachments`: an upload slot for a member of the conversation.
pub async fn slot(shard: &ShardCtx, req: &Request) -> Reply {
    let user = match bearer(shard, req) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Ok(s) = serde_json::from_slice::<SlotRequest>(&req.body) else {
        return err(
            ErrorCode::InvalidRequest,
            "expected {\"conversation_id\", \"size\", \"media_type\", \"sha256\", \"file_name\"}",
        );
    };
    let Ok(conv) = s.conversation_id.parse::<u64>() else {
        return err(ErrorCode::InvalidRequest, "conversation_id must be a decimal id");
    };
    let meta = BlobMeta {
        size: s.size,
        media_type: s.media_type.to_ascii_lowercase(),
        sha256: s.sha256.to_ascii_lowercase(),
        file_name: s.file_name,
    };
    let att = &shard.shared.attachments;
    if let Err(code) = att.check(&meta) {
        let message = match code {
            ErrorCode::InvalidRequest => "sha256 must be 64 hex digits",
            c => c.description(),
        };
        return err(code, message);
    }
    if let Err(r) = member(shard, conv, user).await {
        return r;
    }
    let now = now_ms();
    if let Err(wait) = att.reserve(user, meta.size, now) {
        let code = ErrorCode::UploadBudgetExceeded;
        return retry_after(code, code.description(), wait);
    }
    let key = ObjectKey { conversation: conv, uploader: user, nonce: rand::random() };
    let exp = now + att.cfg.url_ttl_secs.get() * 1000;
    let upload = att.upload(&key, &meta, exp);
    let headers: serde_json::Map<String, serde_json::Value> =
        upload.headers.into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
    (
        201,
        serde_json::json!({
            "attachment_id": key.to_string(),
            "upload_url": upload.url,
            "method": "PUT",
            "headers": headers,
            "expires_ms": exp,
        }),
    )
}

/// `GET /v1/attachments/{id}`: a download URL, for a current member of the
/// attachment's conversation, once it is uploaded.
pub async fn download_url(shard: &ShardCtx, req: &Request) -> Reply {
    let user = match bearer(shard, req) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let id = req.path.trim_start_matches("/v1/attachments/");
    let Some(key) = ObjectKey::parse(id) else {
        return err(ErrorCode::AttachmentNotFound, ErrorCode::AttachmentNotFound.description());
    };
    if let Err(r) = member(shard, key.conversation, user).await {
        return r;
    }
    let meta = match io(shard, move |a| a.stat(&key)).await {
        Ok(Some(m)) => m,
        Ok(None) => return err(ErrorCode::AttachmentNotFound, ErrorCode::AttachmentNotFound.description()),
        Err(r) => return r,
    };
    let att = &shard.shared.attachments;
    let exp = now_ms() + att.cfg.url_ttl_secs.get() * 1000;
    (
        200,
        serde_json::json!({
            "url": att.download_url(&key, &meta, exp),
            "expires_ms": exp,
            "size": meta.size,
            "media_type": meta.media_type,
            "file_name": meta.file_name,
            "sha256": meta.sha256,
        }),
    )
}

/// `PUT /v1/blobs/{id}?...` (a presigned upload URL). `buf` holds what was read
/// past the head; on success the body has been consumed exactly, so the
/// connection may go on (`true`).
pub async fn upload(shard: &ShardCtx, stream: &TcpStream, req: &Request, buf: &mut Vec<u8>) -> (Reply, bool) {
    let Ok(att) = shard.shared.attachments.embedded() else {
        return (err(ErrorCode::HttpNotFound, "no such route"), false);
    };
    let (key, meta) = match att.verify("PUT", &req.path, &req.query, now_ms()) {
        Ok((k, Some(m))) => (k, m),
        Ok((_, None)) => return (err(ErrorCode::UrlInvalid, "not an upload URL"), false),
        Err(code) => return (err(code, code.description()), false),
    };
    // Checked before any byte is read: the slot bound them.
    if req.content_length != meta.size {
        let msg = format!("the body is {} bytes; the slot declared {}", req.content_length, meta.size);
        return (err(ErrorCode::AttachmentMismatch, &msg), false);
    }
    let declared_type = req.header("content-type").map(|t| t.trim().to_ascii_lowercase());
    if declared_type.as_deref() != Some(meta.media_type.as_str()) {
        let msg = format!("content-type must be {}, as the slot declared", meta.media_type);
        return (err(ErrorCode::AttachmentMismatch, &msg), false);
    }
    match io(shard, move |a| a.stat(&key)).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            return (err(ErrorCode::AlreadyUploaded, ErrorCode::AlreadyUploaded.description()), false);
        }
        Err(r) => return (r, false),
    }
    let (file, partial) = match io(shard, |a| a.embedded()?.create_partial()).await {
        Ok(v) => v,
        Err(r) => return (r, false),
    };
    let partial = Arc::new(partial);
    // A client that waits to be told to send the body (curl does for large ones).
    if req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        && send_all(stream, Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n")).await.is_err()
    {
        let p = partial.clone();
        let _ = io(shard, move |_| std::fs::remove_file(&*p)).await;
        return (err(ErrorCode::InvalidRequest, "the client went away"), false);
    }
    let result = receive(shard, stream, buf, file, meta.size).await;
    let outcome = match result {
        Ok((file, digest)) if digest == meta.sha256 => {
            let (p, m) = (partial.clone(), meta.clone());
            match io(shard, move |a| a.embedded()?.commit(file, &p, &key, &m)).await {
                Ok(()) => {
                    shard.shared.metrics.attachment_bytes.with_label_values(&["uploaded"]).inc_by(meta.size);
                    return (
                        (
                            201,
                            serde_json::json!({"attachment_id": key.to_string(), "size": meta.size, "sha256": meta.sha256}),
                        ),
                        true,
                    );
                }
                Err(r) => (r, false),
            }
        }
        Ok((_, digest)) => {
            let msg = format!("the body's SHA-256 is {digest}; the slot declared {}", meta.sha256);
            // The body was read whole: the connection may go on.
            (err(ErrorCode::AttachmentMismatch, &msg), true)
        }
        Err(r) => (r, false),
    };
    // Nothing of a refused upload stays.
    let p = partial.clone();
    let _ = io(shard, move |_| std::fs::remove_file(&*p)).await;
    outcome
}

/// Reads `size` body bytes (the start of them already in `buf`) into `file`,
/// hashing on the way; returns the file and the SHA-256 in hex.
async fn receive(
    shard: &ShardCtx,
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    file: std::fs::File,
    size: u64,
) -> Result<(std::fs::File, String), Reply> {
    let timeout = Duration::from_secs(shard.shared.cfg.limits.http_header_timeout_secs.get());
    let mut remaining = size;
    let mut state = (file, Sha256::new());
    while remaining > 0 {
        let want = remaining.min(CHUNK as u64) as usize;
        let mut chunk = Vec::with_capacity(want);
        let from_buf = want.min(buf.len());
        chunk.extend(buf.drain(..from_buf));
        while chunk.len() < want {
            let left = want - chunk.len();
            match monoio::time::timeout(timeout, recv_into(stream, &mut chunk, left)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Err(err(
                        ErrorCode::AttachmentMismatch,
                        "the body ended before its declared size",
                    ));
                }
                Ok(Ok(_)) => {}
                Err(_) => return Err(err(ErrorCode::InvalidRequest, "the upload stalled")),
            }
        }
        remaining -= chunk.len() as u64;
        let (mut file, mut hasher) = state;
        state = io(shard, move |_| {
            hasher.update(&chunk);
            file.write_all(&chunk)?;
            Ok((file, hasher))
        })
        .await?;
    }
    let (file, hasher) = state;
    Ok((file, hex(&hasher.finalize())))
}

/// `GET`/`HEAD /v1/blobs/{id}?...` (a presigned download URL): the file, with its
/// media type and file name. Returns whether the connection may go on.
pub async fn download(shard: &ShardCtx, stream: &TcpStream, req: &Request) -> bool {
    let reply = |r: Reply| crate::shard::http1::response(r.0, &r.1, req.keep_alive);
    let Ok(att) = shard.shared.attachments.embedded() else {
        let r = err(ErrorCode::HttpNotFound, "no such route");
        return send_all(stream, reply(r)).await.is_ok() && req.keep_alive;
    };
    let key = match att.verify(&req.method, &req.path, &req.query, now_ms()) {
        Ok((k, _)) => k,
        Err(code) => {
            return send_all(stream, reply(err(code, code.description()))).await.is_ok() && req.keep_alive;
        }
    };
    let opened = io(shard, move |a| {
        let e: &Embedded = a.embedded()?;
        let Some(meta) = e.stat(&key)? else { return Ok(None) };
        Ok(Some((meta, e.open_object(&key)?)))
    })
    .await;
    let (meta, file) = match opened {
        Ok(Some(v)) => v,
        Ok(None) => {
            let r = err(ErrorCode::AttachmentNotFound, ErrorCode::AttachmentNotFound.description());
            return send_all(stream, reply(r)).await.is_ok() && req.keep_alive;
        }
        Err(r) => return send_all(stream, reply(r)).await.is_ok() && req.keep_alive,
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\ncontent-disposition: {}\r\nx-content-type-options: nosniff\r\ncache-control: private, max-age={}\r\nconnection: {}\r\n\r\n",
        meta.media_type,
        meta.size,
        content_disposition(&meta.file_name),
        shard.shared.attachments.cfg.url_ttl_secs.get(),
        if req.keep_alive { "keep-alive" } else { "close" },
    );
    if send_all(stream, Bytes::from(head)).await.is_err() {
        return false;
    }
    if req.method == "HEAD" {
        return req.keep_alive;
    }
    let mut file = file;
    let mut left = meta.size;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let read = io(shard, move |_| {
            let mut chunk = vec![0; want];
            file.read_exact(&mut chunk)?;
            Ok((file, chunk))
        })
        .await;
        let Ok((f, chunk)) = read else { return false };
        file = f;
        left -= chunk.len() as u64;
        if send_all(stream, Bytes::from(chunk)).await.is_err() {
            return false;
        }
    }
    shard.shared.metrics.attachment_bytes.with_label_values(&["downloaded"]).inc_by(meta.size);
    req.keep_alive
}

/// After refusing a request whose body was not read: stop sending, then read and
/// drop what the client still sends (up to 8 MiB, 2 s), so that it reads the
/// refusal instead of a reset (a close with unread data sends RST).
pub async fn linger(stream: &TcpStream, buf: &mut Vec<u8>) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a socket we own.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    }
    let drain = async {
        let mut seen = 0usize;
        while seen < 8 << 20 {
            buf.clear();
            match recv_into(stream, buf, 64 * 1024).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    };
    let _ = monoio::time::timeout(Duration::from_secs(2), drain).await;
}
