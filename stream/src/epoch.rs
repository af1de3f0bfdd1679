//! Epoch accounting: the counts and digest that let a receiver prove a checkpoint complete.
//!
//! Both ends keep one [`EpochAccount`] per open epoch. The sender's [`crate::Encoder`] fills
//! `CHECKPOINT_END` from it; the receiver's [`EpochVerifier`] rebuilds it from what arrived
//! and accepts `CHECKPOINT_END(k)` only if both agree. This is what turns "the TCP stream
//! did not break" into "the backup holds all of checkpoint k", the condition for ACK(k).
//!
//! Rules the verifier enforces (normative text: `docs/stream-format.md` § Epochs):
//! - an epoch is *open* from its first record to its `CHECKPOINT_END`; at most
//!   `max_open` epochs are open at once (disk writes of epoch k+1 flow while checkpoint k is
//!   still in transit, so at least 2 are needed);
//! - `CHECKPOINT_BEGIN(k)` precedes k's `DOMAIN_CONFIG`, `PAGE_DATA`, `DEVICE_STATE`;
//!   `DISK_WRITE(k)` may precede it (the guest writes during epoch k before it is captured);
//! - `DEVICE_STATE(k)` chunks arrive in order, without gaps, with one total;
//! - no `DISK_WRITE(k)` after `DISK_BARRIER(k)`, whose counts must match;
//! - checkpoints end in order: `CHECKPOINT_END(k+1)` only after `CHECKPOINT_END(k)`;
//!   after `CHECKPOINT_END(k)` no record of epoch ≤ k may appear;
//! - `CHECKPOINT_END(k)` counts and digest equal the receiver's own;
//! - `HANDOFF(k)` names the last completed checkpoint, with no epoch open, and only `END`
//!   (or an optional record) may follow it.
//!
//! The digest is `D = 0; D = crc32c_append(D, le32(record_crc))` over every record of the
//! epoch except its `CHECKPOINT_END`, in stream order: it detects a missing, duplicated or
//! reordered record even when each record is intact.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::record::{CheckpointEnd, RecordRef};

/// Per-epoch counters kept by both ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EpochAccount {
    pub begun: bool,
    pub pages: u64,
    pub page_records: u64,
    pub device_state_bytes: u64,
    pub disk_writes: u64,
    pub disk_data_bytes: u64,
    pub barrier: bool,
    pub device_total: Option<u64>,
    pub device_next: u64,
    pub digest: u32,
}

/// What a record contributes to its epoch's account; built from a borrowed record on the
/// receiving side and from an owned one on the sending side.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counted {
    Begin,
    Pages(u64),
    Device { offset: u64, len: u64, total: u64 },
    DiskWrite { data_bytes: u64 },
    Barrier,
    Other,
}

impl Counted {
    pub(crate) fn of_ref(record: &RecordRef<'_>) -> Self {
        match record {
            RecordRef::CheckpointBegin { .. } => Counted::Begin,
            RecordRef::PageData(p) => Counted::Pages(p.count() as u64),
            RecordRef::DeviceState(d) => Counted::Device {
                offset: d.offset,
                len: d.data.len() as u64,
                total: d.total_len,
            },
            RecordRef::DiskWrite(w) => Counted::DiskWrite {
                data_bytes: match w.op {
                    crate::DiskOpRef::Data(d) => d.len() as u64,
                    _ => 0,
                },
            },
            RecordRef::DiskBarrier(_) => Counted::Barrier,
            _ => Counted::Other,
        }
    }

    pub(crate) fn of_record(record: &crate::Record) -> Self {
        use crate::Record;
        match record {
            Record::CheckpointBegin { .. } => Counted::Begin,
            Record::PageData(p) => Counted::Pages(p.pfns.len() as u64),
            Record::DeviceState(d) => Counted::Device {
                offset: d.offset,
                len: d.data.len() as u64,
                total: d.total_len,
            },
            Record::DiskWrite(w) => Counted::DiskWrite {
                data_bytes: match &w.op {
                    crate::DiskOp::Data(d) => d.len() as u64,
                    _ => 0,
                },
            },
            Record::DiskBarrier(_) => Counted::Barrier,
            _ => Counted::Other,
        }
    }
}

