//! Attachments through the real gateway, on both blob backends: the embedded
//! one, and a real S3-compatible server (s3s-fs). Upload slots, presigned
//! uploads and downloads, and everything that must be refused. Every test runs
//! on each backend (the `embedded` and `s3` modules at the end).

mod support;

use base64::Engine;
use protocol::{ClientMsg, Subprotocol};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use support::*;

/// One HTTP exchange with a binary body, to `url`: a path on `addr`, or an
/// absolute `http://host:port/...` URL (the object store's). Returns the
/// status, the head and the body.
fn exchange(
    addr: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let (addr, path) = match url.strip_prefix("http://") {
        Some(rest) => {
            let slash = rest.find('/').unwrap_or(rest.len());
            (rest[..slash].parse().expect("a host:port URL"), &rest[slash..])
        }
        None => (addr, url),
    };
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| *k == "content-length") {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may refuse before reading the body: a failed write is its answer.
    let _ = s.write_all(body);
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head, all[split..].to_vec())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Which blob backend a test runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Embedded,
    S3,
}

struct Chat {
    g: TestGateway,
    conv: u64,
    alice: String,
    bob: String,
    carol: String,
    /// The test's extra config, the S3 section included: restarts reuse it.
    config: String,
    s3: Option<S3Server>,
}

/// A gateway on `backend` with alice and bob in a 1:1 conversation, and carol.
/// `None` when the backend's server is not available (said on stderr).
fn chat(backend: Backend, extra: &str, dir: &std::path::Path) -> Option<Chat> {
    let s3 = match backend {
        Backend::Embedded => None,
        Backend::S3 => Some(S3Server::from_env()?),
    };
    let config = format!("{extra}\n{}", s3.as_ref().map(S3Server::toml).unwrap_or_default());
    let g = TestGateway::start_in(dir, &config);
    let (_, alice) = g.user("alice");
    let (bob_id, bob) = g.user("bob");
    let (_, carol) = g.user("carol");
    let mut a = g.connect(&alice, Subprotocol::Json);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: bob_id }));
    Some(Chat { g, conv, alice, bob, carol, config, s3 })
}

/// A refusal as the client sees it: the gateway's error name (embedded), or the
/// object store's S3 error code (from its XML body).
fn refusal(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return name(&v).to_owned();
    }
    let text = String::from_utf8_lossy(body);
    text.split("<Code>").nth(1).and_then(|t| t.split("</Code>").next()).unwrap_or("").to_owned()
}

impl Chat {
    fn backend(&self) -> Backend {
        if self.s3.is_some() { Backend::S3 } else { Backend::Embedded }
    }

    fn restart(self) -> Chat {
        let dir = self.g.dir.clone();
        drop(self.g);
        let g = TestGateway::start_in(&dir, &self.config);
        Chat { g, ..self }
    }

    fn slot_in(
        &self,
        token: &str,
        conv: u64,
        size: u64,
        media_type: &str,
        sha256: &str,
        name: &str,
    ) -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "conversation_id": conv.to_string(), "size": size, "media_type": media_type,
            "sha256": sha256, "file_name": name,
        })
        .to_string();
        let auth = format!("Bearer {token}");
        let (s, _, b) = exchange(
            self.g.addr,
            "POST",
            "/v1/attachments",
            &[("authorization", &auth), ("content-type", "application/json")],
            body.as_bytes(),
        );
        (s, json(&b))
    }

    fn slot(
        &self,
        token: &str,
        size: u64,
        media_type: &str,
        sha256: &str,
        name: &str,
    ) -> (u16, serde_json::Value) {
        self.slot_in(token, self.conv, size, media_type, sha256, name)
    }

    /// PUTs `body` to the slot's URL with the headers the slot names, except
    /// those in `change` (a header with an empty value is left out).
    fn put_with(
        &self,
        url: &str,
        slot: &serde_json::Value,
        change: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut headers: Vec<(String, String)> = slot["headers"]
            .as_object()
            .expect("the slot names the headers to send")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        for (k, v) in change {
            headers.retain(|(h, _)| h != k);
            if !v.is_empty() {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (s, _, b) = exchange(self.g.addr, "PUT", url, &headers, body);
        (s, refusal(&b))
    }

    /// PUTs `body` to the slot, as a client following it does.
    fn put(&self, slot: &serde_json::Value, body: &[u8]) -> (u16, String) {
        self.put_with(slot["upload_url"].as_str().unwrap(), slot, &[], body)
    }

    fn download_url(&self, token: &str, id: &str) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {token}");
        let (s, _, b) =
            exchange(self.g.addr, "GET", &format!("/v1/attachments/{id}"), &[("authorization", &auth)], b"");
        (s, json(&b))
    }

    /// GETs a download URL: the status, the head (lowercase) and the bytes.
    fn get(&self, url: &str) -> (u16, String, Vec<u8>) {
        let (s, head, body) = exchange(self.g.addr, "GET", url, &[], b"");
        (s, head.to_ascii_lowercase(), body)
    }

    /// Checks a refused upload or download: the gateway's coded error on the
    /// embedded backend; the object store's own status and S3 code on S3.
    fn refused(&self, got: (u16, String), embedded: (u16, &str), s3: (u16, &str)) {
        let want = if self.backend() == Backend::S3 { s3 } else { embedded };
        assert_eq!((got.0, got.1.as_str()), want, "on {:?}", self.backend());
    }
}

