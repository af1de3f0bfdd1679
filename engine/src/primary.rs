//! The primary's epoch loop: checkpoint the running VM at a fixed period and release each
//! epoch's network output only when the backup has acknowledged it.
//!
//! One epoch, as an explicit sequence of [`EpochPhase`]s:
//!
//! ```text
//! Running(k) --timer--> [AwaitingAck: the buffer holds max_closed_epochs() closed epochs]
//!   --> ClosingOutput(k) --> Stopping --> Capturing --> DiskBarrier (DISK_BARRIER(k) queued)
//!   --> SavingDevice
//!   --> Resuming  = Running(k+1): the VM runs again (speculative execution)
//!   --> Transmitting(k): encode and queue the checkpoint while the VM runs
//!   ... ACK(k) arrives (any time) --> release the output of k
//! ```
//!
//! The period is measured from epoch start, so the interval is a true fixed period and not
//! interval + checkpoint time (Xen Remus's drift). A late ACK delays the next boundary; the
//! wait is reported as `ack_wait`. An ACK that does not come within `ack_timeout`, a NACK,
//! or a failed connection ends the loop with [`PrimaryExit::BackupLost`] and a
//! [`BackupLoss`] saying which: the caller decides (release output and run unprotected if it
//! may, per the failover policy). A failure here (the VM, the output buffer, the disk, the
//! tracker) is a [`PrimaryError`] instead: in particular output the backup acknowledged but
//! the buffer could not release is [`PrimaryError::Release`], not a lost backup.
//!
//! Planned switchover ([`PrimaryHandle::hand_off`]): at the next boundary the loop takes a
//! final checkpoint and does not resume the VM; once that checkpoint and every earlier one
//! are acknowledged it releases all output, sends `HANDOFF` and `END` and returns
//! [`PrimaryExit::HandedOff`], leaving the VM stopped for the backup to resume. Without the
//! final acknowledgement within `ack_timeout` it resumes the VM and reports the backup lost:
//! a switchover either hands over a checkpoint the backup holds or leaves the VM running here.
//!
//! The first checkpoint is preceded by live pre-copy rounds: RAM is compared with a zeroed
//! shadow while the VM runs (zero pages are never sent), so the pause of the first checkpoint only
//! covers what changed during the last round. Pre-copy always uses a compare tracker: it is
//! the only method that stays correct while the guest writes (a torn copy differs from live
//! RAM and is sent again by the next round or by the stopped collect).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_stream::{EncodingChoice, PageEncoding, Record, MAX_BATCH_PAGES, PAGE_SIZE};
use remus_tracker::{
    AuditConfig, Capture, CompareTracker, DirtySet, DirtyTracker, ReplicaAudit, ScanPool, VmStopped,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::copies;
use crate::metrics::{EpochReport, EpochSummary, EpochWindow};
use crate::ports::{DiskBarrier, OutputBuffer, PortError, VmControl};
use crate::verify::{
    Phase, Step, VerifyError, VerifyProgress, VerifyReport, VerifyRequest, VerifyRun,
};
use crate::wire::{Outgoing, StreamSender, WireError};

/// The epoch of a session's first checkpoint. Epoch 0 names the state both sides start from
/// (an empty replica RAM, the base disk image), as in `blk-remus`.
pub const FIRST_EPOCH: u64 = 1;

/// Read access to the live guest RAM (the agent's mapping of QEMU's shared RAM file).
pub trait GuestMemory: Send + Sync {
    /// All of guest RAM.
    fn bytes(&self) -> &[u8];
}

impl GuestMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// How pages are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Raw pages (zero pages still elided).
    None,
    /// LZ4 per batch.
    Lz4,
    /// XOR against the previous checkpoint's copy, then LZ4 (best for small changes).
    XorLz4,
}

impl Compression {
    fn choice(self) -> EncodingChoice {
        match self {
            Compression::None => EncodingChoice::Fixed(PageEncoding::Raw),
            Compression::Lz4 => EncodingChoice::Auto { xor: false },
            Compression::XorLz4 => EncodingChoice::Auto { xor: true },
        }
    }

    fn capture(self) -> Capture {
        match self {
            Compression::XorLz4 => Capture::OldPage,
            _ => Capture::PfnsOnly,
        }
    }
}

/// Settings of one domain's primary loop.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Domain name, for logs.
    pub domain: String,
    /// Checkpoint period, measured from epoch start.
    pub interval: Duration,
    /// How long the backup may stay silent about the oldest checkpoint in flight once its
    /// TCP stops taking in new bytes (see [`ack_due`]): the ACK timeout of a fast link.
    pub ack_timeout: Duration,
    /// The longest any checkpoint's ACK is waited for, however slowly its bytes still move.
    pub ack_wait_max: Duration,
    /// Page encoding.
    pub compression: Compression,
    /// Most live pre-copy rounds before the first checkpoint.
    pub precopy_max_rounds: u32,
    /// Pre-copy stops early once a round finds at most this many changed pages.
    pub precopy_done_pages: u64,
    /// Most checkpoints in flight (unacknowledged) at once, on top of the output buffer's
    /// own limit.
    pub max_in_flight: usize,
    /// Start a disk verify this long after the last one ended (or the session began);
    /// `None`: only when asked ([`PrimaryHandle::verify`]).
    pub verify_interval: Option<Duration>,
    /// Region size and per-pause budget of verify runs (periodic and asked).
    pub verify: VerifyRequest,
}

/// What a policy reload may change while the loop runs: the period and the ACK deadlines.
/// Taken at the next epoch boundary (see [`PrimaryHandle::retune`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// See [`PrimaryConfig::interval`].
    pub interval: Duration,
    /// See [`PrimaryConfig::ack_timeout`].
    pub ack_timeout: Duration,
    /// See [`PrimaryConfig::ack_wait_max`].
    pub ack_wait_max: Duration,
}

impl PrimaryConfig {
    /// The part of this configuration a reload may change.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            interval: self.interval,
            ack_timeout: self.ack_timeout,
            ack_wait_max: self.ack_wait_max,
        }
    }

    /// Defaults for a domain: 200 ms epochs, XOR+LZ4, up to 5 pre-copy rounds.
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.to_string(),
            interval: Duration::from_millis(200),
            ack_timeout: Duration::from_secs(2),
            ack_wait_max: Duration::from_secs(120),
            compression: Compression::XorLz4,
            precopy_max_rounds: 5,
            precopy_done_pages: 256,
            max_in_flight: 2,
            verify_interval: None,
            verify: VerifyRequest::default(),
        }
    }
}

/// When the ACK of a checkpoint that resumed the VM at `resumed_at` is overdue: `timeout`
/// after the later of that moment and the stream's last progress towards the backup
/// (`last_progress`: its TCP acknowledged new bytes, [`crate::wire::DeliveryProbe`]), and
/// never later than `wait_max` after `resumed_at`.
///
/// Why: a fixed deadline from the checkpoint tore protection down whenever a large
/// checkpoint (the first one is the whole guest) met a slow link, again and again. A
/// checkpoint whose bytes the backup is still taking in is not lost; a backup that is gone
/// or cut off acknowledges nothing (however much the local socket buffer still absorbs),
/// and then `timeout` runs. Small checkpoints are taken in at once, so on a fast link this
/// is `resumed_at + timeout`, as before.
pub fn ack_due(
    resumed_at: Instant,
    last_progress: Instant,
    timeout: Duration,
    wait_max: Duration,
) -> Instant {
    (resumed_at.max(last_progress) + timeout).min(resumed_at + wait_max.max(timeout))
}

/// Where the epoch loop is now (reported through [`PrimaryStatus`]).
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

