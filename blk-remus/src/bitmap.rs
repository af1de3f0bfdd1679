//! The primary's persistent dirty-region bitmap.
//!
//! One bit per `granularity` bytes of disk (a power of two, at least 4 KiB; 64 KiB by default).
//! While the backup is unreachable the primary sets the bits a write touches *before* the write
//! reaches the image (write intent, like DRBD's activity log), so a restart of the agent never
//! forgets a region that differs from the replica. On reconnection the resync copies exactly
//! the set bits.
//!
//! File format (little-endian): a 64-byte header — magic `RMSBMAP1`, `u32` version 1,
//! `u32` reserved, `u64` granularity, `u64` disk size, `u64` word count, zero padding, CRC32C
//! of bytes 0..60 at 60..64 — followed by the bitmap as `u64` words. Setting bits rewrites the
//! affected 8-byte words in place (`pwrite` without fsync: survives an agent crash, as the page
//! cache does); [`DirtyBitmap::persist`] rewrites every word and `fdatasync`s (survives a host
//! crash; the primary calls it on guest flush). Clearing bits is only ever written by
//! `persist`, whose caller decides which cleared bits are safe to forget.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RMSBMAP1";
const HEADER: u64 = 64;

/// Errors of the dirty bitmap.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two ≥ 4096.
    #[error("dirty bitmap: granularity {0} is not a power of two of at least 4096")]
    BadGranularity(u64),
    /// File I/O failed.
    #[error("dirty bitmap {path}: {op}: {source}")]
    Io {
        /// The bitmap file.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but does not describe this disk (or is corrupt).
    #[error("dirty bitmap {path}: {reason}")]
    Mismatch {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A dirty bitmap, optionally backed by a file.
#[derive(Debug)]
pub struct DirtyBitmap {
    /// Bytes per bit.
    granularity: u64,
    /// Disk size in bytes (the last chunk may be short).
    disk_size: u64,
    /// The bits in memory.
    words: Vec<u64>,
    /// The bits as last written to the file: setting bits ORs into these, so a clear in
    /// memory is never written by a later `mark`.
    file_words: Vec<u64>,
    /// Backing file, if persistent.
    file: Option<(File, PathBuf)>,
}

impl DirtyBitmap {
    /// An in-memory bitmap.
    ///
    /// # Errors
    /// [`BitmapError::BadGranularity`].
    pub fn new(disk_size: u64, granularity: u64) -> Result<Self, BitmapError> {
        if granularity < 4096 || !granularity.is_power_of_two() {
            return Err(BitmapError::BadGranularity(granularity));
        }
        let chunks = disk_size.div_ceil(granularity);
        let nwords = chunks.div_ceil(64) as usize;
        Ok(DirtyBitmap {
            granularity,
            disk_size,
            words: vec![0; nwords],
            file_words: vec![0; nwords],
            file: None,
        })
    }

    /// Opens the bitmap file at `path`, creating an empty one if it does not exist.
    ///
    /// # Errors
    /// [`BitmapError::Mismatch`] when the file describes another disk or granularity or is
    /// corrupt; [`BitmapError::Io`] on I/O errors.
    pub fn open(path: &Path, disk_size: u64, granularity: u64) -> Result<Self, BitmapError> {
        let mut bm = Self::new(disk_size, granularity)?;
        let io = |op| {
            let path = path.to_path_buf();
            move |source| BitmapError::Io { path, op, source }
        };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let mismatch = |reason: String| BitmapError::Mismatch {
            path: path.to_path_buf(),
            reason,
        };
        let want_len = HEADER + bm.words.len() as u64 * 8;
        if exists && file.metadata().map_err(io("stat"))?.len() > 0 {
            let mut h = [0u8; HEADER as usize];
            file.read_exact_at(&mut h, 0).map_err(io("read header"))?;
            if &h[0..8] != MAGIC {
                return Err(mismatch("bad magic".into()));
            }
            let crc = u32::from_le_bytes(h[60..64].try_into().expect("4 bytes"));
            if crc != crc32c::crc32c(&h[0..60]) {
                return Err(mismatch("header checksum mismatch".into()));
            }
            let g = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
            let s = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
            if g != granularity || s != disk_size {
                return Err(mismatch(format!(
                    "describes a disk of {s} bytes at granularity {g}, expected {disk_size} at {granularity}"
                )));
            }
            let mut body = vec![0u8; bm.words.len() * 8];
            file.read_exact_at(&mut body, HEADER)
                .map_err(io("read bits"))?;
            for (w, b) in bm.words.iter_mut().zip(body.chunks_exact(8)) {
                *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
            bm.file_words = bm.words.clone();
        } else {
            let mut h = [0u8; HEADER as usize];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&1u32.to_le_bytes());
            h[16..24].copy_from_slice(&granularity.to_le_bytes());
            h[24..32].copy_from_slice(&disk_size.to_le_bytes());
            h[32..40].copy_from_slice(&(bm.words.len() as u64).to_le_bytes());
            let crc = crc32c::crc32c(&h[0..60]);
            h[60..64].copy_from_slice(&crc.to_le_bytes());
            file.set_len(want_len).map_err(io("size"))?;
            file.write_all_at(&h, 0).map_err(io("write header"))?;
            file.sync_all().map_err(io("sync"))?;
        }
        bm.file = Some((file, path.to_path_buf()));
        Ok(bm)
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of chunks (bits in use).
    pub fn chunks(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity)
    }

    /// Chunk indexes covering `[offset, offset+len)`.
    pub fn chunk_span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.granularity;
        let last = (offset.saturating_add(len) - 1) / self.granularity;
        first..(last + 1).min(self.chunks())
    }

    /// Byte range of chunk run `[first, first+n)`, clipped to the disk.
    pub fn byte_range(&self, first: u64, n: u64) -> (u64, u64) {
        let start = first * self.granularity;
        let end = ((first + n) * self.granularity).min(self.disk_size);
        (start, end - start)
    }

    /// Whether chunk `i` is dirty.
    pub fn is_set(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Number of dirty chunks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Marks the chunks of `[offset, offset+len)` dirty; newly set bits are written to the file
    /// (without fsync) before this returns.
    ///
    /// # Errors
    /// [`BitmapError::Io`] when the intent cannot be recorded.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<(), BitmapError> {
        let span = self.chunk_span(offset, len);
        self.mark_chunks(span)
    }

    /// Marks chunk indexes dirty (as [`DirtyBitmap::mark`]).
    ///
    /// # Errors
    /// [`BitmapError::Io`].
    pub fn mark_chunks(
        &mut self,
        chunks: impl IntoIterator<Item = u64>,
    ) -> Result<(), BitmapError> {
        let mut changed: Vec<usize> = Vec::new();
        for i in chunks {
            let w = (i / 64) as usize;
            let Some(word) = self.words.get_mut(w) else {
                continue;
            };
            *word |= 1 << (i % 64);
            if self.file_words[w] & (1 << (i % 64)) == 0 {
                self.file_words[w] |= 1 << (i % 64);
                if changed.last() != Some(&w) {
                    changed.push(w);
                }
            }
        }
        if let Some((file, path)) = &self.file {
            for w in changed {
                file.write_all_at(&self.file_words[w].to_le_bytes(), HEADER + w as u64 * 8)
                    .map_err(|source| BitmapError::Io {
                        path: path.clone(),
                        op: "record write intent",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Marks every chunk dirty (a full sync), in memory.
    pub fn set_all(&mut self) {
        let n = self.chunks();
        for (i, w) in self.words.iter_mut().enumerate() {
            let lo = i as u64 * 64;
            let bits = n.saturating_sub(lo).min(64);
            *w = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
        }
    }

    /// Clears chunks `[first, first+n)` in memory (the file keeps them until `persist`).
    pub fn clear_run(&mut self, first: u64, n: u64) {
        for i in first..first + n {
            if let Some(w) = self.words.get_mut((i / 64) as usize) {
                *w &= !(1 << (i % 64));
            }
        }
    }

    /// Runs of consecutive dirty chunks, each at most `max_chunks` long, as `(first, n)`.
    pub fn runs(&self, max_chunks: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur: Option<(u64, u64)> = None;
        for i in 0..self.chunks() {
            if self.is_set(i) {
                match &mut cur {
                    Some((_, n)) if *n < max_chunks => *n += 1,
                    _ => {
                        if let Some(r) = cur.take() {
                            out.push(r);
                        }
                        cur = Some((i, 1));
                    }
                }
            } else if let Some(r) = cur.take() {
                out.push(r);
            }
        }
        out.extend(cur);
        out
    }

    /// Writes the in-memory bits, ORed with `extra` chunks that must not be forgotten, to the
    /// file and makes it durable.
    ///
    /// # Errors
    /// [`BitmapError::Io`].
    pub fn persist(&mut self, extra: impl IntoIterator<Item = u64>) -> Result<(), BitmapError> {
        let mut words = self.words.clone();
        for i in extra {
            if let Some(w) = words.get_mut((i / 64) as usize) {
                *w |= 1 << (i % 64);
            }
        }
        if let Some((file, path)) = &self.file {
            let io = |op| {
                let path = path.clone();
                move |source| BitmapError::Io { path, op, source }
            };
            let body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            file.write_all_at(&body, HEADER).map_err(io("write bits"))?;
            file.sync_data().map_err(io("sync"))?;
        }
        self.file_words = words;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_spans_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let size = 10 * 65536 + 100; // last chunk is short
        let mut b = DirtyBitmap::open(&p, size, 65536).unwrap();
        assert_eq!(b.chunks(), 11);
        // Table: (offset, len, expected chunk span).
        for (off, len, span) in [
            (0, 1, 0..1),
            (65535, 2, 0..2),
            (65536, 65536, 1..2),
            (10 * 65536, 100, 10..11),
            (5, 0, 0..0),
        ] {
            assert_eq!(b.chunk_span(off, len), span, "({off}, {len})");
        }
        b.mark(65535, 2).unwrap();
        b.mark(3 * 65536, 1).unwrap();
        b.mark(10 * 65536 + 50, 10).unwrap();
        assert_eq!(b.runs(64), vec![(0, 2), (3, 1), (10, 1)]);
        assert_eq!(b.byte_range(10, 1), (10 * 65536, 100));
        // Intent survives a reopen without persist (written in place).
        drop(b);
        let mut b = DirtyBitmap::open(&p, size, 65536).unwrap();
        assert_eq!(b.count(), 4);
        // Clears are only written by persist, and extra chunks are kept.
        b.clear_run(0, 2);
        b.mark(9 * 65536, 1).unwrap();
        drop(b);
        assert_eq!(DirtyBitmap::open(&p, size, 65536).unwrap().count(), 5);
        let mut b = DirtyBitmap::open(&p, size, 65536).unwrap();
        b.clear_run(0, 11);
        b.persist([3]).unwrap();
        drop(b);
        let b = DirtyBitmap::open(&p, size, 65536).unwrap();
        assert_eq!(b.runs(64), vec![(3, 1)]);
        assert!(DirtyBitmap::open(&p, size, 4096).is_err());
        let mut all = DirtyBitmap::new(size, 65536).unwrap();
        all.set_all();
        assert_eq!(all.count(), 11);
        assert_eq!(all.runs(4), vec![(0, 4), (4, 4), (8, 3)]);
        assert!(DirtyBitmap::new(size, 1000).is_err());
    }
}
