//! The primary's disk: apply each write locally, then forward it to the backup, tagged with
//! the current epoch.
//!
//! [`Primary`] wraps the local image's [`BlockBackend`] and is itself a `BlockBackend`, so the
//! NBD server serves it to the VM's QEMU. A write completes once it is on the local image (and
//! durable when FUA was asked) and its [`DiskEvent`] has been handed to the forwarder; it never
//! waits for the backup: the disk is not externally visible, the network buffer is the output
//! commit (Remus semantics).
//!
//! Invariants:
//! - *Epochs.* Every write holds the epoch lock shared while it applies and forwards;
//!   [`Primary::barrier`] takes it exclusively, so when it returns every write tagged ≤ k has
//!   been handed over and the `Barrier(k)` event follows them; later writes carry k+1.
//! - *Order.* Overlapping writes (and sync copies) are ordered by a byte-range lock held from
//!   the local apply until the hand-over, so the event order equals the local apply order.
//! - *No lost region.* While connected, the chunks each epoch wrote are remembered until the
//!   engine reports the backup's acknowledgement ([`Primary::acknowledged`]). When the
//!   forwarder fails or the engine calls [`Primary::disconnect`], those chunks move into the
//!   persistent dirty bitmap, and every later write marks the bitmap *before* touching the
//!   image. A resync ([`crate::sync`]) copies exactly the bitmap.
//!
//! Lock order: epoch lock, then range lock, then the link/tracking mutexes (held briefly).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use tracing::{info, warn};

use crate::backend::{check_range, BackendError, BlockBackend};
use crate::bitmap::{BitmapError, DirtyBitmap};
use crate::event::{DiskEvent, Epoch, EventSink, WriteKind};
use crate::rangelock::RangeLocks;

/// Errors of the primary's control API.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// `barrier(k)` named an epoch that is not the current one.
    #[error("primary disk: barrier for epoch {requested} but the current epoch is {current}")]
    EpochMismatch {
        /// Epoch asked for.
        requested: Epoch,
        /// Current epoch.
        current: Epoch,
    },
    /// The dirty bitmap failed.
    #[error("primary disk: {0}")]
    Bitmap(#[from] BitmapError),
    /// An operation needs a connected forwarder.
    #[error("primary disk: {0} needs a connected backup")]
    NotConnected(&'static str),
    /// Local image I/O failed.
    #[error("primary disk: {0}")]
    Backend(#[from] BackendError),
}

/// Configuration of the primary side.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// Where the dirty bitmap is persisted (`None`: in memory only, for tests).
    pub bitmap_path: Option<PathBuf>,
    /// Bytes per dirty bit (power of two ≥ 4096). 64 KiB is a good default.
    pub granularity: u64,
    /// The first epoch (≥ 1; epoch 0 names the base image both sides start from).
    pub first_epoch: Epoch,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            bitmap_path: None,
            granularity: 64 << 10,
            first_epoch: 1,
        }
    }
}

/// Whether events reach the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Events are handed to the forwarder.
    Connected,
    /// The backup is unreachable; writes mark the dirty bitmap.
    Disconnected,
}

/// What a barrier closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierReport {
    /// The epoch closed.
    pub epoch: Epoch,
    /// Write events emitted in that epoch.
    pub writes: u64,
    /// Data payload bytes emitted in that epoch.
    pub bytes: u64,
    /// Whether the barrier event reached the forwarder (false when disconnected).
    pub forwarded: bool,
}

/// A snapshot of the primary's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryStatus {
    /// The epoch new writes are tagged with.
    pub epoch: Epoch,
    /// Link state.
    pub link: LinkState,
    /// Dirty chunks in the bitmap (to copy on resync).
    pub dirty_chunks: u64,
    /// Bytes per chunk.
    pub granularity: u64,
    /// Epochs forwarded but not yet acknowledged by the backup.
    pub unacked_epochs: u64,
}