/// What the daemon and `remusctl status` see of a primary loop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrimaryStatus {
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
    /// The disk verify in progress.
    #[serde(default)]
    pub verify: Option<VerifyProgress>,
    /// The last disk verify that finished in this session.
    #[serde(default)]
    pub last_verify: Option<VerifyReport>,
    /// Whether the backup said it answers verify requests (`None` before its first ACK).
    #[serde(default)]
    pub peer_can_verify: Option<bool>,
}

/// A reply from the backup, as the primary's reader task delivers it.
#[derive(Clone, Debug)]
pub enum Reply {
    /// The backup holds checkpoint `epoch` durably.
    Ack(u64),
    /// The backup refused checkpoint `epoch`.
    Nack {
        /// The refused checkpoint.
        epoch: u64,
        /// Why, as the backup said it (text from the wire).
        reason: String,
    },
    /// The backup's verdict on one `DISK_VERIFY`.
    Verified(remus_stream::DiskVerifyResult),
    /// What the backup can answer (its first record, before any ACK).
    Capabilities(crate::disk::Capabilities),
    /// The reply stream ended; nothing follows. Shared so the reply stays cloneable.
    Lost(Arc<RepliesEnded>),
}

impl Reply {
    /// The last reply of a stream that ended for `why`.
    pub fn lost(why: RepliesEnded) -> Self {
        Reply::Lost(Arc::new(why))
    }
}

impl PartialEq for Reply {
    /// Replies are equal when they say the same thing; two losses when they read the same
    /// (a stream error has no equality of its own).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Reply::Ack(a), Reply::Ack(b)) => a == b,
            (
                Reply::Nack { epoch, reason },
                Reply::Nack {
                    epoch: e,
                    reason: r,
                },
            ) => epoch == e && reason == r,
            (Reply::Lost(a), Reply::Lost(b)) => a.to_string() == b.to_string(),
            (Reply::Verified(a), Reply::Verified(b)) => a == b,
            (Reply::Capabilities(a), Reply::Capabilities(b)) => a == b,
            _ => false,
        }
    }
}

