//! Message bodies sealed under per-message keys, so that deleting a message
//! destroys its text for good (crypto-shredding).
//!
//! An LSM store cannot overwrite a row in place: the text of a deleted message
//! stays in the journal and in older tables until they happen to be rewritten.
//! So the embedded store never writes a text body in the clear. Each text message
//! gets a random 256-bit key in the key vault ([`Vault`]); its body, every edited
//! version of it and the bodies of its `edit` events are sealed under that key
//! (AES-256-GCM from ring, a random 96-bit nonce per seal: one key seals a
//! handful of texts, so nonces do not repeat; the row's conversation and
//! position as associated data). Deleting the message overwrites its key's slot
//! in the vault with zeros and syncs it; what is left in the LSM files is
//! ciphertext nobody can open. (PostgreSQL and Cassandra keep the keys in a
//! table instead, sealed the same way through [`Sealing`]; `gateway erase`
//! removes deleted keys from their files: see `PostgresStore::erase_deleted`
//! and `CassandraStore::erase_deleted`.)
//!
//! The vault is one flat file of 32-byte slots, written in place with `pwrite`,
//! which is what an LSM cannot offer. A slot is never reused; the file grows by
//! 32 bytes per text message.

use crate::rows::Rows;
use crate::{ConversationId, ErrorKind, Message, MessageKind, Result, Seq, StorageError};
use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) type Key = [u8; 32];

/// A fresh random key (from the thread's CSPRNG: ChaCha12, seeded and reseeded
/// from the OS, without a system call per key).
pub(crate) fn new_key() -> Key {
    let mut k = [0u8; 32];
    rand::rng().fill_bytes(&mut k);
    k
}

fn aad(conv: ConversationId, seq: Seq) -> [u8; 16] {
    crate::codec::key2(conv, seq)
}

fn cipher(key: &Key) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is an AES-256 key"))
}

/// `nonce | ciphertext | tag` of `plain`, bound to row `(conv, seq)`.
pub(crate) fn seal(key: &Key, conv: ConversationId, seq: Seq, plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = cipher(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(conv, seq)),
            &mut out[NONCE_LEN..],
        )
        .expect("AES-256-GCM seals any message shorter than 64 GiB");
    out.extend_from_slice(tag.as_ref());
    out
}

/// The plaintext of [`seal`]'s output; `Corrupt` if it does not open under `key`.
pub(crate) fn open(key: &Key, conv: ConversationId, seq: Seq, sealed: &[u8]) -> Result<Vec<u8>> {
    let bad = || StorageError::new(ErrorKind::Corrupt, "opening a sealed body", "authentication failed");
    let (nonce, ct) = sealed.split_first_chunk::<NONCE_LEN>().ok_or_else(bad)?;
    let mut buf = ct.to_vec();
    let plain = cipher(key)
        .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad(conv, seq)), &mut buf)
        .map_err(|_| bad())?;
    let n = plain.len();
    buf.truncate(n);
    Ok(buf)
}

/// The plaintext of a sealed body as text.
#[cfg(test)]
pub(crate) fn open_text(key: &Key, conv: ConversationId, seq: Seq, sealed: &[u8]) -> Result<String> {
    String::from_utf8(open(key, conv, seq, sealed)?).map_err(|_| crate::codec::corrupt("body not utf-8"))
}

#[derive(serde::Serialize)]
struct Envelope<'a> {
    body: &'a str,
    attachment: &'a protocol::Attachment,
}

#[derive(serde::Deserialize)]
struct OwnedEnvelope {
    body: String,
    attachment: protocol::Attachment,
}

