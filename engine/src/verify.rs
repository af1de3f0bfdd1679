//! Online disk verify: compare the primary's disks with the backup's replica at committed
//! checkpoints while the guest runs, and re-copy the regions that differ.
//!
//! Why this shape: a comparison means something only at one checkpoint on both sides. In
//! the primary's checkpoint pause for epoch k (VM stopped, disk barrier done) the primary's
//! image is exactly what checkpoint k commits on the backup, so the loop hashes a bounded
//! batch of regions there (overlapped with the device-state save, so the pause grows only
//! when hashing is the slower of the two) and sends one `DISK_VERIFY(k)` per region. The
//! backup answers each after committing k (its replica then is the primary's image at k)
//! with `DISK_VERIFY_RESULT`. A run covers every disk in [`plan`]'s order, a batch per
//! checkpoint, so the guest never waits for a whole-disk read.
//!
//! A run is an explicit state machine ([`Phase`]): `Waiting` (for the first ACK, by which
//! the backup has said whether it can answer) → `Hashing` (batches out, verdicts in) →
//! `Resyncing` (only with `resync` and differing regions: the loop re-copies them at the
//! next pause as ordinary writes of that epoch) → done when that epoch is acknowledged.
//!
//! A backup that cannot answer is never taken for a clean one: the backup announces the
//! capability before its first ACK (`CONTROL {"kind":"capabilities",...}`), a run against a
//! backup that did not is refused, and a verdict missing when a later checkpoint is
//! acknowledged fails the run (the backup answers each request before its next ACK).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use remus_stream::{DiskVerifyResult, VerifyRegion, VerifyVerdict};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ports::PortError;

/// Default bytes per region.
pub const DEFAULT_REGION: u32 = 1 << 20;
/// Default bytes hashed per checkpoint pause.
pub const DEFAULT_BYTES_PER_EPOCH: u64 = 4 << 20;
/// Most differing regions a report lists (the count is always exact).
pub const MAX_LISTED: usize = 4096;

/// What the caller asks of a verify run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Re-copy the differing regions afterwards.
    pub resync: bool,
    /// Bytes per region (≤ `remus_stream::MAX_VERIFY_REGION`).
    pub region_bytes: u32,
    /// Bytes hashed per checkpoint pause (at least one region).
    pub bytes_per_epoch: u64,
    /// Started by the policy's period, not by an operator.
    pub periodic: bool,
}

impl Default for VerifyRequest {
    fn default() -> Self {
        Self {
            resync: false,
            region_bytes: DEFAULT_REGION,
            bytes_per_epoch: DEFAULT_BYTES_PER_EPOCH,
            periodic: false,
        }
    }
}

/// A region of one disk, as reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Region {
    /// Index of the disk in the domain's disk list.
    pub disk: u16,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

impl From<VerifyRegion> for Region {
    fn from(r: VerifyRegion) -> Self {
        Self {
            disk: r.disk,
            offset: r.offset,
            length: r.length.into(),
        }
    }
}

/// The regions of a whole verify: each disk cut into `region` bytes (the last one shorter),
/// disk by disk. Empty disks have none.
pub fn plan(disk_sizes: &[u64], region: u32) -> Vec<VerifyRegion> {
    let region = region.max(1);
    let mut out = Vec::new();
    for (disk, &size) in disk_sizes.iter().enumerate() {
        let Ok(disk) = u16::try_from(disk) else {
            break;
        };
        let mut offset = 0;
        while offset < size {
            let length = (size - offset).min(u64::from(region)) as u32;
            out.push(VerifyRegion {
                disk,
                offset,
                length,
            });
            offset += u64::from(length);
        }
    }
    out
}

