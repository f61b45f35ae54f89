//! Message bodies sealed under per-message keys, so that deleting a message
//! destroys its text for good (crypto-shredding).
//!
//! An LSM store cannot overwrite a row in place: the text of a deleted message
//! stays in the journal and in older tables until they happen to be rewritten.
//! So the embedded store never writes a text body in the clear. Each text message
//! gets a random 256-bit key in the key vault ([`Vault`]); its body, every edited
//! version of it and the bodies of its `edit` events are sealed under that key
//! (XChaCha20-Poly1305, a random 192-bit nonce per seal, the row's conversation
//! and position as associated data). Deleting the message overwrites its key's
//! slot in the vault with zeros and syncs it; what is left in the LSM files is
//! ciphertext nobody can open.
//!
//! The vault is one flat file of 32-byte slots, written in place with `pwrite`,
//! which is what an LSM cannot offer. A slot is never reused; the file grows by
//! 32 bytes per text message.

use crate::{ConversationId, ErrorKind, Result, Seq, StorageError};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) type Key = [u8; 32];
const NONCE: usize = 24;

/// A fresh random key.
pub(crate) fn new_key() -> Key {
    XChaCha20Poly1305::generate_key(&mut OsRng).into()
}

fn aad(conv: ConversationId, seq: Seq) -> [u8; 16] {
    crate::codec::key2(conv, seq)
}

/// `nonce | ciphertext | tag` of `plain`, bound to row `(conv, seq)`.
pub(crate) fn seal(key: &Key, conv: ConversationId, seq: Seq, plain: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = XChaCha20Poly1305::new(key.into())
        .encrypt(&nonce, Payload { msg: plain, aad: &aad(conv, seq) })
        .expect("XChaCha20-Poly1305 encrypts any message shorter than 256 GiB");
    let mut out = Vec::with_capacity(NONCE + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// The plaintext of [`seal`]'s output; `Corrupt` if it does not open under `key`.
pub(crate) fn open(key: &Key, conv: ConversationId, seq: Seq, sealed: &[u8]) -> Result<Vec<u8>> {
    let bad = || StorageError::new(ErrorKind::Corrupt, "opening a sealed body", "authentication failed");
    let (nonce, ct) = sealed.split_first_chunk::<NONCE>().ok_or_else(bad)?;
    XChaCha20Poly1305::new(key.into())
        .decrypt(&XNonce::from(*nonce), Payload { msg: ct, aad: &aad(conv, seq) })
        .map_err(|_| bad())
}

/// The key vault: slot `n` is bytes `32n..32n+32` of one file; all zeros is an
/// erased (or never written) slot.
///
/// Writes are positioned (`pwrite`), so the vault is shared by reference; the
/// committer calls [`Vault::sync`] before the rows that name a slot are
/// committed, so a row never points at a key that did not reach the disk.
#[derive(Debug)]
pub(crate) struct Vault {
    file: File,
    next: AtomicU64,
}

const SLOT: u64 = 32;

fn vault_io(context: &'static str) -> impl FnOnce(std::io::Error) -> StorageError {
    move |e| StorageError::new(ErrorKind::Io, context, e)
}

impl Vault {
    pub(crate) fn open(path: &Path) -> Result<Vault> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(vault_io("opening the key vault"))?;
        let len = file.metadata().map_err(vault_io("opening the key vault"))?.len();
        // A torn last slot (a crash mid-write) was never synced, so no row names it.
        Ok(Vault { file, next: AtomicU64::new(len.div_ceil(SLOT)) })
    }

    /// Stores `key` in a new slot and returns the slot (durable after [`Vault::sync`]).
    pub(crate) fn put(&self, key: &Key) -> Result<u64> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        self.file.write_all_at(key, slot * SLOT).map_err(vault_io("writing a key"))?;
        Ok(slot)
    }

    /// The key in `slot`, or `None` once erased.
    pub(crate) fn get(&self, slot: u64) -> Result<Option<Key>> {
        let mut key = [0u8; 32];
        match self.file.read_exact_at(&mut key, slot * SLOT) {
            Ok(()) => Ok((key != [0u8; 32]).then_some(key)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(vault_io("reading a key")(e)),
        }
    }

    /// Overwrites `slot` with zeros (durable after [`Vault::sync`]).
    pub(crate) fn erase(&self, slot: u64) -> Result<()> {
        self.file.write_all_at(&[0u8; 32], slot * SLOT).map_err(vault_io("erasing a key"))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(vault_io("syncing the key vault"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bodies_open_only_under_their_key_and_row() {
        let k = new_key();
        let s = seal(&k, 5, 9, b"hello");
        assert!(!s.windows(5).any(|w| w == b"hello"));
        assert_eq!(open(&k, 5, 9, &s).unwrap(), b"hello");
        assert!(open(&new_key(), 5, 9, &s).is_err(), "another key");
        assert!(open(&k, 5, 10, &s).is_err(), "another row");
        assert!(open(&k, 5, 9, &s[..10]).is_err(), "truncated");
        assert_ne!(seal(&k, 5, 9, b"hello"), s, "a fresh nonce each time");
    }

    #[test]
    fn erased_slots_are_zeros_on_disk_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let v = Vault::open(&path).unwrap();
        let (a, b) = (new_key(), new_key());
        let (sa, sb) = (v.put(&a).unwrap(), v.put(&b).unwrap());
        v.erase(sa).unwrap();
        v.sync().unwrap();
        drop(v);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(32).any(|w| w == a), "the erased key is gone from the file");
        let v = Vault::open(&path).unwrap();
        assert_eq!(v.get(sa).unwrap(), None);
        assert_eq!(v.get(sb).unwrap(), Some(b));
        assert_eq!(v.get(99).unwrap(), None, "past the end");
        assert_eq!(v.put(&a).unwrap(), 2, "slots are never reused");
    }
}
