//! The control protocol between `remusctl` and `remusd`, and what the daemon reports.
//!
//! Transport: the daemon's Unix socket (`[node] control_socket`), one JSON [`Request`] per
//! line, answered by one JSON [`Response`] per line; a connection may carry several
//! requests. The socket is the only way to drive the daemon: its permissions (0600, root)
//! are the access control, so the protocol carries no credentials.
//!
//! The same [`DaemonStatus`] snapshot feeds `remusctl status`, the drills and the
//! Prometheus exporter, so the three can never disagree about what the daemon is doing.
//!
//! # The protocol owns its schema
//!
//! Every type that reaches the wire is defined here (the role and copy stamp in `role`,
//! the epoch loop's and the receiver's status in `protection`), never borrowed from the
//! engine or ha crates: those may rename a phase or add a field without a `remusctl` of
//! another release misreading the daemon. `convert` is the one place that maps the
//! internal types onto these.
//!
//! # Versions
//!
//! [`CONTROL_VERSION`] is 1, the protocol of release 0.1.0: these types serialise byte for
//! byte as that release's daemon did (the golden test in `tests` holds them to it), so a
//! 0.1.0 `remusctl` and this daemon, or the other way round, understand each other during a
//! rolling upgrade. Adding an optional field (`#[serde(default)]`, skipped when absent) is
//! not a change of the wire. Any other change (a renamed field or tag, a new variant an old
//! client must understand, a changed unit) is: it bumps [`CONTROL_VERSION`], and the client
//! must then accept both the old and the new version (and the daemon answer in the version
//! it was asked in) for as long as a rolling upgrade may pair the two releases.

mod convert;
mod domain_config;
mod protection;
mod role;
#[cfg(test)]
mod tests;
pub mod verify;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use domain_config::{DeviceStep, DiskView, DomainConfigView, NicView};
pub use protection::{
    EpochPhase, EpochReport, EpochSummary, Percentiles, ProtectionStatus, ReplicaState,
    ReplicaStatus,
};
pub use role::{CopyHolder, CopyStamp, FenceProof, Role};
pub use verify::{VerifyReport, VerifyStatus};

/// Version of the control protocol; a client refuses a daemon that speaks another one.
/// Unchanged since 0.1.0 (see the module's *Versions* for what a change requires).
pub const CONTROL_VERSION: u32 = 1;

/// Largest request or response line accepted, in bytes (status of many domains fits).
pub const MAX_LINE: usize = 4 << 20;

/// What `remusctl` asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// A snapshot of the daemon and every domain.
    Status,
    /// Start a domain's VM here, unprotected, and protect it to the peer as soon as the
    /// peer's agent accepts. Refused unless this node's role is `stopped` and the peer does
    /// not run the VM, nor advertises a newer copy of the domain's data than this node's
    /// (unless `older_copy`).
    Start {
        /// The domain.
        domain: String,
        /// Start from this node's copy even when the peer's is newer (rolls the guest back).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        older_copy: bool,
    },
    /// Planned, lossless handover of the primary role to the peer (asked of the primary).
    Switchover {
        /// The domain.
        domain: String,
    },
    /// Forced failover (asked of the backup): the operator vouches that the primary is gone
    /// or must be abandoned; the backup activates its last committed checkpoint.
    Failover {
        /// The domain.
        domain: String,
    },
    /// Boot a throwaway copy of the replica with its network cut off, check it runs, and
    /// discard it (asked of the backup; the protected VM and the replica are untouched).
    TestActivate {
        /// The domain.
        domain: String,
    },
    /// A domain's configuration as it really is here: QEMU's devices merged with the stored
    /// configuration (which a mismatch repairs, with a warning).
    DomainConfig {
        /// The domain.
        domain: String,
    },
    /// Compare the domain's disks with the backup's replica at committed checkpoints while
    /// the VM runs (asked of the primary); with `resync`, re-copy the regions that differ.
    /// Answered with [`Response::Verified`] when the run is over. A new request: a daemon
    /// older than it answers with a parse error, and an older client never sends it.
    Verify {
        /// The domain.
        domain: String,
        /// Re-copy the differing regions afterwards.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
    },
    /// Re-read the daemon's configuration file and apply what can change without
    /// restarting a VM; anything else refuses the whole reload, naming file and line, and
    /// the running policy stays (see `config::reload`).
    Reload,
}

