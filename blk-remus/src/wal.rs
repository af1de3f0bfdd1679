//! The backup's write-ahead log: how commit(k) stays atomic across crashes.
//!
//! Layout of `wal.log`:
//! ```text
//! [header slot 0: 4 KiB][header slot 1: 4 KiB][record][record]...
//! header  = "RMSWAL01" | u64 generation | u64 committed_epoch | u64 disk_size | u8 consistent
//!           | pad | u32 CRC32C of the preceding 36 bytes          (all little-endian)
//! record  = u32 body_len | u32 CRC32C(generation_le ‖ body) | body
//! body    = u8 type | u64 epoch | type-specific fields
//!           1 Data:   u64 offset | bytes        2 Zeroes: u64 offset | u64 len
//!           3 Trim:   u64 offset | u64 len      4 SyncBegin: u8 full
//!           5 SyncEnd                           6 Commit
//! ```
//! Protocol of `commit(k)`: (1) append every record of the epochs ≤ k, then a `Commit(k)`
//! record, and `fdatasync` — from here epoch k is durable and may be acknowledged; (2) apply
//! the same records to the replica in order (page cache, no sync); (3) when the log has grown
//! past a threshold: `fdatasync` the replica, then write the header slot `(g+1) % 2` with
//! generation g+1 and `committed_epoch = k`, `fdatasync`, and append from the start again.
//!
//! Replay at open: take the valid header with the highest generation g; scan records from
//! 8 KiB while the length is sane and the CRC (seeded with g, so records left over from older
//! generations never verify) matches; apply every record up to the *last* `Commit` record,
//! in order, then sync the replica and start generation g+1. Records are blind overwrites of
//! byte ranges, so re-applying a prefix that already reached the replica is harmless: after
//! replay the replica is exactly at the last epoch whose `Commit` record was durable, i.e. at
//! the boundary of k (commit finished its fsync) or of the previous commit (it did not). A torn
//! tail (crash during step 1) fails its CRC and is ignored with everything after it.
//!
//! Two header slots make the header update itself crash-safe: a torn slot fails its CRC and
//! the other, older one (whose records are all still on disk, since only step 3 rewinds) wins.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::event::{Epoch, WriteKind};

const MAGIC: &[u8; 8] = b"RMSWAL01";
const SLOT: u64 = 4096;
/// Offset of the first record.
pub const RECORDS_START: u64 = 2 * SLOT;
/// Largest record body accepted (a maximal NBD write plus its fields); anything longer is
/// treated as the end of the log, so a corrupt length cannot make replay allocate without bound.
pub const MAX_BODY: u32 = (32 << 20) + 64;
const APPEND_BUF: usize = 4 << 20;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// File I/O failed.
    #[error("wal {path}: {op}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither header slot is valid in a non-empty log.
    #[error("wal {0}: no valid header in either slot")]
    NoHeader(PathBuf),
    /// The log belongs to a disk of another size.
    #[error("wal {path}: written for a disk of {found} bytes, replica has {expected}")]
    SizeMismatch {
        /// The log file.
        path: PathBuf,
        /// Size in the header.
        found: u64,
        /// Replica size.
        expected: u64,
    },
}

/// One logged record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A replicated write.
    Write {
        /// Its epoch.
        epoch: Epoch,
        /// Byte offset.
        offset: u64,
        /// What it does.
        kind: WriteKind,
    },
    /// A sync starts: the replica is inconsistent until `SyncEnd` commits.
    SyncBegin {
        /// Its epoch.
        epoch: Epoch,
        /// Full copy or resync.
        full: bool,
    },
    /// The sync finished.
    SyncEnd {
        /// Its epoch.
        epoch: Epoch,
    },
    /// Every record before this one with epoch ≤ `epoch` is committed.
    Commit {
        /// The committed epoch.
        epoch: Epoch,
    },
}

impl Record {
    /// Payload bytes (data writes only).
    pub fn payload_len(&self) -> u64 {
        match self {
            Record::Write { kind, .. } => kind.payload_len(),
            _ => 0,
        }
    }

