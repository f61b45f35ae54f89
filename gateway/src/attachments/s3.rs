//! The S3-compatible blob backend, for fleets: objects in a bucket every node
//! shares, and presigned URLs (AWS Signature V4, signed by `rusty-s3`) that
//! send the bytes straight between clients and the object store.
//!
//! An upload URL signs, besides the object and expiry, the headers the client
//! must send with the body: `content-type`, `content-length` and
//! `x-amz-checksum-sha256` (so the store itself refuses another type, length or
//! content), and the object's metadata, `x-amz-meta-sha256` and
//! `x-amz-meta-file-name`, which `HEAD` returns later. A message names an object
//! once `<name>.linked` (an empty object) exists beside it.
//!
//! The gateway's own calls (HEAD, PUT of the marker, DELETE, list) are signed
//! the same way and sent by `ureq`, blocking.
//!
//! Runs on: shards (signing: microseconds); the `blob-io` pool (every request
//! to the store).

use super::{BlobMeta, ObjectKey, Upload, content_disposition};
use crate::config::S3Config;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{percent_decode_str, utf8_percent_encode};
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::collections::HashMap;
use std::io;
use std::time::Duration;

const META_SHA256: &str = "x-amz-meta-sha256";
const META_FILE_NAME: &str = "x-amz-meta-file-name";
/// How long the gateway's own requests stay signed.
const OWN_REQUEST_TTL: Duration = Duration::from_secs(300);

pub struct S3Store {
    /// Where the gateway reaches the store.
    own: Bucket,
    /// Where clients reach it (the URLs handed out).
    public: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
}

fn bucket(endpoint: &str, cfg: &S3Config) -> anyhow::Result<Bucket> {
    let style = if cfg.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
    let url = endpoint.parse().map_err(|e| anyhow::anyhow!("attachments.s3 endpoint {endpoint:?}: {e}"))?;
    Bucket::new(url, style, cfg.bucket.clone(), cfg.region.clone())
        .map_err(|e| anyhow::anyhow!("attachments.s3 endpoint {endpoint:?}: {e:?}"))
}

fn status_error(what: &str, status: u16) -> io::Error {
    io::Error::other(format!("the object store answered {what} with status {status}"))
}