/// What a text row seals: its body, or, for a message with an attachment, a NUL
/// byte and then JSON `{"body", "attachment"}`. (Bodies never hold U+0000, so
/// the two cannot be confused.) The attachment's name, preview and id are sealed
/// with the caption: deleting the message erases them too.
pub(crate) fn plaintext(m: &Message) -> std::borrow::Cow<'_, [u8]> {
    match &m.attachment {
        None => std::borrow::Cow::Borrowed(m.body.as_bytes()),
        Some(attachment) => {
            let mut v = vec![0u8];
            serde_json::to_writer(&mut v, &Envelope { body: &m.body, attachment })
                .expect("an attachment serialises");
            std::borrow::Cow::Owned(v)
        }
    }
}

/// Opens a sealed row into `m`: its body, and its attachment if it has one.
pub(crate) fn open_into(m: &mut Message, key: &Key, sealed: &[u8]) -> Result<()> {
    let plain = open(key, m.conversation_id, m.seq, sealed)?;
    if plain.first() == Some(&0) {
        let e: OwnedEnvelope = serde_json::from_slice(&plain[1..])
            .map_err(|_| crate::codec::corrupt("bad attachment envelope"))?;
        m.body = e.body;
        m.attachment = Some(Box::new(e.attachment));
    } else {
        m.body = String::from_utf8(plain).map_err(|_| crate::codec::corrupt("body not utf-8"))?;
    }
    Ok(())
}

/// A key as stored in a database column.
pub(crate) fn key_from_bytes(bytes: Vec<u8>) -> Result<Key> {
    bytes.try_into().map_err(|_| crate::codec::corrupt("a key that is not 32 bytes"))
}

/// One commit's sealing, for the backends that keep keys in a table (PostgreSQL,
/// Cassandra): each text row's and `edit` row's sealed body, the keys to store,
/// the keys to remove (deleted messages).
#[derive(Debug, Default)]
pub(crate) struct Sealing {
    pub(crate) sealed: HashMap<(ConversationId, Seq), Vec<u8>>,
    pub(crate) put_keys: Vec<(ConversationId, Seq, Key)>,
    pub(crate) drop_keys: Vec<(ConversationId, Seq)>,
}

impl Sealing {
    /// The stored keys a commit of `rows` needs: those of edited text messages,
    /// and of the messages its `edit` rows concern when they are not in the commit.
    pub(crate) fn wanted(rows: &Rows<'_>) -> Vec<(ConversationId, Seq)> {
        let text = Self::text(rows);
        let mut wanted = Vec::new();
        for m in rows.messages.values() {
            match (m.kind, m.target_seq) {
                (MessageKind::Text, _) if m.edited_ms.is_some() => wanted.push((m.conversation_id, m.seq)),
                (MessageKind::Edit, Some(t)) if !text.contains_key(&(m.conversation_id, t)) => {
                    wanted.push((m.conversation_id, t))
                }
                _ => {}
            }
        }
        wanted
    }

    fn text<'a>(rows: &Rows<'a>) -> HashMap<(ConversationId, Seq), &'a Message> {
        rows.messages
            .values()
            .filter(|m| m.kind == MessageKind::Text)
            .map(|m| ((m.conversation_id, m.seq), *m))
            .collect()
    }

    /// Seals `rows` given the stored keys of [`Sealing::wanted`] (read before the
    /// commit: one writer per conversation). A new text message gets a new key;
    /// an edited one, and an `edit` row, the key of the message concerned; a
    /// deleted message's key is dropped. An `edit` of a message whose key is gone
    /// keeps no text.
    pub(crate) fn of(rows: &Rows<'_>, mut keys: HashMap<(ConversationId, Seq), Key>) -> Sealing {
        let mut out = Sealing::default();
        for (id, m) in Self::text(rows) {
            let key = *keys.entry(id).or_insert_with(|| {
                let k = new_key();
                out.put_keys.push((id.0, id.1, k));
                k
            });
            out.sealed.insert(id, seal(&key, id.0, id.1, &plaintext(m)));
        }
        for m in rows.messages.values() {
            match (m.kind, m.target_seq) {
                (MessageKind::Edit, Some(t)) => {
                    if let Some(key) = keys.get(&(m.conversation_id, t)) {
                        out.sealed.insert(
                            (m.conversation_id, m.seq),
                            seal(key, m.conversation_id, m.seq, &plaintext(m)),
                        );
                    }
                }
                (MessageKind::Deleted, _) => out.drop_keys.push((m.conversation_id, m.seq)),
                _ => {}
            }
        }
        out
    }
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