impl EpochAccount {
    /// Counts a record (already known to carry this account's epoch) and folds its CRC into
    /// the digest. `CHECKPOINT_END` is not passed here.
    pub(crate) fn count(&mut self, what: Counted, crc: u32) {
        match what {
            Counted::Begin => self.begun = true,
            Counted::Pages(n) => {
                self.pages += n;
                self.page_records += 1;
            }
            Counted::Device { offset, len, total } => {
                self.device_state_bytes += len;
                self.device_total = Some(total);
                self.device_next = offset.saturating_add(len);
            }
            Counted::DiskWrite { data_bytes } => {
                self.disk_writes += 1;
                self.disk_data_bytes += data_bytes;
            }
            Counted::Barrier => self.barrier = true,
            Counted::Other => {}
        }
        self.digest = crc32c::crc32c_append(self.digest, &crc.to_le_bytes());
    }

    pub(crate) fn end_record(&self, epoch: u64) -> CheckpointEnd {
        CheckpointEnd {
            epoch,
            pages: self.pages,
            page_records: self.page_records,
            device_state_bytes: self.device_state_bytes,
            disk_writes: self.disk_writes,
            digest: self.digest,
        }
    }
}

/// A checkpoint the verifier proved complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochSummary {
    /// The `CHECKPOINT_END` record, whose counts matched.
    pub end: CheckpointEnd,
    /// `DATA` bytes of the epoch's disk writes.
    pub disk_data_bytes: u64,
}

/// A record that breaks the epoch rules. The receiver must not acknowledge the epoch.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EpochError {
    /// A record of an epoch already completed.
    #[error("epoch {epoch}: {record} arrived after checkpoint {completed} was completed")]
    Stale {
        epoch: u64,
        completed: u64,
        record: &'static str,
    },
    /// Opening another epoch would exceed the limit.
    #[error("epoch {epoch}: {record} would open more than {max} epochs at once")]
    TooManyOpen {
        epoch: u64,
        max: usize,
        record: &'static str,
    },
    /// A checkpoint record before `CHECKPOINT_BEGIN`.
    #[error("epoch {epoch}: {record} before CHECKPOINT_BEGIN")]
    NotBegun { epoch: u64, record: &'static str },
    /// A second `CHECKPOINT_BEGIN`.
    #[error("epoch {epoch}: second CHECKPOINT_BEGIN")]
    DuplicateBegin { epoch: u64 },
    /// Device state chunks out of order or with a changing total.
    #[error("epoch {epoch}: device state chunk at offset {offset} (total {total}), expected offset {expected_offset} (total {expected_total})")]
    DeviceChunk {
        epoch: u64,
        offset: u64,
        total: u64,
        expected_offset: u64,
        expected_total: u64,
    },
    /// Checkpoint ended before its device state was complete.
    #[error("epoch {epoch}: CHECKPOINT_END after {have} of {total} device state bytes")]
    DeviceIncomplete { epoch: u64, have: u64, total: u64 },
    /// `DISK_WRITE` after `DISK_BARRIER`, or a second barrier.
    #[error("epoch {epoch}: {record} after DISK_BARRIER")]
    AfterBarrier { epoch: u64, record: &'static str },
    /// Barrier counts differ from the writes received.
    #[error("epoch {epoch}: DISK_BARRIER declares {declared_writes} writes / {declared_bytes} bytes, received {writes} / {bytes}")]
    Barrier {
        epoch: u64,
        declared_writes: u64,
        declared_bytes: u64,
        writes: u64,
        bytes: u64,
    },
    /// Checkpoints must end in epoch order.
    #[error("epoch {epoch}: CHECKPOINT_END out of order, expected epoch {expected}")]
    OutOfOrder { epoch: u64, expected: u64 },
    /// A `CHECKPOINT_END` count differs.
    #[error("epoch {epoch}: CHECKPOINT_END declares {field} = {declared}, received {received}")]
    Count {
        epoch: u64,
        field: &'static str,
        declared: u64,
        received: u64,
    },
    /// `HANDOFF(k)` where k is not the last completed checkpoint, or with an epoch open.
    #[error("epoch {epoch}: HANDOFF {reason}")]
    HandOff { epoch: u64, reason: String },
    /// A record after `HANDOFF`: only `END` may follow it.
    #[error("{record} after HANDOFF of checkpoint {handed_off}")]
    AfterHandOff {
        handed_off: u64,
        record: &'static str,
    },
    /// The digest differs: a record is missing, duplicated or reordered.
    #[error("epoch {epoch}: CHECKPOINT_END digest {declared:#010x}, computed {computed:#010x}")]
    Digest {
        epoch: u64,
        declared: u32,
        computed: u32,
    },
}

impl EpochError {
    /// The `CHECKPOINT_NACK` reason a receiver should send for this error.
    pub fn nack_reason(&self) -> crate::NackReason {
        match self {
            EpochError::Digest { .. } => crate::NackReason::DigestMismatch,
            EpochError::Count { .. } | EpochError::Barrier { .. } => {
                crate::NackReason::CountMismatch
            }
            _ => crate::NackReason::Protocol,
        }
    }
}

/// Receiver-side checker of the epoch rules (see the module documentation).
#[derive(Clone, Debug)]
pub struct EpochVerifier {
    /// Accounts of open epochs, by epoch.
    open: BTreeMap<u64, EpochAccount>,
    /// Last checkpoint proved complete; records of older epochs are stale.
    last_completed: Option<u64>,
    /// Limit on open epochs; bounds memory and catches a runaway sender.
    max_open: usize,
    /// The checkpoint a `HANDOFF` named: the stream may only end after it.
    handed_off: Option<u64>,
}

impl Default for EpochVerifier {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_OPEN)
    }
}

