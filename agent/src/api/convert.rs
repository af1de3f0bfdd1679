//! The one place where the daemon's internal types become the control protocol's.
//!
//! Every conversion destructures its source completely, so a field added to an engine or
//! ha type fails to compile here until someone decides whether it reaches the wire (and,
//! if it does, adds it to the protocol type with `#[serde(default)]` so a client of the
//! previous release still reads it).
//!
//! One conversion goes the other way, for the heartbeat: the daemon advertises each domain's
//! copy stamp (and role, `daemon::advert`) from the same snapshot the control socket serves,
//! so that a peer and an operator never see different roles.

use remus_engine::backup::BackupStatus;
use remus_engine::metrics::Percentiles as EnginePercentiles;
use remus_engine::metrics::{EpochReport as EngineReport, EpochSummary as EngineSummary};
use remus_engine::primary::{EpochPhase as EnginePhase, PrimaryStatus};
use remus_engine::replica::ReplicaState as EngineReplicaState;
use remus_ha::lineage::{CopyHolder as HaHolder, CopyStamp as HaStamp};
use remus_ha::role::{FenceProof as HaProof, Role as HaRole};

use super::protection::{
    EpochPhase, EpochReport, EpochSummary, Percentiles, ProtectionStatus, ReplicaState,
    ReplicaStatus,
};
use super::role::{CopyHolder, CopyStamp, FenceProof, Role};

impl From<&HaRole> for Role {
    fn from(r: &HaRole) -> Self {
        match r.clone() {
            HaRole::Stopped => Role::Stopped,
            HaRole::Standalone => Role::Standalone,
            HaRole::Primary { peer, since_epoch } => Role::Primary { peer, since_epoch },
            HaRole::Backup {
                peer,
                last_committed,
            } => Role::Backup {
                peer,
                last_committed,
            },
            HaRole::Fencing {
                peer,
                started_ms,
                attempts,
            } => Role::Fencing {
                peer,
                started_ms,
                attempts,
            },
            HaRole::Fenced { peer, by } => Role::Fenced {
                peer,
                by: by.into(),
            },
            HaRole::Activating { from_epoch } => Role::Activating { from_epoch },
            HaRole::Activated { epoch } => Role::Activated { epoch },
            HaRole::Resyncing { peer } => Role::Resyncing { peer },
        }
    }
}

impl From<HaProof> for FenceProof {
    fn from(p: HaProof) -> Self {
        match p {
            HaProof::Command => FenceProof::Command,
            HaProof::Lease => FenceProof::Lease,
            HaProof::Unfenced => FenceProof::Unfenced,
            HaProof::Operator => FenceProof::Operator,
            HaProof::Switchover => FenceProof::Switchover,
        }
    }
}

impl From<HaStamp> for CopyStamp {
    fn from(s: HaStamp) -> Self {
        let HaStamp { generation, holder } = s;
        CopyStamp {
            generation,
            holder: match holder {
                HaHolder::None => CopyHolder::None,
                HaHolder::Received => CopyHolder::Received,
                HaHolder::Ran => CopyHolder::Ran,
            },
        }
    }
}

impl From<&PrimaryStatus> for ProtectionStatus {
    fn from(s: &PrimaryStatus) -> Self {
        let PrimaryStatus {
            phase,
            last_acked,
            in_flight,
            last,
            summary,
            precopy_pages,
            tracker,
            audit_repaired_total,
            // Reported in the domain's `verify` status, not the loop's.
            verify: _,
            last_verify: _,
            peer_can_verify: _,
        } = s;
        ProtectionStatus {
            phase: (*phase).into(),
            last_acked: *last_acked,
            in_flight: *in_flight,
            last: last.as_ref().map(EpochReport::from),
            summary: summary.into(),
            precopy_pages: precopy_pages.clone(),
            tracker: tracker.clone(),
            audit_repaired_total: *audit_repaired_total,
        }
    }
}

