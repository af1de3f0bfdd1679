//! The engine's boundaries: what it needs from the VM, the network buffer and the disk.
//!
//! Each trait is small and names only the operations an epoch performs, so the epoch logic
//! can be unit-tested with in-memory stand-ins, while the daemon plugs in the real
//! implementations (the QEMU driver, `sch-plug`; `blk-remus` through the engine's own
//! [`crate::disk`]), which are tested for real in their own crates and together in the
//! end-to-end tests.

use std::time::Duration;

use async_trait::async_trait;
use remus_stream::VerifyRegion;
use thiserror::Error;

/// The cause of a [`PortError`]: the adapter's own error, kept whole so its chain of
/// sources reaches the log.
pub type PortCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure of a side effect, with the object and operation named by the adapter.
#[derive(Debug, Error)]
#[error("{object}: {operation}: {source}")]
pub struct PortError {
    /// What failed: "vm web1", "netbuf tap-web1", "disk disk0".
    pub object: String,
    /// The operation: "stop", "save device state", "release epoch 42".
    pub operation: String,
    /// The underlying cause (an adapter's error, or a sentence when there is none).
    pub source: PortCause,
}

impl PortError {
    /// Builds an error from a cause: any error type (kept as the source), or a sentence.
    pub fn new(
        object: impl Into<String>,
        operation: impl Into<String>,
        cause: impl Into<PortCause>,
    ) -> Self {
        Self {
            object: object.into(),
            operation: operation.into(),
            source: cause.into(),
        }
    }
}

/// The protected VM as the epoch loop sees it.
#[async_trait]
pub trait VmControl: Send {
    /// Pauses every vCPU and drains in-flight block I/O. Returns when the VM is stopped.
    async fn stop(&mut self) -> Result<(), PortError>;
    /// Resumes the VM.
    async fn cont(&mut self) -> Result<(), PortError>;
    /// Saves the device state of the stopped VM (everything but the shared guest RAM).
    async fn save_device_state(&mut self) -> Result<Vec<u8>, PortError>;
}

/// The network egress buffer of the primary (one per domain, covering all its NICs).
#[async_trait]
pub trait OutputBuffer: Send {
    /// How many closed, unreleased epochs the buffer can hold apart (the plug qdisc: 1).
    fn max_closed_epochs(&self) -> usize;
    /// Closes epoch `epoch`: output produced from now on belongs to the next epoch.
    async fn close_epoch(&mut self, epoch: u64) -> Result<(), PortError>;
    /// Releases the output of closed epoch `epoch` (the oldest closed one).
    async fn release(&mut self, epoch: u64) -> Result<(), PortError>;
    /// Stops holding output altogether (the backup is gone, or protection ends).
    async fn release_all(&mut self) -> Result<(), PortError>;
}

/// The primary's side of disk replication.
#[async_trait]
pub trait DiskBarrier: Send {
    /// Called while the VM is stopped: every write of epochs ≤ `epoch` has been handed to
    /// the replication stream when this returns, and later writes carry `epoch + 1`.
    async fn barrier(&mut self, epoch: u64) -> Result<(), PortError>;

    /// The backup acknowledged every epoch ≤ `epoch`: regions written then need no resync
    /// if the link fails later.
    fn acknowledged(&mut self, _epoch: u64) {}

    /// Sizes of the disks in index order, for online verify (`crate::verify`); empty when
    /// these disks cannot be verified.
    fn verify_sizes(&self) -> Vec<u64> {
        Vec::new()
    }

    /// Digests of `regions` of the images as they are now. Called in the checkpoint pause,
    /// after [`barrier`](Self::barrier), so they are the images checkpoint k commits.
    async fn digests(&mut self, regions: &[VerifyRegion]) -> Result<Vec<[u8; 16]>, PortError> {
        Err(PortError::new(
            "disks",
            format!("digest {} regions", regions.len()),
            "these disks cannot be verified",
        ))
    }

    /// Sends `regions` of the images again as ordinary writes of the current epoch (before
    /// [`barrier`](Self::barrier)), so they commit with it. Returns the bytes sent as data.
    async fn recopy(&mut self, regions: &[VerifyRegion]) -> Result<u64, PortError> {
        Err(PortError::new(
            "disks",
            format!("re-copy {} regions", regions.len()),
            "these disks cannot be verified",
        ))
    }
}

/// The replica's digest of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaRegionDigest {
    /// The checkpoint the replica held while the region was read.
    pub committed: u64,
    /// Whether the replica was a consistent image (no sync in progress).
    pub consistent: bool,
    /// XXH3-128, little-endian.
    pub digest: [u8; 16],
}

