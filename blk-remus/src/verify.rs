//! Online verify of a replicated disk: digests of byte ranges of the primary's image and of
//! the backup's replica, and the re-copy of ranges found to differ.
//!
//! Why here: both images are this crate's (`Primary`'s local backend, `BackupStore`'s
//! replica), and a re-copy must take the same path as every other byte the primary sends
//! (epoch lock shared, byte-range lock, [`Primary::forward`] tagging the copy with the
//! current epoch), so it commits with that epoch's checkpoint and, should the link fail
//! before it is acknowledged, joins the dirty bitmap like any write. The engine decides
//! *when* (a checkpoint's pause for the primary's digests, right after a commit for the
//! replica's) and carries digests and verdicts in the stream.
//!
//! The digest is XXH3-128 (the `twox-hash` crate already in the workspace's tree): fast
//! (several GB/s) and with a 2^-128 chance that a corrupted region keeps its digest. It is
//! not a defence against a malicious peer, which the authenticated channel keeps out and
//! which could lie about its verdict anyway.

use bytes::Bytes;

use crate::backend::{check_range, BackendError, BlockBackend};
use crate::backup::{BackupError, BackupStore};
use crate::event::{Epoch, WriteKind};
use crate::primary::{Primary, PrimaryError};

/// Bytes read per step while hashing.
const HASH_STEP: usize = 1 << 20;

/// A region's digest: XXH3-128, little-endian.
pub type Digest = [u8; 16];

/// Hashes `len` bytes at `offset` of `backend`, reading through `buf`.
///
/// # Errors
/// Out of range, or the read failed.
pub fn digest_range(
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<Digest, BackendError> {
    check_range("verify read", offset, len, backend.size())?;
    buf.resize(HASH_STEP, 0);
    let mut h = twox_hash::xxhash3_128::Hasher::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(HASH_STEP as u64) as usize;
        backend.read_at(offset + done, &mut buf[..n])?;
        h.write(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finish_128().to_le_bytes())
}

/// The replica's digest of a region, and the state it was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaDigest {
    /// The committed epoch the replica held while the region was read.
    pub committed: Epoch,
    /// Whether the replica was a consistent image (no sync in progress).
    pub consistent: bool,
    /// The digest.
    pub digest: Digest,
}

impl Primary {
    /// Digests of `regions` (offset, length) of the local image, in order. Call while the
    /// VM is stopped after `barrier(k)`: the image then is exactly what checkpoint k leaves
    /// (no guest write is in flight, and a sync copy only reads it). Blocking.
    ///
    /// # Errors
    /// A region out of range, or a read failure.
    pub fn digests(&self, regions: &[(u64, u64)]) -> Result<Vec<Digest>, PrimaryError> {
        let mut buf = Vec::new();
        regions
            .iter()
            .map(|&(off, len)| Ok(digest_range(&*self.local, off, len, &mut buf)?))
            .collect()
    }

