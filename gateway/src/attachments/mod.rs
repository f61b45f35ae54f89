//! Attachments: upload slots, their limits and budgets, and the blob backend
//! that keeps the bytes: `embedded` (a directory next to the store; the
//! gateway signs and serves the URLs itself) or `s3` (an S3-compatible bucket;
//! URLs signed with AWS Signature V4, the bytes never pass the gateway).
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
//! now).
//!
//! Runs on: shards (signing, verifying, budgets: microseconds); the `blob-io`
//! pool (every file operation and every request to the object store).

mod embedded;
mod s3;

pub use embedded::Embedded;
pub use s3::S3Store;

use crate::config::AttachmentsConfig;
use crate::pool::Pool;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use protocol::{ConversationId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Where the bytes are kept.
pub enum Backend {
    Embedded(Embedded),
    S3(S3Store),
}

/// A presigned upload: where to send the body, and the headers to send with it.
pub struct Upload {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
}

pub struct Attachments {
    pub cfg: AttachmentsConfig,
    pub backend: Backend,
    /// Upload bytes reserved per user in the current hour (fixed windows).
    budgets: Mutex<HashMap<UserId, Window>>,
    /// Every blob file operation and object store request runs here.
    pub io: Arc<Pool>,
    /// Deleted messages' objects for the sweeper thread to remove (bounded).
    deferred: Mutex<Vec<ObjectKey>>,
    wake: Condvar,
}

/// `Content-Disposition` for a download: the name as given (RFC 6266
/// `filename*`), and an ASCII stand-in for old clients.
pub fn content_disposition(file_name: &str) -> String {
    let ascii: String = file_name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' })
        .collect();
    format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        utf8_percent_encode(file_name, NON_ALPHANUMERIC)
    )
}

impl Attachments {
    /// Opens the configured backend: the S3-compatible bucket if `[attachments.s3]`
    /// is set, else the embedded directory. `key` signs the embedded backend's
    /// URLs (derived from the token secret: every node with the same secret
    /// verifies every other's URLs).
    pub fn open(cfg: &AttachmentsConfig, data_dir: &Path, key: &[u8], io: Arc<Pool>) -> anyhow::Result<Self> {
        let backend = match &cfg.s3 {
            Some(s3) => Backend::S3(S3Store::open(s3)?),
            None => Backend::Embedded(Embedded::open(
                cfg.dir.clone().unwrap_or_else(|| data_dir.join("blobs")),
                key,
            )?),
        };
        Ok(Attachments {
            cfg: cfg.clone(),
            backend,
            budgets: Mutex::new(HashMap::new()),
            io,
            deferred: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        })
    }

    /// The embedded backend, for the routes that serve its URLs.
    pub fn embedded(&self) -> std::io::Result<&Embedded> {
        match &self.backend {
            Backend::Embedded(e) => Ok(e),
            Backend::S3(_) => Err(std::io::Error::other("the attachments backend is S3, not embedded")),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.cfg.url_ttl_secs.get())
    }

    /// The presigned upload for `key`, valid until `exp_ms` (now plus the URL TTL).
    pub fn upload(&self, key: &ObjectKey, meta: &BlobMeta, exp_ms: u64) -> Upload {
        match &self.backend {
            Backend::Embedded(e) => Upload {
                url: e.upload_url(key, meta, exp_ms),
                headers: vec![("content-type", meta.media_type.clone())],
            },
            Backend::S3(s) => s.upload(key, meta, self.ttl()),
        }
    }

    /// The presigned download URL for `key`, valid until `exp_ms` (now plus the URL TTL).
    pub fn download_url(&self, key: &ObjectKey, meta: &BlobMeta, exp_ms: u64) -> String {
        match &self.backend {
            Backend::Embedded(e) => e.download_url(key, exp_ms),
            Backend::S3(s) => s.download_url(key, meta, self.ttl()),
        }
    }

    // ---- on the blob-io pool only ---------------------------------------------

    /// What is stored for `key`, if it is.
    pub fn stat(&self, key: &ObjectKey) -> std::io::Result<Option<BlobMeta>> {
        match &self.backend {
            Backend::Embedded(e) => e.stat(key),
            Backend::S3(s) => s.stat(key),
        }
    }

    /// Marks an uploaded object as named by a message (durably: the sweeper
    /// removes only objects never named) and returns what was uploaded; `None`
    /// if nothing was. Called before the message's commit: a send that then
    /// fails leaves the object kept, never a stored message without its object.
    pub fn link(&self, key: &ObjectKey) -> std::io::Result<Option<BlobMeta>> {
        match &self.backend {
            Backend::Embedded(e) => e.link(key),
            Backend::S3(s) => s.link(key),
        }
    }

