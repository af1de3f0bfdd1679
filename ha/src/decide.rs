//! The failover decision: given what this node knows, what it must do with the VM now.
//!
//! Every failover rule of the product lives here, and only here. [`decide`] is a pure
//! function of a [`Situation`], so every rule is a row of a table test. The daemon's
//! supervisor observes (peer liveness and what the peer advertises, lease state, ACK flow,
//! fencing progress, its QEMU), calls [`decide`] whenever an input changes and carries out
//! the [`Action`], persisting the role first. The admission of an incoming replication
//! session ([`incoming_session`]) and of an operator's command ([`admit`],
//! [`against_newer`]) are pure functions of the same kind.
//!
//! The rules, and why:
//! - **A node releases output only while it can prove nobody else may run the VM.** A
//!   primary proves it by its backup's ACKs (the backup is alive and following it), by the
//!   witness lease (the backup cannot win the lease while it is held), or by having fenced
//!   the backup. A primary that has neither ACKs nor the lease (witness policy), or whose
//!   fencing failed, pauses its VM: otherwise a partitioned backup could activate from an
//!   older checkpoint while the primary's newer output is already out (split brain).
//! - **A primary's lease is preemptible by its backup while the backup gates its output**
//!   ([`lease_preemptible`]): a primary releases output only on its backup's ACKs, and a
//!   backup stops acknowledging before it fences, so the backup may take the lease at once
//!   (no wait for it to run out) and the old primary, silent, can never release what the
//!   backup does not hold. Such a lease lets a VM run, never release output alone: a node
//!   that would release without ACKs (backup lost, standalone, resyncing, activated) first
//!   renews the lease exclusive, and holds output until the witness grants that (or kills
//!   its VM when the witness says the peer took the lease).
//! - **The lease is checked before the role's own rules** (witness policy): a VM runs only
//!   while the lease is held with a margin or fresh ACKs show the backup following. A
//!   partition shows in the lease first, while the epoch loop still waits out its ACK
//!   timeout.
//! - **A paused VM gives way to a peer that runs the VM**: when the witness granted the
//!   lease to the peer, or the live peer says it runs the domain, the paused VM (which
//!   released nothing since it paused) is killed. A *running* VM is never killed on the
//!   peer's word alone: two nodes must not kill each other's VM on one stale view.
//! - **A backup activates only after fencing succeeded or the lease was won**, and only
//!   from a committed checkpoint. With fencing `none`, the no-op fencer "succeeds" after the
//!   detection timeout: unsafe, logged every time, and only ever chosen explicitly. A
//!   switchover's or an operator's activation with witness fencing wins the lease first.
//! - **A live peer whose VM of this domain is gone counts as lost** for its backup, once a
//!   replication session ended under this daemon with a committed checkpoint: nothing will
//!   checkpoint the VM again (its QEMU died under a live daemon, or a switchover's hand-off
//!   record was lost after the final ACK).
//! - **A primary heard again ends the loss** while fencing has not started or has failed.
//! - **Manual failover never activates by itself**: a backup whose primary is lost waits
//!   for the operator (who applies `OperatorFailover`).
//! - **A restarted daemon never activates twice**: in `Activated` with no VM running, the
//!   guest may already have run from the checkpoint, so the answer is to record `Stop`. Any
//!   other role that says the VM runs here while none does records `Stop` as well.
//! - **A running VM without a backup offers protection** to a live peer that runs nothing.
//! - ACKs that are late (not yet past the ACK timeout) only hold output: the epoch loop
//!   already waits for them, and declaring the backup lost on one slow epoch would drop
//!   protection needlessly — unless the failure detector has declared the backup lost
//!   (heartbeats *and* replication traffic silent for the detection timeout, and no fresh
//!   ACK): then the primary abandons the session at once instead of waiting out the ACK
//!   timeout, and releases output only once it has the proof a primary without ACKs needs.

use crate::heartbeat::PeerLiveness;
use crate::lineage::CopyStamp;
use crate::role::Role;

/// The detector's verdict on the peer, as coarse as the rules need it (from
/// [`PeerLiveness`], the one liveness type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Heard within the timeout on some link.
    Alive,
    /// Silent for a while (or not heard yet), not yet past the timeout.
    Suspect,
    /// Silent on every link for the timeout.
    Lost,
}

impl From<&PeerLiveness> for Peer {
    fn from(l: &PeerLiveness) -> Self {
        match l {
            PeerLiveness::Alive { .. } => Peer::Alive,
            PeerLiveness::Starting | PeerLiveness::Suspect => Peer::Suspect,
            PeerLiveness::Lost { .. } => Peer::Lost,
        }
    }
}

/// The primary's view of its backup's acknowledgements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// ACKs arrive in time.
    Flowing,
    /// The oldest unacknowledged epoch is late but within the ACK timeout.
    Late,
    /// No ACK for longer than the ACK timeout (or the replication connection is gone).
    Stopped,
}

/// The witness lease, as the keeper reports it (see [`crate::witness::LeaseState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// This node holds it exclusively (by its own conservative clock).
    Held,
    /// This node holds it, but declared it preemptible by its backup: enough to run the VM
    /// with output held for the backup's ACKs, not to release output alone.
    HeldPreemptible,
    /// Not held: expired, never acquired, or the witness is unreachable.
    NotHeld,
    /// Another node holds it.
    Denied,
}

