//! The embedded blob backend: objects in a directory next to the store, and
//! presigned URLs the gateway signs with a key of its own and serves itself on
//! its HTTP port (`/v1/blobs/...`, `shard::blobs`).
//!
//! On disk: `objects/<name>` and `objects/<name>.meta` (JSON), written through
//! `tmp/` and renamed into place once complete, checked and fsynced;
//! `objects/<name>.linked` once a message names the object.
//!
//! Runs on: shards (signing, verifying: microseconds); the `blob-io` pool (every
//! file operation).

use super::{BlobMeta, ObjectKey, QUERY};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode};
use protocol::ErrorCode;
use sha2::Sha256;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Embedded {
    dir: PathBuf,
    key: Hmac<Sha256>,
}

impl Embedded {
    /// Opens (creating) the blob directory and drops partial uploads left by a crash.
    /// `key` signs URLs (derived from the token secret: every node with the same
    /// secret verifies every other's URLs).
    pub fn open(dir: PathBuf, key: &[u8]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("objects"))?;
        let _ = std::fs::remove_dir_all(dir.join("tmp"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let key = Hmac::new_from_slice(key).expect("HMAC takes any key length");
        Ok(Embedded { dir, key })
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