/// Why the backup's reply stream ended.
#[derive(Debug, Error)]
pub enum RepliesEnded {
    /// The backup's reply header names another replication session.
    #[error("the backup answered for session {got:#x}, this is {expected:#x}")]
    WrongSession {
        /// The session the backup answered for.
        got: u64,
        /// This session.
        expected: u64,
    },
    /// The backup sent `END` on its reply stream.
    #[error("the backup ended the session")]
    Ended,
    /// The backup closed the reply stream after its `END`.
    #[error("the backup closed the session")]
    Closed,
    /// Reading the reply stream failed.
    #[error("reply stream: {0}")]
    Stream(#[source] WireError),
}

/// Why the primary considers its backup lost: the `reason` of [`PrimaryExit::BackupLost`].
/// Each is about the link or the backup's answers; a local failure (the VM, the output
/// buffer, the disk, the tracker) is a [`PrimaryError`] instead.
#[derive(Debug, Error)]
pub enum BackupLoss {
    /// Queueing a record for the backup failed: the replication stream is gone.
    #[error("sending {what} to the backup: {source}")]
    Send {
        /// The record or batch, e.g. "PAGE_DATA of epoch 4".
        what: String,
        /// Why the stream is gone.
        source: WireError,
    },
    /// The reply stream from the backup ended.
    #[error("{0}")]
    Replies(#[source] Arc<RepliesEnded>),
    /// The reply channel closed without a last reply (its reader task ended).
    #[error("the backup's reply channel closed: {0}")]
    RepliesClosed(#[source] WireError),
    /// The backup refused a checkpoint (`NACK`).
    #[error("the backup refused checkpoint {epoch}: {reason}")]
    Refused {
        /// The refused checkpoint.
        epoch: u64,
        /// The backup's reason, as sent.
        reason: String,
    },
    /// The agent declared the backup lost (its heartbeats and its replication traffic
    /// stopped for the detection timeout) before the ACK timeout ran out.
    #[error("the agent declared the backup lost: its heartbeats and replication traffic stopped")]
    Abandoned,
    /// A checkpoint's acknowledgement did not come in time ([`ack_due`]).
    #[error("no acknowledgement of checkpoint {epoch} after {timeout:?} (the backup took in no new bytes for ack_timeout, or ack_wait_max was reached)")]
    AckTimeout {
        /// The checkpoint waited for.
        epoch: u64,
        /// How long it was waited for.
        timeout: Duration,
    },
    /// An acknowledgement arrived with no checkpoint in flight.
    #[error("the backup acknowledged checkpoint {epoch}, but none is in flight")]
    AckUnexpected {
        /// The acknowledged epoch.
        epoch: u64,
    },
    /// An acknowledgement arrived out of order.
    #[error("the backup acknowledged checkpoint {epoch}, expected {expected}")]
    AckOutOfOrder {
        /// The acknowledged epoch.
        epoch: u64,
        /// The oldest checkpoint in flight.
        expected: u64,
    },
    /// The initial disk synchronisation failed.
    #[error("initial disk synchronisation: {0}")]
    InitialSync(#[source] PortError),
    /// The initial disk synchronisation ended without saying whether it completed.
    #[error("initial disk synchronisation was abandoned")]
    InitialSyncAbandoned,
    /// A planned switchover's final checkpoint was not the last one acknowledged.
    #[error("the final checkpoint {epoch} was not acknowledged (last: {last_acked:?})")]
    FinalNotAcked {
        /// The final checkpoint.
        epoch: u64,
        /// The last acknowledged one.
        last_acked: Option<u64>,
    },
    /// A planned switchover was given up (the VM was resumed here).
    #[error("switchover at checkpoint {epoch} abandoned: {source}")]
    SwitchoverAbandoned {
        /// The final checkpoint that was not handed over.
        epoch: u64,
        /// Why.
        source: Box<BackupLoss>,
    },
}

/// Why the loop ended.
#[derive(Debug)]
pub enum PrimaryExit {
    /// Shutdown was requested; every sent checkpoint was acknowledged or abandoned.
    Shutdown {
        /// Last acknowledged checkpoint.
        last_acked: Option<u64>,
    },
    /// Planned switchover done: checkpoint `epoch` is final and acknowledged, the VM is
    /// **stopped** at it (and stays stopped: the backup resumes it), all output of the VM is
    /// released, and `HANDOFF(epoch)` then `END` were queued on the stream.
    HandedOff {
        /// The final checkpoint.
        epoch: u64,
    },
    /// The backup stopped acknowledging: protection is lost. Output of unacknowledged
    /// epochs is still held. (Also the result of a hand-off whose final checkpoint was not
    /// acknowledged in time: the VM was resumed here and nothing was handed over.)
    BackupLost {
        /// What happened.
        reason: BackupLoss,
        /// Last acknowledged checkpoint.
        last_acked: Option<u64>,
    },
}

/// Errors that end the loop other than losing the backup: the VM or a host facility failed.
#[derive(Debug, Error)]
pub enum PrimaryError {
    /// A side effect failed.
    #[error("domain {domain}: epoch {epoch}: {source}")]
    Port {
        domain: String,
        epoch: u64,
        source: PortError,
    },
    /// The tracker failed.
    #[error("domain {domain}: epoch {epoch}: {source}")]
    Tracker {
        domain: String,
        epoch: u64,
        source: remus_tracker::TrackerError,
    },
    /// A pre-copy round's tracker failed.
    #[error("domain {domain}: pre-copy round {round}: {source}")]
    PreCopy {
        domain: String,
        round: u32,
        source: remus_tracker::TrackerError,
    },
    /// Guest RAM and the shadow disagree in size (the VM was reconfigured underneath).
    #[error("domain {domain}: guest RAM is {live} bytes, the shadow {shadow}")]
    RamSize {
        domain: String,
        live: usize,
        shadow: usize,
    },
    /// The page-scan thread could not be started, or stopped (a bug: a job panicked).
    #[error("domain {domain}: page-scan thread: {source}")]
    ScanThread {
        domain: String,
        source: std::io::Error,
    },
    /// The backup acknowledged epoch `epoch`, but its network output could not be released:
    /// the buffer holds output a client may be waiting for, so protection cannot go on.
    #[error("domain {domain}: releasing the output of acknowledged epoch {epoch}: {source}")]
    Release {
        domain: String,
        epoch: u64,
        source: PortError,
    },
}

/// Why a step of the loop could not go on: the backup is lost (reported as
/// [`PrimaryExit::BackupLost`]; the caller decides), or a local failure ends the loop.
#[derive(Debug)]
enum Halt {
    Lost(BackupLoss),
    Fatal(PrimaryError),
}

impl From<BackupLoss> for Halt {
    fn from(reason: BackupLoss) -> Self {
        Halt::Lost(reason)
    }
}

impl From<PrimaryError> for Halt {
    fn from(e: PrimaryError) -> Self {
        Halt::Fatal(e)
    }
}

/// Whether a checkpoint resumes the VM (every one but a hand-off's final checkpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    Yes,
    No,
}

struct InFlight {
    epoch: u64,
    closed_at: Instant,
    resumed_at: Instant,
    report: EpochReport,
    sent: Option<oneshot::Receiver<crate::wire::SentStats>>,
}

/// The primary side of one protected domain.
pub struct Primary {
    cfg: PrimaryConfig,
    vm: Box<dyn VmControl>,
    net: Box<dyn OutputBuffer>,
    disk: Box<dyn DiskBarrier>,
    /// The thread that owns the page scan's state (trackers, audit, shadow, dirty set).
    scan: ScanThread,
    out: StreamSender,
    replies: mpsc::Receiver<Reply>,
    status: watch::Sender<PrimaryStatus>,
    shutdown: watch::Receiver<bool>,
    /// Turns `true` when the caller asks for a planned switchover (see [`PrimaryHandle::hand_off`]).
    handoff: watch::Receiver<bool>,
    /// New period and deadlines from a policy reload, taken at the next epoch boundary.
    tuning: watch::Receiver<Tuning>,
    /// Turns `true` when the agent declares the backup lost (see
    /// [`PrimaryHandle::abandon_backup`]).
    abandon: watch::Receiver<bool>,
    in_flight: VecDeque<InFlight>,
    window: EpochWindow,
    last_acked: Option<u64>,
    precopy_pages: Vec<u64>,
    initial_sync: Option<oneshot::Receiver<Result<(), PortError>>>,
    /// Verify requests from the handle.
    verify_rx: mpsc::Receiver<VerifyJob>,
    /// The verify run in progress, and who waits for its report (none for a periodic one).
    verify: Option<(VerifyRun, Option<VerifyReply>)>,
    /// Whether the backup answers verify requests; `None` until its first ACK.
    peer_can_verify: Option<bool>,
    /// Verify runs started in this session (the next run's number).
    verify_runs: u32,
    /// When the policy's next periodic verify is due.
    next_periodic_verify: Option<Instant>,
}

/// Where a verify's report goes.
pub type VerifyReply = oneshot::Sender<Result<VerifyReport, VerifyError>>;
/// A verify request with its reply.
type VerifyJob = (VerifyRequest, VerifyReply);

/// Handles the caller keeps: status, shutdown and hand-off.
pub struct PrimaryHandle {
    /// Latest status.
    pub status: watch::Receiver<PrimaryStatus>,
    /// Send `true` to stop the loop at the next boundary.
    pub shutdown: watch::Sender<bool>,
    /// Send `true` (or call [`hand_off`](Self::hand_off)) for a planned switchover.
    pub handoff: watch::Sender<bool>,
    /// See [`retune`](Self::retune).
    pub tuning: watch::Sender<Tuning>,
    /// See [`abandon_backup`](Self::abandon_backup).
    pub abandon: watch::Sender<bool>,
    /// See [`verify`](Self::verify).
    pub verify: mpsc::Sender<(VerifyRequest, VerifyReply)>,
}

impl PrimaryHandle {
    /// The agent's failure detector declared the backup lost: the loop stops waiting for
    /// ACKs that will not come and returns [`PrimaryExit::BackupLost`] at once (from any
    /// wait for a reply or a boundary, never in the middle of a checkpoint), output held as
    /// after an ACK timeout.
    pub fn abandon_backup(&self) {
        self.abandon.send_replace(true);
    }

    /// A policy reload: the loop takes the new period and ACK deadlines at its next epoch
    /// boundary (the epoch in progress keeps the ones it started with).
    pub fn retune(&self, t: Tuning) {
        self.tuning.send_if_modified(|cur| {
            let changed = *cur != t;
            *cur = t;
            changed
        });
    }

    /// Asks for a planned switchover. At the next epoch boundary the loop takes a final
    /// checkpoint and leaves the VM stopped, waits (up to `ack_timeout`) for the
    /// acknowledgement of it and of everything in flight, releases all held output, sends
    /// `HANDOFF` and `END`, and returns [`PrimaryExit::HandedOff`]. If the final
    /// acknowledgement does not come in time, it resumes the VM and returns
    /// [`PrimaryExit::BackupLost`] as any lost backup (the VM keeps running here).
    pub fn hand_off(&self) {
        self.handoff.send_replace(true);
    }

    /// Asks for an online disk verify (see [`crate::verify`]); the report (or why there is
    /// none) arrives on the returned channel. Refused at the next epoch boundary when a run
    /// is in progress or the backup cannot answer; the channel closes without a report if
    /// protection ends first.
    pub fn start_verify(
        &self,
        req: VerifyRequest,
    ) -> oneshot::Receiver<Result<VerifyReport, VerifyError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(
            mpsc::error::TrySendError::Full((_, tx)) | mpsc::error::TrySendError::Closed((_, tx)),
        ) = self.verify.try_send((req, tx))
        {
            let _ = tx.send(Err(VerifyError::Ended(
                "the epoch loop does not take verify requests now".into(),
            )));
        }
        rx
    }
}

/// Everything a primary loop is built from.
pub struct PrimaryParts {
    /// The VM.
    pub vm: Box<dyn VmControl>,
    /// The network egress buffer.
    pub net: Box<dyn OutputBuffer>,
    /// The disk replication barrier.
    pub disk: Box<dyn DiskBarrier>,
    /// Live guest RAM.
    pub memory: Arc<dyn GuestMemory>,
    /// The dirty-page tracker for stopped collects.
    pub tracker: Box<dyn DirtyTracker>,
    /// Threads for page scanning (shared with the tracker).
    pub pool: Arc<ScanPool>,
    /// The stream to the backup.
    pub out: StreamSender,
    /// Replies from the backup.
    pub replies: mpsc::Receiver<Reply>,
    /// Completes when the initial disk synchronisation has handed every region to the
    /// stream; pre-copy goes on until then, so the first checkpoint commits memory and disk
    /// together. `None` when there is nothing to wait for.
    pub initial_sync: Option<oneshot::Receiver<Result<(), PortError>>>,
}

impl Primary {
    /// Builds the loop and starts its page-scan thread; nothing else runs until
    /// [`run`](Self::run).
    ///
    /// # Errors
    /// [`PrimaryError::ScanThread`]: the scan thread cannot be started.
    pub fn new(
        cfg: PrimaryConfig,
        parts: PrimaryParts,
    ) -> Result<(Self, PrimaryHandle), PrimaryError> {
        let len = parts.memory.bytes().len();
        let (status_tx, status_rx) = watch::channel(PrimaryStatus {
            phase: EpochPhase::Idle,
            last_acked: None,
            in_flight: 0,
            last: None,
            summary: EpochSummary::default(),
            precopy_pages: Vec::new(),
            tracker: parts.tracker.kind().as_str().to_string(),
            audit_repaired_total: 0,
            verify: None,
            last_verify: None,
            peer_can_verify: None,
        });
        let (verify_tx, verify_rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (handoff_tx, handoff_rx) = watch::channel(false);
        let (tuning_tx, tuning_rx) = watch::channel(cfg.tuning());
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let capture = cfg.compression.capture();
        let mut shadow = vec![0u8; len];
        // Fault every page in now: a first write into fresh zero pages inside the stop
        // window costs a fault each (and cross-CPU TLB flushes).
        remus_tracker::prefault(&mut shadow);
        let scan = Scan {
            memory: parts.memory,
            tracker: parts.tracker,
            precopy: CompareTracker::new(parts.pool.clone()),
            audit: ReplicaAudit::new(len, AuditConfig::default(), parts.pool),
            shadow,
            dirty: DirtySet::new(capture),
        };
        let scan =
            ScanThread::start(scan, &cfg.domain).map_err(|source| PrimaryError::ScanThread {
                domain: cfg.domain.clone(),
                source,
            })?;
        let p = Self {
            vm: parts.vm,
            net: parts.net,
            disk: parts.disk,
            scan,
            out: parts.out,
            replies: parts.replies,
            status: status_tx,
            shutdown: stop_rx,
            handoff: handoff_rx,
            tuning: tuning_rx,
            abandon: abandon_rx,
            in_flight: VecDeque::new(),
            window: EpochWindow::default(),
            last_acked: None,
            precopy_pages: Vec::new(),
            initial_sync: parts.initial_sync,
            verify_rx,
            verify: None,
            peer_can_verify: None,
            verify_runs: 0,
            next_periodic_verify: cfg.verify_interval.map(|i| Instant::now() + i),
            cfg,
        };
        Ok((
            p,
            PrimaryHandle {
                status: status_rx,
                shutdown: stop_tx,
                handoff: handoff_tx,
                tuning: tuning_tx,
                abandon: abandon_tx,
                verify: verify_tx,
            },
        ))
    }

    fn set_phase(&self, phase: EpochPhase) {
        self.status.send_modify(|s| {
            s.phase = phase;
            s.in_flight = self.in_flight.len();
            s.last_acked = self.last_acked;
        });
    }

    fn port(&self, epoch: u64) -> impl FnOnce(PortError) -> PrimaryError + '_ {
        move |source| PrimaryError::Port {
            domain: self.cfg.domain.clone(),
            epoch,
            source,
        }
    }