    /// Removes an object (its message was deleted, or no message named it).
    pub fn remove(&self, key: &ObjectKey) -> std::io::Result<()> {
        match &self.backend {
            Backend::Embedded(e) => e.remove(key),
            Backend::S3(s) => s.remove(key),
        }
    }

    /// One pass of the sweeper; returns how many objects it removed.
    pub fn sweep(&self, grace: Duration) -> std::io::Result<usize> {
        match &self.backend {
            Backend::Embedded(e) => e.sweep(grace),
            Backend::S3(s) => s.sweep(grace),
        }
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
}

/// Removals waiting for the sweeper thread; beyond, an object stays (logged).
const MAX_DEFERRED_REMOVALS: usize = 65_536;
/// How long the sweeper waits before retrying removals that failed.
const REMOVAL_RETRY: Duration = Duration::from_secs(2);

impl Attachments {
    /// Hands removals to the sweeper thread, which retries them until they
    /// succeed (the object store may be down). Never blocks.
    fn defer_removal(&self, keys: impl IntoIterator<Item = ObjectKey>) {
        let mut q = self.deferred.lock().unwrap();
        let before = q.len();
        q.extend(keys.into_iter().take(MAX_DEFERRED_REMOVALS.saturating_sub(before)));
        if q.len() == MAX_DEFERRED_REMOVALS {
            tracing::error!(
                "attachment removals waiting are at their bound; further deleted messages' objects stay"
            );
        }
        self.wake.notify_one();
    }

    /// Removes each object; what fails goes to the sweeper thread to retry.
    fn remove_or_defer(&self, keys: Vec<ObjectKey>) {
        let mut failed = Vec::new();
        for key in keys {
            if let Err(e) = self.remove(&key) {
                tracing::warn!(error = %e, object = %key, "removing a deleted message's attachment failed; will retry");
                failed.push(key);
            }
        }
        if !failed.is_empty() {
            self.defer_removal(failed);
        }
    }
}

/// Removes the objects of deleted messages, on the `blob-io` pool; with that
/// queue full, or the store failing, on the sweeper thread (never the
/// sequencer's: an object store request may take seconds).
impl crate::sequencer::AttachmentLinks for Arc<Attachments> {
    fn unlinked(&self, ids: Vec<String>) {
        let keys: Vec<ObjectKey> = ids.iter().filter_map(|id| ObjectKey::parse(id)).collect();
        let (me, queued) = (self.clone(), keys.clone());
        if self.io.spawn(move || me.remove_or_defer(queued)).is_err() {
            self.defer_removal(keys);
        }
    }
}

/// The sweeper: a thread of its own. Every `sweep_interval_secs` it removes
/// objects no message named within `orphan_grace_secs`; in between, it removes
/// deleted messages' objects handed to it, retrying those that fail.
pub fn start_sweeper(a: Arc<Attachments>) {
    let interval = Duration::from_secs(a.cfg.sweep_interval_secs.get());
    let grace = Duration::from_secs(a.cfg.orphan_grace_secs.get());
    std::thread::Builder::new()
        .name("blob-sweeper".into())
        .spawn(move || {
            let mut next_sweep = Instant::now() + interval;
            let mut retry_at: Option<Instant> = None;
            loop {
                let due = {
                    let mut q = a.deferred.lock().unwrap();
                    loop {
                        let now = Instant::now();
                        let removals_due = !q.is_empty() && retry_at.is_none_or(|t| now >= t);
                        if removals_due || now >= next_sweep {
                            break std::mem::take(&mut *q);
                        }
                        let until =
                            retry_at.filter(|_| !q.is_empty()).map_or(next_sweep, |t| t.min(next_sweep));
                        q = a.wake.wait_timeout(q, until - now).unwrap().0;
                    }
                };
                retry_at = None;
                if !due.is_empty() {
                    let n = due.len();
                    a.remove_or_defer(due);
                    if !a.deferred.lock().unwrap().is_empty() {
                        retry_at = Some(Instant::now() + REMOVAL_RETRY);
                    } else {
                        tracing::info!(removed = n, "removed deleted messages' attachments");
                    }
                }
                if Instant::now() >= next_sweep {
                    next_sweep = Instant::now() + interval;
                    match a.sweep(grace) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "swept attachments no message names"),
                        Err(e) => tracing::error!(error = %e, "sweeping attachments failed"),
                    }
                }
            }
        })
        .expect("spawning the blob sweeper");
}