/// Why a verify failed (nothing about the disks' contents: that is the report).
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The backup did not announce that it answers verify requests.
    #[error("the backup cannot answer disk verify requests (it runs an older remusd without DISK_VERIFY); upgrade it, then verify again")]
    PeerCannotVerify,
    /// The domain replicates no disk.
    #[error("the domain replicates no disk")]
    NoDisks,
    /// A run is in progress.
    #[error("a verify of this domain is already running (run {0})")]
    Busy(u32),
    /// The backup acknowledged a checkpoint without answering a request of an earlier one.
    #[error("the backup acknowledged checkpoint {acked} without answering the verify of {region:?} at checkpoint {epoch}")]
    Unanswered {
        /// The request's checkpoint.
        epoch: u64,
        /// The request's region.
        region: Region,
        /// The checkpoint acknowledged.
        acked: u64,
    },
    /// Hashing or re-copying on the primary failed.
    #[error("{0}")]
    Port(#[source] PortError),
    /// The protection session ended before the run did.
    #[error("protection ended before the verify finished: {0}")]
    Ended(String),
}

/// A region the backup did not compare, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotCompared {
    /// The region.
    pub region: Region,
    /// The backup's verdict ("stale", "inconsistent", "unreadable", …).
    pub why: String,
}

/// What a resync re-copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resynced {
    /// Regions re-copied.
    pub regions: u64,
    /// Bytes they cover.
    pub bytes: u64,
    /// Bytes sent as data (all-zero pieces go as zeroes).
    pub data_bytes: u64,
    /// The checkpoint the copies committed with (acknowledged).
    pub epoch: u64,
}

/// The outcome of a verify run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Run number (per protection session).
    pub run: u32,
    /// Started by the policy's period.
    pub periodic: bool,
    /// Regions planned.
    pub regions_total: u64,
    /// Regions compared (match or differ).
    pub regions_checked: u64,
    /// How many differ.
    pub differing_count: u64,
    /// The differing regions (at most [`MAX_LISTED`]), in disk and offset order.
    pub differing: Vec<Region>,
    /// Regions the backup did not compare.
    pub not_compared: Vec<NotCompared>,
    /// Bytes hashed on the primary (the backup hashed as many).
    pub bytes_hashed: u64,
    /// From the request to the last verdict (or the resync's ACK).
    pub elapsed: Duration,
    /// Time the primary spent hashing inside checkpoint pauses (overlapped with the
    /// device-state save).
    pub hash_time: Duration,
    /// The longest a pause waited for hashing beyond its device-state save.
    pub max_pause_added: Duration,
    /// First and last checkpoint compared at.
    pub epochs: (u64, u64),
    /// The re-copy, when asked for and needed.
    pub resynced: Option<Resynced>,
}

impl VerifyReport {
    /// Every region compared and none differs.
    pub fn clean(&self) -> bool {
        self.differing_count == 0 && self.not_compared.is_empty()
    }
}

/// Where a run is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Until the first ACK of the session (capabilities known).
    Waiting,
    /// Batches out, verdicts in.
    Hashing,
    /// Re-copy the differing regions at the next pause, then wait for that ACK.
    Resyncing {
        /// The checkpoint the copies went into, once sent.
        epoch: Option<u64>,
    },
}

/// Progress, for the status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProgress {
    /// Run number.
    pub run: u32,
    /// "waiting", "hashing", "resyncing".
    pub phase: String,
    /// Regions planned.
    pub regions_total: u64,
    /// Regions answered so far.
    pub regions_done: u64,
    /// Differing so far.
    pub differing: u64,
}

/// One verify run (see the module documentation).
#[derive(Debug)]
pub struct VerifyRun {
    /// Run number, echoed by the backup.
    pub run: u32,
    req: VerifyRequest,
    /// Where the run is.
    pub phase: Phase,
    regions: Vec<VerifyRegion>,
    next: usize,
    outstanding: BTreeMap<(u64, VerifyRegion), ()>,
    answered: u64,
    checked: u64,
    differing: Vec<VerifyRegion>,
    not_compared: Vec<NotCompared>,
    bytes_hashed: u64,
    hash_time: Duration,
    max_pause_added: Duration,
    epochs: Option<(u64, u64)>,
    started: Instant,
    resynced: Option<Resynced>,
}

/// What a step of the run leads to.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Keep going.
    Continue,
    /// The run is over.
    Done,
}