    /// Appends `u32 len | u32 crc | body` to `out`.
    pub fn encode(&self, generation: u64, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0u8; 8]);
        let (ty, epoch) = match self {
            Record::Write {
                epoch,
                kind: WriteKind::Data(_),
                ..
            } => (1u8, epoch),
            Record::Write {
                epoch,
                kind: WriteKind::Zeroes { .. },
                ..
            } => (2, epoch),
            Record::Write {
                epoch,
                kind: WriteKind::Trim { .. },
                ..
            } => (3, epoch),
            Record::SyncBegin { epoch, .. } => (4, epoch),
            Record::SyncEnd { epoch } => (5, epoch),
            Record::Commit { epoch } => (6, epoch),
        };
        out.push(ty);
        out.extend_from_slice(&epoch.to_le_bytes());
        match self {
            Record::Write { offset, kind, .. } => {
                out.extend_from_slice(&offset.to_le_bytes());
                match kind {
                    WriteKind::Data(b) => out.extend_from_slice(b),
                    WriteKind::Zeroes { len } | WriteKind::Trim { len } => {
                        out.extend_from_slice(&len.to_le_bytes())
                    }
                }
            }
            Record::SyncBegin { full, .. } => out.push(u8::from(*full)),
            _ => {}
        }
        let body_len = (out.len() - at - 8) as u32;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), &out[at + 8..]);
        out[at..at + 4].copy_from_slice(&body_len.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a body (after its CRC was verified). `None` if malformed.
    pub fn decode(body: &[u8]) -> Option<Record> {
        let ty = *body.first()?;
        let epoch = u64::from_le_bytes(body.get(1..9)?.try_into().ok()?);
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(body.get(i..i + 8)?.try_into().ok()?))
        };
        Some(match ty {
            1 => Record::Write {
                epoch,
                offset: u64_at(9)?,
                kind: WriteKind::Data(Bytes::copy_from_slice(body.get(17..)?)),
            },
            2 | 3 if body.len() == 25 => {
                let len = u64_at(17)?;
                Record::Write {
                    epoch,
                    offset: u64_at(9)?,
                    kind: if ty == 2 {
                        WriteKind::Zeroes { len }
                    } else {
                        WriteKind::Trim { len }
                    },
                }
            }
            4 if body.len() == 10 => Record::SyncBegin {
                epoch,
                full: body[9] != 0,
            },
            5 if body.len() == 9 => Record::SyncEnd { epoch },
            6 if body.len() == 9 => Record::Commit { epoch },
            _ => return None,
        })
    }
}

/// Reads framed records from a stream until the first invalid one.
pub struct RecordReader<R> {
    rd: R,
    generation: u64,
}

impl<R: Read> RecordReader<R> {
    /// Reads records framed with `generation`.
    pub fn new(rd: R, generation: u64) -> Self {
        RecordReader { rd, generation }
    }

    /// The next valid record and its framed size; `Ok(None)` at the end of the valid log.
    ///
    /// # Errors
    /// I/O errors other than EOF.
    pub fn next_record(&mut self) -> std::io::Result<Option<(Record, u64)>> {
        let mut h = [0u8; 8];
        match self.rd.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if !(9..=MAX_BODY).contains(&len) {
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        match self.rd.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let want = crc32c::crc32c_append(crc32c::crc32c(&self.generation.to_le_bytes()), &body);
        if want != crc {
            return Ok(None);
        }
        Ok(Record::decode(&body).map(|r| (r, 8 + u64::from(len))))
    }
}

/// The durable state a header records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalState {
    /// Generation of the records that follow.
    pub generation: u64,
    /// Last committed epoch (0: the base image).
    pub committed: Epoch,
    /// Whether the replica is a consistent image (no sync in progress).
    pub consistent: bool,
}