fn name(v: &serde_json::Value) -> &str {
    v["error"]["name"].as_str().unwrap_or("")
}

fn an_upload_reaches_members_by_a_download_url_and_nobody_else(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(c) = chat(backend, "", tmp.path()) else { return };
    // Several chunks of the server's streaming, and a name that needs encoding.
    let photo = bytes(3 * 1024 * 1024 + 17, 7);
    let (s, slot) = c.slot(&c.alice, photo.len() as u64, "image/png", &sha(&photo), "Beach day ☀.png");
    assert_eq!(s, 201, "{slot}");
    let url = slot["upload_url"].as_str().unwrap();
    let id = slot["attachment_id"].as_str().unwrap();
    assert_eq!(slot["method"], "PUT");
    assert_eq!(slot["headers"]["content-type"], "image/png");

    // Nothing to download before the upload.
    assert_eq!(name(&c.download_url(&c.bob, id).1), "attachment_not_found");
    let (s, r) = c.put(&slot, &photo);
    assert!((200..300).contains(&s), "{s} {r}");

    // Bob, a member, gets a URL and the exact bytes, with the type and name.
    let (s, d) = c.download_url(&c.bob, id);
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["size"].as_u64(), d["media_type"].as_str(), d["sha256"].as_str(), d["file_name"].as_str()),
        (Some(photo.len() as u64), Some("image/png"), Some(sha(&photo).as_str()), Some("Beach day ☀.png"))
    );
    let durl = d["url"].as_str().unwrap().to_owned();
    let (s, head, got) = c.get(&durl);
    assert_eq!(s, 200, "{head}");
    assert!(got == photo, "the downloaded bytes are the uploaded ones");
    assert!(head.contains("content-type: image/png"), "{head}");
    assert!(head.contains("filename*=utf-8''beach%20day%20%e2%98%80%2epng"), "{head}");

    // Carol is in no conversation with them: no URL, and no hint whether it exists.
    assert_eq!(name(&c.download_url(&c.carol, id).1), "not_a_member");
    // A slot is used once (on S3, the same URL can only put the same bytes again).
    let again = c.put(&slot, &photo);
    if backend == Backend::Embedded {
        assert_eq!((again.0, again.1.as_str()), (409, "already_uploaded"));
    }
    // The download URL does not upload, and the upload URL does not download.
    c.refused(c.put_with(&durl, &slot, &[], &photo), (403, "url_invalid"), (403, "SignatureDoesNotMatch"));
    let (s, _, b) = c.get(url);
    c.refused((s, refusal(&b)), (403, "url_invalid"), (403, "SignatureDoesNotMatch"));

    // Stored durably: a restart serves the same bytes.
    let c = c.restart();
    let (s, _, got) = c.get(&durl);
    assert_eq!(s, 200);
    assert!(got == photo);
}