impl From<EnginePhase> for EpochPhase {
    fn from(p: EnginePhase) -> Self {
        match p {
            EnginePhase::Idle => EpochPhase::Idle,
            EnginePhase::PreCopy { round } => EpochPhase::PreCopy { round },
            EnginePhase::Running { epoch } => EpochPhase::Running { epoch },
            EnginePhase::AwaitingAck { epoch } => EpochPhase::AwaitingAck { epoch },
            EnginePhase::ClosingOutput { epoch } => EpochPhase::ClosingOutput { epoch },
            EnginePhase::Stopping { epoch } => EpochPhase::Stopping { epoch },
            EnginePhase::Capturing { epoch } => EpochPhase::Capturing { epoch },
            EnginePhase::DiskBarrier { epoch } => EpochPhase::DiskBarrier { epoch },
            EnginePhase::SavingDevice { epoch } => EpochPhase::SavingDevice { epoch },
            EnginePhase::Resuming { epoch } => EpochPhase::Resuming { epoch },
            EnginePhase::Transmitting { epoch } => EpochPhase::Transmitting { epoch },
            EnginePhase::HandingOff { epoch } => EpochPhase::HandingOff { epoch },
            EnginePhase::Ended => EpochPhase::Ended,
        }
    }
}

impl From<&EngineReport> for EpochReport {
    fn from(r: &EngineReport) -> Self {
        let EngineReport {
            epoch,
            ack_wait,
            stop,
            capture,
            disk_barrier,
            device_save,
            resume,
            pause,
            dirty_pages,
            audit_repaired,
            device_bytes,
            page_bytes_raw,
            page_bytes_encoded,
            transmit,
            ack_latency,
            output_commit_delay,
        } = *r;
        EpochReport {
            epoch,
            ack_wait,
            stop,
            capture,
            disk_barrier,
            device_save,
            resume,
            pause,
            dirty_pages,
            audit_repaired,
            device_bytes,
            page_bytes_raw,
            page_bytes_encoded,
            transmit,
            ack_latency,
            output_commit_delay,
        }
    }
}

impl From<&EngineSummary> for EpochSummary {
    fn from(s: &EngineSummary) -> Self {
        let EngineSummary {
            epochs,
            pause,
            output_commit_delay,
            ack_latency,
            mean_dirty_pages,
        } = *s;
        EpochSummary {
            epochs,
            pause: pause.into(),
            output_commit_delay: output_commit_delay.into(),
            ack_latency: ack_latency.into(),
            mean_dirty_pages,
        }
    }
}

impl From<EnginePercentiles> for Percentiles {
    fn from(p: EnginePercentiles) -> Self {
        let EnginePercentiles {
            p50_us,
            p99_us,
            max_us,
        } = p;
        Percentiles {
            p50_us,
            p99_us,
            max_us,
        }
    }
}

impl From<&BackupStatus> for ReplicaStatus {
    fn from(s: &BackupStatus) -> Self {
        let BackupStatus {
            replica,
            receiving,
            committed_count,
            refused_count,
        } = *s;
        ReplicaStatus {
            replica: replica.into(),
            receiving,
            committed_count,
            refused_count,
        }
    }
}

impl From<EngineReplicaState> for ReplicaState {
    fn from(s: EngineReplicaState) -> Self {
        match s {
            EngineReplicaState::Empty => ReplicaState::Empty,
            EngineReplicaState::Syncing => ReplicaState::Syncing,
            EngineReplicaState::Applying(k) => ReplicaState::Applying(k),
            EngineReplicaState::Committed(k) => ReplicaState::Committed(k),
        }
    }
}

// ------------------------------------------------------------ back, for the heartbeat

impl From<CopyStamp> for HaStamp {
    fn from(s: CopyStamp) -> Self {
        let CopyStamp { generation, holder } = s;
        HaStamp {
            generation,
            holder: match holder {
                CopyHolder::None => HaHolder::None,
                CopyHolder::Received => HaHolder::Received,
                CopyHolder::Ran => HaHolder::Ran,
            },
        }
    }
}