    /// Runs pre-copy, the first checkpoint, then one checkpoint per interval until shutdown
    /// or until the backup is lost.
    ///
    /// # Errors
    /// A failure of the VM, the output buffer, the disk or the tracker. Losing the backup is
    /// not an error but an [`PrimaryExit`].
    pub async fn run(mut self) -> Result<PrimaryExit, PrimaryError> {
        let domain = self.cfg.domain.clone();
        let exit = self
            .run_inner()
            .instrument(info_span!("primary", domain = %domain))
            .await;
        if let Some((run, reply)) = self.verify.take() {
            let why = match &exit {
                Ok(PrimaryExit::BackupLost { reason, .. }) => format!("backup lost: {reason}"),
                Ok(_) => "the session ended".to_string(),
                Err(e) => e.to_string(),
            };
            info!(run = run.run, %why, "disk verify abandoned");
            if let Some(reply) = reply {
                let _ = reply.send(Err(VerifyError::Ended(why)));
            }
        }
        while let Ok((_, reply)) = self.verify_rx.try_recv() {
            let _ = reply.send(Err(VerifyError::Ended("the session ended".into())));
        }
        self.set_phase(EpochPhase::Ended);
        exit
    }

    /// The exit for a loop stopped by `halt`.
    fn halted(&self, halt: Halt) -> Result<PrimaryExit, PrimaryError> {
        match halt {
            Halt::Lost(reason) => Ok(self.lost(reason)),
            Halt::Fatal(e) => Err(e),
        }
    }

    async fn run_inner(&mut self) -> Result<PrimaryExit, PrimaryError> {
        if let Err(halt) = self.precopy().await {
            return self.halted(halt);
        }
        let mut epoch = FIRST_EPOCH;
        loop {
            self.take_tuning();
            self.poll_verify();
            let started = Instant::now();
            let ack_wait = match self.make_room(epoch).await {
                Ok(Some(w)) => w,
                Ok(None) => {
                    return Ok(PrimaryExit::Shutdown {
                        last_acked: self.last_acked,
                    })
                }
                Err(halt) => return self.halted(halt),
            };
            if *self.handoff.borrow() {
                return self.hand_off(epoch, ack_wait).await;
            }
            if let Err(halt) = self
                .checkpoint(epoch, ack_wait, Resume::Yes)
                .instrument(info_span!("epoch", epoch))
                .await
            {
                return self.halted(halt);
            }
            epoch += 1;
            self.set_phase(EpochPhase::Running { epoch });
            match self.wait_until(started + self.cfg.interval).await {
                Ok(true) => {}
                Ok(false) => return self.finish().await,
                Err(halt) => return self.halted(halt),
            }
        }
    }

    /// The planned switchover: the final checkpoint `epoch` without resuming the VM, then
    /// every acknowledgement, then `HANDOFF` + `END`. Any failure to get the final
    /// acknowledgement resumes the VM here (nothing is lost: the primary keeps running it).
    async fn hand_off(
        &mut self,
        epoch: u64,
        ack_wait: Duration,
    ) -> Result<PrimaryExit, PrimaryError> {
        info!(domain = %self.cfg.domain, epoch, "planned switchover: taking the final checkpoint");
        let taken = self
            .checkpoint(epoch, ack_wait, Resume::No)
            .instrument(info_span!("epoch", epoch, final_checkpoint = true))
            .await;
        let acked = match taken {
            Ok(()) => self.drain_for_hand_off(epoch).await,
            Err(halt) => Err(halt),
        };
        match acked {
            Ok(()) => {}
            Err(Halt::Fatal(fatal)) => {
                // The VM may be stopped; try to give it back before reporting the failure.
                if let Err(e) = self.vm.cont().await {
                    warn!(domain = %self.cfg.domain, error = %e, "resuming the VM after a failed final checkpoint");
                }
                return Err(fatal);
            }
            Err(Halt::Lost(reason)) => {
                self.set_phase(EpochPhase::Resuming { epoch });
                self.vm.cont().await.map_err(self.port(epoch))?;
                warn!(domain = %self.cfg.domain, epoch, %reason, "switchover abandoned; the VM runs on here");
                return Ok(self.lost(BackupLoss::SwitchoverAbandoned {
                    epoch,
                    source: Box::new(reason),
                }));
            }
        }
        // Checkpoint `epoch` is the VM's whole state, including output it produced after
        // `close_epoch` and before it stopped: the backup holds it, so nothing stays held.
        self.net.release_all().await.map_err(self.port(epoch))?;
        let _ = self
            .out
            .send(Outgoing::Record(Record::HandOff { epoch }))
            .await;
        let _ = self.out.send(Outgoing::Record(Record::End)).await;
        info!(domain = %self.cfg.domain, epoch, "handed off; the VM stays stopped here");
        Ok(PrimaryExit::HandedOff { epoch })
    }

