//! Accounts: argon2id password hashes and signed, expiring bearer tokens (JWT, HS256).

use crate::config::AuthConfig;
use crate::vocab::clock::now_ms;
use anyhow::Context;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use protocol::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;

/// Bytes of a cursor's MAC: 128 bits, far past guessing.
const CURSOR_MAC: usize = 16;

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
    /// Seals list cursors (a key derived from the token secret, so every node of a
    /// fleet opens every other node's cursors).
    cursor_key: Hmac<Sha256>,
    /// Keys for other purposes derive from this one (see [`Auth::derive`]).
    derivation: Hmac<Sha256>,
    /// A real hash of a random password, verified against on unknown usernames so that
    /// "no such user" and "wrong password" take the same time.
    dummy_hash: String,
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
        // A token that says "not before" is honoured (ours never carry one).
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut auth = Auth {
            argon,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            ttl_secs: cfg.token_ttl_secs.get(),
            cursor_key: {
                let mut k = Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key length");
                k.update(b"switchboard list cursor v1");
                Hmac::new_from_slice(&k.finalize().into_bytes()).expect("HMAC takes any key length")
            },
            derivation: Hmac::new_from_slice(&secret).expect("HMAC takes any key length"),
            dummy_hash: String::new(),
        };
        auth.dummy_hash = auth.hash_password(&format!("{:x}", rand::random::<u128>()))?;
        Ok(auth)
    }

    /// A key for `purpose`, derived from the token secret: every node of a fleet
    /// (which shares that secret) derives the same one.
    pub fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        let mut m = self.derivation.clone();
        m.update(purpose);
        m.finalize().into_bytes().into()
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

    /// An opaque `list_conversations` cursor for `user`: the position it encodes,
    /// sealed with a MAC over it and the user, so a client can neither forge one
    /// nor use another user's.
    pub fn seal_cursor(&self, user: UserId, last_ts_ms: u64, conversation: u64) -> String {
        let mut raw = Vec::with_capacity(16 + CURSOR_MAC);
        raw.extend_from_slice(&last_ts_ms.to_be_bytes());
        raw.extend_from_slice(&conversation.to_be_bytes());
        let mac = self.cursor_mac(user, &raw);
        raw.extend_from_slice(&mac[..CURSOR_MAC]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The position in a cursor [`seal_cursor`](Self::seal_cursor) issued to `user`; `None` for anything else.
    pub fn open_cursor(&self, user: UserId, cursor: &str) -> Option<(u64, u64)> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        if raw.len() != 16 + CURSOR_MAC {
            return None;
        }
        let (pos, mac) = raw.split_at(16);
        let mut m = self.cursor_key.clone();
        m.update(&user.to_be_bytes());
        m.update(pos);
        m.verify_truncated_left(mac).ok()?;
        let word = |i: usize| u64::from_be_bytes(pos[i..i + 8].try_into().expect("8 bytes"));
        Some((word(0), word(8)))
    }

    fn cursor_mac(&self, user: UserId, pos: &[u8]) -> Vec<u8> {
        let mut m = self.cursor_key.clone();
        m.update(&user.to_be_bytes());
        m.update(pos);
        m.finalize().into_bytes().to_vec()
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
        #[derive(Serialize)]
        struct WithNbf {
            sub: String,
            iat: u64,
            exp: u64,
            nbf: u64,
        }
        let early = WithNbf { sub: "42".into(), iat: now, exp: now + 3600, nbf: now + 600 };
        let t = jsonwebtoken::encode(&Header::default(), &early, &a.encoding).unwrap();
        assert_eq!(a.verify(&t), Err(ErrorCode::Unauthorized), "not valid before nbf");
    }

    #[test]
    fn cursors_are_sealed_to_their_user() {
        let a = auth();
        let c = a.seal_cursor(7, 1_700_000_000_123, 42);
        assert_eq!(a.open_cursor(7, &c), Some((1_700_000_000_123, 42)));
        assert_eq!(a.open_cursor(8, &c), None, "another user's cursor");
        for bad in ["", "9999999999999.1", &c[..c.len() - 1], &format!("{c}A")] {
            assert_eq!(a.open_cursor(7, bad), None, "{bad:?}");
        }
        let mut flipped = c.into_bytes();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(a.open_cursor(7, std::str::from_utf8(&flipped).unwrap()), None, "a forged position");
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
