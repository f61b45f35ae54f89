//! The embedded store's write-ahead logs: one file per commit lane, so that
//! commits from different lanes (the gateway's sequencer partitions) make
//! themselves durable with concurrent `fdatasync`s instead of queueing behind
//! fjall's one journal lock, which fjall holds across its own fsync
//! (docs/design/why-sequencer-partitions.md).
//!
//! A commit appends one [`Record`] (its table writes, and the new vault keys
//! its rows are sealed under) to its lane's file, syncs it, and only then
//! applies it to fjall without fjall's fsync: nothing is visible before it is
//! durable. A checkpoint (every [`CHECKPOINT_BYTES`] of any lane, at open, and
//! after a key is erased) takes every lane's lock, makes fjall's journal and
//! the vault durable, then empties every lane's file. So the files only ever
//! hold records since the last checkpoint, and replaying them in `seqno` order
//! (taken under the lane lock, after the previous commit's apply: causal order)
//! rebuilds exactly what fjall may have lost.
//!
//! Record framing: `len: u32 LE | crc32(payload): u32 LE | payload` (postcard).
//! Reading stops at the first short or mismatching record: a torn tail was
//! never synced, so nobody was told it was stored.

use crate::{ErrorKind, Result, StorageError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Commit lanes (files `wal-NN.log`); a caller's lane is taken modulo this.
pub(crate) const LANES: usize = 64;

/// Past this many bytes in one lane, the next commit of that lane checkpoints.
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;

/// One table write.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    Put {
        table: u8,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        table: u8,
        key: Vec<u8>,
    },
    /// A member's positions, merged (maximum) with the stored row when applied.
    Positions {
        key: [u8; 16],
        delivered: u64,
        read: u64,
    },
}

/// One commit.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub seqno: u64,
    pub ops: Vec<Op>,
    /// New vault keys as runs of consecutive slots: `(first slot, keys)`.
    pub keys: Vec<(u64, Vec<u8>)>,
}

pub(crate) struct Lane {
    file: Option<File>,
    len: u64,
}

pub(crate) struct Wal {
    dir: PathBuf,
    lanes: Vec<Mutex<Lane>>,
    seqno: AtomicU64,
}

fn wal_io(context: &'static str) -> impl FnOnce(std::io::Error) -> StorageError {
    move |e| StorageError::new(ErrorKind::Io, context, e)
}