fn an_upload_that_is_not_what_its_slot_declared_is_refused_and_leaves_nothing(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(c) = chat(backend, "", tmp.path()) else { return };
    let file = bytes(600 * 1024, 3);
    let (_, slot) = c.slot(&c.alice, file.len() as u64, "application/pdf", &sha(&file), "report.pdf");
    let url = slot["upload_url"].as_str().unwrap().to_owned();
    let id = slot["attachment_id"].as_str().unwrap().to_owned();
    let signature = (403, "SignatureDoesNotMatch");

    // Larger than declared, and smaller.
    let mut larger = file.clone();
    larger.push(0);
    c.refused(c.put(&slot, &larger), (400, "attachment_mismatch"), signature);
    c.refused(c.put(&slot, &file[..1000]), (400, "attachment_mismatch"), signature);
    // Another type than declared.
    c.refused(
        c.put_with(&url, &slot, &[("content-type", "image/png")], &file),
        (400, "attachment_mismatch"),
        signature,
    );
    // The declared size, other bytes: found out by the checksum.
    let other = bytes(file.len(), 4);
    c.refused(c.put(&slot, &other), (400, "attachment_mismatch"), (400, "BadDigest"));
    if backend == Backend::S3 {
        // The checksum header is part of the deal: left out, or changed.
        c.refused(c.put_with(&url, &slot, &[("x-amz-checksum-sha256", "")], &other), signature, signature);
        let forged = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&other));
        c.refused(
            c.put_with(&url, &slot, &[("x-amz-checksum-sha256", &forged)], &other),
            signature,
            signature,
        );
    }
    assert_eq!(name(&c.download_url(&c.alice, &id).1), "attachment_not_found", "nothing was kept");
    // A body that stops short of its length (the client went away).
    let (addr, path) = match url.strip_prefix("http://") {
        Some(rest) => (rest[..rest.find('/').unwrap()].parse().unwrap(), &rest[rest.find('/').unwrap()..]),
        None => (c.g.addr, url.as_str()),
    };
    let mut head = format!("PUT {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n", file.len());
    for (k, v) in slot["headers"].as_object().unwrap() {
        head.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap()));
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("{head}\r\n").as_bytes()).unwrap();
    s.write_all(&file[..100_000]).unwrap();
    drop(s);

    // Changed URLs: a longer life (embedded: another size), another object with
    // this signature, no signature.
    let tampered = match backend {
        Backend::Embedded => url.replace(&format!("size={}", file.len()), "size=1"),
        Backend::S3 => url.replace("X-Amz-Expires=900", "X-Amz-Expires=9000"),
    };
    assert_ne!(tampered, url);
    c.refused(c.put_with(&tampered, &slot, &[], &file), (403, "url_invalid"), signature);
    let (_, other_slot) = c.slot(&c.alice, 10, "text/plain", &sha(b"0123456789"), "a.txt");
    let other_id = other_slot["attachment_id"].as_str().unwrap();
    c.refused(c.put_with(&url.replace(&id, other_id), &slot, &[], &file), (403, "url_invalid"), signature);
    let unsigned = url.split("&sig=").next().unwrap().split("&X-Amz-Signature=").next().unwrap();
    c.refused(c.put_with(unsigned, &slot, &[], &file), (403, "url_invalid"), (403, "AccessDenied"));
    // Path-like names never reach the disk; on S3 the gateway serves no blobs at all.
    let (s, _, b) = exchange(c.g.addr, "PUT", "/v1/blobs/..%2F..%2Fetc%2Fpasswd?exp=1&sig=x", &[], &file);
    c.refused((s, refusal(&b)), (403, "url_invalid"), (404, "no_such_endpoint"));

    // After all that, the slot still takes the right bytes.
    let (s, r) = c.put(&slot, &file);
    assert!((200..300).contains(&s), "{s} {r}");
    let (s, d) = c.download_url(&c.bob, &id);
    assert_eq!(s, 200);
    let (_, _, got) = c.get(d["url"].as_str().unwrap());
    assert!(got == file);
}

