//! The backup's receiver: stage each checkpoint, prove it complete, apply it, acknowledge.
//!
//! ```text
//! Receiving(k): records verified one by one (CRC by the decoder, order/counts/digest by
//!   the epoch verifier); pages staged in memory, disk writes held per epoch by the disk
//! CHECKPOINT_END(k) proved complete, DISK_BARRIER(k) matched
//!   --> replica: stage durably, apply (see `replica`) --> disk: commit writes ≤ k
//!   --> replica: Committed(k) --> ACK(k)
//! ```
//!
//! The ACK is the last step, so it is sent only when the invariant holds: the backup holds
//! all of checkpoint k and every disk write tagged ≤ k durably. A checkpoint that breaks a
//! rule (digest, counts, order, a page that does not decode) is refused with a NACK naming
//! the reason and discarded whole; the replica stays at the previous checkpoint, which
//! remains activatable. The first checkpoint of a session is written straight into the
//! replica RAM (there is nothing older to protect) and becomes activatable only at its END.
//!
//! Sessions: one receiver serves one replication session; a store outlives sessions. A new
//! session (re-protection after the primary lost its backup) restarts at epoch 1 and gives up
//! the previous session's checkpoint as soon as it begins, before any record is read: the
//! primary ran unprotected with its output released in between, so that checkpoint is older
//! than what clients have seen and must never be activated.

use remus_stream::{
    DigestAlgorithm, DiskVerify, DiskVerifyResult, Encoder, FlatMemory, Nack, NackReason,
    PageDataRef, Record, StreamHeader, StreamKind, VerifyVerdict, PAGE_SIZE,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::copies;
use crate::peer::SecureWriter;
use crate::ports::{DiskOpHeld, DiskWriteHeld, PortError, ReplicaDisk};
use crate::replica::{ReplicaError, ReplicaState, ReplicaStore, StagedPages};
use crate::wire::{Incoming, PageSink, RecordReader, WireError};

/// Longest NACK text the stream format allows (`docs/stream-format.md`, CHECKPOINT_NACK).
const MAX_NACK_MESSAGE: usize = 4096;

/// Why the receiver stopped.
#[derive(Debug, Error)]
pub enum BackupError {
    /// The stream or channel failed (the primary may be gone).
    #[error("domain {domain}: replication stream: {source}")]
    Wire { domain: String, source: WireError },
    /// A checkpoint was refused; the replica keeps the previous one.
    #[error("domain {domain}: checkpoint {epoch} refused ({reason}): {message}")]
    Refused {
        domain: String,
        epoch: u64,
        reason: NackReason,
        message: String,
    },
    /// The replica store failed.
    #[error("domain {domain}: {source}")]
    Replica {
        domain: String,
        source: ReplicaError,
    },
    /// The replica disk failed.
    #[error("domain {domain}: {source}")]
    Disk { domain: String, source: PortError },
    /// The caller cancelled the session (its detector declared the primary lost while the
    /// connection was still open, e.g. a cut link that never delivered a FIN). The
    /// checkpoint being received, if any, was discarded; `replica` is what remains.
    #[error("domain {domain}: replication session cancelled while waiting for the primary's next record; the replica holds {replica}")]
    Cancelled {
        domain: String,
        /// The replica's state when the session ended.
        replica: ReplicaState,
    },
}

/// How a replication session ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupExit {
    /// The primary sent END: protection was stopped on purpose.
    Ended {
        /// The last committed checkpoint.
        committed: Option<u64>,
    },
    /// Planned switchover: the primary stopped its VM at checkpoint `epoch`, which is
    /// committed here and acknowledged; this side is to resume the VM from it.
    HandedOff {
        /// The final checkpoint (the replica's committed one).
        epoch: u64,
    },
}

/// What the daemon and `remusctl status` see of a receiver.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupStatus {
    /// The replica's state.
    pub replica: ReplicaState,
    /// The checkpoint being received.
    pub receiving: Option<u64>,
    /// Checkpoints committed in this session.
    pub committed_count: u64,
    /// Checkpoints refused in this session.
    pub refused_count: u64,
}