/// The backup's side of disk replication.
#[async_trait]
pub trait ReplicaDisk: Send {
    /// A new replication session begins (called once, before its first record is read).
    /// Its epochs restart at 1, so the disk must forget the previous session's epoch
    /// numbers and drop its uncommitted writes; and since the primary ran unprotected
    /// before this session, the replica disk is no longer an image to activate until the
    /// session's resynchronisation commits (`blk_remus::BackupStore::begin_session` does
    /// both). The default does nothing, for stores without epochs.
    async fn begin_session(&mut self) -> Result<(), PortError> {
        Ok(())
    }
    /// Holds one replicated write of `epoch` (not applied to the replica yet).
    async fn hold(&mut self, write: DiskWriteHeld) -> Result<(), PortError>;
    /// The primary's barrier: `writes` writes of `bytes` bytes belong to `epoch`. An error
    /// means the held writes do not match (lost or extra writes).
    async fn barrier(&mut self, epoch: u64, writes: u64, bytes: u64) -> Result<(), PortError>;
    /// Applies every held write of epochs ≤ `epoch` to the replica durably.
    async fn commit(&mut self, epoch: u64) -> Result<(), PortError>;
    /// Drops every write of epochs > the last committed one (failover).
    async fn discard_uncommitted(&mut self) -> Result<(), PortError>;

    /// A `CONTROL` record of the replication stream, in stream order (disk replication uses
    /// it for synchronisation markers). Messages a disk does not know are ignored.
    async fn control(&mut self, _json: &str) -> Result<(), PortError> {
        Ok(())
    }

    /// Whether [`digest`](Self::digest) works: the backup announces it to the primary.
    fn can_verify(&self) -> bool {
        false
    }

    /// The replica's digest of `len` bytes at `offset` of disk `disk`, at the committed
    /// checkpoint it returns.
    async fn digest(
        &mut self,
        disk: u16,
        _offset: u64,
        _len: u64,
    ) -> Result<ReplicaRegionDigest, PortError> {
        Err(PortError::new(
            format!("disk #{disk}"),
            "digest",
            "this replica cannot be verified",
        ))
    }
}

/// One replicated disk write as the backup receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWriteHeld {
    /// Which disk (index into the domain's disks).
    pub disk: u32,
    /// The epoch the VM was in when it wrote.
    pub epoch: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// What the write does.
    pub op: DiskOpHeld,
}

/// The three kinds of disk write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOpHeld {
    /// Data to write.
    Data(Vec<u8>),
    /// Write zeroes over `len` bytes.
    Zeroes(u64),
    /// Discard `len` bytes.
    Trim(u64),
}

impl DiskOpHeld {
    /// Bytes of the disk the operation covers.
    pub fn len(&self) -> u64 {
        match self {
            DiskOpHeld::Data(d) => d.len() as u64,
            DiskOpHeld::Zeroes(n) | DiskOpHeld::Trim(n) => *n,
        }
    }

    /// True when the operation covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Timings of a stop/cont pair, for the pause split in the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timed<T> {
    /// The result.
    pub value: T,
    /// How long it took.
    pub took: Duration,
}

/// A VM with no devices to save and nothing to stop: for tests of memory-only replication.
#[derive(Debug, Default)]
pub struct NoDisk;

#[async_trait]
impl DiskBarrier for NoDisk {
    async fn barrier(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
}

#[async_trait]
impl ReplicaDisk for NoDisk {
    async fn hold(&mut self, write: DiskWriteHeld) -> Result<(), PortError> {
        Err(PortError::new(
            format!("disk {}", write.disk),
            "hold write",
            "this domain replicates no disk",
        ))
    }
    async fn barrier(&mut self, epoch: u64, writes: u64, _bytes: u64) -> Result<(), PortError> {
        if writes == 0 {
            Ok(())
        } else {
            Err(PortError::new(
                "disk",
                format!("barrier of epoch {epoch}"),
                format!("{writes} writes announced, but this domain replicates no disk"),
            ))
        }
    }
    async fn commit(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn discard_uncommitted(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}

/// An output buffer that holds nothing: for `unsafe_no_output_buffering` and tests. Every
/// packet leaves at once, so a failover can lose state a client has already seen.
#[derive(Debug, Default)]
pub struct Unbuffered;

#[async_trait]
impl OutputBuffer for Unbuffered {
    fn max_closed_epochs(&self) -> usize {
        usize::MAX
    }
    async fn close_epoch(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn release(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn release_all(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}