    /// Reads `len` bytes at `offset` of the local image into `buf` and drops them: the
    /// plain read that a verify's rate is set beside (the disk read floor). Blocking.
    ///
    /// # Errors
    /// Out of range, or a read failure.
    pub fn read_only_pass(&self, offset: u64, len: u64) -> Result<(), PrimaryError> {
        check_range("read floor", offset, len, self.local.size())?;
        let mut buf = vec![0u8; HASH_STEP];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(HASH_STEP as u64) as usize;
            self.local.read_at(offset + done, &mut buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Sends `len` bytes at `offset` of the local image to the backup again, as ordinary
    /// writes of the current epoch (data, or zeroes for all-zero 64 KiB pieces), under the
    /// epoch lock and the region's range lock like a guest write or a sync copy: a guest
    /// write to the region is ordered entirely before or after it, in the image and in the
    /// stream. Returns the bytes sent as data. Blocking.
    ///
    /// # Errors
    /// [`PrimaryError::NotConnected`] without a forwarder (or when it fails: the region is
    /// then in the unacknowledged set folded into the dirty bitmap); read failures.
    pub fn recopy(&self, offset: u64, len: u64) -> Result<u64, PrimaryError> {
        check_range("recopy", offset, len, self.local.size())?;
        const PIECE: u64 = 64 << 10;
        let mut sent = 0;
        let mut buf = vec![0u8; HASH_STEP];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(HASH_STEP as u64);
            let start = offset + done;
            let ep = self.epoch.read().unwrap_or_else(|p| p.into_inner());
            let _range = self.ranges.lock(start, n);
            let sink = self.sink().ok_or(PrimaryError::NotConnected("recopy"))?;
            let buf = &mut buf[..n as usize];
            self.local.read_at(start, buf)?;
            for (i, piece) in buf.chunks(PIECE as usize).enumerate() {
                let off = start + i as u64 * PIECE;
                let kind = if piece.iter().all(|&b| b == 0) {
                    WriteKind::Zeroes {
                        len: piece.len() as u64,
                    }
                } else {
                    sent += piece.len() as u64;
                    WriteKind::Data(Bytes::copy_from_slice(piece))
                };
                if !self.forward(&ep, &sink, off, kind) {
                    return Err(PrimaryError::NotConnected("recopy"));
                }
            }
            done += n;
        }
        Ok(sent)
    }
}

impl BackupStore {
    /// The replica's digest of `len` bytes at `offset`, read under the commit lock so it is
    /// the image of exactly the committed epoch returned. Blocking.
    ///
    /// # Errors
    /// Out of range, or a read failure.
    pub fn digest(&self, offset: u64, len: u64) -> Result<ReplicaDigest, BackupError> {
        let mut buf = Vec::new();
        self.with_replica(|replica, consistent, committed| {
            Ok(ReplicaDigest {
                committed,
                consistent,
                digest: digest_range(replica, offset, len, &mut buf)?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::FileBackend;
    use crate::event::DiskEvent;
    use crate::primary::PrimaryConfig;

    #[test]
    fn digests_see_one_changed_byte_and_recopy_sends_the_region_in_the_current_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let img = FileBackend::create(dir.path().join("img"), 4 << 20).unwrap();
        img.write_at(3 << 20, Bytes::from(vec![7u8; 100_000]), false)
            .unwrap();
        let p = Primary::new(Arc::new(img), &PrimaryConfig::default()).unwrap();
        let regions = [(0, 1 << 20), (3 << 20, 1 << 20), (4 << 20, 1)];
        assert!(
            p.digests(&regions).is_err(),
            "a region past the end is refused"
        );
        let before = p.digests(&regions[..2]).unwrap();
        assert_ne!(before[0], before[1]);
        p.write_at((3 << 20) + 5, Bytes::from_static(b"x"), false)
            .unwrap();
        let after = p.digests(&regions[..2]).unwrap();
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1], "one byte changes the digest");

        assert!(matches!(
            p.recopy(3 << 20, 1 << 20),
            Err(PrimaryError::NotConnected(_))
        ));
        let (tx, rx) = std::sync::mpsc::sync_channel(100);
        p.connect(Arc::new(tx));
        p.barrier(1).unwrap();
        let sent = p.recopy(3 << 20, 1 << 20).unwrap();
        // 100,001 bytes written from 3 MiB on: the first two 64 KiB pieces hold data.
        assert_eq!(sent, 128 << 10);
        let evs: Vec<DiskEvent> = rx.try_iter().skip(1).collect();
        assert_eq!(evs.len(), 16);
        assert!(
            evs.iter().all(|e| e.epoch() == 2),
            "tagged with the current epoch"
        );
        let covered: u64 = evs
            .iter()
            .map(|e| match e {
                DiskEvent::Write { kind, .. } => kind.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(covered, 1 << 20);
        assert_eq!(
            p.status().unacked_epochs,
            1,
            "the copy waits for its ACK like a write"
        );
    }
}
