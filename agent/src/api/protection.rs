//! What the control protocol reports of a primary's epoch loop and of a backup's receiver.
//!
//! These mirror `remus_engine`'s `PrimaryStatus`, `EpochPhase`, `EpochReport`,
//! `EpochSummary`, `Percentiles`, `BackupStatus` and `ReplicaState`, and serialise exactly
//! as those did in release 0.1.0 (durations as integer microseconds, the same tags). The
//! engine is free to change its own types; [`super::convert`] keeps the wire still.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What `remusctl status` sees of a primary's epoch loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtectionStatus {
    /// Current phase.
    pub phase: EpochPhase,
    /// Last checkpoint the backup acknowledged.
    pub last_acked: Option<u64>,
    /// Checkpoints sent and not yet acknowledged.
    pub in_flight: usize,
    /// The latest epoch's costs.
    pub last: Option<EpochReport>,
    /// Rolling summaries.
    pub summary: EpochSummary,
    /// Pre-copy rounds run before the first checkpoint, and pages each sent.
    pub precopy_pages: Vec<u64>,
    /// The dirty-page tracker in use ("compare", "soft-dirty").
    pub tracker: String,
    /// Pages the replica audit found missed by the tracker, since the start.
    pub audit_repaired_total: u64,
}

/// Where the epoch loop is now (`{"phase":"running","epoch":7}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum EpochPhase {
    /// Not started.
    Idle,
    /// Live pre-copy before the first checkpoint.
    PreCopy {
        /// Round number, from 1.
        round: u32,
    },
    /// The VM runs in epoch `epoch`.
    Running {
        /// The running epoch.
        epoch: u64,
    },
    /// At a boundary, waiting for an ACK before the output buffer can close another epoch.
    AwaitingAck {
        /// The epoch whose ACK is awaited.
        epoch: u64,
    },
    /// Closing the network output of `epoch`.
    ClosingOutput {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Pausing the VM.
    Stopping {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Copying dirty pages.
    Capturing {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Waiting for the disk barrier.
    DiskBarrier {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Saving device state.
    SavingDevice {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Resuming the VM.
    Resuming {
        /// The epoch being checkpointed.
        epoch: u64,
    },
    /// Encoding and queueing checkpoint `epoch` while the VM runs.
    Transmitting {
        /// The epoch being sent.
        epoch: u64,
    },
    /// Planned switchover: the final checkpoint `epoch` was taken with the VM left stopped;
    /// waiting for its acknowledgement (and that of every earlier one).
    HandingOff {
        /// The final checkpoint.
        epoch: u64,
    },
    /// The loop ended.
    Ended,
}

/// Costs of one checkpoint on the primary. Durations travel as integer microseconds so
/// that `remusctl` and scripts need no duration parser.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// The checkpoint's epoch number.
    pub epoch: u64,
    /// Time waiting at the boundary for the previous epoch's ACK (a late backup).
    #[serde(with = "micros")]
    pub ack_wait: Duration,
    /// QMP `stop` (includes draining in-flight guest block I/O).
    #[serde(with = "micros")]
    pub stop: Duration,
    /// Finding and copying the dirty pages (the tracker).
    #[serde(with = "micros")]
    pub capture: Duration,
    /// Disk barrier: every write of the epoch handed to the stream.
    #[serde(with = "micros")]
    pub disk_barrier: Duration,
    /// Saving the device state.
    #[serde(with = "micros")]
    pub device_save: Duration,
    /// QMP `cont`.
    #[serde(with = "micros")]
    pub resume: Duration,
    /// The VM's whole pause: from `stop` issued to `cont` returned.
    #[serde(with = "micros")]
    pub pause: Duration,
    /// Pages that changed in the epoch.
    pub dirty_pages: u64,
    /// Pages the audit found the tracker had missed (resent in this checkpoint).
    pub audit_repaired: u64,
    /// Device-state bytes.
    pub device_bytes: u64,
    /// Page bytes before encoding.
    pub page_bytes_raw: u64,
    /// Page bytes after encoding (zero, LZ4, XOR+LZ4).
    pub page_bytes_encoded: u64,
    /// Encoding and queueing the checkpoint for transmission (while the VM runs).
    #[serde(with = "micros")]
    pub transmit: Duration,
    /// From `cont` to the backup's ACK.
    #[serde(with = "micros")]
    pub ack_latency: Duration,
    /// From closing the epoch's network output to releasing it: how long the epoch's
    /// packets were held.
    #[serde(with = "micros")]
    pub output_commit_delay: Duration,
}

/// A [`Duration`] as integer microseconds (saturating at `u64::MAX`).
mod micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// p50/p99/max of one quantity over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Maximum, microseconds.
    pub max_us: u64,
}

/// Summaries over the primary's window of recent epochs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// Epochs in the window.
    pub epochs: u64,
    /// The VM's pause.
    pub pause: Percentiles,
    /// Output held per epoch.
    pub output_commit_delay: Percentiles,
    /// ACK latency.
    pub ack_latency: Percentiles,
    /// Mean dirty pages per epoch.
    pub mean_dirty_pages: u64,
}

/// What `remusctl status` sees of a backup's receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The replica's state.
    pub replica: ReplicaState,
    /// The checkpoint being received.
    pub receiving: Option<u64>,
    /// Checkpoints committed in this session.
    pub committed_count: u64,
    /// Checkpoints refused in this session.
    pub refused_count: u64,
}

/// Where the replica stands (`{"state":"committed","epoch":7}`, `{"state":"empty"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "epoch", rename_all = "snake_case")]
pub enum ReplicaState {
    /// No usable checkpoint: nothing was ever received, or the first one is incomplete.
    Empty,
    /// A session has begun and its first checkpoint is being written straight into the
    /// replica: not activatable.
    Syncing,
    /// Checkpoint k is staged and being applied.
    Applying(u64),
    /// Checkpoint k is complete and activatable.
    Committed(u64),
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaState::Empty => f.write_str("empty"),
            ReplicaState::Syncing => f.write_str("first checkpoint of the session in progress"),
            ReplicaState::Applying(k) => write!(f, "applying checkpoint {k}"),
            ReplicaState::Committed(k) => write!(f, "committed checkpoint {k}"),
        }
    }
}
