//! The control protocol's view of an online disk verify (`remusctl verify`): its report,
//! and what a domain's status says of verifies. Converted from `remus_engine::verify` here
//! only, so the engine may change its types without a `remusctl` misreading the daemon.

use serde::{Deserialize, Serialize};

/// A region of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRegion {
    /// The disk's id (from the policy).
    pub disk: String,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// A region the backup did not compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotComparedRegion {
    /// The region.
    #[serde(flatten)]
    pub region: DiskRegion,
    /// The backup's reason ("stale", "inconsistent", "unreadable", …).
    pub why: String,
}

/// What a resync re-copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncedRegions {
    /// Regions re-copied.
    pub regions: u64,
    /// Bytes they cover.
    pub bytes: u64,
    /// Bytes sent as data (all-zero pieces go as zeroes).
    pub data_bytes: u64,
    /// The checkpoint they committed with (acknowledged by the backup).
    pub epoch: u64,
}

/// A plain sequential read of the primary's first disk, measured in the same run as the
/// verify: what reading alone costs, beside which the verify's rate is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFloor {
    /// Bytes read.
    pub bytes: u64,
    /// Milliseconds taken (at least 1).
    pub ms: u64,
}

/// The answer to `verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The domain.
    pub domain: String,
    /// Run number within the protection session.
    pub run: u32,
    /// Started by the policy's `verify_interval_s`.
    #[serde(default)]
    pub periodic: bool,
    /// Regions planned (every disk, cut into regions).
    pub regions_total: u64,
    /// Regions compared.
    pub regions_checked: u64,
    /// Regions that differ.
    pub differing_count: u64,
    /// The differing regions (the first 4096).
    pub differing: Vec<DiskRegion>,
    /// Regions the backup did not compare (a clean verify has none).
    pub not_compared: Vec<NotComparedRegion>,
    /// Bytes hashed on each side.
    pub bytes_hashed: u64,
    /// From the request to the last verdict (or the resync's acknowledgement).
    pub elapsed_ms: u64,
    /// Time the primary spent hashing inside checkpoint pauses (overlapped with the
    /// device-state save).
    pub hash_ms: u64,
    /// The longest a checkpoint pause waited for hashing beyond its device-state save (µs).
    pub max_pause_added_us: u64,
    /// First and last checkpoint compared at.
    pub epochs: (u64, u64),
    /// The re-copy of the differing regions (with `resync`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynced: Option<ResyncedRegions>,
    /// The disk read floor measured right after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_floor: Option<ReadFloor>,
}

impl VerifyReport {
    /// Every region compared and none differs.
    pub fn clean(&self) -> bool {
        self.differing_count == 0 && self.not_compared.is_empty()
    }

    /// MiB/s of `bytes` in `ms`.
    pub fn rate_mib_s(bytes: u64, ms: u64) -> f64 {
        bytes as f64 / (1u64 << 20) as f64 / (ms.max(1) as f64 / 1000.0)
    }
}

/// A domain's verifies, in its status (absent until the first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// The run in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<VerifyRunning>,
    /// The last run that finished (this node, since the daemon started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<VerifyLast>,
}

/// Progress of a verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRunning {
    /// Run number.
    pub run: u32,
    /// "waiting", "hashing", "resyncing".
    pub phase: String,
    /// Regions planned.
    pub regions_total: u64,
    /// Regions answered.
    pub regions_done: u64,
    /// Differing so far.
    pub differing: u64,
}

/// The last finished verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyLast {
    /// When it finished (Unix ms, as the supervisor saw it).
    pub finished_at_ms: u64,
    /// Started by the policy.
    pub periodic: bool,
    /// Regions compared.
    pub regions_checked: u64,
    /// Regions that differed.
    pub differing: u64,
    /// Regions not compared.
    pub not_compared: u64,
    /// Whether the differing regions were re-copied.
    pub resynced: bool,
}

/// Converts the engine's report, naming disks by their ids.
pub fn report_of(
    domain: &str,
    r: &remus_engine::verify::VerifyReport,
    disk_ids: &[String],
) -> VerifyReport {
    let name = |disk: u16| {
        disk_ids
            .get(usize::from(disk))
            .cloned()
            .unwrap_or_else(|| format!("#{disk}"))
    };
    let region = |g: &remus_engine::verify::Region| DiskRegion {
        disk: name(g.disk),
        offset: g.offset,
        length: g.length,
    };
    VerifyReport {
        domain: domain.to_string(),
        run: r.run,
        periodic: r.periodic,
        regions_total: r.regions_total,
        regions_checked: r.regions_checked,
        differing_count: r.differing_count,
        differing: r.differing.iter().map(region).collect(),
        not_compared: r
            .not_compared
            .iter()
            .map(|n| NotComparedRegion {
                region: region(&n.region),
                why: n.why.clone(),
            })
            .collect(),
        bytes_hashed: r.bytes_hashed,
        elapsed_ms: r.elapsed.as_millis() as u64,
        hash_ms: r.hash_time.as_millis() as u64,
        max_pause_added_us: r.max_pause_added.as_micros() as u64,
        epochs: r.epochs,
        resynced: r.resynced.map(|s| ResyncedRegions {
            regions: s.regions,
            bytes: s.bytes,
            data_bytes: s.data_bytes,
            epoch: s.epoch,
        }),
        read_floor: None,
    }
}