    /// Waits for the acknowledgement of every checkpoint in flight (the final one last),
    /// each within `ack_timeout` of its transmission. Shutdown requests are not looked at:
    /// the switchover either completes or is abandoned within that bound.
    async fn drain_for_hand_off(&mut self, epoch: u64) -> Result<(), Halt> {
        self.set_phase(EpochPhase::HandingOff { epoch });
        while let Some(front) = self.in_flight.front() {
            let deadline = self.ack_due(front.resumed_at);
            let (waiting, resumed_at) = (front.epoch, front.resumed_at);
            tokio::select! {
                r = self.replies.recv() => self.handle_reply(r).await?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    // Bytes may have moved meanwhile: overdue only by the current rule.
                    if Instant::now() >= self.ack_due(resumed_at) {
                        return Err(BackupLoss::AckTimeout {
                            epoch: waiting,
                            timeout: resumed_at.elapsed(),
                        }
                        .into());
                    }
                }
            }
        }
        if self.last_acked != Some(epoch) {
            return Err(BackupLoss::FinalNotAcked {
                epoch,
                last_acked: self.last_acked,
            }
            .into());
        }
        Ok(())
    }

    /// Takes a reload's new period and deadlines, if any came (at an epoch boundary).
    fn take_tuning(&mut self) {
        if !self.tuning.has_changed().unwrap_or(false) {
            return;
        }
        let t = *self.tuning.borrow_and_update();
        info!(
            domain = %self.cfg.domain,
            interval_ms = t.interval.as_millis() as u64,
            ack_timeout_ms = t.ack_timeout.as_millis() as u64,
            ack_wait_max_ms = t.ack_wait_max.as_millis() as u64,
            "policy reload: new period and ACK deadlines from this epoch on"
        );
        self.cfg.interval = t.interval;
        self.cfg.ack_timeout = t.ack_timeout;
        self.cfg.ack_wait_max = t.ack_wait_max;
    }

    /// When the ACK of the checkpoint that resumed the VM at `resumed_at` is overdue now.
    fn ack_due(&self, resumed_at: Instant) -> Instant {
        ack_due(
            resumed_at,
            self.out.last_progress(),
            self.cfg.ack_timeout,
            self.cfg.ack_wait_max,
        )
    }

    fn lost(&self, reason: BackupLoss) -> PrimaryExit {
        warn!(domain = %self.cfg.domain, %reason, last_acked = ?self.last_acked, "backup lost");
        PrimaryExit::BackupLost {
            reason,
            last_acked: self.last_acked,
        }
    }

    /// Graceful end: wait (bounded) for the checkpoints in flight, then say END. A lost
    /// backup only ends the wait; output that cannot be released is still an error.
    async fn finish(&mut self) -> Result<PrimaryExit, PrimaryError> {
        let deadline = Instant::now() + self.cfg.ack_timeout;
        let mut failed = None;
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            match self.wait_reply(deadline).await {
                Ok(()) => {}
                Err(Halt::Lost(_)) => break,
                Err(Halt::Fatal(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let _ = self.out.send(Outgoing::Record(Record::End)).await;
        match failed {
            Some(e) => Err(e),
            None => Ok(PrimaryExit::Shutdown {
                last_acked: self.last_acked,
            }),
        }
    }

    /// Live pre-copy rounds, sending pages of the first checkpoint while the VM runs.
    async fn precopy(&mut self) -> Result<(), Halt> {
        self.send(Outgoing::Record(Record::CheckpointBegin {
            epoch: FIRST_EPOCH,
        }))
        .await?;
        for round in 1..=self.cfg.precopy_max_rounds {
            self.set_phase(EpochPhase::PreCopy { round });
            let dirty_pages = self.precopy_round(round).await?;
            self.precopy_pages.push(dirty_pages);
            self.transmit_pages(FIRST_EPOCH).await?;
            if dirty_pages <= self.cfg.precopy_done_pages {
                break;
            }
        }
        // The disk must be in the stream before the first checkpoint closes; keep the
        // memory copy fresh (one compare round per interval) while it is not.
        if let Some(mut rx) = self.initial_sync.take() {
            let mut round = self.precopy_pages.len() as u32;
            loop {
                let next = tokio::time::sleep(self.cfg.interval);
                tokio::select! {
                    r = &mut rx => {
                        r.map_err(|_| BackupLoss::InitialSyncAbandoned)?
                            .map_err(BackupLoss::InitialSync)?;
                        break;
                    }
                    _ = next => {}
                }
                round += 1;
                self.set_phase(EpochPhase::PreCopy { round });
                let stats = self.precopy_round(round).await?;
                self.precopy_pages.push(stats);
                self.transmit_pages(FIRST_EPOCH).await?;
            }
        }
        let pages = self.precopy_pages.clone();
        self.status.send_modify(|s| s.precopy_pages = pages);
        Ok(())
    }

    /// One live compare round; returns the pages found changed (now in the dirty set).
    async fn precopy_round(&mut self, round: u32) -> Result<u64, Halt> {
        let stats = self
            .scan
            .run(Scan::precopy_round)
            .await
            .ok_or_else(|| self.scan_gone())?
            .map_err(|source| PrimaryError::PreCopy {
                domain: self.cfg.domain.clone(),
                round,
                source,
            })?;
        debug!(round, pages = stats.pages_dirty, "pre-copy round");
        Ok(stats.pages_dirty)
    }

    /// The error for a scan thread that is gone (it panicked: a bug).
    fn scan_gone(&self) -> PrimaryError {
        PrimaryError::ScanThread {
            domain: self.cfg.domain.clone(),
            source: std::io::Error::other("the page-scan thread stopped (it panicked)"),
        }
    }

    /// Waits until the output buffer and the in-flight limit allow closing another epoch.
    /// Returns the time waited, or `None` on shutdown.
    async fn make_room(&mut self, epoch: u64) -> Result<Option<Duration>, Halt> {
        let start = Instant::now();
        let limit = self
            .net
            .max_closed_epochs()
            .min(self.cfg.max_in_flight)
            .max(1);
        while self.in_flight.len() >= limit {
            let oldest = self.in_flight.front().map_or(epoch, |f| f.epoch);
            self.set_phase(EpochPhase::AwaitingAck { epoch: oldest });
            let Some(oldest_sent) = self.in_flight.front().map(|f| f.resumed_at) else {
                break;
            };
            let deadline = self.ack_due(oldest_sent);
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            self.check_abandoned()?;
            self.wait_reply(deadline).await?;
        }
        Ok(Some(start.elapsed()))
    }

    /// Processes replies until `boundary`. Returns `false` on shutdown.
    async fn wait_until(&mut self, boundary: Instant) -> Result<bool, Halt> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(false);
            }
            self.check_abandoned()?;
            let now = Instant::now();
            if now >= boundary {
                return Ok(true);
            }
            let deadline = match self.in_flight.front() {
                Some(f) => boundary.min(self.ack_due(f.resumed_at)),
                None => boundary,
            };
            if self.in_flight.is_empty() {
                let mut stop = self.shutdown.clone();
                let mut abandon = self.abandon.clone();
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = stop.changed() => {}
                    _ = abandon.changed() => {}
                    r = self.replies.recv() => self.handle_reply(r).await?,
                }
            } else {
                self.wait_reply(deadline).await?;
            }
        }
    }

    /// [`BackupLoss::Abandoned`] once the agent declared the backup lost.
    fn check_abandoned(&self) -> Result<(), Halt> {
        if *self.abandon.borrow() {
            Err(BackupLoss::Abandoned.into())
        } else {
            Ok(())
        }
    }