/// Sends the backup's replies (ACK/NACK) on the reply stream.
pub struct ReplyWriter<W> {
    writer: SecureWriter<W>,
    encoder: Encoder,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    /// Starts the reply stream; its header repeats the replication session id.
    ///
    /// # Errors
    /// Channel failures; names too long for the header.
    pub async fn start(
        mut writer: SecureWriter<W>,
        node: &str,
        domain: &str,
        session_id: u64,
    ) -> Result<Self, WireError> {
        let mut encoder = Encoder::new();
        let mut buf = Vec::new();
        let header = StreamHeader {
            kind: StreamKind::Reply,
            session_id,
            node: node.to_string(),
            domain: domain.to_string(),
        };
        encoder
            .header(&mut buf, &header)
            .map_err(|e| WireError::Encode {
                what: "reply stream header".into(),
                reason: e.to_string(),
            })?;
        writer.send(&buf).await?;
        writer.flush().await?;
        buf.clear();
        Ok(Self {
            writer,
            encoder,
            buf,
        })
    }

    /// Sends one record and flushes.
    ///
    /// # Errors
    /// Channel failures.
    pub async fn send(&mut self, record: Record) -> Result<(), WireError> {
        self.buf.clear();
        self.encoder
            .record(&mut self.buf, &record)
            .map_err(|e| WireError::Encode {
                what: format!("{:?}", record.record_type()),
                reason: e.to_string(),
            })?;
        self.writer.send(&self.buf).await?;
        self.writer.flush().await?;
        Ok(())
    }
}

/// The receiver for one replication session.
pub struct Backup<R, W> {
    domain: String,
    reader: RecordReader<R>,
    replies: ReplyWriter<W>,
    replica: ReplicaStore,
    disk: Box<dyn ReplicaDisk>,
    /// Pages of the checkpoint being received (not the first one, which goes straight in).
    staged: StagedPages,
    /// Device state of the checkpoint being received, assembled from its chunks.
    device: Vec<u8>,
    /// The checkpoint being received, and whether it is the session's first.
    receiving: Option<(u64, bool)>,
    /// Whether the session has begun on the replica and the disks (see `begin_session`).
    session_begun: bool,
    /// Whether this session has begun its first checkpoint.
    session_started: bool,
    /// The latest domain configuration received (JSON).
    config: Option<String>,
    /// Set by the caller to end the session: turning `true` ends `run` the next time the
    /// receiver waits for a record (never in the middle of applying a checkpoint).
    cancel: Option<watch::Receiver<bool>>,
    /// Requests to hold still between two checkpoints (see [`Backup::set_quiesce`]).
    quiesce: Option<mpsc::Receiver<QuiesceRequest>>,
    status: watch::Sender<BackupStatus>,
    scratch: Vec<u8>,
    /// `DISK_VERIFY` requests waiting for their checkpoint to commit.
    verify_pending: Vec<DiskVerify>,
}

/// Most `DISK_VERIFY` requests held for checkpoints not yet committed (a primary sends a
/// few per checkpoint).
const MAX_PENDING_VERIFY: usize = 4096;

/// A request to hold the receiver still right after a checkpoint commits, so that the
/// caller can read the replica's files (RAM, device state, disks) at exactly that
/// checkpoint while the session goes on. See [`Backup::set_quiesce`].
#[derive(Debug)]
pub struct QuiesceRequest {
    /// Told the checkpoint the replica holds, once the receiver is still.
    pub quiesced: oneshot::Sender<u64>,
    /// The receiver goes on when this resolves or its sender is dropped.
    pub resume: oneshot::Receiver<()>,
}

