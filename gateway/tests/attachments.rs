//! Attachments on the embedded blob backend, through the real gateway: upload
//! slots, presigned uploads and downloads, and everything that must be refused.

mod support;

use protocol::{ClientMsg, Subprotocol};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use support::*;

/// One HTTP exchange with a binary body; returns the status, the head and the body.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
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

struct Chat {
    g: TestGateway,
    conv: u64,
    alice: String,
    bob: String,
    carol: String,
}

fn chat(extra: &str, dir: &std::path::Path) -> Chat {
    let g = TestGateway::start_in(dir, extra);
    let (_, alice) = g.user("alice");
    let (bob_id, bob) = g.user("bob");
    let (_, carol) = g.user("carol");
    let mut a = g.connect(&alice, Subprotocol::Json);
    let conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: bob_id }));
    Chat { g, conv, alice, bob, carol }
}

impl Chat {
    fn slot(
        &self,
        token: &str,
        size: u64,
        media_type: &str,
        sha256: &str,
        name: &str,
    ) -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "conversation_id": self.conv.to_string(), "size": size, "media_type": media_type,
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

    fn put(&self, url: &str, media_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let (s, _, b) = exchange(self.g.addr, "PUT", url, &[("content-type", media_type)], body);
        (s, json(&b))
    }

    fn download_url(&self, token: &str, id: &str) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {token}");
        let (s, _, b) =
            exchange(self.g.addr, "GET", &format!("/v1/attachments/{id}"), &[("authorization", &auth)], b"");
        (s, json(&b))
    }
}

fn name(v: &serde_json::Value) -> &str {
    v["error"]["name"].as_str().unwrap_or("")
}

#[test]
fn an_upload_reaches_members_by_a_download_url_and_nobody_else() {
    let tmp = tempfile::tempdir().unwrap();
    let c = chat("", tmp.path());
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
    let (s, r) = c.put(url, "image/png", &photo);
    assert_eq!(s, 201, "{r}");
    assert_eq!(r["sha256"], sha(&photo));

    // Bob, a member, gets a URL and the exact bytes, with the type and name.
    let (s, d) = c.download_url(&c.bob, id);
    assert_eq!(s, 200, "{d}");
    assert_eq!((d["size"].as_u64(), d["media_type"].as_str()), (Some(photo.len() as u64), Some("image/png")));
    let (s, head, got) = exchange(c.g.addr, "GET", d["url"].as_str().unwrap(), &[], b"");
    assert_eq!(s, 200);
    assert!(got == photo, "the downloaded bytes are the uploaded ones");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: image/png"), "{head}");
    assert!(head.contains("filename*=utf-8''beach%20day%20%e2%98%80%2epng"), "{head}");

    // Carol is in no conversation with them: no URL, and no hint whether it exists.
    assert_eq!(name(&c.download_url(&c.carol, id).1), "not_a_member");
    // A slot is used once.
    let (s, r) = c.put(url, "image/png", &photo);
    assert_eq!((s, name(&r)), (409, "already_uploaded"));
    // The download URL does not upload, and the upload URL does not download.
    let (s, r) = c.put(d["url"].as_str().unwrap(), "image/png", &photo);
    assert_eq!((s, name(&r)), (403, "url_invalid"));
    let (s, _, b) = exchange(c.g.addr, "GET", url, &[], b"");
    assert_eq!((s, name(&json(&b))), (403, "url_invalid"));

    // Stored durably: a restart serves the same bytes.
    drop(c.g);
    let g = TestGateway::start_in(tmp.path(), "");
    let (s, _, got) = exchange(g.addr, "GET", d["url"].as_str().unwrap(), &[], b"");
    assert_eq!(s, 200);
    assert!(got == photo);
}

