//! Test users, minted through the gateway's admin endpoint and cached in a file.
//!
//! Registering tens of thousands of users through `/v1/register` costs an argon2
//! hash each (tens of milliseconds, by design). `POST /v1/admin/users`, enabled
//! by `auth.admin_secret`, creates password-less users and returns tokens in one
//! call per 20,000, several calls at once over the targets. The tokens are
//! cached (`--user-cache`) and reused while fresh.

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

/// Chunks minted at once, each through another target (its own store pool and
/// hashing threads): one at a time, 1M users took ~6 min, round-trip-bound.
const IN_FLIGHT: usize = 8;

pub fn users(
    bases: &[String],
    secret: &str,
    prefix: &str,
    count: usize,
    cache: &Path,
) -> anyhow::Result<Vec<User>> {
    let first = bases.first().context("no target to mint users through")?;
    if let Ok(text) = std::fs::read_to_string(cache)
        && let Ok(c) = serde_json::from_str::<Cache>(&text)
        && c.base == *first
        && c.prefix == prefix
        && c.users.len() >= count
        && now_ms().saturating_sub(c.created_ms) < FRESH_MS
    {
        eprintln!("loadgen: reusing {count} users from {}", cache.display());
        return Ok(c.users.into_iter().take(count).collect());
    }
    let starts: Vec<usize> = (0..count).step_by(CHUNK).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut chunks: Vec<(usize, Vec<User>)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..IN_FLIGHT.min(starts.len()))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<Vec<(usize, Vec<User>)>> {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&start) = starts.get(i) else { return Ok(got) };
                        let n = (count - start).min(CHUNK);
                        got.push((start, mint(&bases[i % bases.len()], secret, prefix, start, n)?));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().map_err(|_| anyhow::anyhow!("a minting thread panicked"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    chunks.sort_unstable_by_key(|(start, _)| *start);
    let users: Vec<User> = chunks.into_iter().flat_map(|(_, u)| u).collect();
    if users.len() != count {
        bail!("minted {} users, wanted {count}", users.len());
    }
    let c = Cache { base: first.clone(), prefix: prefix.into(), created_ms: now_ms(), users };
    std::fs::write(cache, serde_json::to_string(&c)?)
        .with_context(|| format!("writing {}", cache.display()))?;
    Ok(c.users)
}

/// Users `prefix{start}` .. `prefix{start + n - 1}` through `base`'s admin endpoint.
fn mint(base: &str, secret: &str, prefix: &str, start: usize, n: usize) -> anyhow::Result<Vec<User>> {
    #[derive(Deserialize)]
    struct Reply {
        users: Vec<User>,
    }
    let body = serde_json::json!({"prefix": prefix, "start": start, "count": n});
    let resp = ureq::post(&format!("{base}/v1/admin/users"))
        .header("authorization", &format!("Bearer {secret}"))
        .send_json(&body);
    let mut resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::StatusCode(404)) => {
            bail!("the gateway has no admin endpoint: set auth.admin_secret in its config")
        }
        Err(ureq::Error::StatusCode(401)) => bail!("the gateway refused the admin secret"),
        Err(e) => return Err(e).with_context(|| format!("minting users through {base}")),
    };
    let r: Reply = resp.body_mut().read_json().context("reading minted users")?;
    Ok(r.users)
}