impl Lease {
    /// Whether the lease lets a VM run (output aside).
    pub fn lets_run(self) -> bool {
        matches!(self, Lease::Held | Lease::HeldPreemptible)
    }
}

/// The configured fencing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fencing {
    /// A fencing command.
    Command,
    /// Winning the witness lease.
    Witness,
    /// None (unsafe).
    None,
}

/// Progress of the fencing of the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceProgress {
    /// Not started.
    Idle,
    /// Running.
    InProgress,
    /// Proven gone.
    Succeeded,
    /// The last attempt failed.
    Failed,
}

/// The configured failover mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failover {
    /// The backup activates on its own once the primary is lost and fenced.
    Automatic,
    /// The operator decides.
    Manual,
}

/// What the peer's heartbeats say of this domain (its role there, coarsened to what the
/// rules need). `Unknown` when the peer is not heard or does not advertise the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerClaim {
    /// Not heard, or the domain is not in its heartbeats.
    Unknown,
    /// Stopped: no VM, no replica session.
    Stopped,
    /// It holds (or is ready to hold) this node's replica.
    Backup,
    /// It is fencing this node or was proven to have done so: it may activate soon.
    TakingOver,
    /// It runs the VM, or is activating it (standalone, primary, resyncing, activating,
    /// activated).
    Runs,
}

impl PeerClaim {
    /// Whether the peer may be (or become) this node's backup: it runs nothing.
    pub fn can_be_backup(self) -> bool {
        matches!(
            self,
            PeerClaim::Unknown | PeerClaim::Stopped | PeerClaim::Backup
        )
    }
}

/// This node's QEMU for the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vm {
    /// None (never started, exited, killed, or not yet activated).
    Absent,
    /// Running (the epoch loop's own brief stops count as running).
    Running,
    /// Paused by the daemon because nothing proved it safe to run.
    Paused,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Situation<'a> {
    /// The persisted role.
    pub role: &'a Role,
    /// The heartbeat detector's verdict.
    pub peer: Peer,
    /// What the peer advertises of this domain.
    pub claim: PeerClaim,
    /// ACK flow (meaningful for a primary).
    pub acks: Acks,
    /// A protection session runs and its backup acknowledged within the heartbeat timeout:
    /// the backup is demonstrably following this node, so it cannot be activating.
    pub acks_fresh: bool,
    /// The witness lease (meaningful with [`Fencing::Witness`]), held only with a margin.
    pub lease: Lease,
    /// The fencing policy.
    pub fencing: Fencing,
    /// Fencing of the peer, if any was started for the current loss.
    pub fence: FenceProgress,
    /// Automatic or manual failover.
    pub failover: Failover,
    /// Whether the replica holds a committed checkpoint (meaningful for a backup).
    pub has_committed_checkpoint: bool,
    /// Whether a replication session ended while this daemon ran and none runs now (a
    /// daemon restarted after a double failure does not qualify: it cannot know whether its
    /// checkpoint is the newest).
    pub replication_ended_here: bool,
    /// This node's QEMU.
    pub vm: Vm,
}

/// Why [`Action::KillVm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The VM here is paused and the live peer says it runs the VM.
    PeerRunsTheVm,
    /// The witness granted the lease to the peer.
    PeerHoldsLease,
}

impl std::fmt::Display for KillReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KillReason::PeerRunsTheVm => "the peer runs the VM now (it says so in its heartbeats)",
            KillReason::PeerHoldsLease => "the peer holds the witness lease: it runs the VM now",
        })
    }
}

/// Why [`Action::RecordStopped`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The role says the VM runs here but no QEMU does (it exited, or died with the
    /// previous daemon).
    VmGone,
    /// `Activated` with no VM: the guest may have run from the checkpoint already.
    NeverActivateTwice,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::VmGone => "the VM is not running on this node",
            StopReason::NeverActivateTwice => "activated VM not running: never activate twice",
        })
    }
}

/// What the daemon must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do yet.
    Wait,
    /// Nothing changes: keep running; the epoch loop releases output as ACKs come.
    KeepRunning,
    /// Keep the VM running but release no more output until the situation clears.
    HoldOutput,
    /// Run without protection: resume the VM if it was paused, release output that no
    /// protection session holds.
    RunUnprotected,
    /// [`Action::RunUnprotected`], and offer the peer a protection session (the daemon
    /// spaces the attempts).
    Protect,
    /// Pause the VM (QMP `stop`), ending protection: output not acknowledged stays held.
    PauseVm,
    /// Kill this node's QEMU and record `Stop`: the peer has the VM.
    KillVm(KillReason),
    /// Record `Stop`: the role says the VM runs here but none does.
    RecordStopped(StopReason),
    /// Fence the peer (for a primary: its backup; for a backup: its primary; a backup in
    /// `Backup` records `PeerLost` first).
    Fence,
    /// The primary was heard again before fencing succeeded: end the loss (`PeerReturned`).
    PeerReturned,
    /// Activate the replica (from `Fencing` with the lease held the proof is recorded
    /// first). `acquire_lease`: the witness lease must be won before the guest runs
    /// (switchover, operator failover or a redo after restart with witness fencing).
    Activate {
        /// Win the witness lease first.
        acquire_lease: bool,
    },
    /// The backup is gone and proven unable to run the VM: release held output and run
    /// unprotected (a primary or resyncing node records `BackupLost`).
    ReleaseOutputAndRunUnprotected,
    /// The failure detector declared the backup lost while the epoch loop still waits for
    /// its ACKs: end the protection session now (output stays held) instead of waiting out
    /// the ACK timeout; the rules for a primary without ACKs then apply.
    AbandonBackup,
}

