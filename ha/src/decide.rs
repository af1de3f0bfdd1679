//! The failover decision: given what this node knows, what it must do with the VM now.
//!
//! [`decide`] is a pure function of a [`Situation`], so every rule is a row of a table test.
//! The daemon calls it whenever an input changes (peer liveness, lease state, ACK flow,
//! fencing progress) and carries out the [`Action`], persisting the role first.
//!
//! The rules, and why:
//! - **A node releases output only while it can prove nobody else may run the VM.** A
//!   primary proves it by its backup's ACKs (the backup is alive and following it), by the
//!   witness lease (the backup cannot win the lease while it is held), or by having fenced
//!   the backup. A primary that has neither ACKs nor the lease (witness policy), or whose
//!   fencing failed, stops its VM: otherwise a partitioned backup could activate from an
//!   older checkpoint while the primary's newer output is already out (split brain).
//! - **A backup activates only after fencing succeeded or the lease was won**, and only
//!   from a committed checkpoint. With fencing `none`, the no-op fencer "succeeds" after the
//!   detection timeout: unsafe, logged every time, and only ever chosen explicitly.
//! - **Manual failover never activates by itself**: a backup whose primary is lost waits
//!   for the operator (who applies `OperatorFailover`).
//! - **A restarted daemon never activates twice**: in `Activated` with no VM running, the
//!   guest may already have run from the checkpoint, so the answer is to stay stopped.
//! - ACKs that are late (not yet past the ACK timeout) only hold output: the epoch loop
//!   already waits for them, and declaring the backup lost on one slow epoch would drop
//!   protection needlessly.

use crate::role::Role;

/// What the heartbeat detector says about the peer (see [`crate::heartbeat::PeerLiveness`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Heard within the timeout on some link.
    Alive,
    /// Silent for a while, not yet past the timeout.
    Suspect,
    /// Silent on every link for the timeout.
    Lost,
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
    /// This node holds it (by its own conservative clock).
    Held,
    /// Not held: expired, never acquired, or the witness is unreachable.
    NotHeld,
    /// Another node holds it.
    Denied,
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

/// Everything [`decide`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Situation<'a> {
    /// The persisted role.
    pub role: &'a Role,
    /// The heartbeat detector's verdict.
    pub peer: Peer,
    /// ACK flow (meaningful for a primary).
    pub acks: Acks,
    /// The witness lease (meaningful with [`Fencing::Witness`]).
    pub lease: Lease,
    /// The fencing policy.
    pub fencing: Fencing,
    /// Fencing of the peer, if any was started for the current loss.
    pub fence: FenceProgress,
    /// Automatic or manual failover.
    pub failover: Failover,
    /// Whether the replica holds a committed checkpoint (meaningful for a backup).
    pub has_committed_checkpoint: bool,
    /// Whether this node's QEMU for the domain is running.
    pub vm_running: bool,
}

/// What the daemon must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing changes: keep running (and releasing output as the role allows).
    KeepRunning,
    /// Keep the VM running but release no more output until the situation clears.
    HoldOutput,
    /// Stop the VM (no output was released that it could not justify).
    StopVm,
    /// Fence the peer (for a primary: its backup; for a backup: its primary).
    Fence,
    /// Activate the replica (role must be `Fenced` or `Activating`).
    Activate,
    /// The backup is gone and proven unable to run the VM: release held output and run
    /// unprotected (role `Standalone`).
    ReleaseOutputAndRunUnprotected,
    /// Nothing to do yet.
    Wait,
}

/// The rule table. See the module documentation for the reasoning.
pub fn decide(s: &Situation<'_>) -> Action {
    match s.role {
        Role::Stopped => Action::Wait,
        Role::Primary { .. } => match s.acks {
            Acks::Flowing => Action::KeepRunning,
            Acks::Late => Action::HoldOutput,
            Acks::Stopped => primary_without_backup(s),
        },
        // Running unprotected: keep running while nobody else can take the VM.
        Role::Standalone | Role::Resyncing { .. } => match s.fencing {
            Fencing::Witness if s.lease != Lease::Held => Action::StopVm,
            _ => Action::KeepRunning,
        },
        Role::Backup { .. } => match s.peer {
            Peer::Alive | Peer::Suspect => Action::Wait,
            Peer::Lost if s.failover == Failover::Manual => Action::Wait,
            Peer::Lost if !s.has_committed_checkpoint => Action::Wait,
            Peer::Lost => Action::Fence,
        },
        Role::Fencing { .. } => backup_fencing(s),
        Role::Fenced { .. } | Role::Activating { .. } if s.has_committed_checkpoint => {
            Action::Activate
        }
        Role::Fenced { .. } | Role::Activating { .. } => Action::Wait,
        // Written right before `cont`: a running VM finishes the activation; a missing one
        // (daemon restarted, QEMU died with it) must not be activated again.
        Role::Activated { .. } if s.vm_running => Action::KeepRunning,
        Role::Activated { .. } => Action::StopVm,
    }
}