#[test]
fn an_upload_that_is_not_what_its_slot_declared_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = chat("", tmp.path());
    let file = bytes(600 * 1024, 3);
    let (_, slot) = c.slot(&c.alice, file.len() as u64, "application/pdf", &sha(&file), "report.pdf");
    let url = slot["upload_url"].as_str().unwrap().to_owned();
    let id = slot["attachment_id"].as_str().unwrap().to_owned();

    // Larger than declared, and smaller.
    let mut larger = file.clone();
    larger.push(0);
    let (s, r) = c.put(&url, "application/pdf", &larger);
    assert_eq!((s, name(&r)), (400, "attachment_mismatch"), "{r}");
    let (s, r) = c.put(&url, "application/pdf", &file[..1000]);
    assert_eq!((s, name(&r)), (400, "attachment_mismatch"));
    // Another type than declared.
    let (s, r) = c.put(&url, "image/png", &file);
    assert_eq!((s, name(&r)), (400, "attachment_mismatch"));
    // The declared size, other bytes: found out by the checksum, once all is read.
    let other = bytes(file.len(), 4);
    let (s, r) = c.put(&url, "application/pdf", &other);
    assert_eq!((s, name(&r)), (400, "attachment_mismatch"), "{r}");
    assert_eq!(name(&c.download_url(&c.alice, &id).1), "attachment_not_found", "nothing was kept");
    // A body that stops short of its length (the client went away).
    let head = format!(
        "PUT {url} HTTP/1.1\r\nhost: x\r\ncontent-type: application/pdf\r\ncontent-length: {}\r\n\r\n",
        file.len()
    );
    let mut s = TcpStream::connect(c.g.addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&file[..100_000]).unwrap();
    drop(s);

    // Changed URLs: another size, another object with this signature, no signature.
    let tampered = url.replace(&format!("size={}", file.len()), "size=1");
    let (s, r) = c.put(&tampered, "application/pdf", &file[..1]);
    assert_eq!((s, name(&r)), (403, "url_invalid"));
    let (_, other_slot) = c.slot(&c.alice, 10, "text/plain", &sha(b"0123456789"), "a.txt");
    let other_id = other_slot["attachment_id"].as_str().unwrap();
    let (s, r) = c.put(&url.replace(&id, other_id), "application/pdf", &file);
    assert_eq!((s, name(&r)), (403, "url_invalid"));
    let (s, r) = c.put(url.split("&sig=").next().unwrap(), "application/pdf", &file);
    assert_eq!((s, name(&r)), (403, "url_invalid"));
    let (s, r) = c.put("/v1/blobs/..%2F..%2Fetc%2Fpasswd?exp=1&sig=x", "application/pdf", &file);
    assert_eq!((s, name(&r)), (403, "url_invalid"));

    // After all that, the slot still takes the right bytes.
    let (s, r) = c.put(&url, "application/pdf", &file);
    assert_eq!(s, 201, "{r}");
    let (s, d) = c.download_url(&c.bob, &id);
    assert_eq!(s, 200);
    let (_, _, got) = exchange(c.g.addr, "GET", d["url"].as_str().unwrap(), &[], b"");
    assert!(got == file);
}

#[test]
fn slots_are_checked_against_membership_limits_and_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[attachments]\nmax_bytes = 2097152\nupload_bytes_per_hour = 3145728\nmedia_types = [\"image/png\", \"text/plain\"]\n";
    let c = chat(extra, tmp.path());
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

#[test]
fn presigned_urls_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let c = chat("[attachments]\nurl_ttl_secs = 1\n", tmp.path());
    let (_, slot) = c.slot(&c.alice, 3, "text/plain", &sha(b"abc"), "a.txt");
    let url = slot["upload_url"].as_str().unwrap().to_owned();
    // While valid, a wrong-sized body is refused for its size; once expired, for the URL.
    assert_eq!(name(&c.put(&url, "text/plain", b"ab").1), "attachment_mismatch");
    eventually("the upload URL to expire", || c.put(&url, "text/plain", b"ab").0 == 403);
    let (s, r) = c.put(&url, "text/plain", b"abc");
    assert_eq!((s, name(&r)), (403, "url_expired"));
}

/// Uploads `data` to the chat's conversation as `token`'s; returns the attachment id.
fn uploaded(c: &Chat, token: &str, data: &[u8], media_type: &str, file: &str) -> String {
    let (s, slot) = c.slot(token, data.len() as u64, media_type, &sha(data), file);
    assert_eq!(s, 201, "{slot}");
    let (s, r) = c.put(slot["upload_url"].as_str().unwrap(), media_type, data);
    assert_eq!(s, 201, "{r}");
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

#[test]
fn a_message_with_an_attachment_is_stored_delivered_and_deleted_with_its_object() {
    for proto in both() {
        let tmp = tempfile::tempdir().unwrap();
        let c = chat("", tmp.path());
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
        drop(c.g);
        let g = TestGateway::start_in(tmp.path(), "");
        let c = Chat { g, ..c };
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

#[test]
fn a_send_naming_an_attachment_it_may_not_is_refused_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = chat("", tmp.path());
    let bob_token = c.bob.clone();
    let (dave_id, _) = c.g.user("dave");
    let mut a = c.g.connect(&c.alice, Subprotocol::Json);
    a.sync(vec![]);
    let other_conv = conversation_id(&a.request(ClientMsg::CreateDirect { user_id: dave_id }));

    // A slot never uploaded to.
    let (_, slot) = c.slot(&c.alice, 5, "text/plain", &sha(b"hello"), "a.txt");
    let never = slot["attachment_id"].as_str().unwrap().to_owned();
    // Bob's upload, in the same conversation.
    let bobs = uploaded(&c, &bob_token, b"bob's file", "text/plain", "b.txt");
    // Alice's own upload, to her other conversation.
    let (s, slot) = {
        let body = serde_json::json!({
            "conversation_id": other_conv.to_string(), "size": 4, "media_type": "text/plain",
            "sha256": sha(b"dave"), "file_name": "d.txt",
        })
        .to_string();
        let auth = format!("Bearer {}", c.alice);
        let (s, _, b) =
            exchange(c.g.addr, "POST", "/v1/attachments", &[("authorization", &auth)], body.as_bytes());
        (s, json(&b))
    };
    assert_eq!(s, 201);
    assert_eq!(c.put(slot["upload_url"].as_str().unwrap(), "text/plain", b"dave").0, 201);
    let elsewhere = slot["attachment_id"].as_str().unwrap().to_owned();

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

#[test]
fn the_sweeper_removes_uploads_no_message_names_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let c = chat("[attachments]\norphan_grace_secs = 1\nsweep_interval_secs = 1\n", tmp.path());
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