/// What `remusd` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(DaemonStatus),
    /// Answer to [`Request::DomainConfig`].
    DomainConfig(DomainConfigView),
    /// The request was carried out.
    Done {
        /// What was done, for the operator.
        message: String,
    },
    /// Answer to [`Request::Verify`] (only ever sent to a client that asked it).
    Verified(Box<VerifyReport>),
    /// The request was refused or failed.
    Error {
        /// What and why, naming the domain.
        message: String,
    },
}

/// The daemon as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// [`CONTROL_VERSION`].
    pub version: u32,
    /// This node's name.
    pub node: String,
    /// The peer node's name.
    pub peer: String,
    /// Heartbeat view of the peer.
    pub peer_liveness: PeerLiveness,
    /// How long ago replication traffic from the peer (a checkpoint received or an ACK)
    /// was last reported to the failure detector as proof of life; `None` if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_heard_ms_ago: Option<u64>,
    /// The longest silence of the peer (no heartbeat, no replication traffic) that ended
    /// without a loss, since the daemon started: how close the detector came to a false
    /// failover, beside its timeout (an upper bound; absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_longest_silence_ms: Option<u64>,
    /// The longest time between two heartbeats on any one link (interval plus the worst
    /// jitter and losses seen; absent before the second heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_longest_gap_ms: Option<u64>,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// One entry per configured domain, in configuration order.
    pub domains: Vec<DomainStatus>,
    /// What the network doors refused since the daemon started (absent while all zero, so
    /// a quiet daemon's status is byte-identical to 0.1.0's).
    #[serde(default, skip_serializing_if = "Doors::is_quiet")]
    pub doors: Doors,
    /// The lease arbiter (`[witness]`), when one is configured (absent in 0.1.0's form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterStatus>,
}

/// Which lease arbiter the daemon uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterStatus {
    /// `"witness"` (remus-witness) or `"etcd"`.
    pub backend: String,
    /// Where: the witness's address, or the etcd endpoints and key prefix.
    pub location: String,
    /// The lease length asked for, in ms.
    pub lease_ms: u64,
    /// Requests made of it since the daemon started, per operation (`acquire`, `renew`,
    /// `preempt`, `release`, `query`, `record`), for those ever made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<ArbiterOpStats>,
}

/// One operation's requests to the lease arbiter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterOpStats {
    /// `acquire`, `renew`, `preempt`, `release`, `query` or `record`.
    pub op: String,
    /// Answered with success.
    pub ok: u64,
    /// Answered: another node holds the lease.
    pub denied: u64,
    /// Not answered, or refused for another reason.
    pub failed: u64,
    /// Time spent in all of them, µs.
    pub latency_sum_us: u64,
    /// The slowest, µs.
    pub latency_max_us: u64,
    /// The last, µs.
    pub latency_last_us: u64,
}

/// Counters of what anyone on the network can send and this node refused: each is counted
/// always and logged only at a limited rate (`remus_ha::lograte`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doors {
    /// Heartbeats dropped for a bad tag (wrong key, tampered, random bytes), all links.
    #[serde(default)]
    pub heartbeat_bad_tag: u64,
    /// Heartbeats dropped as malformed although authentic.
    #[serde(default)]
    pub heartbeat_malformed: u64,
    /// Authentic heartbeats from another node than the peer.
    #[serde(default)]
    pub heartbeat_unknown_node: u64,
    /// Heartbeats replayed (sequence not above the last accepted).
    #[serde(default)]
    pub heartbeat_replayed: u64,
    /// Replication connections that failed the handshake or its deadline.
    #[serde(default)]
    pub handshakes_refused: u64,
    /// Replication connections closed at once because the unauthenticated ones were at the cap.
    #[serde(default)]
    pub connections_shed: u64,
}

impl Doors {
    /// All zero.
    pub fn is_quiet(&self) -> bool {
        *self == Doors::default()
    }
}

/// The heartbeat detector's verdict on the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PeerLiveness {
    /// Nothing heard yet.
    Starting,
    /// Heard within the timeout.
    Alive {
        /// Links heard within the timeout.
        links_up: usize,
        /// Configured links.
        links_total: usize,
    },
    /// Silent for a while, not yet past the timeout.
    Suspect,
    /// Silent on every link for the timeout.
    Lost {
        /// From the last news of the peer to the declaration (ms).
        detected_after_ms: u64,
    },
}