impl S3Store {
    /// Checks the bucket once. A bucket that is missing or refuses the
    /// credentials stops the start (configuration); an unreachable store does
    /// not (requests fail as `storage_unavailable` until it is back).
    pub fn open(cfg: &S3Config) -> anyhow::Result<Self> {
        let creds = match (&cfg.access_key, &cfg.secret_key) {
            (Some(k), Some(s)) => Credentials::new(k.clone(), s.clone()),
            (None, None) => Credentials::from_env().ok_or_else(|| {
                anyhow::anyhow!(
                    "attachments.s3 needs access_key and secret_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                )
            })?,
            _ => anyhow::bail!("attachments.s3: set both access_key and secret_key, or neither"),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms.get())))
            .http_status_as_error(false)
            .build()
            .into();
        let store = S3Store {
            own: bucket(&cfg.endpoint, cfg)?,
            public: bucket(cfg.public_endpoint.as_deref().unwrap_or(&cfg.endpoint), cfg)?,
            creds,
            agent,
        };
        let url = store.own.head_bucket(Some(&store.creds)).sign(OWN_REQUEST_TTL);
        match store.agent.head(url.as_str()).call() {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => anyhow::bail!(
                "attachments.s3: bucket {:?} at {} answered {} (missing, or the credentials are refused)",
                cfg.bucket,
                cfg.endpoint,
                r.status()
            ),
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %cfg.endpoint, "the object store is not reachable yet")
            }
        }
        Ok(store)
    }

    /// The presigned upload for `key`, valid for `ttl`.
    pub fn upload(&self, key: &ObjectKey, meta: &BlobMeta, ttl: Duration) -> Upload {
        let name = key.to_string();
        let raw = (0..32).map(|i| u8::from_str_radix(&meta.sha256[2 * i..2 * i + 2], 16).unwrap_or(0));
        let headers = vec![
            ("content-type", meta.media_type.clone()),
            ("x-amz-checksum-sha256", STANDARD.encode(raw.collect::<Vec<u8>>())),
            (META_SHA256, meta.sha256.clone()),
            (META_FILE_NAME, utf8_percent_encode(&meta.file_name, super::QUERY).to_string()),
        ];
        let mut put = self.public.put_object(Some(&self.creds), &name);
        put.headers_mut().insert("content-length", meta.size.to_string());
        for (k, v) in &headers {
            put.headers_mut().insert(*k, v.clone());
        }
        // The client sends `content-length` by itself (a browser may not set it).
        Upload { url: put.sign(ttl).to_string(), headers }
    }

    /// The presigned download of `key`, answered with its type and file name.
    pub fn download_url(&self, key: &ObjectKey, meta: &BlobMeta, ttl: Duration) -> String {
        let name = key.to_string();
        let mut get = self.public.get_object(Some(&self.creds), &name);
        get.query_mut().insert("response-content-type", meta.media_type.clone());
        get.query_mut().insert("response-content-disposition", content_disposition(&meta.file_name));
        get.sign(ttl).to_string()
    }

    // ---- requests to the store: on the blob-io pool only ----------------------

    /// What is stored for `key`, if it is.
    pub fn stat(&self, key: &ObjectKey) -> io::Result<Option<BlobMeta>> {
        let name = key.to_string();
        let url = self.own.head_object(Some(&self.creds), &name).sign(OWN_REQUEST_TTL);
        let r = self.agent.head(url.as_str()).call().map_err(io::Error::other)?;
        match r.status().as_u16() {
            404 => return Ok(None),
            s if !(200..300).contains(&s) => return Err(status_error("HEAD", s)),
            _ => {}
        }
        let header = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // An object without the metadata our URLs bind was not put there by one.
        let (Some(size), Some(media_type), Some(sha256), Some(file_name)) = (
            header("content-length").and_then(|l| l.parse().ok()),
            header("content-type"),
            header(META_SHA256),
            header(META_FILE_NAME)
                .and_then(|n| percent_decode_str(&n).decode_utf8().ok().map(|n| n.into_owned())),
        ) else {
            return Ok(None);
        };
        Ok(Some(BlobMeta { size, media_type, sha256, file_name }))
    }

    /// See `Embedded::link`: the marker is written before the message's commit.
    pub fn link(&self, key: &ObjectKey) -> io::Result<Option<BlobMeta>> {
        let Some(meta) = self.stat(key)? else { return Ok(None) };
        let marker = format!("{key}.linked");
        let url = self.own.put_object(Some(&self.creds), &marker).sign(OWN_REQUEST_TTL);
        let r = self.agent.put(url.as_str()).send_empty().map_err(io::Error::other)?;
        if !r.status().is_success() {
            return Err(status_error("PUT", r.status().as_u16()));
        }
        Ok(Some(meta))
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let url = self.own.delete_object(Some(&self.creds), name).sign(OWN_REQUEST_TTL);
        let r = self.agent.delete(url.as_str()).call().map_err(io::Error::other)?;
        match r.status().as_u16() {
            s if (200..300).contains(&s) || s == 404 => Ok(()),
            s => Err(status_error("DELETE", s)),
        }
    }

    /// Removes an object, then its marker (a marker left alone by a crash is
    /// swept: it names nothing).
    pub fn remove(&self, key: &ObjectKey) -> io::Result<()> {
        self.delete(&key.to_string())?;
        self.delete(&format!("{key}.linked"))
    }

    /// One pass of the sweeper over the whole bucket: objects older than
    /// `grace` that no message named, and markers whose object is gone.
    pub fn sweep(&self, grace: Duration) -> io::Result<usize> {
        let now = jiff::Timestamp::now();
        let (mut objects, mut markers) = (Vec::new(), HashMap::new());
        let mut token: Option<String> = None;
        loop {
            let mut list = self.own.list_objects_v2(Some(&self.creds));
            if let Some(t) = &token {
                list.with_continuation_token(t.clone());
            }
            let url = list.sign(OWN_REQUEST_TTL);
            let mut r = self.agent.get(url.as_str()).call().map_err(io::Error::other)?;
            if !r.status().is_success() {
                return Err(status_error("LIST", r.status().as_u16()));
            }
            let body = r.body_mut().read_to_string().map_err(io::Error::other)?;
            let page = ListObjectsV2::parse_response(&body).map_err(io::Error::other)?;
            for o in page.contents {
                let age = o
                    .last_modified
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .and_then(|t| Duration::try_from(now.duration_since(t)).ok());
                if let Some(k) = o.key.strip_suffix(".linked").and_then(ObjectKey::parse) {
                    markers.insert(k.to_string(), age);
                } else if let Some(k) = ObjectKey::parse(&o.key) {
                    objects.push((k, age));
                }
            }
            token = page.next_continuation_token;
            if token.is_none() {
                break;
            }
        }
        let old = |age: &Option<Duration>| age.is_some_and(|a| a >= grace);
        let mut removed = 0;
        for (key, age) in &objects {
            let named = markers.remove(&key.to_string()).is_some();
            if !named && old(age) {
                self.remove(key)?;
                removed += 1;
            }
        }
        // What is left names no object (its removal was interrupted). Only old
        // ones: a young marker may belong to an object listed on an earlier page
        // before it was uploaded.
        for (marker, age) in markers {
            if old(&age) {
                self.delete(&format!("{marker}.linked"))?;
            }
        }
        Ok(removed)
    }
}