/// The rule table. See the module documentation for the reasoning.
pub fn decide(s: &Situation<'_>) -> Action {
    // A paused VM here while the live peer says it runs the VM: the peer won the lease or
    // fenced this node. The paused VM released nothing since, so it goes, whatever the
    // lease keeper reports (a witness this node cannot reach would keep it waiting). A
    // running VM is left alone: two nodes must not kill each other's VM on one stale view.
    if s.vm == Vm::Paused && s.peer == Peer::Alive && s.claim == PeerClaim::Runs {
        return Action::KillVm(KillReason::PeerRunsTheVm);
    }
    // With witness fencing a VM runs only while the lease is held with a margin or the
    // backup demonstrably follows (fresh ACKs). Checked before the role's rules because a
    // partition shows here first: the lease runs out while the epoch loop still waits out
    // its ACK timeout, and the peer may win the lease right after it expires.
    if s.fencing == Fencing::Witness && s.vm != Vm::Absent && !s.lease.lets_run() && !s.acks_fresh {
        return stop(s);
    }
    if s.role.runs_vm() && s.vm == Vm::Absent {
        return Action::RecordStopped(match s.role {
            Role::Activated { .. } => StopReason::NeverActivateTwice,
            _ => StopReason::VmGone,
        });
    }
    match s.role {
        Role::Stopped => Action::Wait,
        Role::Primary { .. } => match s.acks {
            // Heartbeats and replication traffic both silent for the detection timeout: the
            // backup is gone, and its ACKs will not come. Ending the session at once (output
            // held) saves the rest of the ACK timeout; releasing still needs the proof of a
            // primary without ACKs. Fresh ACKs overrule the detector: the backup follows.
            Acks::Flowing | Acks::Late if s.peer == Peer::Lost && !s.acks_fresh => {
                Action::AbandonBackup
            }
            Acks::Flowing => Action::KeepRunning,
            Acks::Late => Action::HoldOutput,
            Acks::Stopped => primary_without_backup(s),
        },
        Role::Standalone => match s.fencing {
            _ if s.lease == Lease::Denied => stop(s),
            // Still the lease of the primary it was: hold until the witness makes it ours alone.
            Fencing::Witness if s.lease == Lease::HeldPreemptible => Action::HoldOutput,
            Fencing::Witness if s.lease != Lease::Held => stop(s),
            _ if s.vm == Vm::Running && s.peer == Peer::Alive && s.claim.can_be_backup() => {
                Action::Protect
            }
            _ => Action::RunUnprotected,
        },
        // The returning backup holds no activatable checkpoint until the first ACK.
        Role::Resyncing { .. } => match s.fencing {
            Fencing::Witness if s.lease == Lease::HeldPreemptible => Action::HoldOutput,
            Fencing::Witness if s.lease != Lease::Held => stop(s),
            _ if s.acks == Acks::Stopped => Action::ReleaseOutputAndRunUnprotected,
            _ => Action::RunUnprotected,
        },
        Role::Backup { .. } => match effective_peer(s) {
            Peer::Alive | Peer::Suspect => Action::Wait,
            Peer::Lost if s.failover == Failover::Manual => Action::Wait,
            Peer::Lost if !s.has_committed_checkpoint => Action::Wait,
            Peer::Lost => Action::Fence,
        },
        Role::Fencing { .. } => backup_fencing(s),
        Role::Fenced { .. } | Role::Activating { .. } if s.has_committed_checkpoint => {
            Action::Activate {
                acquire_lease: must_win_lease(s.fencing, s.lease),
            }
        }
        Role::Fenced { .. } | Role::Activating { .. } => Action::Wait,
        // Written right before `cont`: a running VM finishes the activation (a missing one
        // was handled above: never activate twice).
        Role::Activated { .. } if s.lease == Lease::HeldPreemptible => Action::HoldOutput,
        Role::Activated { .. } => Action::RunUnprotected,
    }
}

/// Whether this node may hold its lease *preemptible by its peer* (witness fencing only):
/// exactly while it is the primary, its output is buffered (released only on the backup's
/// ACKs) and the ACKs have not stopped. Everywhere else the lease is held exclusive, and a
/// primary whose ACKs stopped must have it exclusive again before it releases anything
/// alone. With `unsafe_no_output_buffering` the output does not wait for the backup, so the
/// backup must wait for the lease to run out as before.
pub fn lease_preemptible(role: &Role, acks: Acks, fencing: Fencing, output_buffered: bool) -> bool {
    fencing == Fencing::Witness
        && output_buffered
        && matches!(role, Role::Primary { .. })
        && acks != Acks::Stopped
}

/// Whether the witness lease must be won before this node runs the VM: with witness
/// fencing, unless it is held already (an operator's start and failover, a switchover's or
/// a restarted activation).
pub fn must_win_lease(fencing: Fencing, lease: Lease) -> bool {
    fencing == Fencing::Witness && lease != Lease::Held
}