/// One commit's new keys, as runs of consecutive slots.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) runs: Vec<(u64, Vec<u8>)>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Zeroes `slot` if this commit gave it out (a message created and deleted in one batch).
    pub(crate) fn forget(&mut self, slot: u64) {
        for (first, bytes) in &mut self.runs {
            if let Some(at) = slot.checked_sub(*first).map(|i| (i * SLOT) as usize)
                && at < bytes.len()
            {
                bytes[at..at + 32].fill(0);
            }
        }
    }
}

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

    /// Gives `key` a new slot in `pending`, written by [`Vault::write`].
    pub(crate) fn put(&self, pending: &mut Pending, key: &Key) -> u64 {
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        match pending.runs.last_mut() {
            Some((first, bytes)) if *first + bytes.len() as u64 / SLOT == slot => {
                bytes.extend_from_slice(key)
            }
            _ => pending.runs.push((slot, key.to_vec())),
        }
        slot
    }

    /// Writes `pending`'s keys, one `pwrite` per run of consecutive slots
    /// (durable after [`Vault::sync`]).
    pub(crate) fn write(&self, pending: &Pending) -> Result<()> {
        for (first, bytes) in &pending.runs {
            self.file.write_all_at(bytes, first * SLOT).map_err(vault_io("writing keys"))?;
        }
        Ok(())
    }

    /// The keys in `slots` that are not erased. Slots close together (a page of
    /// history was written together) are read with one `pread`.
    pub(crate) fn get_many(&self, slots: &[u64]) -> Result<HashMap<u64, Key>> {
        let mut out = HashMap::with_capacity(slots.len());
        let (Some(&lo), Some(&hi)) = (slots.iter().min(), slots.iter().max()) else {
            return Ok(out);
        };
        if hi - lo > 4 * slots.len() as u64 + 64 {
            for &s in slots {
                if let Some(k) = self.get(s)? {
                    out.insert(s, k);
                }
            }
            return Ok(out);
        }
        let mut buf = vec![0u8; ((hi - lo + 1) * SLOT) as usize];
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], lo * SLOT + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(vault_io("reading keys")(e)),
            }
        }
        for &s in slots {
            let at = ((s - lo) * SLOT) as usize;
            let key: Key = buf[at..at + 32].try_into().expect("32 bytes");
            if key != [0u8; 32] {
                out.insert(s, key);
            }
        }
        Ok(out)
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

    /// After keys were written past the slots given out (a log replay at open):
    /// new slots start after them.
    pub(crate) fn settle(&self) -> Result<()> {
        let len = self.file.metadata().map_err(vault_io("reading the key vault's size"))?.len();
        self.next.fetch_max(len.div_ceil(SLOT), Ordering::Relaxed);
        Ok(())
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
        let mut p = Pending::default();
        let (sa, sb) = (v.put(&mut p, &a), v.put(&mut p, &b));
        v.write(&p).unwrap();
        assert_eq!(v.get_many(&[sa, sb, 7]).unwrap(), HashMap::from([(sa, a), (sb, b)]));
        v.erase(sa).unwrap();
        v.sync().unwrap();
        drop(v);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(32).any(|w| w == a), "the erased key is gone from the file");
        let v = Vault::open(&path).unwrap();
        assert_eq!(v.get(sa).unwrap(), None);
        assert_eq!(v.get(sb).unwrap(), Some(b));
        assert_eq!(v.get(99).unwrap(), None, "past the end");
        assert_eq!(v.get_many(&[sa, sb]).unwrap(), HashMap::from([(sb, b)]));
        assert_eq!(v.put(&mut Pending::default(), &a), 2, "slots are never reused");
    }
}