impl EpochVerifier {
    /// Default limit on open epochs: the checkpoint in transit, the epoch running, and one
    /// spare for a relay buffer that pipelines one more.
    pub const DEFAULT_MAX_OPEN: usize = 4;

    /// A verifier allowing `max_open` open epochs (at least 1).
    pub fn new(max_open: usize) -> Self {
        EpochVerifier {
            open: BTreeMap::new(),
            last_completed: None,
            max_open: max_open.max(1),
            handed_off: None,
        }
    }

    /// Last checkpoint proved complete.
    pub fn last_completed(&self) -> Option<u64> {
        self.last_completed
    }

    /// Epochs open now; at the end of a stream these are incomplete and must be discarded.
    pub fn open_epochs(&self) -> Vec<u64> {
        self.open.keys().copied().collect()
    }

    /// Checks one record (with its record CRC, from [`crate::Frame::crc`]). Returns the
    /// summary when the record is a `CHECKPOINT_END` that proves its checkpoint complete.
    ///
    /// # Errors
    /// Any rule broken; the verifier's state is unchanged by a rejected record.
    pub fn observe(
        &mut self,
        record: &RecordRef<'_>,
        crc: u32,
    ) -> Result<Option<EpochSummary>, EpochError> {
        if let Some(handed_off) = self.handed_off {
            if !matches!(record, RecordRef::End) && !record.record_type().is_optional() {
                return Err(EpochError::AfterHandOff {
                    handed_off,
                    record: record.record_type().name().unwrap_or("record"),
                });
            }
        }
        if let RecordRef::HandOff { epoch } = record {
            return self.hand_off(*epoch).map(|()| None);
        }
        let Some(epoch) = record.epoch() else {
            return Ok(None);
        };
        if matches!(
            record,
            RecordRef::CheckpointAck { .. } | RecordRef::CheckpointNack { .. }
        ) {
            return Ok(None);
        }
        let name = record.record_type().name().unwrap_or("record");
        if let Some(completed) = self.last_completed {
            if epoch <= completed {
                return Err(EpochError::Stale {
                    epoch,
                    completed,
                    record: name,
                });
            }
        }
        if !self.open.contains_key(&epoch) && self.open.len() >= self.max_open {
            return Err(EpochError::TooManyOpen {
                epoch,
                max: self.max_open,
                record: name,
            });
        }
        let fresh = EpochAccount::default();
        let acct = self.open.get(&epoch).unwrap_or(&fresh);
        if let RecordRef::CheckpointEnd(end) = record {
            let summary = self.check_end(acct, end)?;
            self.open.remove(&epoch);
            self.last_completed = Some(epoch);
            return Ok(Some(summary));
        }
        Self::check_record(acct, epoch, record, name)?;
        self.open
            .entry(epoch)
            .or_default()
            .count(Counted::of_ref(record), crc);
        Ok(None)
    }