impl QuiesceRequest {
    /// A request with the requester's ends: where the receiver says it holds (the
    /// checkpoint), and the let-go (send, or drop, to let it go on).
    pub fn new() -> (Self, oneshot::Receiver<u64>, oneshot::Sender<()>) {
        let (quiesced, held) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        (
            Self {
                quiesced,
                resume: resume_rx,
            },
            held,
            resume,
        )
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Backup<R, W> {
    /// A receiver over an authenticated channel whose replication header was already read
    /// by `reader` or will be read first.
    pub fn new(
        domain: &str,
        reader: RecordReader<R>,
        replies: ReplyWriter<W>,
        replica: ReplicaStore,
        disk: Box<dyn ReplicaDisk>,
    ) -> (Self, watch::Receiver<BackupStatus>) {
        let (tx, rx) = watch::channel(BackupStatus {
            replica: replica.state(),
            receiving: None,
            committed_count: 0,
            refused_count: 0,
        });
        (
            Self {
                domain: domain.to_string(),
                reader,
                replies,
                replica,
                disk,
                staged: StagedPages::default(),
                device: Vec::new(),
                receiving: None,
                session_begun: false,
                session_started: false,
                config: None,
                cancel: None,
                quiesce: None,
                status: tx,
                scratch: Vec::new(),
                verify_pending: Vec::new(),
            },
            rx,
        )
    }

    /// Lets the caller end the session: when `*cancel` turns `true` while the receiver is
    /// waiting for the primary's next record, [`run`](Self::run) returns
    /// [`BackupError::Cancelled`] and the checkpoint being received is discarded. A
    /// checkpoint whose END has arrived is always applied, committed and acknowledged
    /// first: the cancel is looked at only between records. A sender dropped without
    /// sending `true` never cancels.
    ///
    /// The daemon uses it when its heartbeat detector declares the primary lost while the
    /// replication connection is still half-open (a cut link delivers no FIN, so the read
    /// would otherwise wait for TCP keepalive). After `Cancelled` the receiver must not be
    /// run again (a partly read frame is lost); take the replica with
    /// [`into_replica`](Self::into_replica).
    pub fn set_cancel(&mut self, cancel: watch::Receiver<bool>) {
        self.cancel = Some(cancel);
    }

    /// Lets the caller hold the receiver still between two checkpoints: a
    /// [`QuiesceRequest`] is served right after the next checkpoint commits and its ACK is
    /// sent, before the next record is read. The replica's files then hold exactly that
    /// checkpoint and nothing changes them until the request's `resume` resolves (or a
    /// cancel arrives). The primary keeps running and sending meanwhile; its next ACK is
    /// late by the time the caller holds the receiver, so hold it briefly (well under the
    /// primary's ACK timeout).
    ///
    /// The daemon uses it to copy the committed replica for a test activation without
    /// interrupting protection.
    pub fn set_quiesce(&mut self, requests: mpsc::Receiver<QuiesceRequest>) {
        self.quiesce = Some(requests);
    }

    /// The latest domain configuration the primary sent.
    pub fn config(&self) -> Option<&str> {
        self.config.as_deref()
    }

    /// Gives the replica back (for activation after the session ended).
    pub fn into_replica(self) -> (ReplicaStore, Box<dyn ReplicaDisk>) {
        (self.replica, self.disk)
    }

    /// The replica.
    pub fn replica(&self) -> &ReplicaStore {
        &self.replica
    }

    /// Receives until the primary ends the session or the stream fails. On any error the
    /// checkpoint being received is discarded and the replica keeps the last committed one
    /// *of this session*.
    ///
    /// Before the first record is read, the session begins on the replica and the disks
    /// ([`ReplicaStore::begin_session`], [`ReplicaDisk::begin_session`]): whatever an
    /// earlier session committed stops being activatable, because the primary ran
    /// unprotected (output released) before it opened this session. Until the first
    /// checkpoint of this session commits, the replica state is `Syncing`.
    ///
    /// # Errors
    /// See [`BackupError`]; a refused checkpoint is NACKed before the error is returned.
    pub async fn run(&mut self) -> Result<BackupExit, BackupError> {
        self.begin_session().await?;
        let r = self.receive().await;
        if r.is_err() {
            self.discard_partial();
        }
        r
    }

    /// Starts the session on the replica and the disks (once per receiver).
    async fn begin_session(&mut self) -> Result<(), BackupError> {
        if self.session_begun {
            return Ok(());
        }
        let header = match or_cancel(self.cancel.as_mut(), self.reader.read_header()).await {
            Some(h) => h.map_err(|e| self.wire(e))?,
            None => return Err(self.cancelled()),
        };
        let session = header.session_id;
        let previous = self.replica.state();
        self.replica
            .begin_session(session)
            .map_err(|source| BackupError::Replica {
                domain: self.domain.clone(),
                source,
            })?;
        self.disk
            .begin_session()
            .await
            .map_err(|source| BackupError::Disk {
                domain: self.domain.clone(),
                source,
            })?;
        // Before any ACK, so the primary knows by the first ACK whether verify requests
        // will be answered (`crate::verify`). An older primary logs and ignores it.
        let caps = crate::disk::Capabilities {
            disk_verify: u32::from(self.disk.can_verify()),
        };
        let caps = serde_json::to_string(&caps).unwrap_or_default();
        self.replies
            .send(Record::Control(caps))
            .await
            .map_err(|e| self.wire(e))?;
        self.session_begun = true;
        let state = self.replica.state();
        self.status.send_modify(|s| s.replica = state);
        info!(
            domain = %self.domain,
            session = format_args!("{session:#x}"),
            %previous,
            "replication session begins; the replica is not activatable until its first checkpoint commits"
        );
        Ok(())
    }

    fn discard_partial(&mut self) {
        if let Some((epoch, _)) = self.receiving.take() {
            warn!(domain = %self.domain, epoch, "discarding an incomplete checkpoint");
        }
        self.staged.clear();
        self.device.clear();
    }

    fn committed(&self) -> Option<u64> {
        match self.replica.state() {
            ReplicaState::Committed(k) => Some(k),
            _ => None,
        }
    }

    async fn receive(&mut self) -> Result<BackupExit, BackupError> {
        loop {
            let mut sink = StageBatch {
                receiving: self.receiving,
                staged: &mut self.staged,
                replica: &mut self.replica,
                scratch: &mut self.scratch,
            };
            let next = match or_cancel(self.cancel.as_mut(), self.reader.next_with(&mut sink)).await
            {
                Some(next) => next,
                None => return Err(self.cancelled()),
            };
            let received = match next {
                Ok(Some(Incoming::Record(r))) => r,
                Ok(Some(Incoming::Pages {
                    epoch,
                    verdict,
                    sunk,
                    ..
                })) => {
                    if let Err(e) = verdict {
                        return Err(self.refuse(epoch, e.nack_reason(), e.to_string()).await);
                    }
                    if let Err(refusal) = sunk {
                        let msg = refusal.to_string();
                        return Err(self.refuse(epoch, NackReason::Protocol, msg).await);
                    }
                    continue;
                }
                Ok(None) => {
                    let peer = self.reader.peer().to_string();
                    return Err(self.wire(WireError::ClosedAfterEnd { peer }));
                }
                Err(e) => {
                    if let (WireError::Decode { .. }, Some((epoch, _))) = (&e, self.receiving) {
                        self.nack(epoch, NackReason::Protocol, e.to_string()).await;
                    }
                    return Err(self.wire(e));
                }
            };
            let epoch_of = received.record.epoch();
            let summary = match received.verdict {
                Ok(s) => s,
                Err(e) => {
                    let epoch = epoch_of.unwrap_or(0);
                    return Err(self.refuse(epoch, e.nack_reason(), e.to_string()).await);
                }
            };
            match received.record {
                Record::End => {
                    info!(domain = %self.domain, "primary ended the replication session");
                    return Ok(BackupExit::Ended {
                        committed: self.committed(),
                    });
                }
                Record::HandOff { epoch } => {
                    // The verifier proved `epoch` is the last completed checkpoint with
                    // nothing open; completed checkpoints are committed before the next
                    // record is read, so the replica must hold exactly it.
                    if self.committed() != Some(epoch) || self.receiving.is_some() {
                        let msg = format!(
                            "HANDOFF({epoch}) but the replica holds {}",
                            self.replica.state()
                        );
                        return Err(self.refuse(epoch, NackReason::Protocol, msg).await);
                    }
                    info!(domain = %self.domain, epoch, "planned switchover: the primary handed off at this checkpoint");
                    return Ok(BackupExit::HandedOff { epoch });
                }
                Record::DomainConfig(c) => self.config = Some(c.json),
                Record::CheckpointBegin { epoch } => self.begin(epoch).await?,
                // Never here: `next_with` hands every batch to the `StageBatch` sink.
                Record::PageData(_) => {}
                Record::DeviceState(ds) => {
                    self.expect_receiving(ds.epoch).await?;
                    if ds.offset == 0 {
                        self.device.clear();
                        self.device.reserve(ds.total_len.min(64 << 20) as usize);
                    }
                    self.device.extend_from_slice(&ds.data);
                }
                Record::DiskWrite(w) => {
                    let op = match w.op {
                        remus_stream::DiskOp::Data(d) => DiskOpHeld::Data(d),
                        remus_stream::DiskOp::Zeroes(n) => DiskOpHeld::Zeroes(n.into()),
                        remus_stream::DiskOp::Trim(n) => DiskOpHeld::Trim(n.into()),
                    };
                    let held = DiskWriteHeld {
                        disk: w.disk.into(),
                        epoch: w.epoch,
                        offset: w.offset,
                        op,
                    };
                    if let Err(e) = self.disk.hold(held).await {
                        return Err(self
                            .refuse(w.epoch, NackReason::Storage, e.to_string())
                            .await);
                    }
                }
                Record::DiskBarrier(b) => {
                    if let Err(e) = self.disk.barrier(b.epoch, b.writes, b.data_bytes).await {
                        return Err(self
                            .refuse(b.epoch, NackReason::CountMismatch, e.to_string())
                            .await);
                    }
                }
                Record::CheckpointEnd(end) => {
                    let Some(summary) = summary else {
                        let msg = "CHECKPOINT_END was not proved complete".to_string();
                        return Err(self.refuse(end.epoch, NackReason::Protocol, msg).await);
                    };
                    debug!(domain = %self.domain, epoch = end.epoch, ?summary, "checkpoint complete");
                    self.commit(end.epoch).await?;
                    self.answer_verifies(end.epoch).await?;
                    self.serve_quiesce(end.epoch).await;
                }
                Record::Control(json) => {
                    if let Err(e) = self.disk.control(&json).await {
                        let epoch = self.receiving.map_or(0, |r| r.0);
                        return Err(self.refuse(epoch, NackReason::Storage, e.to_string()).await);
                    }
                }
                Record::DiskVerify(v) => self.verify_request(v).await?,
                Record::Unknown { .. } => {}
                Record::DiskVerifyResult(_)
                | Record::CheckpointAck { .. }
                | Record::CheckpointNack(_) => {
                    // The stream decoder refuses reply records in a replication stream.
                }
            }
        }
    }

    async fn begin(&mut self, epoch: u64) -> Result<(), BackupError> {
        let first = !self.session_started;
        if first {
            if epoch != crate::primary::FIRST_EPOCH {
                let msg = format!(
                    "a session must start with checkpoint {}, got {epoch}",
                    crate::primary::FIRST_EPOCH
                );
                return Err(self.refuse(epoch, NackReason::Protocol, msg).await);
            }
            // The replica has been `Syncing` since `begin_session`.
            self.session_started = true;
        }
        self.staged.clear();
        self.device.clear();
        self.receiving = Some((epoch, first));
        self.status.send_modify(|s| s.receiving = Some(epoch));
        Ok(())
    }

    async fn expect_receiving(&mut self, epoch: u64) -> Result<(u64, bool), BackupError> {
        match self.receiving {
            Some((e, first)) if e == epoch => Ok((e, first)),
            other => {
                let msg = format!(
                    "record of checkpoint {epoch} while receiving {:?}",
                    other.map(|o| o.0)
                );
                Err(self.refuse(epoch, NackReason::Protocol, msg).await)
            }
        }
    }

    async fn commit(&mut self, epoch: u64) -> Result<(), BackupError> {
        let Some((receiving, first)) = self.receiving else {
            let msg = format!("CHECKPOINT_END({epoch}) without CHECKPOINT_BEGIN");
            return Err(self.refuse(epoch, NackReason::Protocol, msg).await);
        };
        if receiving != epoch {
            let msg = format!("CHECKPOINT_END({epoch}) while receiving {receiving}");
            return Err(self.refuse(epoch, NackReason::Protocol, msg).await);
        }
        let replica_err = |source| BackupError::Replica {
            domain: self.domain.clone(),
            source,
        };
        if first {
            if let Err(e) = self.disk.commit(epoch).await {
                return Err(self.refuse(epoch, NackReason::Storage, e.to_string()).await);
            }
            self.replica
                .commit_first(epoch, &self.device)
                .map_err(replica_err)?;
        } else {
            self.replica
                .stage_and_apply(epoch, &self.staged, &self.device)
                .map_err(replica_err)?;
            if let Err(e) = self.disk.commit(epoch).await {
                return Err(self.refuse(epoch, NackReason::Storage, e.to_string()).await);
            }
            self.replica
                .mark_committed(epoch)
                .map_err(|source| BackupError::Replica {
                    domain: self.domain.clone(),
                    source,
                })?;
        }
        self.staged.clear();
        self.device.clear();
        self.receiving = None;
        let state = self.replica.state();
        self.status.send_modify(|s| {
            s.replica = state;
            s.receiving = None;
            s.committed_count += 1;
        });
        self.replies
            .send(Record::CheckpointAck { epoch })
            .await
            .map_err(|e| self.wire(e))?;
        debug!(domain = %self.domain, epoch, "checkpoint committed and acknowledged");
        Ok(())
    }

    /// A `DISK_VERIFY`: compared once its checkpoint commits (at once if the replica holds
    /// exactly it, "stale" if the replica is already past it). Requests beyond a bound are
    /// answered "unreadable" rather than held without limit.
    async fn verify_request(&mut self, v: DiskVerify) -> Result<(), BackupError> {
        let committed = self.committed();
        if committed == Some(v.epoch) && self.receiving.is_none_or(|(e, _)| e > v.epoch) {
            return self.answer_verify(v).await;
        }
        if committed.is_some_and(|c| c >= v.epoch) {
            return self.send_verdict(&v, VerifyVerdict::Stale).await;
        }
        if self.verify_pending.len() >= MAX_PENDING_VERIFY {
            return self.send_verdict(&v, VerifyVerdict::Unreadable).await;
        }
        self.verify_pending.push(v);
        Ok(())
    }

    /// Answers the pending requests of checkpoint `epoch`, just committed (and those of
    /// older checkpoints as stale: the primary never sends them late, but say so).
    async fn answer_verifies(&mut self, epoch: u64) -> Result<(), BackupError> {
        if self.verify_pending.is_empty() {
            return Ok(());
        }
        let (due, later): (Vec<DiskVerify>, Vec<DiskVerify>) =
            std::mem::take(&mut self.verify_pending)
                .into_iter()
                .partition(|v| v.epoch <= epoch);
        self.verify_pending = later;
        for v in due {
            if v.epoch == epoch {
                self.answer_verify(v).await?;
            } else {
                self.send_verdict(&v, VerifyVerdict::Stale).await?;
            }
        }
        Ok(())
    }

    async fn answer_verify(&mut self, v: DiskVerify) -> Result<(), BackupError> {
        let verdict = if v.algorithm != DigestAlgorithm::Xxh3_128 {
            VerifyVerdict::Algorithm
        } else {
            match self
                .disk
                .digest(v.region.disk, v.region.offset, v.region.length.into())
                .await
            {
                Ok(d) if !d.consistent => VerifyVerdict::Inconsistent,
                Ok(d) if d.committed != v.epoch => VerifyVerdict::Stale,
                Ok(d) if d.digest[..] == v.digest[..16] => VerifyVerdict::Match,
                Ok(_) => VerifyVerdict::Differ,
                Err(e) => {
                    warn!(domain = %self.domain, error = %e, "verify: cannot read the replica region");
                    VerifyVerdict::Unreadable
                }
            }
        };
        if verdict == VerifyVerdict::Differ {
            warn!(
                domain = %self.domain,
                epoch = v.epoch,
                disk = v.region.disk,
                offset = v.region.offset,
                length = v.region.length,
                "verify: the replica differs from the primary"
            );
        }
        self.send_verdict(&v, verdict).await
    }

    async fn send_verdict(
        &mut self,
        v: &DiskVerify,
        verdict: VerifyVerdict,
    ) -> Result<(), BackupError> {
        self.replies
            .send(Record::DiskVerifyResult(DiskVerifyResult {
                epoch: v.epoch,
                run: v.run,
                region: v.region,
                verdict,
            }))
            .await
            .map_err(|e| self.wire(e))
    }

    /// Serves pending [`QuiesceRequest`]s: the replica is at committed checkpoint `epoch`
    /// and stays there until each requester lets go (or the session is cancelled).
    async fn serve_quiesce(&mut self, epoch: u64) {
        let Some(requests) = self.quiesce.as_mut() else {
            return;
        };
        while let Ok(req) = requests.try_recv() {
            if req.quiesced.send(epoch).is_err() {
                continue; // The requester gave up.
            }
            let started = std::time::Instant::now();
            let cancelled = async {
                match self.cancel.as_mut() {
                    Some(c) => {
                        if c.wait_for(|&c| c).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = req.resume => {}
                () = cancelled => {}
            }
            info!(
                domain = %self.domain,
                epoch,
                held_ms = started.elapsed().as_millis() as u64,
                "receiver held still at a committed checkpoint"
            );
        }
    }

    async fn nack(&mut self, epoch: u64, reason: NackReason, message: String) {
        let mut message = message;
        if message.len() > MAX_NACK_MESSAGE {
            let mut cut = MAX_NACK_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let nack = Record::CheckpointNack(Nack {
            epoch,
            reason,
            message,
        });
        if let Err(e) = self.replies.send(nack).await {
            warn!(domain = %self.domain, epoch, error = %e, "could not send NACK");
        }
        self.status.send_modify(|s| s.refused_count += 1);
    }

    async fn refuse(&mut self, epoch: u64, reason: NackReason, message: String) -> BackupError {
        warn!(domain = %self.domain, epoch, %reason, %message, "refusing checkpoint");
        self.nack(epoch, reason, message.clone()).await;
        self.discard_partial();
        BackupError::Refused {
            domain: self.domain.clone(),
            epoch,
            reason,
            message,
        }
    }

    fn cancelled(&self) -> BackupError {
        let replica = self.replica.state();
        info!(
            domain = %self.domain,
            %replica,
            receiving = ?self.receiving.map(|r| r.0),
            "replication session cancelled"
        );
        BackupError::Cancelled {
            domain: self.domain.clone(),
            replica,
        }
    }

    fn wire(&self, source: WireError) -> BackupError {
        BackupError::Wire {
            domain: self.domain.clone(),
            source,
        }
    }
}

/// Runs `fut` unless `cancel` is (or turns) `true` first; `None` when cancelled. The cancel
/// is checked first, so a stream that always has data ready cannot starve it.
async fn or_cancel<T>(
    cancel: Option<&mut watch::Receiver<bool>>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let Some(cancel) = cancel else {
        return Some(fut.await);
    };
    if *cancel.borrow_and_update() {
        return None;
    }
    let turned_true = async {
        if cancel.wait_for(|&c| c).await.is_err() {
            // The sender is gone without cancelling: never cancel.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        () = turned_true => None,
        r = fut => Some(r),
    }
}

/// Why a `PAGE_DATA` batch was refused (the checkpoint is NACKed as a protocol error).
#[derive(Debug, Error)]
enum PageRefusal {
    /// The batch belongs to another checkpoint than the one being received.
    #[error("record of checkpoint {epoch} while receiving {receiving:?}")]
    NotReceiving { epoch: u64, receiving: Option<u64> },
    /// The batch does not decode.
    #[error("PAGE_DATA at offset {offset}: {source}")]
    Decode {
        offset: u64,
        source: remus_stream::PageError,
    },
    /// A page lies past the end of guest RAM.
    #[error("page frame {pfn} is beyond guest RAM")]
    BeyondRam { pfn: u64 },
    /// The replica refused a page of the first checkpoint.
    #[error(transparent)]
    Replica(ReplicaError),
}

/// Puts each `PAGE_DATA` batch in its place as it is decoded from the receive buffer: an
/// incremental checkpoint's pages straight into their staging slots (XOR references from
/// pages staged earlier in the checkpoint, else the committed replica), the first
/// checkpoint's into the replica RAM (through one batch buffer: an LZ4 block unpacks to
/// contiguous pages, the replica's are scattered).
struct StageBatch<'a> {
    /// The checkpoint being received, and whether it is the session's first.
    receiving: Option<(u64, bool)>,
    staged: &'a mut StagedPages,
    replica: &'a mut ReplicaStore,
    /// The first checkpoint's batch buffer; its length only grows (no zero-fill per batch).
    scratch: &'a mut Vec<u8>,
}

impl PageSink for StageBatch<'_> {
    type Error = PageRefusal;

    fn pages(&mut self, offset: u64, batch: &PageDataRef<'_>) -> Result<(), PageRefusal> {
        let first = match self.receiving {
            Some((e, first)) if e == batch.epoch => first,
            other => {
                return Err(PageRefusal::NotReceiving {
                    epoch: batch.epoch,
                    receiving: other.map(|o| o.0),
                })
            }
        };
        let n = batch.count();
        let decode = |source| PageRefusal::Decode { offset, source };
        copies::pages_received(n as u64);
        copies::add(copies::Stage::Decode, (n * PAGE_SIZE) as u64);
        if first {
            if self.scratch.len() < n * PAGE_SIZE {
                self.scratch.resize(n * PAGE_SIZE, 0);
            }
            let out = &mut self.scratch[..n * PAGE_SIZE];
            batch
                .decode_into(out, &mut FlatMemory(self.replica.ram()))
                .map_err(decode)?;
            for (i, page) in out.chunks_exact(PAGE_SIZE).enumerate() {
                self.replica
                    .write_first_page(batch.pfn(i), page)
                    .map_err(PageRefusal::Replica)?;
            }
            copies::add(copies::Stage::Apply, (n * PAGE_SIZE) as u64);
        } else {
            let ram = self.replica.ram_size();
            if let Some(pfn) = batch
                .pfns()
                .find(|&pfn| pfn.checked_mul(PAGE_SIZE as u64).is_none_or(|o| o >= ram))
            {
                return Err(PageRefusal::BeyondRam { pfn });
            }
            let moved = self
                .staged
                .decode(batch, self.replica.ram())
                .map_err(decode)?;
            copies::add(copies::Stage::Stage, moved);
        }
        Ok(())
    }
}