/// A primary whose backup stopped acknowledging.
fn primary_without_backup(s: &Situation<'_>) -> Action {
    match s.fencing {
        // The lease proves the backup cannot win it, hence cannot activate.
        Fencing::Witness => match s.lease {
            Lease::Held => Action::ReleaseOutputAndRunUnprotected,
            Lease::NotHeld | Lease::Denied => Action::StopVm,
        },
        // Shoot the backup before releasing output it never acknowledged.
        Fencing::Command => match s.fence {
            FenceProgress::Idle => Action::Fence,
            FenceProgress::InProgress => Action::HoldOutput,
            FenceProgress::Succeeded => Action::ReleaseOutputAndRunUnprotected,
            FenceProgress::Failed => Action::StopVm,
        },
        // Unsafe by configuration: nothing to prove.
        Fencing::None => Action::ReleaseOutputAndRunUnprotected,
    }
}

/// A backup in `Fencing`.
fn backup_fencing(s: &Situation<'_>) -> Action {
    if s.failover == Failover::Manual {
        return Action::Wait;
    }
    match s.fencing {
        Fencing::Witness if s.lease == Lease::Held => Action::Activate,
        _ => match s.fence {
            FenceProgress::Succeeded if s.has_committed_checkpoint => Action::Activate,
            FenceProgress::Succeeded | FenceProgress::InProgress => Action::Wait,
            // A failed attempt is retried (the daemon spaces the retries) while the peer
            // stays lost; a returning peer ends fencing (`PeerReturned`).
            FenceProgress::Idle | FenceProgress::Failed if s.peer == Peer::Lost => Action::Fence,
            FenceProgress::Idle | FenceProgress::Failed => Action::Wait,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::FenceProof;

    fn base(role: &Role) -> Situation<'_> {
        Situation {
            role,
            peer: Peer::Alive,
            acks: Acks::Flowing,
            lease: Lease::NotHeld,
            fencing: Fencing::Command,
            fence: FenceProgress::Idle,
            failover: Failover::Automatic,
            has_committed_checkpoint: true,
            vm_running: true,
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
            // --- primary ---
            ("primary, ACKs flow", &primary, |_| {}, Action::KeepRunning),
            ("primary, ACKs late: hold", &primary, |s| s.acks = Acks::Late, Action::HoldOutput),
            ("primary, no ACKs, no witness lease: stop", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.peer = Peer::Lost },
             Action::StopVm),
            ("primary, no ACKs, lease denied: stop", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Denied },
             Action::StopVm),
            ("primary, no ACKs, lease held: run unprotected", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::Witness; s.lease = Lease::Held },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, no ACKs, command: fence the backup", &primary,
             |s| s.acks = Acks::Stopped, Action::Fence),
            ("primary, no ACKs, fencing running: hold", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::InProgress }, Action::HoldOutput),
            ("primary, no ACKs, backup fenced: run unprotected", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::Succeeded },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, no ACKs, fencing failed: stop", &primary,
             |s| { s.acks = Acks::Stopped; s.fence = FenceProgress::Failed }, Action::StopVm),
            ("primary, no ACKs, fencing none: unsafe run", &primary,
             |s| { s.acks = Acks::Stopped; s.fencing = Fencing::None },
             Action::ReleaseOutputAndRunUnprotected),
            ("primary, ACKs flow, witness unreachable: fine", &primary,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::NotHeld }, Action::KeepRunning),
            // --- standalone / resyncing ---
            ("standalone, command policy", &standalone, |_| {}, Action::KeepRunning),
            ("standalone, lease held", &standalone,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Held }, Action::KeepRunning),
            ("standalone, lease lost: stop before it expires at the witness", &standalone,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::NotHeld }, Action::StopVm),
            ("resyncing, lease denied: stop", &resync,
             |s| { s.fencing = Fencing::Witness; s.lease = Lease::Denied }, Action::StopVm),
            ("resyncing, fencing none", &resync, |s| s.fencing = Fencing::None, Action::KeepRunning),
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
            // --- fencing (backup side) ---
            ("fencing, running", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::InProgress }, Action::Wait),
            ("fencing, succeeded: activate", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::Succeeded }, Action::Activate),
            ("fencing, failed: retry while lost", &fencing,
             |s| { s.peer = Peer::Lost; s.fence = FenceProgress::Failed }, Action::Fence),
            ("fencing, failed, peer back: wait", &fencing,
             |s| s.fence = FenceProgress::Failed, Action::Wait),
            ("fencing, lease won: activate", &fencing,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::Witness; s.lease = Lease::Held },
             Action::Activate),
            ("fencing, lease denied: keep trying", &fencing,
             |s| { s.peer = Peer::Lost; s.fencing = Fencing::Witness; s.lease = Lease::Denied;
                   s.fence = FenceProgress::Failed }, Action::Fence),
            ("fencing, manual: never by itself", &fencing,
             |s| { s.peer = Peer::Lost; s.failover = Failover::Manual;
                   s.fence = FenceProgress::Succeeded }, Action::Wait),
            // --- activation ---
            ("fenced: activate", &fenced, |s| s.vm_running = false, Action::Activate),
            ("fenced, nothing committed: wait", &fenced,
             |s| s.has_committed_checkpoint = false, Action::Wait),
            ("activating after restart: redo", &activating, |s| s.vm_running = false, Action::Activate),
            ("activated, VM running", &activated, |_| {}, Action::KeepRunning),
            ("activated after restart, VM gone: never twice", &activated,
             |s| s.vm_running = false, Action::StopVm),
            ("stopped", &Role::Stopped, |s| s.peer = Peer::Lost, Action::Wait),
        ];
        for (what, role, tweak, want) in rows {
            let mut s = base(role);
            tweak(&mut s);
            assert_eq!(decide(&s), want, "{what}: {s:?}");
        }
    }
}
