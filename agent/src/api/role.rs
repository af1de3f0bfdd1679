//! The role and the data-copy stamp of a domain as the control protocol reports them.
//!
//! They mirror `remus_ha::role::Role` and `remus_ha::lineage::CopyStamp` field for field
//! (and serialise identically), but belong to the protocol: the role state machine may grow
//! or rename a state without changing what `remusctl` of another release reads, because
//! [`super::convert`] is the one place that maps one onto the other.

use serde::{Deserialize, Serialize};

/// The role of the node for one domain (`{"role":"primary","peer":…,"since_epoch":…}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// No VM runs here for this domain.
    Stopped,
    /// The VM runs here without a backup: output is released as produced.
    Standalone,
    /// The VM runs here and is checkpointed to `peer`; output waits for its ACKs.
    Primary {
        /// The backup node.
        peer: String,
        /// First epoch of this protection session.
        since_epoch: u64,
    },
    /// This node holds the replica of `peer`'s VM.
    Backup {
        /// The primary node.
        peer: String,
        /// Last checkpoint known committed when the role was last written (coarse: the
        /// replica's own state is the authority on the current one).
        last_committed: Option<u64>,
    },
    /// The primary is lost and this node is proving it gone.
    Fencing {
        /// The node being fenced.
        peer: String,
        /// When fencing started (Unix ms).
        started_ms: u64,
        /// Failed attempts so far.
        attempts: u32,
    },
    /// The old primary is proven gone: activation may start.
    Fenced {
        /// The fenced node.
        peer: String,
        /// How it was proven.
        by: FenceProof,
    },
    /// The replica is being loaded into a new QEMU; the guest has not run yet.
    Activating {
        /// The committed checkpoint being activated.
        from_epoch: u64,
    },
    /// The guest resumed from a checkpoint here (and may have run since).
    Activated {
        /// The checkpoint the guest resumed from.
        epoch: u64,
    },
    /// The VM runs here (unprotected) while a returning backup is brought up to date.
    Resyncing {
        /// The returning backup.
        peer: String,
    },
}

impl Role {
    /// The role's name as the wire tags it ("primary", "backup", …): the one-hot label of
    /// the exporter and the drills' observations.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Stopped => "stopped",
            Role::Standalone => "standalone",
            Role::Primary { .. } => "primary",
            Role::Backup { .. } => "backup",
            Role::Fencing { .. } => "fencing",
            Role::Fenced { .. } => "fenced",
            Role::Activating { .. } => "activating",
            Role::Activated { .. } => "activated",
            Role::Resyncing { .. } => "resyncing",
        }
    }
}

/// How the old primary was proven gone (or who vouched for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceProof {
    /// A fencing command reported success.
    Command,
    /// This node won the witness lease.
    Lease,
    /// Fencing policy `none`: nothing proves it (unsafe).
    Unfenced,
    /// An operator ordered the failover (manual mode).
    Operator,
    /// The primary handed over in a planned switchover and confirmed its VM stopped.
    Switchover,
}

/// A node's stamp on its copy of one domain's data; the greater stamp is the newer copy
/// (generation first, then holder), as `remus_ha::lineage` orders them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct CopyStamp {
    /// Runs of the VM so far, as far as this node knows.
    pub generation: u64,
    /// How this node holds that generation's data.
    pub holder: CopyHolder,
}

/// How a node came by its copy of a generation (ordered: `ran` is the newest).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CopyHolder {
    /// Nothing: the node never ran the domain nor received it.
    #[default]
    None,
    /// The node kept the copy as the backup of the generation's runner.
    Received,
    /// The node ran the VM in this generation.
    Ran,
}

impl std::fmt::Display for CopyStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.holder {
            CopyHolder::None => write!(f, "no copy"),
            CopyHolder::Received => {
                write!(f, "generation {}, received as backup", self.generation)
            }
            CopyHolder::Ran => write!(f, "generation {}, ran the VM", self.generation),
        }
    }
}