fn slots_are_checked_against_membership_limits_and_the_budget(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[attachments]\nmax_bytes = 2097152\nupload_bytes_per_hour = 3145728\nmedia_types = [\"image/png\", \"text/plain\"]\n";
    let Some(c) = chat(backend, extra, tmp.path()) else { return };
    let h = sha(b"x");
    assert_eq!(name(&c.slot(&c.carol, 10, "image/png", &h, "a.png").1), "not_a_member");
    let (s, r) = c.slot(&c.alice, 2097153, "image/png", &h, "a.png");
    assert_eq!((s, name(&r)), (413, "attachment_too_large"));
    let (s, r) = c.slot(&c.alice, 10, "text/html", &h, "a.html");
    assert_eq!((s, name(&r)), (415, "media_type_not_allowed"));
    let (s, r) = c.slot(&c.alice, 10, "image/png", "abc", "a.png");
    assert_eq!((s, name(&r)), (400, "invalid_request"));
    for bad in ["../../etc/passwd", "a/b.png", "a\\b.png", "..", "tab\there", &"x".repeat(256)] {
        let (s, r) = c.slot(&c.alice, 10, "image/png", &h, bad);
        assert_eq!((s, name(&r)), (400, "invalid_file_name"), "{bad:?}");
    }
    let (s, r) = c.slot("not-a-token", 10, "image/png", &h, "a.png");
    assert_eq!((s, name(&r)), (401, "unauthorized"));

    // The hourly budget: 3 MiB reserved by slots, then 429 with a Retry-After.
    assert_eq!(c.slot(&c.alice, 2 << 20, "image/png", &h, "a.png").0, 201);
    assert_eq!(c.slot(&c.alice, 1 << 20, "image/png", &h, "b.png").0, 201);
    let (s, r) = c.slot(&c.alice, 1, "image/png", &h, "c.png");
    assert_eq!((s, name(&r)), (429, "upload_budget_exceeded"));
    assert!(r["error"]["retry_after_secs"].as_u64().unwrap() > 3000);
    // Another user's budget is their own.
    assert_eq!(c.slot(&c.bob, 1 << 20, "image/png", &h, "d.png").0, 201);
}

fn presigned_urls_expire(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(c) = chat(backend, "[attachments]\nurl_ttl_secs = 2\n", tmp.path()) else { return };
    // Two slots at once: the first is used while valid, the second once expired.
    let (_, first) = c.slot(&c.alice, 3, "text/plain", &sha(b"abc"), "a.txt");
    let (_, second) = c.slot(&c.alice, 3, "text/plain", &sha(b"abc"), "b.txt");
    let (s, r) = c.put(&first, b"abc");
    assert!((200..300).contains(&s), "{s} {r}");
    let (_, d) = c.download_url(&c.bob, first["attachment_id"].as_str().unwrap());
    let durl = d["url"].as_str().unwrap().to_owned();
    assert_eq!(c.get(&durl).0, 200);
    // The download URL, issued after the second slot's, expires; so has that one.
    eventually("the download URL to expire", || c.get(&durl).0 == 403);
    let (s, _, b) = c.get(&durl);
    c.refused((s, refusal(&b)), (403, "url_expired"), (403, "AccessDenied"));
    c.refused(c.put(&second, b"abc"), (403, "url_expired"), (403, "AccessDenied"));
    let id = second["attachment_id"].as_str().unwrap();
    assert_eq!(name(&c.download_url(&c.alice, id).1), "attachment_not_found");
}

/// Uploads `data` to the chat's conversation as `token`'s; returns the attachment id.
fn uploaded(c: &Chat, token: &str, data: &[u8], media_type: &str, file: &str) -> String {
    uploaded_in(c, token, c.conv, data, media_type, file)
}

fn uploaded_in(c: &Chat, token: &str, conv: u64, data: &[u8], media_type: &str, file: &str) -> String {
    let (s, slot) = c.slot_in(token, conv, data.len() as u64, media_type, &sha(data), file);
    assert_eq!(s, 201, "{slot}");
    let (s, r) = c.put(&slot, data);
    assert!((200..300).contains(&s), "{s} {r}");
    slot["attachment_id"].as_str().unwrap().to_owned()
}

fn with_attachment(conversation_id: u64, cmid: &str, caption: &str, id: &str) -> ClientMsg {
    ClientMsg::Send {
        conversation_id,
        client_msg_id: cmid.into(),
        body: caption.into(),
        attachment: Some(protocol::AttachmentRef {
            attachment_id: id.into(),
            width: Some(640),
            height: Some(480),
            preview: "thumb".into(),
        }),
    }
}

fn a_message_with_an_attachment_is_stored_delivered_and_deleted_with_its_object(backend: Backend) {
    for proto in both() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(c) = chat(backend, "", tmp.path()) else { return };
        let photo = bytes(300_000, 9);
        let id = uploaded(&c, &c.alice, &photo, "image/jpeg", "cat.jpg");
        let mut a = c.g.connect(&c.alice, proto);
        let mut b = c.g.connect(&c.bob, proto);
        a.sync(vec![]);
        b.sync(vec![]);

        a.send(with_attachment(c.conv, "p1", "our cat", &id));
        let seq = a.wait_ack("p1");
        let got = b.next_message();
        assert_eq!((got.seq, got.body.as_str()), (seq, "our cat"));
        let att = got.attachment.expect("the attachment reaches the recipient");
        assert_eq!(
            (att.attachment_id.as_str(), att.file_name.as_str(), att.media_type.as_str(), att.size),
            (id.as_str(), "cat.jpg", "image/jpeg", photo.len() as u64),
            "size, type and name come from the upload"
        );
        assert_eq!(
            (att.sha256, att.width, att.height, att.preview.as_str()),
            (sha(&photo), Some(640), Some(480), "thumb")
        );
        // Resent with its key: the same message, nothing new.
        a.send(with_attachment(c.conv, "p1", "our cat", &id));
        assert_eq!(a.wait_ack("p1"), seq);

        // In history after a restart (sealed with the caption), on a new device.
        drop((a, b));
        let c = c.restart();
        let mut b = c.g.connect(&c.bob, proto);
        let replay = b.sync(vec![]);
        let stored = replay.iter().find(|m| m.seq == seq).expect("replayed");
        assert_eq!(stored.attachment.as_ref().map(|a| a.attachment_id.as_str()), Some(id.as_str()));
        assert_eq!(stored.body, "our cat");

        // Deleting the message: a tombstone without it, and the object goes.
        let mut a = c.g.connect(&c.alice, proto);
        a.sync(vec![]);
        assert!(matches!(
            a.request(ClientMsg::Delete { conversation_id: c.conv, seq }),
            protocol::ServerMsg::Ok
        ));
        let history = match b.request(ClientMsg::History {
            conversation_id: c.conv,
            before: None,
            after: None,
            limit: None,
        }) {
            protocol::ServerMsg::History { messages, .. } => messages,
            other => panic!("{other:?}"),
        };
        let tomb = history.iter().find(|m| m.seq == seq).unwrap();
        assert_eq!((tomb.kind, tomb.attachment.is_none()), (protocol::MessageKind::Deleted, true));
        eventually("the deleted message's object to go", || {
            name(&c.download_url(&c.bob, &id).1) == "attachment_not_found"
        });
    }
}

