//! Synchronising the replica with the primary: initial full copy and bitmap resync.
//!
//! Both are the same loop: mark what must be copied in the dirty bitmap (everything for a full
//! copy), then walk the dirty runs; for each run, under the epoch lock (shared) and the
//! byte-range lock, read the local image, clear the run's bits, and emit the copy as ordinary
//! `Write` events of the current epoch — `Zeroes` for chunks that are all zero, so zero
//! regions cost a few bytes on the wire. Because the copy holds the same range lock as guest
//! writes, a guest write to a region being copied is ordered entirely before or after the copy,
//! in the image and in the event stream alike: nothing is lost or reordered. Writes made while
//! the sync runs are forwarded as usual and commit with their epoch.
//!
//! The copy is framed by `SyncBegin`/`SyncEnd` events: the backup treats its replica as
//! inconsistent (not activatable) from a committed `SyncBegin` until a committed `SyncEnd`.
//! The copied chunks count as the epoch's writes for acknowledgement, so if the link fails
//! mid-sync, everything copied but unacknowledged and everything not yet copied stays dirty.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::info;

use crate::backend::BackendError;
use crate::bitmap::BitmapError;
use crate::event::{DiskEvent, WriteKind};
use crate::primary::Primary;

/// Largest region copied in one step (bounds memory and the time a range stays locked).
pub const MAX_COPY: u64 = 1 << 20;

/// Errors of a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The forwarder is not connected (or closed during the sync).
    #[error("disk sync: backup not connected after {0} regions")]
    Disconnected(u64),
    /// Reading the local image failed.
    #[error("disk sync: {0}")]
    Backend(#[from] BackendError),
    /// The bitmap failed.
    #[error("disk sync: {0}")]
    Bitmap(#[from] BitmapError),
}

/// Full copy or resync of the dirty regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy the whole disk (zero chunks as `Zeroes`).
    Full,
    /// Copy only the dirty bitmap's regions.
    Dirty,
}

/// Progress, published on a watch channel for the CLI's progress bar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Bytes to examine in total.
    pub total_bytes: u64,
    /// Bytes examined so far.
    pub done_bytes: u64,
}

/// What a sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Contiguous dirty regions (bitmap runs, before splitting at [`MAX_COPY`]).
    pub regions: u64,
    /// Dirty chunks copied.
    pub chunks: u64,
    /// Bytes sent as data.
    pub bytes_copied: u64,
    /// Bytes found all-zero and sent as `Zeroes`.
    pub bytes_zero: u64,
    /// Write events emitted.
    pub events: u64,
}

impl Primary {
    /// Copies the regions `mode` selects to the backup through the forwarder, while the VM
    /// keeps running. Blocking (run it on a blocking thread).
    ///
    /// # Errors
    /// [`SyncError::Disconnected`] when no forwarder is connected or it fails (the regions
    /// not yet acknowledged stay dirty); I/O errors of the local image.
    pub fn sync(
        &self,
        mode: SyncMode,
        progress: &watch::Sender<SyncProgress>,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let (runs, gran) = {
            let mut t = self.track.lock().unwrap_or_else(|p| p.into_inner());
            if mode == SyncMode::Full {
                t.bitmap.set_all();
            }
            (t.bitmap.runs(u64::MAX), t.bitmap.granularity())
        };
        report.regions = runs.len() as u64;
        let total: u64 = {
            let t = self.track.lock().unwrap_or_else(|p| p.into_inner());
            runs.iter().map(|&(f, n)| t.bitmap.byte_range(f, n).1).sum()
        };
        progress.send_replace(SyncProgress {
            total_bytes: total,
            done_bytes: 0,
        });
        self.emit_marker(|epoch| DiskEvent::SyncBegin {
            epoch,
            full: mode == SyncMode::Full,
        })
        .ok_or(SyncError::Disconnected(0))?;
        let step = (MAX_COPY / gran).max(1);
        let mut buf = vec![0u8; (step * gran) as usize];
        for (i, &(first, n)) in runs.iter().enumerate() {
            let mut c = first;
            while c < first + n {
                let m = step.min(first + n - c);
                self.copy_run(c, m, gran, &mut buf, &mut report)
                    .map_err(|e| match e {
                        SyncError::Disconnected(_) => SyncError::Disconnected(i as u64),
                        e => e,
                    })?;
                c += m;
                let (_, len) = {
                    let t = self.track.lock().unwrap_or_else(|p| p.into_inner());
                    t.bitmap.byte_range(c - m, m)
                };
                progress.send_modify(|p| p.done_bytes += len);
            }
        }
        self.emit_marker(|epoch| DiskEvent::SyncEnd { epoch })
            .ok_or(SyncError::Disconnected(report.regions))?;
        info!(?mode, ?report, "disk sync done");
        Ok(report)
    }