fn lock(m: &Mutex<Lane>) -> MutexGuard<'_, Lane> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wal {
    fn path(dir: &Path, lane: usize) -> PathBuf {
        dir.join(format!("wal-{lane:02}.log"))
    }

    /// Opens the lanes in `dir` and returns the records they hold, in `seqno`
    /// order, for the caller to apply before anything else; then it must
    /// [`Wal::checkpoint`].
    pub(crate) fn open(dir: &Path) -> Result<(Wal, Vec<Record>)> {
        let mut records = Vec::new();
        let mut lanes = Vec::with_capacity(LANES);
        for i in 0..LANES {
            let path = Self::path(dir, i);
            let lane = if path.exists() {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(wal_io("opening a write-ahead log"))?;
                let bytes = std::fs::read(&path).map_err(wal_io("reading a write-ahead log"))?;
                records.extend(decode_all(&bytes));
                Lane { len: bytes.len() as u64, file: Some(file) }
            } else {
                Lane { file: None, len: 0 }
            };
            lanes.push(Mutex::new(lane));
        }
        records.sort_by_key(|r| r.seqno);
        let next = records.last().map_or(0, |r| r.seqno + 1);
        Ok((Wal { dir: dir.to_owned(), lanes, seqno: AtomicU64::new(next) }, records))
    }

    pub(crate) fn lane(&self, lane: usize) -> MutexGuard<'_, Lane> {
        lock(&self.lanes[lane % LANES])
    }

    /// Appends a record (its `seqno` given here) to `lane`, held by the caller
    /// until the record is applied, and syncs it. Returns whether the lane is
    /// due a checkpoint.
    pub(crate) fn append(
        &self,
        lane: &mut Lane,
        index: usize,
        ops: &[Op],
        keys: &[(u64, Vec<u8>)],
    ) -> Result<bool> {
        #[derive(Serialize)]
        struct RecordRef<'a> {
            seqno: u64,
            ops: &'a [Op],
            keys: &'a [(u64, Vec<u8>)],
        }
        let seqno = self.seqno.fetch_add(1, Ordering::Relaxed);
        let payload = postcard::to_stdvec(&RecordRef { seqno, ops, keys })
            .map_err(|e| StorageError::new(ErrorKind::Corrupt, "encoding a log record", e))?;
        let mut framed = Vec::with_capacity(8 + payload.len());
        framed.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        framed.extend_from_slice(&payload);
        if lane.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(Self::path(&self.dir, index % LANES))
                .map_err(wal_io("creating a write-ahead log"))?;
            lane.file = Some(file);
        }
        let file = lane.file.as_ref().expect("just opened");
        file.write_all_at(&framed, lane.len).map_err(wal_io("appending to a write-ahead log"))?;
        file.sync_data().map_err(wal_io("syncing a write-ahead log"))?;
        lane.len += framed.len() as u64;
        Ok(lane.len >= CHECKPOINT_BYTES)
    }

    /// With every lane held (so no commit is between its append and its apply):
    /// `persist` makes everything applied durable elsewhere, then every lane's
    /// file is emptied (first overwritten with zeros when `scrub`: an erased key
    /// must not survive in a log). Callers hold no lane (lanes are taken in order).
    pub(crate) fn checkpoint(&self, scrub: bool, persist: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut lanes: Vec<MutexGuard<'_, Lane>> = self.lanes.iter().map(lock).collect();
        persist()?;
        for lane in lanes.iter_mut() {
            let Some(file) = &lane.file else { continue };
            if lane.len == 0 {
                continue;
            }
            if scrub {
                file.write_all_at(&vec![0u8; lane.len as usize], 0).map_err(wal_io("scrubbing a log"))?;
                file.sync_data().map_err(wal_io("scrubbing a log"))?;
            }
            file.set_len(0).map_err(wal_io("emptying a write-ahead log"))?;
            // The new length must be durable before anything is appended again:
            // replaying a record older than the checkpoint could undo later writes.
            file.sync_all().map_err(wal_io("emptying a write-ahead log"))?;
            lane.len = 0;
        }
        Ok(())
    }
}

/// The whole records of one lane's file, up to the first torn one.
fn decode_all(mut bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    while bytes.len() >= 8 {
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(8..8 + len) else { break };
        if len == 0 || crc32fast::hash(payload) != crc {
            break;
        }
        match postcard::from_bytes::<Record>(payload) {
            Ok(r) => out.push(r),
            Err(_) => break,
        }
        bytes = &bytes[8 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_seqno_order_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, old) = Wal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            for (lane, n) in [(3usize, 0u8), (5, 1), (3, 2)] {
                let mut l = wal.lane(lane);
                let ops = [Op::Put { table: 1, key: vec![n], value: vec![n; 3] }];
                wal.append(&mut l, lane, &ops, &[(7, vec![n; 32])]).unwrap();
            }
        }
        // A torn record after lane 3's two: never synced whole, never replayed.
        let p = Wal::path(dir.path(), 3);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3, 4, 9]).unwrap();
        let (wal, got) = Wal::open(dir.path()).unwrap();
        let keys: Vec<(u64, u8)> = got
            .iter()
            .map(|r| match &r.ops[0] {
                Op::Put { key, .. } => (r.seqno, key[0]),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys, [(0, 0), (1, 1), (2, 2)]);
        assert_eq!(got[1].keys, [(7, vec![1; 32])]);
        // Emptied by a checkpoint: nothing to replay next time; seqnos go on.
        wal.checkpoint(true, || Ok(())).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        {
            let mut l = wal.lane(9);
            wal.append(&mut l, 9, &[Op::Remove { table: 2, key: vec![1] }], &[]).unwrap();
        }
        let (_, got) = Wal::open(dir.path()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seqno, 3);
    }
}
