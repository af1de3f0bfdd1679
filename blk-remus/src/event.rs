//! The events that carry the primary's disk writes to the backup.
//!
//! The primary emits, in this order per epoch k: every write tagged `k` (data, zeroes, trims,
//! and sync copies), then exactly one [`DiskEvent::Barrier`] for `k` whose counters let the
//! backup verify it received the whole epoch. Events of epoch k+1 follow only after that
//! barrier. The order of events within an epoch is the order in which overlapping writes were
//! applied on the primary, so replaying them in order reproduces the primary's image.
//!
//! Transport is not this crate's business: the checkpoint engine moves events over its
//! authenticated peer connection. [`EventSink`] is the hand-off point on the primary.

use bytes::Bytes;

/// A checkpoint epoch number. Epoch k's disk writes are committed with checkpoint k.
pub type Epoch = u64;

/// What a replicated write does to its byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteKind {
    /// Store these bytes at the offset.
    Data(Bytes),
    /// The range reads as zeroes afterwards.
    Zeroes {
        /// Length of the zeroed range in bytes.
        len: u64,
    },
    /// The range was discarded; on a raw image a discard punches a hole, so it reads as
    /// zeroes afterwards and the replica does the same to stay byte-identical.
    Trim {
        /// Length of the discarded range in bytes.
        len: u64,
    },
}

impl WriteKind {
    /// Length of the byte range this write covers.
    pub fn len(&self) -> u64 {
        match self {
            WriteKind::Data(b) => b.len() as u64,
            WriteKind::Zeroes { len } | WriteKind::Trim { len } => *len,
        }
    }

    /// Whether the write covers no bytes (never emitted by the primary).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of payload this write carries (only data writes carry any).
    pub fn payload_len(&self) -> u64 {
        match self {
            WriteKind::Data(b) => b.len() as u64,
            _ => 0,
        }
    }
}

/// One event of the primary → backup disk stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEvent {
    /// A write applied on the primary during `epoch`.
    Write {
        /// Epoch the write belongs to; it is committed with that checkpoint.
        epoch: Epoch,
        /// Byte offset in the disk.
        offset: u64,
        /// What the write does.
        kind: WriteKind,
    },
    /// Every write of `epoch` has been emitted; `writes`/`bytes` let the backup check it
    /// received them all (bytes counts data payload only).
    Barrier {
        /// The epoch that is now complete.
        epoch: Epoch,
        /// Number of `Write` events emitted for this epoch.
        writes: u64,
        /// Sum of the data payload bytes of those writes.
        bytes: u64,
    },
    /// A synchronisation starts in `epoch`: until the matching [`DiskEvent::SyncEnd`] is
    /// committed the replica is not a consistent image and must not be activated.
    SyncBegin {
        /// Epoch the marker belongs to.
        epoch: Epoch,
        /// Whether this is a full copy (initial sync) or a bitmap resync.
        full: bool,
    },
    /// The synchronisation started by the last `SyncBegin` copied everything.
    SyncEnd {
        /// Epoch the marker belongs to.
        epoch: Epoch,
    },
}

impl DiskEvent {
    /// The epoch the event belongs to.
    pub fn epoch(&self) -> Epoch {
        match self {
            DiskEvent::Write { epoch, .. }
            | DiskEvent::Barrier { epoch, .. }
            | DiskEvent::SyncBegin { epoch, .. }
            | DiskEvent::SyncEnd { epoch } => *epoch,
        }
    }
}

/// The receiving end of the forwarder has gone: the backup is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("disk event forwarder: receiver closed")]
pub struct SinkClosed;

/// Where the primary hands its events. `send` may block (back-pressure from a bounded
/// channel); it is only called from blocking threads, never from an async task.
pub trait EventSink: Send + Sync {
    /// Hands one event over, in order.
    ///
    /// # Errors
    /// [`SinkClosed`] when the receiver is gone; the primary then tracks dirty regions instead.
    fn send(&self, event: DiskEvent) -> Result<(), SinkClosed>;
}

impl EventSink for tokio::sync::mpsc::Sender<DiskEvent> {
    fn send(&self, event: DiskEvent) -> Result<(), SinkClosed> {
        self.blocking_send(event).map_err(|_| SinkClosed)
    }
}

impl EventSink for tokio::sync::mpsc::UnboundedSender<DiskEvent> {
    fn send(&self, event: DiskEvent) -> Result<(), SinkClosed> {
        tokio::sync::mpsc::UnboundedSender::send(self, event).map_err(|_| SinkClosed)
    }
}

impl EventSink for std::sync::mpsc::SyncSender<DiskEvent> {
    fn send(&self, event: DiskEvent) -> Result<(), SinkClosed> {
        std::sync::mpsc::SyncSender::send(self, event).map_err(|_| SinkClosed)
    }
}