    /// [`Primary::sync`] on the blocking pool.
    ///
    /// # Errors
    /// As `sync`.
    pub async fn sync_async(
        self: &Arc<Self>,
        mode: SyncMode,
        progress: watch::Sender<SyncProgress>,
    ) -> Result<SyncReport, SyncError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync(mode, &progress))
            .await
            .expect("sync task panicked")
    }

    fn emit_marker(&self, ev: impl FnOnce(u64) -> DiskEvent) -> Option<()> {
        let ep = self.epoch.read().unwrap_or_else(|p| p.into_inner());
        let sink = self.sink()?;
        if sink.send(ev(ep.current)).is_err() {
            self.sink_failed(&sink);
            return None;
        }
        Some(())
    }

    /// Copies chunks `[first, first+n)`: zero chunks merge into `Zeroes`, others into `Data`.
    fn copy_run(
        &self,
        first: u64,
        n: u64,
        gran: u64,
        buf: &mut [u8],
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let ep = self.epoch.read().unwrap_or_else(|p| p.into_inner());
        let (start, len) = {
            let t = self.track.lock().unwrap_or_else(|p| p.into_inner());
            t.bitmap.byte_range(first, n)
        };
        let _range = self.ranges.lock(start, len);
        let sink = self.sink().ok_or(SyncError::Disconnected(0))?;
        let buf = &mut buf[..len as usize];
        self.local.read_at(start, buf)?;
        self.track
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bitmap
            .clear_run(first, n);
        report.chunks += n;
        // Split into segments of equal zero-ness at chunk granularity.
        let mut seg_start = 0usize;
        while seg_start < buf.len() {
            let zero = is_zero(&buf[seg_start..(seg_start + gran as usize).min(buf.len())]);
            let mut seg_end = seg_start;
            while seg_end < buf.len() {
                let e = (seg_end + gran as usize).min(buf.len());
                if is_zero(&buf[seg_end..e]) != zero {
                    break;
                }
                seg_end = e;
            }
            let off = start + seg_start as u64;
            let slen = (seg_end - seg_start) as u64;
            let kind = if zero {
                report.bytes_zero += slen;
                WriteKind::Zeroes { len: slen }
            } else {
                report.bytes_copied += slen;
                WriteKind::Data(Bytes::copy_from_slice(&buf[seg_start..seg_end]))
            };
            report.events += 1;
            if !self.forward(&ep, &sink, off, kind) {
                // `forward` folded the unacked chunks (including this run) into the bitmap.
                let mut t = self.track.lock().unwrap_or_else(|p| p.into_inner());
                t.bitmap.mark_chunks(first..first + n)?;
                return Err(SyncError::Disconnected(0));
            }
            seg_start = seg_end;
        }
        Ok(())
    }
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BlockBackend, FileBackend};
    use crate::primary::PrimaryConfig;

    #[test]
    fn full_sync_emits_zeroes_and_data_segments() {
        let dir = tempfile::tempdir().unwrap();
        let img = FileBackend::create(dir.path().join("img"), 10 * 4096 + 100).unwrap();
        img.write_at(4096 * 2 + 7, Bytes::from_static(b"a"), false)
            .unwrap();
        img.write_at(4096 * 3, Bytes::from_static(b"b"), false)
            .unwrap();
        img.write_at(10 * 4096 + 99, Bytes::from_static(b"c"), false)
            .unwrap();
        let cfg = PrimaryConfig {
            granularity: 4096,
            ..Default::default()
        };
        let p = Primary::new(Arc::new(img), &cfg).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(100);
        p.connect(Arc::new(tx));
        let (ptx, prx) = watch::channel(SyncProgress::default());
        let r = p.sync(SyncMode::Full, &ptx).unwrap();
        assert_eq!(
            *prx.borrow(),
            SyncProgress {
                total_bytes: 10 * 4096 + 100,
                done_bytes: 10 * 4096 + 100
            }
        );
        assert_eq!(
            (r.regions, r.chunks, r.bytes_copied, r.bytes_zero),
            (1, 11, 2 * 4096 + 100, 8 * 4096)
        );
        let shape: Vec<(u64, bool, u64)> = rx
            .try_iter()
            .filter_map(|e| match e {
                DiskEvent::Write { offset, kind, .. } => {
                    Some((offset, matches!(kind, WriteKind::Zeroes { .. }), kind.len()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, true, 8192),
                (8192, false, 8192),
                (16384, true, 6 * 4096),
                (40960, false, 100),
            ]
        );
        assert_eq!(p.status().dirty_chunks, 0);
        assert!(is_zero(&[0u8; 37]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
