//! Disk replication with per-epoch commit: the disk half of Remus output commit.
//!
//! The VM's disk is served by the agent over NBD ([`nbd`]), so every guest write passes through
//! this crate. On the primary, [`primary::Primary`] applies each write to the local image and
//! forwards it as a [`DiskEvent`] tagged with the current checkpoint epoch; the checkpoint
//! engine carries those events to the backup over its own authenticated connection. On the
//! backup, [`backup::BackupStore`] holds the writes of each epoch until the engine calls
//! `commit(k)`, then applies them to the replica image through a write-ahead log so that the
//! replica is always exactly at a committed epoch boundary, even after a crash.
//!
//! The invariant this crate upholds for the engine: when `BackupStore::commit(k)` returns, every
//! write the primary tagged with an epoch ≤ k is durable on the backup, and no write tagged with
//! a later epoch has touched the replica.
//!
//! Module map:
//! - [`backend`]: the [`backend::BlockBackend`] trait NBD serves, and its raw-file implementation;
//! - [`nbd`]: a hand-written NBD server (handshake + transmission phase);
//! - [`event`]: the [`DiskEvent`]s that flow from primary to backup;
//! - [`primary`]: apply locally, forward, epoch barriers, dirty tracking while disconnected;
//! - [`bitmap`]: the persistent dirty-region bitmap;
//! - [`wal`]: the backup's write-ahead log (record framing, CRC32C, replay);
//! - [`backup`]: per-epoch buffering, spill, commit, discard, activation;
//! - [`sync`]: initial full copy and incremental resync from the dirty bitmap;
//! - [`verify`]: digests of the primary's image and the replica, re-copy of differing ranges.

pub mod backend;
pub mod backup;
pub mod bitmap;
pub mod event;
pub mod nbd;
pub mod primary;
mod rangelock;
pub mod sync;
pub mod verify;
pub mod wal;

pub use backend::{BackendError, BlockBackend, FileBackend};

pub use event::{DiskEvent, Epoch, EventSink, SinkClosed, WriteKind};

pub use backup::{
    BackupConfig, BackupError, BackupStatus, BackupStore, CommitReport, WrittenRanges,
};
pub use bitmap::{BitmapError, DirtyBitmap};
pub use primary::{BarrierReport, LinkState, Primary, PrimaryConfig, PrimaryError, PrimaryStatus};
pub use sync::{SyncError, SyncMode, SyncProgress, SyncReport};
