//! Test users, minted through the gateway's admin endpoint and cached in a file.
//!
//! Registering tens of thousands of users through `/v1/register` costs an argon2
//! hash each (tens of milliseconds, by design). `POST /v1/admin/users`, enabled
//! by `auth.admin_secret`, creates password-less users and returns tokens in one
//! call per 20,000. The tokens are cached (`--user-cache`) and reused while fresh.

use crate::plan::User;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct Cache {
    base: String,
    prefix: String,
    created_ms: u64,
    users: Vec<User>,
}

/// Tokens are reused for this long (the gateway's default lifetime is 24 h).
const FRESH_MS: u64 = 6 * 3600 * 1000;
const CHUNK: usize = 20_000;

fn now_ms() -> u64 {
    crate::worker::now_us() / 1000
}

pub fn users(
    base: &str,
    secret: &str,
    prefix: &str,
    count: usize,
    cache: &Path,
) -> anyhow::Result<Vec<User>> {
    if let Ok(text) = std::fs::read_to_string(cache)
        && let Ok(c) = serde_json::from_str::<Cache>(&text)
        && c.base == base
        && c.prefix == prefix
        && c.users.len() >= count
        && now_ms().saturating_sub(c.created_ms) < FRESH_MS
    {
        eprintln!("loadgen: reusing {count} users from {}", cache.display());
        return Ok(c.users.into_iter().take(count).collect());
    }
    #[derive(Deserialize)]
    struct Reply {
        users: Vec<User>,
    }
    let mut users = Vec::with_capacity(count);
    while users.len() < count {
        let n = (count - users.len()).min(CHUNK);
        let body = serde_json::json!({"prefix": prefix, "start": users.len(), "count": n});
        let resp = ureq::post(&format!("{base}/v1/admin/users"))
            .header("authorization", &format!("Bearer {secret}"))
            .send_json(&body);
        let mut resp = match resp {
            Ok(r) => r,
            Err(ureq::Error::StatusCode(404)) => {
                bail!("the gateway has no admin endpoint: set auth.admin_secret in its config")
            }
            Err(ureq::Error::StatusCode(401)) => bail!("the gateway refused the admin secret"),
            Err(e) => return Err(e).context("minting users"),
        };
        let r: Reply = resp.body_mut().read_json().context("reading minted users")?;
        users.extend(r.users);
    }
    let c = Cache { base: base.into(), prefix: prefix.into(), created_ms: now_ms(), users };
    std::fs::write(cache, serde_json::to_string(&c)?)
        .with_context(|| format!("writing {}", cache.display()))?;
    Ok(c.users)
}