/// The epoch new writes carry and its counters (counters are atomics so writers only need
/// the shared lock).
#[derive(Debug)]
pub(crate) struct EpochState {
    pub(crate) current: Epoch,
    pub(crate) writes: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// The forwarder, when connected.
enum Link {
    Connected(Arc<dyn EventSink>),
    Disconnected,
}

/// Dirty tracking: the persistent bitmap plus the chunks of epochs not yet acknowledged.
#[derive(Debug)]
pub(crate) struct Tracking {
    pub(crate) bitmap: DirtyBitmap,
    /// Chunks written per forwarded-but-unacknowledged epoch. Bounded in practice by the
    /// engine's pipelining depth (one or two epochs).
    pub(crate) unacked: BTreeMap<Epoch, BTreeSet<u64>>,
}

impl Tracking {
    fn unacked_chunks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.unacked.values().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The primary's replicated disk. See the module documentation.
pub struct Primary {
    /// The local image.
    pub(crate) local: Arc<dyn BlockBackend>,
    /// Shared by writes, exclusive for barriers and link changes.
    pub(crate) epoch: RwLock<EpochState>,
    /// Orders overlapping writes between local apply and hand-over.
    pub(crate) ranges: RangeLocks,
    /// The forwarder.
    link: Mutex<Link>,
    /// Dirty tracking.
    pub(crate) track: Mutex<Tracking>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Primary {
    /// Wraps `local`. Starts disconnected; the bitmap file, if configured and present, is
    /// loaded so dirty regions recorded before a restart are kept.
    ///
    /// # Errors
    /// [`PrimaryError::Bitmap`] when the bitmap cannot be opened or describes another disk.
    pub fn new(local: Arc<dyn BlockBackend>, config: &PrimaryConfig) -> Result<Self, PrimaryError> {
        let size = local.size();
        let bitmap = match &config.bitmap_path {
            Some(p) => DirtyBitmap::open(p, size, config.granularity)?,
            None => DirtyBitmap::new(size, config.granularity)?,
        };
        Ok(Primary {
            local,
            epoch: RwLock::new(EpochState {
                current: config.first_epoch,
                writes: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
            ranges: RangeLocks::default(),
            link: Mutex::new(Link::Disconnected),
            track: Mutex::new(Tracking {
                bitmap,
                unacked: BTreeMap::new(),
            }),
        })
    }

    /// Starts forwarding to `sink` at the current epoch boundary. Regions dirtied while
    /// disconnected stay in the bitmap until a resync copies them.
    pub fn connect(&self, sink: Arc<dyn EventSink>) {
        let ep = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        *lock(&self.link) = Link::Connected(sink);
        info!(epoch = ep.current, "primary disk: forwarder connected");
    }

    /// Starts forwarding to `sink` for a new replication session whose first epoch is
    /// `first_epoch`: new writes are tagged from `first_epoch` on, the epoch's counters
    /// restart. The engine numbers every session's epochs from 1, while this disk's epoch
    /// counter kept the previous session's numbers, so a re-protection must come through
    /// here, not [`Primary::connect`]. Chunks of the previous session that were never
    /// acknowledged join the dirty bitmap first (made durable), so the session's resync
    /// ([`crate::sync`], `SyncMode::Dirty`) copies them with everything written while the
    /// backup was away.
    ///
    /// # Errors
    /// [`PrimaryError::Bitmap`] when the bitmap cannot be persisted (nothing changed then).
    pub fn connect_session(
        &self,
        sink: Arc<dyn EventSink>,
        first_epoch: Epoch,
    ) -> Result<(), PrimaryError> {
        let mut ep = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        self.fold_unacked()?;
        let previous = ep.current;
        ep.current = first_epoch;
        ep.writes.store(0, Ordering::Relaxed);
        ep.bytes.store(0, Ordering::Relaxed);
        *lock(&self.link) = Link::Connected(sink);
        info!(
            epoch = first_epoch,
            previous, "primary disk: forwarder connected for a new session"
        );
        Ok(())
    }

    /// Declares the backup lost: unacknowledged epochs' chunks join the dirty bitmap (made
    /// durable) and later writes are tracked there.
    ///
    /// # Errors
    /// [`PrimaryError::Bitmap`] when the bitmap cannot be persisted.
    pub fn disconnect(&self) -> Result<(), PrimaryError> {
        let _ep = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        *lock(&self.link) = Link::Disconnected;
        self.fold_unacked()
    }

    fn fold_unacked(&self) -> Result<(), PrimaryError> {
        let mut t = lock(&self.track);
        let chunks = t.unacked_chunks();
        t.unacked.clear();
        t.bitmap.mark_chunks(chunks)?;
        t.bitmap.persist(std::iter::empty())?;
        Ok(())
    }

    /// The forwarder, if connected.
    pub(crate) fn sink(&self) -> Option<Arc<dyn EventSink>> {
        match &*lock(&self.link) {
            Link::Connected(s) => Some(s.clone()),
            Link::Disconnected => None,
        }
    }

    /// The forwarder `sink` failed: switch to disconnected (once) and fold unacked chunks.
    pub(crate) fn sink_failed(&self, sink: &Arc<dyn EventSink>) {
        let mut l = lock(&self.link);
        if let Link::Connected(cur) = &*l {
            if Arc::ptr_eq(cur, sink) {
                *l = Link::Disconnected;
                drop(l);
                warn!("primary disk: forwarder closed, tracking dirty regions");
                if let Err(e) = self.fold_unacked() {
                    warn!(error = %e, "primary disk: cannot persist dirty bitmap");
                }
            }
        }
    }

    /// Sends one event of the current epoch; on failure the link goes down and the chunks are
    /// marked dirty. Returns whether it was forwarded.
    pub(crate) fn forward(
        &self,
        ep: &EpochState,
        sink: &Arc<dyn EventSink>,
        offset: u64,
        kind: WriteKind,
    ) -> bool {
        let len = kind.len();
        let payload = kind.payload_len();
        {
            let mut t = lock(&self.track);
            let span = t.bitmap.chunk_span(offset, len);
            t.unacked.entry(ep.current).or_default().extend(span);
        }
        let ev = DiskEvent::Write {
            epoch: ep.current,
            offset,
            kind,
        };
        if sink.send(ev).is_ok() {
            ep.writes.fetch_add(1, Ordering::Relaxed);
            ep.bytes.fetch_add(payload, Ordering::Relaxed);
            true
        } else {
            self.sink_failed(sink);
            false
        }
    }

    /// The common write path: range checks, epoch + range locks, intent, local apply, forward.
    fn replicate(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        local: impl FnOnce(&dyn BlockBackend) -> Result<(), BackendError>,
        kind: impl FnOnce() -> WriteKind,
    ) -> Result<(), BackendError> {
        check_range(op, offset, len, self.local.size())?;
        let ep = self.epoch.read().unwrap_or_else(|p| p.into_inner());
        let _range = self.ranges.lock(offset, len);
        let sink = self.sink();
        if sink.is_none() {
            self.mark_intent(op, offset, len)?;
        }
        local(&*self.local)?;
        if let Some(sink) = sink {
            if !self.forward(&ep, &sink, offset, kind()) {
                self.mark_intent(op, offset, len)?;
            }
        }
        Ok(())
    }

    fn mark_intent(&self, op: &'static str, offset: u64, len: u64) -> Result<(), BackendError> {
        lock(&self.track)
            .bitmap
            .mark(offset, len)
            .map_err(|e| BackendError::Refused {
                op,
                offset,
                len,
                reason: e.to_string(),
            })
    }

    /// Closes epoch `k` (call while the VM is stopped): returns once every write of epoch ≤ k
    /// has been handed to the forwarder, emits `Barrier(k)`, and tags later writes with k+1.
    ///
    /// Blocking: call from a blocking thread ([`Primary::barrier_async`] does that).
    ///
    /// # Errors
    /// [`PrimaryError::EpochMismatch`] when `k` is not the current epoch.
    pub fn barrier(&self, k: Epoch) -> Result<BarrierReport, PrimaryError> {
        let mut ep = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        if ep.current != k {
            return Err(PrimaryError::EpochMismatch {
                requested: k,
                current: ep.current,
            });
        }
        let writes = ep.writes.swap(0, Ordering::Relaxed);
        let bytes = ep.bytes.swap(0, Ordering::Relaxed);
        let mut forwarded = false;
        if let Some(sink) = self.sink() {
            forwarded = sink
                .send(DiskEvent::Barrier {
                    epoch: k,
                    writes,
                    bytes,
                })
                .is_ok();
            if !forwarded {
                self.sink_failed(&sink);
            }
        }
        ep.current = k + 1;
        Ok(BarrierReport {
            epoch: k,
            writes,
            bytes,
            forwarded,
        })
    }

    /// [`Primary::barrier`] on the blocking pool.
    ///
    /// # Errors
    /// As `barrier`.
    pub async fn barrier_async(self: &Arc<Self>, k: Epoch) -> Result<BarrierReport, PrimaryError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.barrier(k))
            .await
            .expect("barrier task panicked")
    }

    /// The backup durably holds every epoch ≤ k: forget their chunks (they no longer need a
    /// resync if the link fails).
    pub fn acknowledged(&self, k: Epoch) {
        lock(&self.track).unacked.retain(|&e, _| e > k);
    }

    /// Makes the dirty bitmap durable (call periodically while disconnected; guest flushes do
    /// it too).
    ///
    /// # Errors
    /// [`PrimaryError::Bitmap`].
    pub fn persist_bitmap(&self) -> Result<(), PrimaryError> {
        let mut t = lock(&self.track);
        let extra = t.unacked_chunks();
        t.bitmap.persist(extra)?;
        Ok(())
    }

    /// Current state.
    pub fn status(&self) -> PrimaryStatus {
        let epoch = self.epoch.read().unwrap_or_else(|p| p.into_inner()).current;
        let link = if self.sink().is_some() {
            LinkState::Connected
        } else {
            LinkState::Disconnected
        };
        let t = lock(&self.track);
        PrimaryStatus {
            epoch,
            link,
            dirty_chunks: t.bitmap.count(),
            granularity: t.bitmap.granularity(),
            unacked_epochs: t.unacked.len() as u64,
        }
    }
}

impl BlockBackend for Primary {
    fn size(&self) -> u64 {
        self.local.size()
    }

