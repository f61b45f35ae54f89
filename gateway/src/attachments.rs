//! Attachments on the embedded blob backend: upload slots, presigned URLs signed
//! with a key of the node's own, and the blob files themselves.
//!
//! The bytes never pass through a shard's chat path: a client asks for a slot
//! (`POST /v1/attachments`), uploads to the presigned `PUT` URL, and later asks
//! for a presigned `GET`. The URL binds everything the slot declared (object,
//! size, media type, SHA-256, file name, expiry), so a client cannot upload
//! anything else with it; the server checks the bytes against it as they stream.
//!
//! Objects are named `<conversation>.<uploader>.<random>`: the name itself says
//! which conversation an attachment belongs to and who uploaded it, so no table
//! is needed to answer "may this user see it?" (a member of that conversation,
//! now). On disk: `objects/<name>` and `objects/<name>.meta` (JSON), written
//! through `tmp/` and renamed into place once complete, checked and fsynced.
//!
//! Runs on: shards (signing, verifying, budgets: microseconds); the `blob-io`
//! pool (every file operation).

use crate::config::AttachmentsConfig;
use crate::pool::Pool;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use protocol::{ConversationId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Query values are percent-encoded except RFC 3986's unreserved characters.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// What an upload slot declared, bound into its URL's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub size: u64,
    pub media_type: String,
    /// Lowercase hex.
    pub sha256: String,
    pub file_name: String,
}

/// An object's name, parsed: the conversation it belongs to and its uploader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectKey {
    pub conversation: ConversationId,
    pub uploader: UserId,
    pub nonce: u64,
}

impl ObjectKey {
    /// Only the exact form `<digits>.<digits>.<16 hex>`: nothing path-like gets through.
    pub fn parse(s: &str) -> Option<ObjectKey> {
        let mut parts = s.split('.');
        let (c, u, n) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || n.len() != 16 {
            return None;
        }
        let digits = |x: &str| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(c) || !digits(u) || !n.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        Some(ObjectKey {
            conversation: c.parse().ok()?,
            uploader: u.parse().ok()?,
            nonce: u64::from_str_radix(n, 16).ok()?,
        })
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{:016x}", self.conversation, self.uploader, self.nonce)
    }
}