/// A VM that nothing proves safe to run: killed if the peer holds the lease, paused
/// otherwise (a paused one stays paused).
fn stop(s: &Situation<'_>) -> Action {
    match s.vm {
        Vm::Absent => Action::Wait,
        _ if s.lease == Lease::Denied => Action::KillVm(KillReason::PeerHoldsLease),
        Vm::Running => Action::PauseVm,
        Vm::Paused => Action::Wait,
    }
}

/// The detector's verdict, except that a backup whose live peer says its VM of this
/// domain is gone (QEMU died under a live daemon: `Stopped`; or a switchover whose
/// hand-off record was lost after the final ACK left the old primary a `Backup` with its VM
/// killed) counts the peer as lost for this domain: nothing will checkpoint the VM again.
/// Only once a session ended under this daemon with a committed checkpoint.
fn effective_peer(s: &Situation<'_>) -> Peer {
    let vm_gone_there = matches!(s.claim, PeerClaim::Stopped | PeerClaim::Backup);
    if s.peer == Peer::Alive
        && vm_gone_there
        && s.replication_ended_here
        && s.has_committed_checkpoint
    {
        Peer::Lost
    } else {
        s.peer
    }
}

/// A primary whose backup stopped acknowledging.
fn primary_without_backup(s: &Situation<'_>) -> Action {
    match s.fencing {
        // The lease proves the backup cannot win it, hence cannot activate; a preemptible
        // one proves nothing (the backup may have taken it): the keeper is renewing it
        // exclusive ([`lease_preemptible`] is false without ACKs), output waits for that.
        Fencing::Witness => match s.lease {
            Lease::Held => Action::ReleaseOutputAndRunUnprotected,
            Lease::HeldPreemptible => Action::HoldOutput,
            Lease::NotHeld | Lease::Denied => stop(s),
        },
        // Shoot the backup before releasing output it never acknowledged.
        Fencing::Command => match s.fence {
            FenceProgress::Idle => Action::Fence,
            FenceProgress::InProgress => Action::HoldOutput,
            FenceProgress::Succeeded => Action::ReleaseOutputAndRunUnprotected,
            FenceProgress::Failed => stop(s),
        },
        // Unsafe by configuration: nothing to prove.
        Fencing::None => Action::ReleaseOutputAndRunUnprotected,
    }
}

/// A backup in `Fencing`.
fn backup_fencing(s: &Situation<'_>) -> Action {
    // A primary heard again before fencing got under way or after it failed ends the loss
    // (also in manual mode, and even with the lease held: the primary is alive).
    if s.peer == Peer::Alive && matches!(s.fence, FenceProgress::Idle | FenceProgress::Failed) {
        return Action::PeerReturned;
    }
    if s.failover == Failover::Manual {
        return Action::Wait;
    }
    match s.fencing {
        Fencing::Witness if s.lease == Lease::Held => Action::Activate {
            acquire_lease: false,
        },
        _ => match s.fence {
            FenceProgress::Succeeded if s.has_committed_checkpoint => Action::Activate {
                acquire_lease: false,
            },
            FenceProgress::Succeeded | FenceProgress::InProgress => Action::Wait,
            // A failed attempt is retried (the daemon spaces the retries) while the peer
            // stays lost.
            FenceProgress::Idle | FenceProgress::Failed if s.peer == Peer::Lost => Action::Fence,
            FenceProgress::Idle | FenceProgress::Failed => Action::Wait,
        },
    }
}

/// What to do with a replication session the peer opens to this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionVerdict {
    /// Stopped here: become the peer's backup (`BackupStarted`).
    BecomeBackup,
    /// Already its backup: the new session supersedes the old one.
    Continue,
    /// Fencing the peer, which is evidently alive: stop fencing (`PeerReturned`), receive.
    EndFencing,
    /// This node runs the VM or is taking it over: refuse.
    Refuse,
}

/// The rule for an incoming replication session.
pub fn incoming_session(role: &Role) -> SessionVerdict {
    match role {
        Role::Stopped => SessionVerdict::BecomeBackup,
        Role::Backup { .. } => SessionVerdict::Continue,
        Role::Fencing { .. } => SessionVerdict::EndFencing,
        _ => SessionVerdict::Refuse,
    }
}

/// An operator's command, as far as its admission depends on the roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Boot the VM here (`remusctl start`).
    Start,
    /// Activate the replica now (`remusctl failover`).
    Failover,
    /// Hand the VM over to the backup (`remusctl switchover`).
    Switchover,
    /// Boot a throwaway copy of the replica (`remusctl test-activate`).
    TestActivate,
}