    /// Waits for one reply or `deadline`; an overdue ACK is an error.
    async fn wait_reply(&mut self, deadline: Instant) -> Result<(), Halt> {
        let mut stop = self.shutdown.clone();
        let mut abandon = self.abandon.clone();
        tokio::select! {
            r = self.replies.recv() => self.handle_reply(r).await,
            _ = stop.changed() => Ok(()),
            _ = abandon.changed() => self.check_abandoned(),
            _ = tokio::time::sleep_until(deadline.into()) => {
                match self.in_flight.front() {
                    Some(f) if Instant::now() >= self.ack_due(f.resumed_at) => {
                        Err(BackupLoss::AckTimeout {
                            epoch: f.epoch,
                            timeout: f.resumed_at.elapsed(),
                        }
                        .into())
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    async fn handle_reply(&mut self, reply: Option<Reply>) -> Result<(), Halt> {
        match reply {
            None => Err(BackupLoss::RepliesClosed(self.out.gone()).into()),
            Some(Reply::Lost(why)) => Err(BackupLoss::Replies(why).into()),
            Some(Reply::Nack { epoch, reason }) => {
                Err(BackupLoss::Refused { epoch, reason }.into())
            }
            Some(Reply::Capabilities(c)) => {
                self.peer_can_verify = Some(c.disk_verify >= 1);
                self.publish_verify();
                Ok(())
            }
            Some(Reply::Verified(r)) => {
                if let Some((run, _)) = self.verify.as_mut() {
                    if run.verdict(&r) == Step::Done {
                        self.finish_verify(Ok(()));
                    } else {
                        self.publish_verify();
                    }
                }
                Ok(())
            }
            Some(Reply::Ack(epoch)) => {
                if self.peer_can_verify.is_none() {
                    // Announced before any ACK by a backup that can: this one cannot.
                    self.peer_can_verify = Some(false);
                }
                self.verify_acked(epoch);
                let mut f = match self.in_flight.pop_front() {
                    Some(f) if f.epoch == epoch => f,
                    Some(f) => {
                        let expected = f.epoch;
                        self.in_flight.push_front(f);
                        return Err(BackupLoss::AckOutOfOrder { epoch, expected }.into());
                    }
                    None => return Err(BackupLoss::AckUnexpected { epoch }.into()),
                };
                self.disk.acknowledged(epoch);
                self.net
                    .release(epoch)
                    .await
                    .map_err(|source| PrimaryError::Release {
                        domain: self.cfg.domain.clone(),
                        epoch,
                        source,
                    })?;
                let now = Instant::now();
                f.report.output_commit_delay = now - f.closed_at;
                f.report.ack_latency = now - f.resumed_at;
                if let Some(rx) = f.sent.take() {
                    if let Ok(s) = rx.await {
                        f.report.page_bytes_raw = s.page_bytes_raw;
                        f.report.page_bytes_encoded = s.page_bytes_encoded;
                    }
                }
                self.last_acked = Some(epoch);
                // Debug, not info: at 200 ms epochs an info line each would be 432,000 lines
                // a day per domain; status and metrics carry the same figures.
                debug!(
                    epoch,
                    pause_us = f.report.pause.as_micros() as u64,
                    dirty = f.report.dirty_pages,
                    sent_bytes = f.report.page_bytes_encoded,
                    ack_us = f.report.ack_latency.as_micros() as u64,
                    held_us = f.report.output_commit_delay.as_micros() as u64,
                    "checkpoint acknowledged, output released"
                );
                self.window.push(f.report.clone());
                let summary = self.window.summary();
                let last = f.report;
                let repaired = last.audit_repaired;
                self.status.send_modify(|s| {
                    s.audit_repaired_total += repaired;
                    s.last = Some(last);
                    s.summary = summary;
                    s.last_acked = Some(epoch);
                });
                Ok(())
            }
        }
    }

    /// Takes verify requests (at an epoch boundary) and starts the policy's periodic run
    /// when it is due.
    fn poll_verify(&mut self) {
        while let Ok((req, reply)) = self.verify_rx.try_recv() {
            if let Some((run, _)) = &self.verify {
                let _ = reply.send(Err(VerifyError::Busy(run.run)));
                continue;
            }
            self.start_verify(req, Some(reply));
        }
        let due = self
            .next_periodic_verify
            .is_some_and(|at| Instant::now() >= at);
        if due && self.verify.is_none() && self.peer_can_verify == Some(true) {
            let req = VerifyRequest {
                periodic: true,
                resync: false,
                ..self.cfg.verify
            };
            self.start_verify(req, None);
        }
        if let Some((run, _)) = self.verify.as_mut() {
            if run.phase == Phase::Waiting {
                match self.peer_can_verify {
                    Some(true) => run.phase = Phase::Hashing,
                    Some(false) => self.finish_verify(Err(VerifyError::PeerCannotVerify)),
                    None => {}
                }
            }
        }
        self.publish_verify();
    }

    fn start_verify(&mut self, req: VerifyRequest, reply: Option<VerifyReply>) {
        if self.peer_can_verify == Some(false) {
            if let Some(reply) = reply {
                let _ = reply.send(Err(VerifyError::PeerCannotVerify));
            }
            return;
        }
        let sizes = self.disk.verify_sizes();
        if sizes.iter().all(|&s| s == 0) {
            if let Some(reply) = reply {
                let _ = reply.send(Err(VerifyError::NoDisks));
            }
            return;
        }
        self.verify_runs += 1;
        let req = VerifyRequest {
            region_bytes: req
                .region_bytes
                .clamp(4096, remus_stream::MAX_VERIFY_REGION),
            bytes_per_epoch: req.bytes_per_epoch.max(1),
            ..req
        };
        let run = VerifyRun::new(self.verify_runs, req, &sizes);
        info!(
            run = run.run,
            resync = req.resync,
            periodic = req.periodic,
            regions = run.progress().regions_total,
            "disk verify starts"
        );
        self.verify = Some((run, reply));
    }

    /// Ends the run: its report (or `err`) to whoever waits, and into the status.
    fn finish_verify(&mut self, result: Result<(), VerifyError>) {
        let Some((run, reply)) = self.verify.take() else {
            return;
        };
        let result = result.map(|()| run.report());
        match &result {
            Ok(r) if r.clean() => info!(
                run = r.run,
                regions = r.regions_checked,
                bytes = r.bytes_hashed,
                ms = r.elapsed.as_millis() as u64,
                "disk verify: the replica equals the primary"
            ),
            Ok(r) => warn!(
                run = r.run,
                differing = r.differing_count,
                not_compared = r.not_compared.len(),
                resynced = r.resynced.is_some(),
                "disk verify: the replica differs from the primary"
            ),
            Err(e) => warn!(run = run.run, error = %e, "disk verify failed"),
        }
        if let Ok(r) = &result {
            let r = r.clone();
            self.status.send_modify(|s| s.last_verify = Some(r));
        }
        if run.periodic() || result.is_ok() {
            self.next_periodic_verify = self.cfg.verify_interval.map(|i| Instant::now() + i);
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        self.publish_verify();
    }

    fn publish_verify(&self) {
        let progress = self.verify.as_ref().map(|(run, _)| run.progress());
        let peer = self.peer_can_verify;
        self.status.send_if_modified(|s| {
            let changed = s.verify != progress || s.peer_can_verify != peer;
            s.verify = progress;
            s.peer_can_verify = peer;
            changed
        });
    }

    fn verify_acked(&mut self, epoch: u64) {
        let Some((run, _)) = self.verify.as_mut() else {
            return;
        };
        match run.acked(epoch) {
            Ok(Step::Continue) => {}
            Ok(Step::Done) => self.finish_verify(Ok(())),
            Err(e) => self.finish_verify(Err(e)),
        }
    }

    /// Queues the `DISK_VERIFY` records of a batch hashed at checkpoint `epoch`'s pause.
    async fn verify_sent(
        &mut self,
        epoch: u64,
        batch: &[remus_stream::VerifyRegion],
        digests: Result<Vec<[u8; 16]>, PortError>,
        took: Duration,
        added: Duration,
    ) {
        let digests = match digests {
            Ok(d) if d.len() == batch.len() => d,
            Ok(d) => {
                let e = PortError::new(
                    "disks",
                    "digest",
                    format!("{} digests for {} regions", d.len(), batch.len()),
                );
                return self.finish_verify(Err(VerifyError::Port(e)));
            }
            Err(e) => return self.finish_verify(Err(VerifyError::Port(e))),
        };
        let run_id = match self.verify.as_mut() {
            Some((run, _)) => {
                run.sent(epoch, batch, took, added);
                run.run
            }
            None => return,
        };
        for (region, d) in batch.iter().zip(digests) {
            let mut digest = [0u8; 32];
            digest[..16].copy_from_slice(&d);
            let rec = Record::DiskVerify(remus_stream::DiskVerify {
                epoch,
                run: run_id,
                region: *region,
                algorithm: remus_stream::DigestAlgorithm::Xxh3_128,
                digest,
            });
            // A failed send is the lost stream, which the checkpoint's own sends report.
            if self.send(Outgoing::Record(rec)).await.is_err() {
                return;
            }
        }
        self.publish_verify();
    }

    /// A resyncing run's differing regions go out again as writes of `epoch` (the VM is
    /// stopped and the barrier of `epoch` not yet taken, so they commit with it).
    async fn verify_recopy(&mut self, epoch: u64) {
        let regions = match self.verify.as_ref() {
            Some((run, _)) => run.to_recopy(),
            None => return,
        };
        if regions.is_empty() {
            return;
        }
        match self.disk.recopy(&regions).await {
            Ok(data) => {
                info!(
                    epoch,
                    regions = regions.len(),
                    data_bytes = data,
                    "disk verify: differing regions re-copied"
                );
                if let Some((run, _)) = self.verify.as_mut() {
                    run.recopied(epoch, data);
                }
                self.publish_verify();
            }
            Err(e) => self.finish_verify(Err(VerifyError::Port(e))),
        }
    }

    /// Queues `item` for the backup; a failure means the stream (so the backup) is lost.
    async fn send(&mut self, item: Outgoing) -> Result<(), BackupLoss> {
        let what = item.describe();
        self.out
            .send(item)
            .await
            .map_err(|source| BackupLoss::Send { what, source })
    }

    /// Takes checkpoint `epoch`. Fails with [`Halt::Fatal`] when the VM, the buffer, the
    /// disk or the tracker failed, with [`Halt::Lost`] when the backup was lost (after the
    /// VM was resumed: the stop window always ends).
    async fn checkpoint(
        &mut self,
        epoch: u64,
        ack_wait: Duration,
        resume: Resume,
    ) -> Result<(), Halt> {
        let mut report = EpochReport {
            epoch,
            ack_wait,
            ..Default::default()
        };
        self.set_phase(EpochPhase::ClosingOutput { epoch });
        let closed_at = Instant::now();
        self.net
            .close_epoch(epoch)
            .await
            .map_err(self.port(epoch))?;

        self.set_phase(EpochPhase::Stopping { epoch });
        let stopping_at = Instant::now();
        self.vm.stop().await.map_err(self.port(epoch))?;
        report.stop = stopping_at.elapsed();

        self.set_phase(EpochPhase::Capturing { epoch });
        let t = Instant::now();
        let (stats, repaired) = self.collect(epoch).await?;
        report.capture = t.elapsed();
        report.dirty_pages = stats.pages_dirty;
        report.audit_repaired = repaired;

        self.verify_recopy(epoch).await;
        self.set_phase(EpochPhase::DiskBarrier { epoch });
        let t = Instant::now();
        self.disk.barrier(epoch).await.map_err(self.port(epoch))?;
        // DISK_BARRIER(k) goes into the stream now, while the VM is stopped: every write of
        // epoch k is queued before it and every write of k+1 (after `cont`) after it, which
        // is the order the backup's disk needs. If the session is gone, finish the epoch's
        // stop window anyway (the VM must run again) and report the loss after `cont`.
        let barrier_sent = self.send(Outgoing::DiskBarrier(epoch)).await;
        report.disk_barrier = t.elapsed();

        self.set_phase(EpochPhase::SavingDevice { epoch });
        let t = Instant::now();
        // A verify batch is hashed while the device state is saved: the image is checkpoint
        // k's now, and the pause grows only if hashing takes longer than the save.
        let batch = match self.verify.as_mut() {
            Some((run, _)) if barrier_sent.is_ok() => run.next_batch(),
            _ => Vec::new(),
        };
        let (vm, disk) = (&mut self.vm, &mut self.disk);
        let hashing = async {
            if batch.is_empty() {
                return (Ok(Vec::new()), Duration::ZERO);
            }
            let t = Instant::now();
            (disk.digests(&batch).await, t.elapsed())
        };
        let (device, (digests, hash_took)) = tokio::join!(
            async {
                let d = vm.save_device_state().await;
                (d, t.elapsed())
            },
            hashing
        );
        let (device, save_took) = device;
        let device = device.map_err(self.port(epoch))?;
        report.device_save = t.elapsed();
        if !batch.is_empty() {
            let added = report.device_save.saturating_sub(save_took);
            self.verify_sent(epoch, &batch, digests, hash_took, added)
                .await;
        }
        report.device_bytes = device.len() as u64;

        let t = Instant::now();
        if resume == Resume::Yes {
            self.set_phase(EpochPhase::Resuming { epoch });
            self.vm.cont().await.map_err(self.port(epoch))?;
        }
        // For a final checkpoint the VM stays stopped; the ACK deadline counts from here.
        let resumed_at = Instant::now();
        report.resume = resumed_at - t;
        report.pause = resumed_at - stopping_at;
        barrier_sent?;

        self.set_phase(EpochPhase::Transmitting { epoch });
        let t = Instant::now();
        let sent = async {
            if epoch > FIRST_EPOCH {
                self.send(Outgoing::Record(Record::CheckpointBegin { epoch }))
                    .await?;
            }
            self.transmit_pages(epoch).await?;
            self.send(Outgoing::DeviceState {
                epoch,
                blob: Arc::new(device),
            })
            .await?;
            let (tx, rx) = oneshot::channel();
            self.send(Outgoing::CheckpointEnd {
                epoch,
                done: Some(tx),
            })
            .await?;
            Ok::<_, Halt>(rx)
        }
        .await;
        report.transmit = t.elapsed();
        let rx = sent?;
        self.in_flight.push_back(InFlight {
            epoch,
            closed_at,
            resumed_at,
            report,
            sent: Some(rx),
        });
        Ok(())
    }

    /// The stopped collect, on the scan thread (the tracker splits it across cores).
    /// Returns the collect's statistics and the number of pages the audit had to repair.
    async fn collect(
        &mut self,
        epoch: u64,
    ) -> Result<(remus_tracker::CollectStats, u64), PrimaryError> {
        let res = self
            .scan
            .run(Scan::collect)
            .await
            .ok_or_else(|| self.scan_gone())?;
        if let Ok((_, repaired)) = &res {
            if *repaired > 0 {
                warn!(
                    epoch,
                    repaired, "replica audit found pages the tracker missed; resending them"
                );
            }
        }
        res.map_err(|e| match e {
            CollectError::Tracker(source) => PrimaryError::Tracker {
                domain: self.cfg.domain.clone(),
                epoch,
                source,
            },
            CollectError::RamSize { live, shadow } => PrimaryError::RamSize {
                domain: self.cfg.domain.clone(),
                live,
                shadow,
            },
        })
    }

    /// Queues the pages of the last collect as `PAGE_DATA` batches of `epoch`.
    async fn transmit_pages(&mut self, epoch: u64) -> Result<(), Halt> {
        let choice = self.cfg.compression.choice();
        let batches = self
            .scan
            .run(move |scan| build_batches(epoch, &scan.shadow, &scan.dirty, choice))
            .await
            .ok_or_else(|| self.scan_gone())?;
        for b in batches {
            self.send(b).await?;
        }
        Ok(())
    }
}

/// The page scan's state. One thread owns it for the life of the loop ([`ScanThread`]): the
/// loop sends it jobs (a pre-copy round, a stopped collect, building a checkpoint's batches)
/// and awaits each result, so nothing is taken out and put back, and a job can never find a
/// part missing.
struct Scan {
    /// Live guest RAM.
    memory: Arc<dyn GuestMemory>,
    /// The method that finds dirty pages while the VM is stopped.
    tracker: Box<dyn DirtyTracker>,
    /// Pre-copy's compare tracker (see the module doc for why it is always compare).
    precopy: CompareTracker,
    /// Compares a slice of RAM with the shadow every epoch (all of it every N epochs): a
    /// page the tracker missed is found, resent and counted instead of silently diverging.
    audit: ReplicaAudit,
    /// Guest RAM as of the last checkpoint: the compare baseline, and the source of each
    /// checkpoint's new page contents while the VM runs on.
    shadow: Vec<u8>,
    /// The last collect's dirty pages (buffers reused across epochs).
    dirty: DirtySet,
}

/// Why a stopped collect failed.
enum CollectError {
    Tracker(remus_tracker::TrackerError),
    RamSize { live: usize, shadow: usize },
}

impl Scan {
    /// One live compare round against the shadow, into the dirty set.
    fn precopy_round(
        &mut self,
    ) -> Result<remus_tracker::CollectStats, remus_tracker::TrackerError> {
        self.dirty.clear();
        // Not true (the VM runs), and documented in the module doc: a compare tracker stays
        // correct because the stopped collect of the first checkpoint compares all of RAM
        // again.
        let token = VmStopped::caller_asserts_vm_stopped();
        let r = self.precopy.collect(
            &token,
            self.memory.bytes(),
            &mut self.shadow,
            &mut self.dirty,
        );
        self.count_capture();
        r
    }

    /// The stopped collect and the replica audit; returns the collect's statistics and the
    /// number of pages the audit had to repair.
    fn collect(&mut self) -> Result<(remus_tracker::CollectStats, u64), CollectError> {
        self.dirty.clear();
        // The VM was stopped by the caller (`checkpoint`) and is resumed only after this
        // returns.
        let token = VmStopped::caller_asserts_vm_stopped();
        let live = self.memory.bytes();
        if live.len() != self.shadow.len() {
            return Err(CollectError::RamSize {
                live: live.len(),
                shadow: self.shadow.len(),
            });
        }
        let r = self
            .tracker
            .collect(&token, live, &mut self.shadow, &mut self.dirty)
            .and_then(|stats| {
                let report = self
                    .audit
                    .run(&token, live, &mut self.shadow, &mut self.dirty)?;
                if !report.mismatched.is_empty() {
                    // The tracker missed writes: compare everything next time.
                    self.tracker.rearm();
                }
                Ok((stats, report.mismatched.len() as u64))
            })
            .map_err(CollectError::Tracker);
        self.count_capture();
        r
    }

    fn count_capture(&self) {
        copies::add(
            copies::Stage::Capture,
            (self.dirty.len() * PAGE_SIZE + self.dirty.captured_bytes()) as u64,
        );
    }
}

/// A job for the scan thread.
type ScanJob = Box<dyn FnOnce(&mut Scan) + Send>;

/// The thread that owns the [`Scan`]; it ends when the loop (the job sender) is dropped.
struct ScanThread {
    jobs: std::sync::mpsc::Sender<ScanJob>,
}

impl ScanThread {
    fn start(mut scan: Scan, domain: &str) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<ScanJob>();
        std::thread::Builder::new()
            .name(format!("remus-scan-{domain}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut scan);
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `job` on the scan state and returns its result; `None` if the thread is gone
    /// (a job panicked).
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Scan) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |scan: &mut Scan| {
                let _ = tx.send(job(scan));
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// Groups dirty pages into `PAGE_DATA` batches: new contents from the shadow, old contents
/// from the dirty set's captures (for XOR-delta).
fn build_batches(
    epoch: u64,
    shadow: &[u8],
    dirty: &DirtySet,
    choice: EncodingChoice,
) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut pfns = Vec::with_capacity(MAX_BATCH_PAGES);
    let mut new = Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE);
    let mut old: Option<Vec<u8>> = (dirty.capture() == Capture::OldPage)
        .then(|| Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE));
    let mut last: Option<u64> = None;
    let mut flush = |pfns: &mut Vec<u64>, new: &mut Vec<u8>, old: &mut Option<Vec<u8>>| {
        if pfns.is_empty() {
            return;
        }
        copies::add(
            copies::Stage::Gather,
            (new.len() + old.as_ref().map_or(0, Vec::len)) as u64,
        );
        copies::pages_sent(pfns.len() as u64);
        out.push(Outgoing::Pages {
            epoch,
            pfns: std::mem::take(pfns),
            new: std::mem::take(new),
            old: old.as_mut().map(std::mem::take),
            choice,
        });
    };
    for page in dirty.iter() {
        // A batch needs strictly ascending pfns; an audit segment may restart the order.
        if pfns.len() == MAX_BATCH_PAGES || last.is_some_and(|l| page.pfn <= l) {
            flush(&mut pfns, &mut new, &mut old);
        }
        let start = page.pfn as usize * PAGE_SIZE;
        let end = (start + PAGE_SIZE).min(shadow.len());
        new.extend_from_slice(&shadow[start..end]);
        new.resize(new.len() + (PAGE_SIZE - (end - start)), 0);
        if let (Some(old), Some(c)) = (old.as_mut(), page.captured) {
            old.extend_from_slice(c);
        }
        pfns.push(page.pfn);
        last = Some(page.pfn);
    }
    flush(&mut pfns, &mut new, &mut old);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_due_table() {
        let t0 = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let at = |n: u64| t0 + ms(n);
        // (case, last progress ms after resume, timeout, wait max, due ms after resume)
        #[rustfmt::skip]
        let rows: &[(&str, u64, u64, u64, u64)] = &[
            ("small checkpoint, left at once: the timeout from the resume", 0, 2000, 120_000, 2000),
            ("bytes left before the resume (an earlier epoch)", 0, 2000, 120_000, 2000),
            ("large checkpoint still leaving 5 s later: wait on", 5000, 2000, 120_000, 7000),
            ("a slow link at the cap: no longer", 119_000, 2000, 120_000, 120_000),
            ("a cap below the timeout does not shorten it", 0, 2000, 1000, 2000),
        ];
        for (case, progress, timeout, max, due) in rows {
            assert_eq!(
                ack_due(t0, at(*progress), ms(*timeout), ms(*max)),
                at(*due),
                "{case}"
            );
        }
        // Progress from before the checkpoint does not move its deadline earlier.
        assert_eq!(ack_due(at(1000), t0, ms(2000), ms(120_000)), at(3000));
    }
}