/// One domain on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// The domain's name.
    pub name: String,
    /// The persisted role.
    pub role: Role,
    /// This node's QEMU for the domain, if one exists.
    pub vm: Option<VmStatus>,
    /// The primary's epoch loop, while protecting.
    pub protection: Option<ProtectionStatus>,
    /// The backup's receiver, while receiving.
    pub replica: Option<ReplicaStatus>,
    /// Last committed checkpoint of the replica (backup), if any.
    pub committed_epoch: Option<u64>,
    /// The witness lease, when the domain fences with a witness: "held, 1.4 s left", "lost",
    /// "acquiring", "denied by NODE".
    pub lease: Option<String>,
    /// Conditions an operator must know about (running unprotected, fencing failing, …).
    pub alarms: Vec<String>,
    /// Failovers this daemon carried out for the domain since it started.
    pub failovers: Vec<FailoverRecord>,
    /// Disk resynchronisations streamed by this node since it started.
    pub resyncs: Vec<ResyncRecord>,
    /// Checkpoint counters since the daemon started (for the exporter).
    pub counters: DomainCounters,
    /// The stamp on this node's copy of the domain's data (which node's copy is newer:
    /// [`remus_ha::lineage`]); advertised in the heartbeats.
    #[serde(default)]
    pub copy: CopyStamp,
    /// Unprotected windows since the daemon started, the newest last (at most
    /// [`MAX_UNPROTECTED_WINDOWS`]); the last one is open while `to_ms` is absent. Absent
    /// while empty (0.1.0's form).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<UnprotectedWindow>,
    /// Online disk verifies (absent until the first: 0.1.0's form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStatus>,
}

/// How many unprotected windows a domain's status keeps (the oldest are dropped; the
/// counter `unprotected_ms` keeps them all).
pub const MAX_UNPROTECTED_WINDOWS: usize = 16;

/// A QEMU process of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Its process id.
    pub pid: u32,
    /// Whether the guest is running (QMP `query-status`), as last observed.
    pub running: bool,
    /// Whether its network output is held until the backup acknowledges.
    pub output_held: bool,
}

/// One failover, as the backup that took over measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// When the primary was declared lost (Unix ms).
    pub declared_at_ms: u64,
    /// From the last news of the primary to the declaration (ms).
    pub detection_ms: u64,
    /// Fencing (ms).
    pub fencing_ms: u64,
    /// From fencing done to the VM running (ms).
    pub activation_ms: u64,
    /// How the old primary was proven gone: "command", "lease", "unfenced", "operator",
    /// "switchover".
    pub fence_proof: String,
    /// The committed checkpoint the VM resumed from.
    pub from_epoch: u64,
}

/// One disk resynchronisation streamed by this node as primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRecord {
    /// The disk's id.
    pub disk: String,
    /// "full" or "dirty".
    pub mode: String,
    /// Contiguous dirty regions copied (dirty mode).
    pub regions: u64,
    /// Bytes sent as data.
    pub bytes_copied: u64,
    /// Bytes found zero and sent as zeroes.
    pub bytes_zero: u64,
}

/// Monotonic counters (Prometheus counters), since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCounters {
    /// Checkpoints acknowledged by the backup (primary) or committed (backup).
    pub checkpoints: u64,
    /// Checkpoints refused (backup) or NACKed (primary).
    pub refused: u64,
    /// Times protection was lost (primary).
    pub protection_lost: u64,
    /// Failovers carried out (backup).
    pub failovers: u64,
    /// Milliseconds the guest ran here without a backup acknowledging its checkpoints
    /// (closed windows and the open one so far). Absent while zero (0.1.0's form).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unprotected_ms: u64,
    /// Disk verifies finished (primary). Absent while zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verify_runs: u64,
    /// Regions found differing by those verifies. Absent while zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verify_differing_regions: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A time during which the guest ran on this node without a backup acknowledging its
/// checkpoints: what a failure then would have lost is everything since it opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnprotectedWindow {
    /// When it opened (Unix ms).
    pub from_ms: u64,
    /// When it closed (Unix ms); `None` while open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
    /// Why: the role and the state of protection when it opened (e.g. "standalone",
    /// "primary: first checkpoint not yet acknowledged").
    pub reason: String,
}

/// What the control server calls; the daemon implements it, tests may stub it.
#[async_trait]
pub trait ControlHandler: Send + Sync + 'static {
    /// A current snapshot.
    async fn status(&self) -> DaemonStatus;
    /// Carries out `request` (never [`Request::Status`], which goes to [`Self::status`]).
    async fn command(&self, request: Request) -> Response;
}
