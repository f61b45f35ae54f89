//! Accounts: argon2id password hashes and signed, expiring bearer tokens (JWT, HS256).

use crate::config::AuthConfig;
use anyhow::Context;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use protocol::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, decimal.
    sub: String,
    iat: u64,
    exp: u64,
}

pub struct Auth {
    argon: Argon2<'static>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
    /// A real hash of a random password, verified against on unknown usernames so that
    /// "no such user" and "wrong password" take the same time.
    dummy_hash: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Auth {
    /// `data_dir` holds the generated key when the config has none.
    pub fn new(cfg: &AuthConfig, data_dir: &Path) -> anyhow::Result<Self> {
        let secret = match &cfg.token_secret {
            Some(s) => s.clone().into_bytes(),
            None => load_or_create_secret(&data_dir.join("token.key"))?,
        };
        let params = Params::new(cfg.argon2_memory_kib.get(), cfg.argon2_iterations.get(), 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut auth = Auth {
            argon,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            ttl_secs: cfg.token_ttl_secs.get(),
            dummy_hash: String::new(),
        };
        auth.dummy_hash = auth.hash_password(&format!("{:x}", rand::random::<u128>()))?;
        Ok(auth)
    }

    /// Slow by design (tens of milliseconds): call it on a hashing thread.
    pub fn hash_password(&self, password: &str) -> anyhow::Result<String> {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(self
            .argon
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_string())
    }

    /// Slow by design: call it on a hashing thread. `None` hash: the user does not exist.
    pub fn verify_password(&self, hash: Option<&str>, password: &str) -> bool {
        let (hash, exists) = match hash {
            Some(h) => (h, true),
            None => (self.dummy_hash.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        self.argon.verify_password(password.as_bytes(), &parsed).is_ok() && exists
    }

    pub fn issue(&self, user: UserId) -> String {
        let iat = now_ms() / 1000;
        self.issue_at(user, iat, iat + self.ttl_secs)
    }

    /// A token with explicit times: for `issue` and for tests of expiry.
    pub fn issue_at(&self, user: UserId, iat: u64, exp: u64) -> String {
        let claims = Claims { sub: user.to_string(), iat, exp };
        jsonwebtoken::encode(&Header::default(), &claims, &self.encoding).expect("HS256 encoding cannot fail")
    }

    /// The user a token names, if it is well-formed, signed by us and not expired.
    ///
    /// Runs on: any shard (a few microseconds).
    pub fn verify(&self, token: &str) -> Result<UserId, ErrorCode> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| ErrorCode::Unauthorized)?;
        data.claims.sub.parse().map_err(|_| ErrorCode::Unauthorized)
    }
}

fn load_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} is shorter than 32 characters", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let secret = format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>());
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(secret.into_bytes())
}

/// Usernames: 3 to 32 characters of `[A-Za-z0-9_.-]`.
pub fn valid_username(u: &str) -> bool {
    (3..=32).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Passwords: 8 to 128 characters.
pub fn valid_password(p: &str) -> bool {
    (8..=128).contains(&p.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::{NonZeroU32, NonZeroU64};

    fn auth() -> Auth {
        let cfg = AuthConfig {
            token_secret: Some("x".repeat(32)),
            argon2_memory_kib: NonZeroU32::new(64).unwrap(),
            argon2_iterations: NonZeroU32::new(1).unwrap(),
            token_ttl_secs: NonZeroU64::new(60).unwrap(),
            ..AuthConfig::default()
        };
        Auth::new(&cfg, Path::new("/nonexistent")).unwrap()
    }

    #[test]
    fn tokens_verify_and_expire() {
        let a = auth();
        assert_eq!(a.verify(&a.issue(42)), Ok(42));
        let now = now_ms() / 1000;
        assert_eq!(a.verify(&a.issue_at(42, now - 100, now - 1)), Err(ErrorCode::Unauthorized));
        let mut t = a.issue(42);
        t.pop();
        assert_eq!(a.verify(&t), Err(ErrorCode::Unauthorized), "a tampered signature fails");
        assert_eq!(a.verify("garbage"), Err(ErrorCode::Unauthorized));
    }

    #[test]
    fn passwords_verify() {
        let a = auth();
        let h = a.hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(a.verify_password(Some(&h), "correct horse"));
        assert!(!a.verify_password(Some(&h), "wrong horse"));
        assert!(!a.verify_password(None, "correct horse"));
    }

    #[test]
    fn username_rules() {
        assert!(valid_username("alice_01"));
        assert!(!valid_username("al"));
        assert!(!valid_username("al ice"));
        assert!(!valid_username(&"a".repeat(33)));
    }
}