impl VerifyRun {
    /// A run over `disk_sizes`.
    pub fn new(run: u32, req: VerifyRequest, disk_sizes: &[u64]) -> Self {
        Self {
            run,
            phase: Phase::Waiting,
            regions: plan(disk_sizes, req.region_bytes),
            req,
            next: 0,
            outstanding: BTreeMap::new(),
            answered: 0,
            checked: 0,
            differing: Vec::new(),
            not_compared: Vec::new(),
            bytes_hashed: 0,
            hash_time: Duration::ZERO,
            max_pause_added: Duration::ZERO,
            epochs: None,
            started: Instant::now(),
            resynced: None,
        }
    }

    /// The next batch to hash at a pause: at least one region, at most `bytes_per_epoch`.
    pub fn next_batch(&mut self) -> Vec<VerifyRegion> {
        if self.phase != Phase::Hashing {
            return Vec::new();
        }
        let mut bytes = 0u64;
        let mut out = Vec::new();
        while let Some(r) = self.regions.get(self.next) {
            if !out.is_empty() && bytes + u64::from(r.length) > self.req.bytes_per_epoch {
                break;
            }
            bytes += u64::from(r.length);
            out.push(*r);
            self.next += 1;
        }
        out
    }

    /// A batch was hashed at checkpoint `epoch` and its requests queued.
    pub fn sent(&mut self, epoch: u64, batch: &[VerifyRegion], took: Duration, added: Duration) {
        for r in batch {
            self.outstanding.insert((epoch, *r), ());
            self.bytes_hashed += u64::from(r.length);
        }
        self.hash_time += took;
        self.max_pause_added = self.max_pause_added.max(added);
        self.epochs = Some(match self.epochs {
            Some((first, _)) => (first, epoch),
            None => (epoch, epoch),
        });
    }

    /// A verdict arrived. Verdicts of other runs, or for regions not asked, are ignored.
    pub fn verdict(&mut self, r: &DiskVerifyResult) -> Step {
        if r.run != self.run || self.outstanding.remove(&(r.epoch, r.region)).is_none() {
            return Step::Continue;
        }
        self.answered += 1;
        match r.verdict {
            VerifyVerdict::Match => self.checked += 1,
            VerifyVerdict::Differ => {
                self.checked += 1;
                self.differing.push(r.region);
            }
            other => self.not_compared.push(NotCompared {
                region: r.region.into(),
                why: other.to_string(),
            }),
        }
        self.after_answer()
    }

    fn after_answer(&mut self) -> Step {
        if self.phase != Phase::Hashing
            || self.next < self.regions.len()
            || !self.outstanding.is_empty()
        {
            return Step::Continue;
        }
        if self.req.resync && !self.differing.is_empty() {
            self.phase = Phase::Resyncing { epoch: None };
            Step::Continue
        } else {
            Step::Done
        }
    }

    /// Checkpoint `epoch` was acknowledged. The backup answers every request of a checkpoint
    /// right after committing it, before its next ACK; so a request of an earlier
    /// checkpoint still unanswered was ignored, and the run fails rather than count it.
    ///
    /// # Errors
    /// [`VerifyError::Unanswered`].
    pub fn acked(&mut self, epoch: u64) -> Result<Step, VerifyError> {
        if let Some(&(e, region)) = self.outstanding.keys().find(|(e, _)| *e < epoch) {
            return Err(VerifyError::Unanswered {
                epoch: e,
                region: region.into(),
                acked: epoch,
            });
        }
        match self.phase {
            Phase::Resyncing { epoch: Some(e) } if e <= epoch => Ok(Step::Done),
            _ => Ok(Step::Continue),
        }
    }

    /// The regions to re-copy now, if the run is resyncing and has not copied them yet.
    pub fn to_recopy(&self) -> Vec<VerifyRegion> {
        match self.phase {
            Phase::Resyncing { epoch: None } => self.differing.clone(),
            _ => Vec::new(),
        }
    }