/// A file name as clients may give it: shown to people and sent back in
/// `Content-Disposition`, never used as a path.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Lowercase hex of 32 bytes.
pub fn valid_sha256(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Window {
    start_ms: u64,
    bytes: u64,
}

pub struct Attachments {
    pub cfg: AttachmentsConfig,
    dir: PathBuf,
    key: Hmac<Sha256>,
    /// Upload bytes reserved per user in the current hour (fixed windows).
    budgets: Mutex<HashMap<UserId, Window>>,
    /// Every blob file operation runs here.
    pub io: Arc<Pool>,
}

impl Attachments {
    /// Opens (creating) the blob directory and drops partial uploads left by a crash.
    /// `key` signs URLs (derived from the token secret: every node with the same
    /// secret verifies every other's URLs).
    pub fn open(cfg: &AttachmentsConfig, data_dir: &Path, key: &[u8], io: Arc<Pool>) -> anyhow::Result<Self> {
        let dir = cfg.dir.clone().unwrap_or_else(|| data_dir.join("blobs"));
        std::fs::create_dir_all(dir.join("objects"))?;
        let _ = std::fs::remove_dir_all(dir.join("tmp"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let key = Hmac::new_from_slice(key).expect("HMAC takes any key length");
        Ok(Attachments { cfg: cfg.clone(), dir, key, budgets: Mutex::new(HashMap::new()), io })
    }

    /// Checks what a slot declares against the configured limits.
    pub fn check(&self, meta: &BlobMeta) -> Result<(), ErrorCode> {
        if meta.size == 0 || meta.size > self.cfg.max_bytes.get() {
            return Err(ErrorCode::AttachmentTooLarge);
        }
        if !self.cfg.media_types.contains(&meta.media_type) {
            return Err(ErrorCode::MediaTypeNotAllowed);
        }
        if !valid_sha256(&meta.sha256) {
            return Err(ErrorCode::InvalidRequest);
        }
        if !valid_file_name(&meta.file_name) {
            return Err(ErrorCode::InvalidFileName);
        }
        Ok(())
    }

    /// Reserves `bytes` of `user`'s hourly upload budget; `Err(wait)` when spent.
    pub fn reserve(&self, user: UserId, bytes: u64, now_ms: u64) -> Result<(), Duration> {
        const HOUR_MS: u64 = 3_600_000;
        let mut budgets = self.budgets.lock().unwrap();
        // Old windows go, so the map holds only this hour's uploaders.
        if budgets.len() > 4096 {
            budgets.retain(|_, w| now_ms < w.start_ms + HOUR_MS);
        }
        let w = budgets.entry(user).or_insert(Window { start_ms: now_ms, bytes: 0 });
        if now_ms >= w.start_ms + HOUR_MS {
            *w = Window { start_ms: now_ms, bytes: 0 };
        }
        if w.bytes.saturating_add(bytes) > self.cfg.upload_bytes_per_hour.get() {
            return Err(Duration::from_millis(w.start_ms + HOUR_MS - now_ms));
        }
        w.bytes += bytes;
        Ok(())
    }

    fn mac(&self, parts: &[&str]) -> Hmac<Sha256> {
        let mut m = self.key.clone();
        for p in parts {
            // Length-prefixed: no two different part lists sign the same bytes.
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p.as_bytes());
        }
        m
    }

    /// The presigned upload URL (a path on this gateway) for `key`, valid until `exp_ms`.
    pub fn upload_url(&self, key: &ObjectKey, meta: &BlobMeta, exp_ms: u64) -> String {
        let (k, exp, size) = (key.to_string(), exp_ms.to_string(), meta.size.to_string());
        let sig = self.mac(&["PUT", &k, &exp, &size, &meta.media_type, &meta.sha256, &meta.file_name]);
        let enc = |v: &str| utf8_percent_encode(v, QUERY).to_string();
        format!(
            "/v1/blobs/{k}?exp={exp}&size={size}&type={}&sha256={}&name={}&sig={}",
            enc(&meta.media_type),
            meta.sha256,
            enc(&meta.file_name),
            URL_SAFE_NO_PAD.encode(sig.finalize().into_bytes())
        )
    }

    /// The presigned download URL for `key`, valid until `exp_ms`.
    pub fn download_url(&self, key: &ObjectKey, exp_ms: u64) -> String {
        let (k, exp) = (key.to_string(), exp_ms.to_string());
        let sig = self.mac(&["GET", &k, &exp]);
        format!("/v1/blobs/{k}?exp={exp}&sig={}", URL_SAFE_NO_PAD.encode(sig.finalize().into_bytes()))
    }

    /// Verifies a presigned URL: its object, method, bound fields and expiry.
    /// Returns the object and (for uploads) what the slot declared.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        query: &str,
        now_ms: u64,
    ) -> Result<(ObjectKey, Option<BlobMeta>), ErrorCode> {
        let raw = path.strip_prefix("/v1/blobs/").ok_or(ErrorCode::HttpNotFound)?;
        let key = ObjectKey::parse(raw).ok_or(ErrorCode::UrlInvalid)?;
        let mut params: HashMap<&str, String> = HashMap::new();
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let v = percent_decode_str(v).decode_utf8().map_err(|_| ErrorCode::UrlInvalid)?;
            if params.insert(k, v.into_owned()).is_some() {
                return Err(ErrorCode::UrlInvalid);
            }
        }
        let get = |k: &str| params.get(k).map(String::as_str).ok_or(ErrorCode::UrlInvalid);
        let sig = URL_SAFE_NO_PAD.decode(get("sig")?).map_err(|_| ErrorCode::UrlInvalid)?;
        let (exp, k) = (get("exp")?, key.to_string());
        let (mac, meta) = match method {
            "PUT" => {
                let meta = BlobMeta {
                    size: get("size")?.parse().map_err(|_| ErrorCode::UrlInvalid)?,
                    media_type: get("type")?.to_owned(),
                    sha256: get("sha256")?.to_owned(),
                    file_name: get("name")?.to_owned(),
                };
                let size = meta.size.to_string();
                let mac = self.mac(&["PUT", &k, exp, &size, &meta.media_type, &meta.sha256, &meta.file_name]);
                (mac, Some(meta))
            }
            "GET" | "HEAD" => (self.mac(&["GET", &k, exp]), None),
            _ => return Err(ErrorCode::MethodNotAllowed),
        };
        mac.verify_slice(&sig).map_err(|_| ErrorCode::UrlInvalid)?;
        // Checked after the signature: an expiry says nothing until we know we set it.
        if exp.parse::<u64>().map_err(|_| ErrorCode::UrlInvalid)? <= now_ms {
            return Err(ErrorCode::UrlExpired);
        }
        Ok((key, meta))
    }

    fn object(&self, key: &ObjectKey) -> PathBuf {
        self.dir.join("objects").join(key.to_string())
    }

    fn meta_path(&self, key: &ObjectKey) -> PathBuf {
        self.dir.join("objects").join(format!("{key}.meta"))
    }

    // ---- file operations: on the blob-io pool only ----------------------------

    /// What is stored for `key`, if it is.
    pub fn stat(&self, key: &ObjectKey) -> std::io::Result<Option<BlobMeta>> {
        match std::fs::read(self.meta_path(key)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A fresh file for an upload in progress.
    pub fn create_partial(&self) -> std::io::Result<(File, PathBuf)> {
        let path = self.dir.join("tmp").join(format!("{:032x}", rand::random::<u128>()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok((file, path))
    }

    /// Makes a complete, checked upload durable and visible: the object, then its
    /// meta (whose presence means "uploaded"), each fsynced and renamed into place.
    pub fn commit(
        &self,
        file: File,
        partial: &Path,
        key: &ObjectKey,
        meta: &BlobMeta,
    ) -> std::io::Result<()> {
        file.sync_data()?;
        drop(file);
        std::fs::rename(partial, self.object(key))?;
        let tmp_meta = partial.with_extension("meta");
        let mut f = File::create(&tmp_meta)?;
        f.write_all(&serde_json::to_vec(meta).expect("meta serialises"))?;
        f.sync_data()?;
        std::fs::rename(&tmp_meta, self.meta_path(key))?;
        File::open(self.dir.join("objects"))?.sync_all()
    }

    fn linked_path(&self, key: &ObjectKey) -> PathBuf {
        self.dir.join("objects").join(format!("{key}.linked"))
    }

    /// Marks an uploaded object as named by a message (durably: the sweeper
    /// removes only objects never named) and returns what was uploaded; `None`
    /// if nothing was. Called before the message's commit: a send that then
    /// fails leaves the object kept, never a stored message without its object.
    pub fn link(&self, key: &ObjectKey) -> std::io::Result<Option<BlobMeta>> {
        let Some(meta) = self.stat(key)? else { return Ok(None) };
        let marker = self.linked_path(key);
        if !marker.exists() {
            File::create(&marker)?.sync_all()?;
            File::open(self.dir.join("objects"))?.sync_all()?;
        }
        Ok(Some(meta))
    }

    /// Removes an object and what describes it (its message was deleted, or it
    /// was never named). The meta goes first: an object without one is not
    /// served, and the sweeper finishes what a crash interrupts.
    pub fn remove(&self, key: &ObjectKey) -> std::io::Result<()> {
        for path in [self.meta_path(key), self.object(key), self.linked_path(key)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One pass of the sweeper: removes objects older than `grace` that no
    /// message ever named, and leftovers of interrupted removals. Returns how
    /// many objects it removed.
    pub fn sweep(&self, grace: Duration) -> std::io::Result<usize> {
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(self.dir.join("objects"))? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(ObjectKey::parse) else { continue };
            let age = entry.metadata()?.modified().ok().and_then(|m| now.duration_since(m).ok());
            let orphan = !self.meta_path(&key).exists() || !self.linked_path(&key).exists();
            if orphan && age.is_some_and(|a| a >= grace) {
                self.remove(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Opens a stored object for reading.
    pub fn open_object(&self, key: &ObjectKey) -> std::io::Result<File> {
        File::open(self.object(key))
    }
}

/// Removes the objects of deleted messages, on the `blob-io` pool.
impl crate::sequencer::AttachmentLinks for Arc<Attachments> {
    fn unlinked(&self, ids: Vec<String>) {
        fn remove_all(a: &Attachments, ids: &[String]) {
            for key in ids.iter().filter_map(|id| ObjectKey::parse(id)) {
                if let Err(e) = a.remove(&key) {
                    tracing::error!(error = %e, object = %key, "removing a deleted message's attachment failed");
                }
            }
        }
        let (me, queued) = (self.clone(), ids.clone());
        // With the queue full, here and now (rare, and a few unlink calls): the
        // objects are named, so the sweeper would keep them for ever.
        if self.io.spawn(move || remove_all(&me, &queued)).is_err() {
            remove_all(self, &ids);
        }
    }
}

/// The sweeper: a thread of its own that wakes every `sweep_interval_secs` and
/// removes objects no message named within `orphan_grace_secs`.
pub fn start_sweeper(a: Arc<Attachments>) {
    let interval = Duration::from_secs(a.cfg.sweep_interval_secs.get());
    let grace = Duration::from_secs(a.cfg.orphan_grace_secs.get());
    std::thread::Builder::new()
        .name("blob-sweeper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                match a.sweep(grace) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "swept attachments no message names"),
                    Err(e) => tracing::error!(error = %e, "sweeping attachments failed"),
                }
            }
        })
        .expect("spawning the blob sweeper");
}