/// The open log, positioned for appends.
#[derive(Debug)]
pub struct Wal {
    file: File,
    path: PathBuf,
    disk_size: u64,
    state: WalState,
    /// Where the next record goes.
    end: u64,
    /// Records encoded but not yet written.
    buf: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the log. Returns the log positioned after its valid records, and
    /// those records up to and including the last `Commit` (to be replayed by the caller).
    ///
    /// # Errors
    /// [`WalError`] on I/O errors, unreadable headers, or a size mismatch.
    pub fn open(path: &Path, disk_size: u64) -> Result<(Wal, Vec<Record>), WalError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| WalError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        let mut wal = Wal {
            file,
            path: path.to_path_buf(),
            disk_size,
            state: WalState {
                generation: 0,
                committed: 0,
                consistent: true,
            },
            end: RECORDS_START,
            buf: Vec::new(),
        };
        if len == 0 {
            wal.write_header(WalState {
                generation: 1,
                committed: 0,
                consistent: true,
            })?;
            return Ok((wal, Vec::new()));
        }
        let mut best: Option<(WalState, u64)> = None;
        for slot in 0..2 {
            let mut h = [0u8; 40];
            if wal.file.read_exact_at(&mut h, slot * SLOT).is_err() {
                continue;
            }
            if &h[0..8] != MAGIC
                || u32::from_le_bytes(h[36..40].try_into().expect("4 bytes"))
                    != crc32c::crc32c(&h[0..36])
            {
                continue;
            }
            let st = WalState {
                generation: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
                committed: u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
                consistent: h[32] != 0,
            };
            let size = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
            if best.is_none_or(|(b, _)| st.generation > b.generation) {
                best = Some((st, size));
            }
        }
        let (state, size) = best.ok_or_else(|| WalError::NoHeader(path.to_path_buf()))?;
        if size != disk_size {
            return Err(WalError::SizeMismatch {
                path: path.to_path_buf(),
                found: size,
                expected: disk_size,
            });
        }
        wal.state = state;
        // Pass 1: find the end of the valid log and the last commit.
        let mut f = wal.file.try_clone().map_err(io("clone"))?;
        f.seek(SeekFrom::Start(RECORDS_START)).map_err(io("seek"))?;
        let mut rd = RecordReader::new(BufReader::with_capacity(1 << 20, f), state.generation);
        let mut pos = RECORDS_START;
        let mut last_commit_end = None;
        while let Some((rec, n)) = rd.next_record().map_err(io("scan"))? {
            pos += n;
            if matches!(rec, Record::Commit { .. }) {
                last_commit_end = Some(pos);
            }
        }
        // Pass 2: collect the committed prefix.
        let mut records = Vec::new();
        if let Some(stop) = last_commit_end {
            let mut f = wal.file.try_clone().map_err(io("clone"))?;
            f.seek(SeekFrom::Start(RECORDS_START)).map_err(io("seek"))?;
            let mut rd = RecordReader::new(BufReader::with_capacity(1 << 20, f), state.generation);
            let mut p = RECORDS_START;
            while p < stop {
                let Some((rec, n)) = rd.next_record().map_err(io("replay"))? else {
                    break;
                };
                p += n;
                records.push(rec);
            }
        }
        wal.end = last_commit_end.unwrap_or(RECORDS_START);
        Ok((wal, records))
    }

    /// The durable state as of the last header write.
    pub fn state(&self) -> WalState {
        self.state
    }

    /// Bytes of records in the current generation.
    pub fn len(&self) -> u64 {
        self.end - RECORDS_START + self.buf.len() as u64
    }

    /// Whether the current generation holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a record (buffered; durable only after [`Wal::sync`]).
    ///
    /// # Errors
    /// [`WalError::Io`].
    pub fn append(&mut self, rec: &Record) -> Result<(), WalError> {
        rec.encode(self.state.generation, &mut self.buf);
        if self.buf.len() >= APPEND_BUF {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.end)
            .map_err(|source| WalError::Io {
                path: self.path.clone(),
                op: "append",
                source,
            })?;
        self.end += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes buffered records and makes them durable.
    ///
    /// # Errors
    /// [`WalError::Io`].
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.write_out()?;
        self.file.sync_data().map_err(|source| WalError::Io {
            path: self.path.clone(),
            op: "fdatasync",
            source,
        })
    }

    /// Starts a new generation recording `committed`/`consistent` (the caller has made the
    /// replica durable first). Records of older generations become invalid.
    ///
    /// # Errors
    /// [`WalError::Io`].
    pub fn reset(&mut self, committed: Epoch, consistent: bool) -> Result<(), WalError> {
        self.buf.clear();
        let st = WalState {
            generation: self.state.generation + 1,
            committed,
            consistent,
        };
        self.write_header(st)?;
        self.end = RECORDS_START;
        Ok(())
    }

    fn write_header(&mut self, st: WalState) -> Result<(), WalError> {
        let mut h = [0u8; 40];
        h[0..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&st.generation.to_le_bytes());
        h[16..24].copy_from_slice(&st.committed.to_le_bytes());
        h[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        h[32] = u8::from(st.consistent);
        let crc = crc32c::crc32c(&h[0..36]);
        h[36..40].copy_from_slice(&crc.to_le_bytes());
        let io = |op| {
            let path = self.path.clone();
            move |source| WalError::Io { path, op, source }
        };
        self.file
            .write_all_at(&h, (st.generation % 2) * SLOT)
            .map_err(io("write header"))?;
        self.file.sync_data().map_err(io("sync header"))?;
        self.state = st;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs() -> Vec<Record> {
        vec![
            Record::Write {
                epoch: 1,
                offset: 5,
                kind: WriteKind::Data(Bytes::from_static(b"hello")),
            },
            Record::Write {
                epoch: 1,
                offset: 9,
                kind: WriteKind::Zeroes { len: 3 },
            },
            Record::Write {
                epoch: 1,
                offset: 0,
                kind: WriteKind::Trim { len: 4096 },
            },
            Record::SyncBegin {
                epoch: 1,
                full: true,
            },
            Record::SyncEnd { epoch: 1 },
            Record::Commit { epoch: 1 },
        ]
    }

    #[test]
    fn record_codec_round_trip_and_generation_seed() {
        for r in recs() {
            let mut b = Vec::new();
            r.encode(7, &mut b);
            let mut rd = RecordReader::new(&b[..], 7);
            assert_eq!(rd.next_record().unwrap().map(|x| x.0), Some(r.clone()));
            // Another generation never verifies.
            assert_eq!(RecordReader::new(&b[..], 8).next_record().unwrap(), None);
            // A flipped byte never verifies.
            let last = b.len() - 1;
            b[last] ^= 1;
            assert_eq!(RecordReader::new(&b[..], 7).next_record().unwrap(), None);
        }
    }

    /// Table: what replay returns for logs cut at various points.
    #[test]
    fn replay_stops_at_last_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        let (mut w, r) = Wal::open(&p, 1 << 20).unwrap();
        assert!(r.is_empty());
        for rec in recs() {
            w.append(&rec).unwrap();
        }
        // An uncommitted epoch 2 after the commit.
        w.append(&Record::Write {
            epoch: 2,
            offset: 0,
            kind: WriteKind::Zeroes { len: 1 },
        })
        .unwrap();
        w.sync().unwrap();
        let (w2, r) = Wal::open(&p, 1 << 20).unwrap();
        assert_eq!(r, recs());
        assert_eq!(w2.state().generation, 1);
        drop(w2);
        // A torn commit record: nothing is committed.
        let full = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(full - 2 - (8 + 25) - 1).unwrap();
        let (_, r) = Wal::open(&p, 1 << 20).unwrap();
        assert!(r.is_empty());
        // After reset, old records are dead and the header carries the epoch.
        let (mut w, _) = Wal::open(&p, 1 << 20).unwrap();
        w.reset(1, true).unwrap();
        drop(w);
        let (w, r) = Wal::open(&p, 1 << 20).unwrap();
        assert!(r.is_empty());
        assert_eq!(
            w.state(),
            WalState {
                generation: 2,
                committed: 1,
                consistent: true
            }
        );
        assert!(matches!(
            Wal::open(&p, 4096),
            Err(WalError::SizeMismatch { .. })
        ));
    }
}