fn a_send_naming_an_attachment_it_may_not_is_refused_and_stores_nothing(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(c) = chat(backend, "", tmp.path()) else { return };
    let (dave_id, _) = c.g.user("dave");
    let mut a = c.g.connect(&c.alice, Subprotocol::Json);
    a.sync(vec![]);
    let other_conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: dave_id }));

    // A slot never uploaded to.
    let (_, slot) = c.slot(&c.alice, 5, "text/plain", &sha(b"hello"), "a.txt");
    let never = slot["attachment_id"].as_str().unwrap().to_owned();
    // Bob's upload, in the same conversation.
    let bobs = uploaded(&c, &c.bob, b"bob's file", "text/plain", "b.txt");
    // Alice's own upload, to her other conversation.
    let elsewhere = uploaded_in(&c, &c.alice, other_conv, b"dave", "text/plain", "d.txt");

    for (i, bad) in [never.as_str(), bobs.as_str(), elsewhere.as_str(), "1.2.0000000000000003", "../../x"]
        .iter()
        .enumerate()
    {
        let cmid = format!("bad{i}");
        a.send(with_attachment(c.conv, &cmid, "look", bad));
        assert_eq!(a.ack_or_error(&cmid), Err(1016), "{bad}");
    }
    // A preview too large, and a body with U+0000.
    let mine = uploaded(&c, &c.alice, b"mine", "text/plain", "m.txt");
    let mut big = with_attachment(c.conv, "big", "", &mine);
    if let ClientMsg::Send { attachment: Some(a), .. } = &mut big {
        a.preview = "x".repeat(8 * 1024 + 1);
    }
    a.send(big);
    assert_eq!(a.ack_or_error("big"), Err(1004));
    a.send_text(c.conv, "nul", "a\0b");
    assert_eq!(a.ack_or_error("nul"), Err(1004));
    // None of it was stored; the connection goes on, and an empty caption is fine.
    a.send(with_attachment(c.conv, "ok", "", &mine));
    assert_eq!(a.wait_ack("ok"), 1, "the refused sends took no position");
}