    /// The differing regions were re-copied as writes of `epoch`.
    pub fn recopied(&mut self, epoch: u64, data_bytes: u64) {
        self.phase = Phase::Resyncing { epoch: Some(epoch) };
        self.resynced = Some(Resynced {
            regions: self.differing.len() as u64,
            bytes: self.differing.iter().map(|r| u64::from(r.length)).sum(),
            data_bytes,
            epoch,
        });
    }

    /// Progress for the status.
    pub fn progress(&self) -> VerifyProgress {
        VerifyProgress {
            run: self.run,
            phase: match self.phase {
                Phase::Waiting => "waiting",
                Phase::Hashing => "hashing",
                Phase::Resyncing { .. } => "resyncing",
            }
            .to_string(),
            regions_total: self.regions.len() as u64,
            regions_done: self.answered,
            differing: self.differing.len() as u64,
        }
    }

    /// Whether the request was the policy's.
    pub fn periodic(&self) -> bool {
        self.req.periodic
    }

    /// The report of a finished run.
    pub fn report(&self) -> VerifyReport {
        let mut differing: Vec<Region> = self.differing.iter().map(|&r| r.into()).collect();
        differing.sort();
        let differing_count = differing.len() as u64;
        differing.truncate(MAX_LISTED);
        VerifyReport {
            run: self.run,
            periodic: self.req.periodic,
            regions_total: self.regions.len() as u64,
            regions_checked: self.checked,
            differing_count,
            differing,
            not_compared: self.not_compared.clone(),
            bytes_hashed: self.bytes_hashed,
            elapsed: self.started.elapsed(),
            hash_time: self.hash_time,
            max_pause_added: self.max_pause_added,
            epochs: self.epochs.unwrap_or_default(),
            resynced: self.resynced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(disk: u16, offset: u64, length: u32) -> VerifyRegion {
        VerifyRegion {
            disk,
            offset,
            length,
        }
    }

    /// (case, disk sizes, region size, expected (disk, offset, length)).
    type PlanRow = (
        &'static str,
        &'static [u64],
        u32,
        &'static [(u16, u64, u32)],
    );

    #[test]
    fn plan_table() {
        #[rustfmt::skip]
        let rows: &[PlanRow] = &[
            ("no disks", &[], 1 << 20, &[]),
            ("an empty disk has no region", &[0], 1 << 20, &[]),
            ("exact multiple", &[2 << 20], 1 << 20, &[(0, 0, 1 << 20), (0, 1 << 20, 1 << 20)]),
            ("a short last region", &[(1 << 20) + 5], 1 << 20, &[(0, 0, 1 << 20), (0, 1 << 20, 5)]),
            ("smaller than a region", &[4096], 1 << 20, &[(0, 0, 4096)]),
            ("disk by disk", &[3, 0, 2], 2, &[(0, 0, 2), (0, 2, 1), (2, 0, 2)]),
            ("a zero region size is one byte", &[2], 0, &[(0, 0, 1), (0, 1, 1)]),
        ];
        for (case, sizes, region, want) in rows {
            let got: Vec<(u16, u64, u32)> = plan(sizes, *region)
                .into_iter()
                .map(|r| (r.disk, r.offset, r.length))
                .collect();
            assert_eq!(&got, want, "{case}");
        }
    }

    fn result(run: u32, epoch: u64, region: VerifyRegion, v: VerifyVerdict) -> DiskVerifyResult {
        DiskVerifyResult {
            epoch,
            run,
            region,
            verdict: v,
        }
    }

    /// A run over 5 regions of 1 byte, 2 per pause: batches, verdicts (of every kind, of
    /// other runs and repeated), the resync phase and its ACK.
    #[test]
    fn run_walk() {
        let req = VerifyRequest {
            resync: true,
            region_bytes: 1,
            bytes_per_epoch: 2,
            periodic: false,
        };
        let mut run = VerifyRun::new(3, req, &[5]);
        assert!(run.next_batch().is_empty(), "nothing before the first ACK");
        run.phase = Phase::Hashing;
        let b1 = run.next_batch();
        assert_eq!(b1, vec![r(0, 0, 1), r(0, 1, 1)]);
        run.sent(7, &b1, Duration::from_millis(1), Duration::ZERO);
        // A verdict of another run, or a region never asked, changes nothing.
        assert_eq!(
            run.verdict(&result(2, 7, b1[0], VerifyVerdict::Differ)),
            Step::Continue
        );
        assert_eq!(
            run.verdict(&result(3, 7, r(0, 4, 1), VerifyVerdict::Differ)),
            Step::Continue
        );
        assert_eq!(run.progress().regions_done, 0);
        assert_eq!(
            run.verdict(&result(3, 7, b1[0], VerifyVerdict::Match)),
            Step::Continue
        );
        // Repeated: ignored.
        assert_eq!(
            run.verdict(&result(3, 7, b1[0], VerifyVerdict::Differ)),
            Step::Continue
        );
        assert!(run.acked(7).is_ok(), "ACK(7) may precede 7's verdicts");
        assert!(matches!(
            run.acked(8),
            Err(VerifyError::Unanswered {
                epoch: 7,
                acked: 8,
                ..
            })
        ));
        assert_eq!(
            run.verdict(&result(3, 7, b1[1], VerifyVerdict::Differ)),
            Step::Continue
        );
        let b2 = run.next_batch();
        run.sent(8, &b2, Duration::from_millis(1), Duration::from_millis(2));
        let b3 = run.next_batch();
        assert_eq!(b3, vec![r(0, 4, 1)]);
        run.sent(9, &b3, Duration::ZERO, Duration::ZERO);
        assert!(run.next_batch().is_empty());
        run.verdict(&result(3, 8, b2[0], VerifyVerdict::Stale));
        run.verdict(&result(3, 8, b2[1], VerifyVerdict::Other(99)));
        assert!(run.to_recopy().is_empty(), "not before every verdict");
        assert_eq!(
            run.verdict(&result(3, 9, b3[0], VerifyVerdict::Match)),
            Step::Continue
        );
        assert_eq!(run.phase, Phase::Resyncing { epoch: None });
        assert_eq!(run.to_recopy(), vec![r(0, 1, 1)]);
        run.recopied(12, 1);
        assert!(run.to_recopy().is_empty());
        assert_eq!(run.acked(11).unwrap(), Step::Continue);
        assert_eq!(run.acked(12).unwrap(), Step::Done);
        let rep = run.report();
        assert_eq!(
            (rep.regions_total, rep.regions_checked, rep.differing_count),
            (5, 3, 1)
        );
        assert_eq!(rep.not_compared.len(), 2);
        assert_eq!(rep.not_compared[1].why, "code-99");
        assert_eq!(rep.epochs, (7, 9));
        assert_eq!(rep.bytes_hashed, 5);
        assert_eq!(rep.max_pause_added, Duration::from_millis(2));
        assert_eq!(rep.resynced.unwrap().epoch, 12);
        assert!(!rep.clean());
    }

    #[test]
    fn a_clean_run_ends_at_its_last_verdict_and_a_batch_holds_at_least_one_region() {
        let req = VerifyRequest {
            bytes_per_epoch: 1,
            region_bytes: 4,
            ..Default::default()
        };
        let mut run = VerifyRun::new(1, req, &[8]);
        run.phase = Phase::Hashing;
        let b = run.next_batch();
        assert_eq!(
            b,
            vec![r(0, 0, 4)],
            "a region over the budget still goes alone"
        );
        run.sent(1, &b, Duration::ZERO, Duration::ZERO);
        let b2 = run.next_batch();
        run.sent(2, &b2, Duration::ZERO, Duration::ZERO);
        assert_eq!(
            run.verdict(&result(1, 1, b[0], VerifyVerdict::Match)),
            Step::Continue
        );
        assert_eq!(
            run.verdict(&result(1, 2, b2[0], VerifyVerdict::Match)),
            Step::Done
        );
        assert!(run.report().clean());
    }
}