/// Why an operator's command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `start` outside `stopped`.
    #[error("role is {0}: only a stopped domain can be started")]
    NotStopped(&'static str),
    /// `start` while the peer advertises a role other than stopped.
    #[error("the peer's role for the domain is {0:?}: it must be stopped")]
    PeerNotStopped(PeerClaim),
    /// `failover` outside the backup roles.
    #[error("role is {0}: a failover is asked of the backup")]
    NotBackup(&'static str),
    /// `test-activate` outside `backup`.
    #[error("role is {0}: a test activation is asked of the backup")]
    NotBackupForTest(&'static str),
    /// `failover` without a committed checkpoint.
    #[error("the replica holds no committed checkpoint")]
    NothingCommitted,
    /// `switchover` outside `primary`.
    #[error("role is {0}: a switchover is asked of the protecting primary")]
    NotPrimary(&'static str),
}

/// Whether `command` may run in `role` (with the peer claiming `claim` and a committed
/// checkpoint here or not). The copy-stamp check of `start` is [`against_newer`].
pub fn admit(
    command: Command,
    role: &Role,
    claim: PeerClaim,
    has_committed_checkpoint: bool,
) -> Result<(), Refusal> {
    match command {
        Command::Start if *role != Role::Stopped => Err(Refusal::NotStopped(role.name())),
        Command::Start if !matches!(claim, PeerClaim::Unknown | PeerClaim::Stopped) => {
            Err(Refusal::PeerNotStopped(claim))
        }
        Command::Failover if !matches!(role, Role::Backup { .. } | Role::Fencing { .. }) => {
            Err(Refusal::NotBackup(role.name()))
        }
        Command::Failover if !has_committed_checkpoint => Err(Refusal::NothingCommitted),
        Command::Switchover if !matches!(role, Role::Primary { .. }) => {
            Err(Refusal::NotPrimary(role.name()))
        }
        Command::TestActivate if !matches!(role, Role::Backup { .. }) => {
            Err(Refusal::NotBackupForTest(role.name()))
        }
        _ => Ok(()),
    }
}

/// A `start`'s verdict against another holder's copy stamp (the peer's, the witness's
/// record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyVerdict {
    /// This node's copy is not older.
    NotOlder,
    /// Older, started anyway (`--older-copy`).
    OlderOverridden,
    /// Older: refused.
    Refused,
}

/// One rule for a start against another holder's stamp: refused when `other` is newer
/// than `own`, unless the operator passed `--older-copy`.
pub fn against_newer(own: CopyStamp, other: CopyStamp, older_copy: bool) -> CopyVerdict {
    if other <= own {
        CopyVerdict::NotOlder
    } else if older_copy {
        CopyVerdict::OlderOverridden
    } else {
        CopyVerdict::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lineage::CopyHolder;
    use crate::role::FenceProof;

    fn base(role: &Role) -> Situation<'_> {
        Situation {
            role,
            peer: Peer::Alive,
            claim: PeerClaim::Unknown,
            acks: Acks::Flowing,
            acks_fresh: false,
            lease: Lease::NotHeld,
            fencing: Fencing::Command,
            fence: FenceProgress::Idle,
            failover: Failover::Automatic,
            has_committed_checkpoint: true,
            replication_ended_here: false,
            vm: if role.runs_vm() {
                Vm::Running
            } else {
                Vm::Absent
            },
        }
    }

    const PAUSE: Action = Action::PauseVm;
    const ACTIVATE: Action = Action::Activate {
        acquire_lease: false,
    };
    const KILL_LEASE: Action = Action::KillVm(KillReason::PeerHoldsLease);

    #[test]
    fn lease_preemptible_table() {
        let primary = Role::Primary {
            peer: "b".into(),
            since_epoch: 1,
        };
        let resync = Role::Resyncing { peer: "b".into() };
        // (case, role, acks, fencing, output buffered, preemptible)
        #[rustfmt::skip]
        let rows: Vec<(&str, &Role, Acks, Fencing, bool, bool)> = vec![
            ("protecting primary", &primary, Acks::Flowing, Fencing::Witness, true, true),
            ("late ACKs still gate the output", &primary, Acks::Late, Fencing::Witness, true, true),
            ("ACKs stopped: about to release alone", &primary, Acks::Stopped, Fencing::Witness, true, false),
            ("output not buffered: the backup must wait", &primary, Acks::Flowing, Fencing::Witness, false, false),
            ("no witness", &primary, Acks::Flowing, Fencing::Command, true, false),
            ("resyncing releases without ACKs", &resync, Acks::Flowing, Fencing::Witness, true, false),
            ("standalone", &Role::Standalone, Acks::Flowing, Fencing::Witness, true, false),
        ];
        for (case, role, acks, fencing, buffered, want) in rows {
            assert_eq!(
                lease_preemptible(role, acks, fencing, buffered),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn rule_table() {
        let primary = Role::Primary {
            peer: "b".into(),
            since_epoch: 1,
        };
        let backup = Role::Backup {
            peer: "a".into(),
            last_committed: Some(3),
        };
        let fencing = Role::Fencing {
            peer: "a".into(),
            started_ms: 0,
            attempts: 0,
        };
        let fenced = Role::Fenced {
            peer: "a".into(),
            by: FenceProof::Command,
        };
        let activating = Role::Activating { from_epoch: 3 };
        let activated = Role::Activated { epoch: 3 };
        let standalone = Role::Standalone;
        let resync = Role::Resyncing { peer: "b".into() };
        type Tweak = fn(&mut Situation<'_>);
        #[rustfmt::skip]
        let rows: Vec<(&str, &Role, Tweak, Action)> = vec![
            // --- whatever the role: the peer runs the VM ---
            ("paused primary, live peer runs the VM: kill", &primary,
             |s| { s.vm = Vm::Paused; s.acks = Acks::Stopped; s.claim = PeerClaim::Runs },
             Action::KillVm(KillReason::PeerRunsTheVm)),
            ("paused standalone, live peer activating: kill", &standalone,
             |s| { s.vm = Vm::Paused; s.claim = PeerClaim::Runs; s.fencing = Fencing::Witness },
             Action::KillVm(KillReason::PeerRunsTheVm)),
            ("running VM, peer claims to run it: not on one view", &standalone,
             |s| s.claim = PeerClaim::Runs, Action::RunUnprotected),
            ("paused VM, peer claims to run it but is suspect: wait", &standalone,
             |s| { s.vm = Vm::Paused; s.claim = PeerClaim::Runs; s.peer = Peer::Suspect;
                   s.fencing = Fencing::Witness }, Action::Wait),
            ("paused VM, peer only taking over: not yet", &primary,
             |s| { s.vm = Vm::Paused; s.acks = Acks::Stopped; s.claim = PeerClaim::TakingOver;
                   s.fencing = Fencing::Witness }, Action::Wait),
            // --- whatever the role: the lease with witness fencing ---
            ("primary, ACKs flowing but stale, lease lapsing: pause", &primary,
             |s| s.fencing = Fencing::Witness, PAUSE),
            ("primary, fresh ACKs, no lease: keep running", &primary,
             |s| { s.fencing = Fencing::Witness; s.acks_fresh = true }, Action::KeepRunning),
            ("primary, stale ACKs, lease denied: kill", &primary,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Denied }, KILL_LEASE),
            ("activated, lease lapsing: pause", &activated,
             |s| s.fencing = Fencing::Witness, PAUSE),
            ("activated, paused, lease not back: stay paused", &activated,
             |s| { s.fencing = Fencing::Witness; s.vm = Vm::Paused }, Action::Wait),
            // --- whatever the role: no VM where the role says one runs ---
            ("primary, QEMU gone: record stop", &primary, |s| s.vm = Vm::Absent,
             Action::RecordStopped(StopReason::VmGone)),
            ("standalone after restart: record stop", &standalone, |s| s.vm = Vm::Absent,
             Action::RecordStopped(StopReason::VmGone)),
            ("resyncing after restart: record stop", &resync, |s| s.vm = Vm::Absent,
             Action::RecordStopped(StopReason::VmGone)),
            ("activated after restart, VM gone: never twice", &activated, |s| s.vm = Vm::Absent,
             Action::RecordStopped(StopReason::NeverActivateTwice)),
            // --- primary ---
            ("primary, ACKs flow", &primary, |_| {}, Action::KeepRunning),
            ("primary, ACKs late: hold", &primary, |s| s.acks = Acks::Late, Action::HoldOutput),
            ("primary, ACKs late, backup lost by the detector: abandon it", &primary,
             |s| { s.acks = Acks::Late; s.peer = Peer::Lost }, Action::AbandonBackup),
            ("primary, backup lost by the detector before an ACK is late: abandon it", &primary,
             |s| s.peer = Peer::Lost, Action::AbandonBackup),
            ("primary, backup lost by the detector but ACKs fresh: keep running", &primary,
             |s| { s.peer = Peer::Lost; s.acks_fresh = true }, Action::KeepRunning),
            ("primary, ACKs late, backup only suspect: hold", &primary,
             |s| { s.acks = Acks::Late; s.peer = Peer::Suspect }, Action::HoldOutput),
            ("primary, no ACKs, no witness lease: pause", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.peer = Peer::Lost },
             PAUSE),
            ("primary, no ACKs, lease denied: kill", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Denied },
             KILL_LEASE),
            ("primary, no ACKs, paused, lease not held: stay paused", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.vm = Vm::Paused },
             Action::Wait),
            ("primary, no ACKs, lease held: run unprotected", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Held },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, no ACKs, lease preemptible: hold until it is ours alone", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness;
                   s.lease = Lease::HeldPreemptible }, Action::HoldOutput),
            ("primary, stale ACKs, lease preemptible: keep running, output waits for ACKs",
             &primary, |s| { s.acks = Acks::Late; s.fencing = Fencing::Witness;
                   s.lease = Lease::HeldPreemptible }, Action::HoldOutput),
            ("primary, ACKs flow, lease preemptible", &primary,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::HeldPreemptible },
             Action::KeepRunning),
            ("primary, no ACKs, backup took the lease: kill", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Denied },
             KILL_LEASE),
            ("standalone, lease still preemptible: hold", &standalone,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::HeldPreemptible },
             Action::HoldOutput),
            ("resyncing, lease still preemptible: hold", &resync,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::HeldPreemptible },
             Action::HoldOutput),
            ("activated, lease preemptible: hold", &activated,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::HeldPreemptible },
             Action::HoldOutput),
            ("primary, paused, lease back: run unprotected", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Held;
                   s.vm = Vm::Paused }, Action::ReleaseOutputAndRunUnprotected),
            ("primary, no ACKs, command: fence the backup", &primary,
             |s| s.acks = Acks::Stopped, Action::Fence),
            ("primary, no ACKs, fencing running: hold", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::InProgress }, Action::HoldOutput),
            ("primary, no ACKs, backup fenced: run unprotected", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::Succeeded },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, no ACKs, fencing failed: pause", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::Failed }, PAUSE),
            ("primary, no ACKs, fencing none: unsafe run", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::None },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, fresh ACKs, witness unreachable: fine", &primary,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::NotHeld; s.acks_fresh = true },
             Action::KeepRunning),
            // --- standalone ---
            ("standalone, peer alive, may be backup: protect", &standalone, |_| {}, Action::Protect),
            ("standalone, peer is backup already: protect", &standalone,
             |s| s.claim = PeerClaim::Backup, Action::Protect),
            ("standalone, peer suspect: run", &standalone,
             |s| s.peer = Peer::Suspect, Action::RunUnprotected),
            ("standalone, peer taking over: do not protect to it", &standalone,
             |s| s.claim = PeerClaim::TakingOver, Action::RunUnprotected),
            ("standalone, paused: resume before protecting", &standalone,
             |s| s.vm = Vm::Paused, Action::RunUnprotected),
            ("standalone, lease held: protect", &standalone,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Held }, Action::Protect),
            ("standalone, lease lost: pause before it expires at the witness", &standalone,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::NotHeld }, PAUSE),
            ("standalone, lease denied (command fencing after a lease win): kill", &standalone,
             |s| s.lease = Lease::Denied, KILL_LEASE),
            // --- resyncing ---
            ("resyncing, lease denied: kill", &resync,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Denied }, KILL_LEASE),
            ("resyncing, fencing none", &resync, |s| s.fencing = Fencing::None, Action::RunUnprotected),
            ("resyncing, session lost: release and run", &resync,
             |s| s.acks = Acks::Stopped, Action::ReleaseOutputAndRunUnprotected),
            ("resyncing, session lost, no lease: pause, release nothing", &resync,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness }, PAUSE),
            ("resyncing, session lost, paused, lease back: release and run", &resync,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Held;
                   s.vm = Vm::Paused }, Action::ReleaseOutputAndRunUnprotected),
            // --- backup ---
            ("backup, primary alive", &backup, |_| {}, Action::Wait),
            ("backup, primary suspect", &backup, |s| s.peer = Peer::Suspect, Action::Wait),
            ("backup, primary lost: fence", &backup, |s| s.peer = Peer::Lost, Action::Fence),
            ("backup, primary lost, witness: fence = win lease", &backup,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::Witness }, Action::Fence),
            ("backup, primary lost, fencing none: still through the (no-op) fencer", &backup,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::None }, Action::Fence),
            ("backup, primary lost, manual: wait for operator", &backup,
             |s| { s.peer = Peer::Lost; s.failover = Failover::Manual }, Action::Wait),
            ("backup, primary lost, nothing committed", &backup,
             |s| { s.peer = Peer::Lost; s.has_committed_checkpoint = false }, Action::Wait),
            ("backup, live primary says its VM stopped, session ended here: lost", &backup,
             |s| { s.claim = PeerClaim::Stopped; s.replication_ended_here = true }, Action::Fence),
            ("backup, live primary became backup (lost hand-off), session ended here: lost",
             &backup, |s| { s.claim = PeerClaim::Backup; s.replication_ended_here = true },
             Action::Fence),
            ("backup, live primary stopped, but no session ended here (restart): wait", &backup,
             |s| s.claim = PeerClaim::Stopped, Action::Wait),
            ("backup, live primary stopped, nothing committed: wait", &backup,
             |s| { s.claim = PeerClaim::Stopped; s.replication_ended_here = true;
                   s.has_committed_checkpoint = false }, Action::Wait),
            ("backup, live primary runs: wait", &backup,
             |s| { s.claim = PeerClaim::Runs; s.replication_ended_here = true }, Action::Wait),
            // --- fencing (backup side) ---
            ("fencing, running", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::InProgress }, Action::Wait),
            ("fencing, running, peer heard: let it finish", &fencing,
             |s| s.fence = FenceProgress::InProgress, Action::Wait),
            ("fencing, succeeded: activate", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::Succeeded }, ACTIVATE),
            ("fencing, succeeded, peer heard: activate", &fencing,
             |s| s.fence = FenceProgress::Succeeded, ACTIVATE),
            ("fencing, failed: retry while lost", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::Failed }, Action::Fence),
            ("fencing, failed, peer back: end the loss", &fencing,
             |s| s.fence = FenceProgress::Failed, Action::PeerReturned),
            ("fencing, not started, peer back: end the loss", &fencing, |_| {}, Action::PeerReturned),
            ("fencing, peer suspect: wait", &fencing,
             |s| { s.peer = Peer::Suspect; s.fence = FenceProgress::Failed }, Action::Wait),
            ("fencing, manual, peer back: end the loss", &fencing,
             |s| s.failover = Failover::Manual, Action::PeerReturned),
            ("fencing, lease won: activate", &fencing,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::Witness; s.lease = Lease::Held },
             ACTIVATE),
            ("fencing, lease held but primary heard: end the loss", &fencing,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Held }, Action::PeerReturned),
            ("fencing, lease denied: keep trying", &fencing,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::Witness; s.lease = Lease::Denied;
                   s.fence = FenceProgress::Failed }, Action::Fence),
            ("fencing, manual: never by itself", &fencing,
             |s| { s.peer = Peer::Lost; s.failover = Failover::Manual;
                   s.fence = FenceProgress::Succeeded }, Action::Wait),
            // --- activation ---
            ("fenced: activate", &fenced, |_| {}, ACTIVATE),
            ("fenced, witness, lease not held (switchover): win it first", &fenced,
             |s| s.fencing = Fencing::Witness, Action::Activate { acquire_lease: true }),
            ("fenced, witness, lease held: activate", &fenced,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Held }, ACTIVATE),
            ("fenced, nothing committed: wait", &fenced,
             |s| s.has_committed_checkpoint = false, Action::Wait),
            ("activating after restart: redo", &activating, |_| {}, ACTIVATE),
            ("activated, VM running", &activated, |_| {}, Action::RunUnprotected),
            ("stopped", &Role::Stopped, |s| s.peer = Peer::Lost, Action::Wait),
        ];
        for (what, role, tweak, want) in rows {
            let mut s = base(role);
            tweak(&mut s);
            assert_eq!(decide(&s), want, "{what}: {s:?}");
        }
    }

    #[test]
    fn incoming_sessions() {
        let cases = [
            (Role::Stopped, SessionVerdict::BecomeBackup),
            (
                Role::Backup {
                    peer: "a".into(),
                    last_committed: None,
                },
                SessionVerdict::Continue,
            ),
            (
                Role::Fencing {
                    peer: "a".into(),
                    started_ms: 0,
                    attempts: 2,
                },
                SessionVerdict::EndFencing,
            ),
            (Role::Standalone, SessionVerdict::Refuse),
            (
                Role::Primary {
                    peer: "b".into(),
                    since_epoch: 0,
                },
                SessionVerdict::Refuse,
            ),
            (
                Role::Fenced {
                    peer: "a".into(),
                    by: FenceProof::Lease,
                },
                SessionVerdict::Refuse,
            ),
            (Role::Activating { from_epoch: 1 }, SessionVerdict::Refuse),
            (Role::Activated { epoch: 1 }, SessionVerdict::Refuse),
            (Role::Resyncing { peer: "b".into() }, SessionVerdict::Refuse),
        ];
        for (role, want) in cases {
            assert_eq!(incoming_session(&role), want, "{role:?}");
        }
    }

    #[test]
    fn operator_commands() {
        let backup = Role::Backup {
            peer: "a".into(),
            last_committed: Some(1),
        };
        let fencing = Role::Fencing {
            peer: "a".into(),
            started_ms: 0,
            attempts: 0,
        };
        let primary = Role::Primary {
            peer: "b".into(),
            since_epoch: 0,
        };
        use Command::*;
        use PeerClaim as C;
        #[rustfmt::skip]
        type Row<'r> = (Command, &'r Role, PeerClaim, bool, Result<(), Refusal>);
        let rows: Vec<Row<'_>> = vec![
            (Start, &Role::Stopped, C::Unknown, false, Ok(())),
            (Start, &Role::Stopped, C::Stopped, false, Ok(())),
            (
                Start,
                &Role::Stopped,
                C::Backup,
                false,
                Err(Refusal::PeerNotStopped(C::Backup)),
            ),
            (
                Start,
                &Role::Stopped,
                C::Runs,
                false,
                Err(Refusal::PeerNotStopped(C::Runs)),
            ),
            (
                Start,
                &backup,
                C::Stopped,
                true,
                Err(Refusal::NotStopped("backup")),
            ),
            (
                Start,
                &Role::Standalone,
                C::Stopped,
                false,
                Err(Refusal::NotStopped("standalone")),
            ),
            (Failover, &backup, C::Unknown, true, Ok(())),
            (Failover, &fencing, C::Unknown, true, Ok(())),
            (
                Failover,
                &backup,
                C::Unknown,
                false,
                Err(Refusal::NothingCommitted),
            ),
            (
                Failover,
                &primary,
                C::Backup,
                false,
                Err(Refusal::NotBackup("primary")),
            ),
            (
                Failover,
                &Role::Stopped,
                C::Unknown,
                true,
                Err(Refusal::NotBackup("stopped")),
            ),
            (Switchover, &primary, C::Backup, false, Ok(())),
            (
                Switchover,
                &Role::Standalone,
                C::Stopped,
                false,
                Err(Refusal::NotPrimary("standalone")),
            ),
            (
                Switchover,
                &backup,
                C::Runs,
                true,
                Err(Refusal::NotPrimary("backup")),
            ),
            (TestActivate, &backup, C::Runs, true, Ok(())),
            (
                TestActivate,
                &fencing,
                C::Unknown,
                true,
                Err(Refusal::NotBackupForTest("fencing")),
            ),
        ];
        for (cmd, role, claim, committed, want) in rows {
            assert_eq!(
                admit(cmd, role, claim, committed),
                want,
                "{cmd:?} in {role:?}, peer {claim:?}"
            );
        }
    }

    #[test]
    fn start_against_a_newer_copy() {
        let s = |generation, holder| CopyStamp { generation, holder };
        let ran2 = s(2, CopyHolder::Ran);
        let got2 = s(2, CopyHolder::Received);
        let ran3 = s(3, CopyHolder::Ran);
        let rows = [
            (ran2, got2, false, CopyVerdict::NotOlder),
            (ran2, ran2, false, CopyVerdict::NotOlder),
            (got2, ran2, false, CopyVerdict::Refused),
            (got2, ran2, true, CopyVerdict::OlderOverridden),
            (ran2, ran3, false, CopyVerdict::Refused),
            (CopyStamp::NONE, got2, false, CopyVerdict::Refused),
            (ran3, CopyStamp::NONE, false, CopyVerdict::NotOlder),
        ];
        for (own, other, older_copy, want) in rows {
            assert_eq!(
                against_newer(own, other, older_copy),
                want,
                "{own} vs {other}"
            );
        }
    }
}