    fn read_only(&self) -> bool {
        self.local.read_only()
    }

    fn can_multi_conn(&self) -> bool {
        self.local.can_multi_conn()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.local.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let len = data.len() as u64;
        let d = data.clone();
        self.replicate(
            "write",
            offset,
            len,
            |b| b.write_at(offset, d, fua),
            || WriteKind::Data(data),
        )
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_unmap: bool,
    ) -> Result<(), BackendError> {
        self.replicate(
            "write_zeroes",
            offset,
            len,
            |b| b.write_zeroes(offset, len, fua, may_unmap),
            || WriteKind::Zeroes { len },
        )
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.replicate(
            "trim",
            offset,
            len,
            |b| b.trim(offset, len, fua),
            || WriteKind::Trim { len },
        )
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.local.flush()?;
        if self.sink().is_none() {
            self.persist_bitmap().map_err(|e| BackendError::Refused {
                op: "flush",
                offset: 0,
                len: 0,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FileBackend;

    fn setup() -> (tempfile::TempDir, Arc<Primary>) {
        let dir = tempfile::tempdir().unwrap();
        let img = FileBackend::create(dir.path().join("img"), 1 << 20).unwrap();
        let cfg = PrimaryConfig {
            bitmap_path: Some(dir.path().join("bm")),
            granularity: 4096,
            first_epoch: 1,
        };
        (dir, Arc::new(Primary::new(Arc::new(img), &cfg).unwrap()))
    }

    /// Table-driven walk through the epoch/link state machine.
    #[test]
    fn epochs_barriers_and_link_changes() {
        let (_d, p) = setup();
        let (tx, rx) = std::sync::mpsc::sync_channel(100);
        p.connect(Arc::new(tx));
        p.write_at(0, Bytes::from_static(b"abc"), false).unwrap();
        p.write_zeroes(4096, 10, false, true).unwrap();
        assert!(matches!(
            p.barrier(2),
            Err(PrimaryError::EpochMismatch {
                requested: 2,
                current: 1
            })
        ));
        let r = p.barrier(1).unwrap();
        assert_eq!((r.writes, r.bytes, r.forwarded), (2, 3, true));
        p.trim(8192, 4096, false).unwrap();
        let evs: Vec<DiskEvent> = rx.try_iter().collect();
        let want = vec![
            DiskEvent::Write {
                epoch: 1,
                offset: 0,
                kind: WriteKind::Data(Bytes::from_static(b"abc")),
            },
            DiskEvent::Write {
                epoch: 1,
                offset: 4096,
                kind: WriteKind::Zeroes { len: 10 },
            },
            DiskEvent::Barrier {
                epoch: 1,
                writes: 2,
                bytes: 3,
            },
            DiskEvent::Write {
                epoch: 2,
                offset: 8192,
                kind: WriteKind::Trim { len: 4096 },
            },
        ];
        assert_eq!(evs, want);
        assert_eq!(p.status().unacked_epochs, 2);
        p.acknowledged(1);
        assert_eq!(p.status().unacked_epochs, 1);
        // Receiver gone: the unacked chunk of epoch 2 and later writes become dirty.
        drop(rx);
        p.write_at(20480, Bytes::from_static(b"x"), false).unwrap();
        let s = p.status();
        assert_eq!(s.link, LinkState::Disconnected);
        // chunk 2 (trim of epoch 2, unacked) + chunk 5 (the failed forward)
        assert_eq!(s.dirty_chunks, 2);
        p.write_at(40960, Bytes::from_static(b"y"), false).unwrap();
        assert_eq!(p.status().dirty_chunks, 3);
        // Out-of-range writes are refused before any tracking.
        assert!(p
            .write_at(1 << 20, Bytes::from_static(b"z"), false)
            .is_err());
        assert_eq!(p.status().dirty_chunks, 3);
        assert!(!p.barrier(2).unwrap().forwarded);
        assert_eq!(p.status().epoch, 3);
    }
}