fn the_sweeper_removes_uploads_no_message_names_and_keeps_the_rest(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[attachments]\norphan_grace_secs = 1\nsweep_interval_secs = 1\n";
    let Some(c) = chat(backend, extra, tmp.path()) else { return };
    let kept = uploaded(&c, &c.alice, b"named", "text/plain", "named.txt");
    let orphan = uploaded(&c, &c.alice, b"never named", "text/plain", "orphan.txt");
    let mut a = c.g.connect(&c.alice, Subprotocol::Json);
    a.sync(vec![]);
    a.send(with_attachment(c.conv, "k", "", &kept));
    a.wait_ack("k");
    eventually("the sweeper to remove the upload no message names", || {
        name(&c.download_url(&c.bob, &orphan).1) == "attachment_not_found"
    });
    assert_eq!(c.download_url(&c.bob, &kept).0, 200, "a named upload stays");
}

/// The object store goes down and comes back: sends that name an attachment get
/// a retryable error and store nothing, everything else goes on, and once the
/// store is back the same send (same key) goes through, with no restart. A
/// message deleted meanwhile loses its object once the store is back.
#[test]
fn s3_down_sends_are_refused_retryably_and_recover_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut c) = chat(Backend::S3, "", tmp.path()) else { return };
    let photo = bytes(50_000, 5);
    let id = uploaded(&c, &c.alice, &photo, "image/png", "p.png");
    let doomed = uploaded(&c, &c.alice, b"to be deleted", "text/plain", "d.txt");
    let mut a = c.g.connect(&c.alice, Subprotocol::Json);
    let mut b = c.g.connect(&c.bob, Subprotocol::Json);
    a.sync(vec![]);
    b.sync(vec![]);
    a.send(with_attachment(c.conv, "d", "", &doomed));
    let doomed_seq = a.wait_ack("d");
    assert_eq!(b.next_message().seq, doomed_seq);

    c.s3.as_mut().unwrap().stop();
    // The delete commits (the chat store is up); its object's removal waits.
    assert!(matches!(
        a.request(ClientMsg::Delete { conversation_id: c.conv, seq: doomed_seq }),
        protocol::ServerMsg::Ok
    ));
    a.send(with_attachment(c.conv, "p", "while down", &id));
    let code = a.ack_or_error("p").expect_err("no ack while the store is down");
    assert_eq!(code, protocol::ErrorCode::AttachmentStoreUnavailable as u16, "a retryable code");
    let (s, r) = c.download_url(&c.bob, &id);
    assert_eq!((s, name(&r)), (503, "storage_unavailable"), "{r}");
    // Text goes on (after the delete's position: the refused send took none).
    a.send_text(c.conv, "t", "text still flows");
    let text_seq = a.wait_ack("t");
    let got = next_where(&mut b, |m| m.body == "text still flows");
    assert_eq!(got.seq, text_seq);

    c.s3.as_mut().unwrap().start();
    a.send(with_attachment(c.conv, "p", "while down", &id));
    assert_eq!(a.wait_ack("p"), text_seq + 1, "the retry goes through once the store is back");
    let got = next_where(&mut b, |m| m.attachment.is_some());
    assert_eq!(got.attachment.map(|x| x.attachment_id), Some(id.clone()));
    assert_eq!(c.download_url(&c.bob, &id).0, 200);
    eventually("the deleted message's object to be removed once the store is back", || {
        name(&c.download_url(&c.bob, &doomed).1) == "attachment_not_found"
    });
}

/// The next message `c` is shown that satisfies `pred` (others, such as the
/// tombstone of a delete, pass by).
fn next_where(c: &mut Client, pred: impl Fn(&protocol::Message) -> bool) -> protocol::Message {
    loop {
        let m = c.next_message();
        if pred(&m) {
            return m;
        }
    }
}

/// Each test above, on each backend.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[test] fn $test() { super::$test(super::Backend::Embedded) })*
        }
        mod s3 {
            $(#[test] fn $test() { super::$test(super::Backend::S3) })*
        }
    };
}

on_both_backends!(
    an_upload_reaches_members_by_a_download_url_and_nobody_else,
    an_upload_that_is_not_what_its_slot_declared_is_refused_and_leaves_nothing,
    slots_are_checked_against_membership_limits_and_the_budget,
    presigned_urls_expire,
    a_message_with_an_attachment_is_stored_delivered_and_deleted_with_its_object,
    a_send_naming_an_attachment_it_may_not_is_refused_and_stores_nothing,
    the_sweeper_removes_uploads_no_message_names_and_keeps_the_rest,
);