    /// `HANDOFF(epoch)`: the final checkpoint must be the last one completed, and nothing of
    /// a later epoch may have started (the VM stays stopped after the final checkpoint).
    fn hand_off(&mut self, epoch: u64) -> Result<(), EpochError> {
        if self.last_completed != Some(epoch) {
            let reason = match self.last_completed {
                Some(k) => format!("names a checkpoint that is not the last completed one ({k})"),
                None => "before any checkpoint was completed".to_string(),
            };
            return Err(EpochError::HandOff { epoch, reason });
        }
        if let Some(open) = self.open.keys().next() {
            return Err(EpochError::HandOff {
                epoch,
                reason: format!(
                    "while epoch {open} is open (the VM ran after the final checkpoint)"
                ),
            });
        }
        self.handed_off = Some(epoch);
        Ok(())
    }

    fn check_record(
        acct: &EpochAccount,
        epoch: u64,
        record: &RecordRef<'_>,
        name: &'static str,
    ) -> Result<(), EpochError> {
        match record {
            RecordRef::CheckpointBegin { .. } if acct.begun => {
                Err(EpochError::DuplicateBegin { epoch })
            }
            RecordRef::DomainConfig { .. } | RecordRef::PageData(_) | RecordRef::DeviceState(_)
                if !acct.begun =>
            {
                Err(EpochError::NotBegun {
                    epoch,
                    record: name,
                })
            }
            RecordRef::DeviceState(d) => {
                let (expected_offset, expected_total) = match acct.device_total {
                    Some(t) => (acct.device_next, t),
                    None => (0, d.total_len),
                };
                if d.offset != expected_offset || d.total_len != expected_total {
                    return Err(EpochError::DeviceChunk {
                        epoch,
                        offset: d.offset,
                        total: d.total_len,
                        expected_offset,
                        expected_total,
                    });
                }
                Ok(())
            }
            RecordRef::DiskWrite(_) | RecordRef::DiskBarrier(_) if acct.barrier => {
                Err(EpochError::AfterBarrier {
                    epoch,
                    record: name,
                })
            }
            RecordRef::DiskBarrier(b)
                if b.writes != acct.disk_writes || b.data_bytes != acct.disk_data_bytes =>
            {
                Err(EpochError::Barrier {
                    epoch,
                    declared_writes: b.writes,
                    declared_bytes: b.data_bytes,
                    writes: acct.disk_writes,
                    bytes: acct.disk_data_bytes,
                })
            }
            _ => Ok(()),
        }
    }

    fn check_end(
        &self,
        acct: &EpochAccount,
        end: &CheckpointEnd,
    ) -> Result<EpochSummary, EpochError> {
        let epoch = end.epoch;
        if !acct.begun {
            return Err(EpochError::NotBegun {
                epoch,
                record: "CHECKPOINT_END",
            });
        }
        if let Some(last) = self.last_completed {
            if epoch != last + 1 {
                return Err(EpochError::OutOfOrder {
                    epoch,
                    expected: last + 1,
                });
            }
        }
        if let Some(total) = acct.device_total {
            if acct.device_next != total {
                return Err(EpochError::DeviceIncomplete {
                    epoch,
                    have: acct.device_next,
                    total,
                });
            }
        }
        let own = acct.end_record(epoch);
        for (field, declared, received) in [
            ("pages", end.pages, own.pages),
            ("page_records", end.page_records, own.page_records),
            (
                "device_state_bytes",
                end.device_state_bytes,
                own.device_state_bytes,
            ),
            ("disk_writes", end.disk_writes, own.disk_writes),
        ] {
            if declared != received {
                return Err(EpochError::Count {
                    epoch,
                    field,
                    declared,
                    received,
                });
            }
        }
        if end.digest != own.digest {
            return Err(EpochError::Digest {
                epoch,
                declared: end.digest,
                computed: own.digest,
            });
        }
        Ok(EpochSummary {
            end: *end,
            disk_data_bytes: acct.disk_data_bytes,
        })
    }
}
