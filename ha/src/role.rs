//! The persisted per-domain role: what this node is allowed to do with the VM.
//!
//! ```text
//!  Stopped --StartUnprotected--> Standalone --ProtectionStarted--> Primary
//!  Stopped --BackupStarted--> Backup
//!  Primary --BackupLost--> Standalone --BackupReturned--> Resyncing --ResyncDone--> Primary
//!  Backup --PeerLost--> Fencing --Fenced--> Fenced --ActivationStarted--> Activating
//!         --Resuming--> Activated --ActivationDone--> Standalone
//!  Fencing --FenceFailed--> Fencing (attempts + 1)     Fencing --PeerReturned--> Backup
//!  Backup|Fencing --OperatorFailover--> Fenced          (manual failover: the operator vouches)
//!  Primary --SwitchoverHandOff--> Backup                Backup --SwitchoverTakeOver--> Fenced
//!  any --Stop--> Stopped
//! ```
//!
//! # Why the role is persisted before anyone acts on it
//! [`RoleStore::apply`] writes the new role durably (temporary file, fsync, rename, fsync of
//! the directory) and only then returns it; the caller acts (releases output, resumes the
//! VM, starts fencing) after that. So whatever the daemon did last is never *ahead* of what
//! the file says: a daemon killed at any instant restarts in a role at least as advanced as
//! its last action, and can finish or undo that action rather than repeat a different one.
//!
//! # Never activating twice
//! Activation is split in two persisted steps. `Activating { from_epoch }` means the replica
//! is being loaded into a new QEMU but the guest has not run: a daemon restarted here may
//! redo the activation from the same checkpoint (nothing of the replica was consumed, no
//! output left). `Activated { epoch }` is written *right before* the QMP `cont`: from then on
//! the guest may have run, written to the replica disk and released output, so the checkpoint
//! no longer matches the world. A daemon restarted in `Activated` (its QEMU died with it) must
//! not activate again from that checkpoint; the table refuses `ActivationStarted` from
//! `Activated` and the only ways out are `ActivationDone` (the VM is running) and `Stop`.
//!
//! Transitions are a pure table ([`transition`]), so every legal and illegal pair is tested
//! without a disk; the store adds durability and a bounded history of causes and times.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::info;

use crate::auth::unix_millis;
use crate::persist::write_atomic;

/// Number of transitions kept in the role file's history.
pub const HISTORY_LEN: usize = 32;
/// Largest role file read (the history is bounded, so a larger file is not ours).
const MAX_ROLE_FILE: u64 = 1 << 20;
const ROLE_FILE_VERSION: u32 = 1;

/// How the old primary was proven gone (or who vouched for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceProof {
    /// A fencing command reported success.
    Command,
    /// This node won the witness lease.
    Lease,
    /// Fencing policy `none`: nothing proves it (unsafe, logged).
    Unfenced,
    /// An operator ordered the failover (manual mode).
    Operator,
    /// The primary handed over in a planned switchover and confirmed its VM stopped.
    Switchover,
}

/// The role of this node for one domain.
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
        /// replica store is the authority on the current one).
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
    /// Written right before `cont`: the guest may have run from here on.
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
    /// Short name for logs and errors.
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

    /// Whether a VM of this domain may be running on this node in this role.
    pub fn runs_vm(&self) -> bool {
        matches!(
            self,
            Role::Standalone
                | Role::Primary { .. }
                | Role::Activated { .. }
                | Role::Resyncing { .. }
        )
    }
}

/// What happened, as reported by the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The VM was started here without protection.
    StartUnprotected,
    /// The first checkpoint reached `peer`: this node is now its primary.
    ProtectionStarted {
        /// The backup.
        peer: String,
        /// The first epoch of the session.
        epoch: u64,
    },
    /// This node starts receiving `peer`'s checkpoints.
    BackupStarted {
        /// The primary.
        peer: String,
    },
    /// A checkpoint was committed on this backup (optional, coarse bookkeeping).
    Committed {
        /// Its epoch.
        epoch: u64,
    },
    /// The primary stopped hearing its backup (no ACKs, proven gone or lease held).
    BackupLost,
    /// The old backup is reachable again and resynchronisation starts.
    BackupReturned {
        /// The returning backup.
        peer: String,
    },
    /// Resynchronisation finished: protection resumes.
    ResyncDone {
        /// First epoch of the new session.
        epoch: u64,
    },
    /// The backup declared its primary lost.
    PeerLost,
    /// The primary was heard again before fencing finished.
    PeerReturned,
    /// A fencing attempt failed.
    FenceFailed,
    /// Fencing succeeded.
    Fenced {
        /// How.
        by: FenceProof,
    },
    /// The operator ordered a failover (manual mode).
    OperatorFailover,
    /// Loading the replica into a new QEMU starts (or restarts, with the same epoch).
    ActivationStarted {
        /// The committed checkpoint to activate.
        from_epoch: u64,
    },
    /// Recorded right before `cont`.
    Resuming,
    /// The activated VM runs.
    ActivationDone,
    /// Planned switchover, old primary's side: its VM stopped after the final checkpoint.
    SwitchoverHandOff,
    /// Planned switchover, backup's side: the primary confirmed its VM stopped.
    SwitchoverTakeOver,
    /// The VM is stopped or the domain left protection.
    Stop,
}

impl Event {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Event::StartUnprotected => "start-unprotected",
            Event::ProtectionStarted { .. } => "protection-started",
            Event::BackupStarted { .. } => "backup-started",
            Event::Committed { .. } => "committed",
            Event::BackupLost => "backup-lost",
            Event::BackupReturned { .. } => "backup-returned",
            Event::ResyncDone { .. } => "resync-done",
            Event::PeerLost => "peer-lost",
            Event::PeerReturned => "peer-returned",
            Event::FenceFailed => "fence-failed",
            Event::Fenced { .. } => "fenced",
            Event::OperatorFailover => "operator-failover",
            Event::ActivationStarted { .. } => "activation-started",
            Event::Resuming => "resuming",
            Event::ActivationDone => "activation-done",
            Event::SwitchoverHandOff => "switchover-hand-off",
            Event::SwitchoverTakeOver => "switchover-take-over",
            Event::Stop => "stop",
        }
    }
}

/// An event that is not legal in the current role.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("role: event {event} refused in role {from}: {reason}")]
pub struct TransitionError {
    /// The role the event was applied to.
    pub from: &'static str,
    /// The refused event.
    pub event: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// The transition table: the role after `event` in `role`, or why the event is refused.
///
/// `now_ms` stamps the start of fencing; everything else is a pure function of the inputs.
pub fn transition(role: &Role, event: &Event, now_ms: u64) -> Result<Role, TransitionError> {
    use Event as E;
    use Role as R;
    let refuse = |reason| TransitionError {
        from: role.name(),
        event: event.name(),
        reason,
    };
    Ok(match (role, event) {
        (_, E::Stop) => R::Stopped,

        (R::Stopped, E::StartUnprotected) => R::Standalone,
        (R::Stopped, E::BackupStarted { peer }) => R::Backup {
            peer: peer.clone(),
            last_committed: None,
        },
        (R::Standalone, E::ProtectionStarted { peer, epoch }) => R::Primary {
            peer: peer.clone(),
            since_epoch: *epoch,
        },

        (R::Primary { .. }, E::BackupLost) => R::Standalone,
        (R::Resyncing { .. }, E::BackupLost) => R::Standalone,
        (R::Standalone, E::BackupReturned { peer }) => R::Resyncing { peer: peer.clone() },
        (R::Resyncing { peer }, E::ResyncDone { epoch }) => R::Primary {
            peer: peer.clone(),
            since_epoch: *epoch,
        },
        (R::Primary { peer, .. }, E::SwitchoverHandOff) => R::Backup {
            peer: peer.clone(),
            last_committed: None,
        },

        (
            R::Backup {
                peer,
                last_committed,
            },
            E::Committed { epoch },
        ) => {
            if last_committed.is_some_and(|c| *epoch < c) {
                return Err(refuse("committed epochs only move forward"));
            }
            R::Backup {
                peer: peer.clone(),
                last_committed: Some(*epoch),
            }
        }
        (R::Backup { peer, .. }, E::PeerLost) => R::Fencing {
            peer: peer.clone(),
            started_ms: now_ms,
            attempts: 0,
        },
        (R::Fencing { peer, .. }, E::PeerReturned) => R::Backup {
            peer: peer.clone(),
            last_committed: None,
        },
        (
            R::Fencing {
                peer,
                started_ms,
                attempts,
            },
            E::FenceFailed,
        ) => R::Fencing {
            peer: peer.clone(),
            started_ms: *started_ms,
            attempts: attempts.saturating_add(1),
        },
        (R::Fencing { peer, .. }, E::Fenced { by }) => R::Fenced {
            peer: peer.clone(),
            by: *by,
        },
        (R::Backup { peer, .. } | R::Fencing { peer, .. }, E::OperatorFailover) => R::Fenced {
            peer: peer.clone(),
            by: FenceProof::Operator,
        },
        (R::Backup { peer, .. }, E::SwitchoverTakeOver) => R::Fenced {
            peer: peer.clone(),
            by: FenceProof::Switchover,
        },

        (R::Fenced { .. }, E::ActivationStarted { from_epoch }) => R::Activating {
            from_epoch: *from_epoch,
        },
        // A daemon restarted during activation redoes it from the same checkpoint: the guest
        // has not run, so nothing of the checkpoint was consumed.
        (R::Activating { from_epoch }, E::ActivationStarted { from_epoch: again }) => {
            if from_epoch != again {
                return Err(refuse(
                    "an activation is redone only from the same checkpoint",
                ));
            }
            R::Activating {
                from_epoch: *from_epoch,
            }
        }
        (R::Activating { from_epoch }, E::Resuming) => R::Activated { epoch: *from_epoch },
        (R::Activated { .. }, E::ActivationDone) => R::Standalone,
        (R::Activated { .. }, E::ActivationStarted { .. }) => {
            return Err(refuse(
                "the guest may already have run from this checkpoint; activating it again would \
                 roll back output that left the host",
            ))
        }
        (R::Backup { .. }, E::ActivationStarted { .. }) => {
            return Err(refuse("the primary has not been fenced"))
        }
        (R::Fencing { .. }, E::ActivationStarted { .. }) => {
            return Err(refuse("fencing has not succeeded"))
        }
        _ => return Err(refuse("no such transition")),
    })
}

/// One recorded transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Position in the domain's transition sequence (1 = first ever).
    pub seq: u64,
    /// When it was written (Unix ms).
    pub at_ms: u64,
    /// Role before.
    pub from: Role,
    /// The event.
    pub event: Event,
    /// Role after.
    pub to: Role,
    /// The daemon's explanation (e.g. "no heartbeat on 2 links for 512 ms").
    pub cause: String,
}

/// The role file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RoleFile {
    version: u32,
    domain: String,
    role: Role,
    /// Number of transitions ever written.
    seq: u64,
    /// The last [`HISTORY_LEN`] transitions, oldest first.
    history: Vec<Transition>,
}

/// Errors of the role store; each names the file.
#[derive(Debug, Error)]
pub enum RoleError {
    /// A file operation failed.
    #[error("role file {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// The file is not a role file of this domain.
    #[error("role file {path}: unusable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The domain name cannot be a directory name.
    #[error("role store: domain name {0:?} is not a safe directory name")]
    BadDomain(String),
    /// The event is not legal in the current role; nothing was written.
    #[error("role file {path}: {source}")]
    Refused {
        path: PathBuf,
        source: TransitionError,
    },
}

/// The durable role of one domain (`<state_dir>/<domain>/role.json`).
#[derive(Debug)]
pub struct RoleStore {
    /// The role file.
    path: PathBuf,
    /// What the file says (only updated after a successful write).
    file: RoleFile,
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 64
        && d != "."
        && d != ".."
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl RoleStore {
    /// Opens the role of `domain` under `state_dir`, creating `Stopped` if there is none.
    ///
    /// # Errors
    /// [`RoleError::BadDomain`], [`RoleError::Io`] on file errors, [`RoleError::Corrupt`] if
    /// the file is not a role file for this domain.
    pub fn open(state_dir: &Path, domain: &str) -> Result<Self, RoleError> {
        if !valid_domain(domain) {
            return Err(RoleError::BadDomain(domain.to_string()));
        }
        let dir = state_dir.join(domain);
        let path = dir.join("role.json");
        let io_err = |op| {
            let path = path.clone();
            move |source| RoleError::Io { path, op, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create state directory"))?;
        let corrupt = |reason: String| RoleError::Corrupt {
            path: path.clone(),
            reason,
        };
        match fs::metadata(&path) {
            Ok(m) if m.len() > MAX_ROLE_FILE => Err(corrupt(format!(
                "{} bytes, larger than any role file",
                m.len()
            ))),
            Ok(_) => {
                let bytes = fs::read(&path).map_err(io_err("read"))?;
                let file: RoleFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if file.version != ROLE_FILE_VERSION {
                    return Err(corrupt(crate::persist::unknown_version(
                        file.version,
                        ROLE_FILE_VERSION,
                    )));
                }
                if file.domain != domain {
                    return Err(corrupt(format!("belongs to domain {:?}", file.domain)));
                }
                if file.history.len() > HISTORY_LEN {
                    return Err(corrupt(format!("{} history entries", file.history.len())));
                }
                Ok(Self { path, file })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let store = Self {
                    file: RoleFile {
                        version: ROLE_FILE_VERSION,
                        domain: domain.to_string(),
                        role: Role::Stopped,
                        seq: 0,
                        history: Vec::new(),
                    },
                    path,
                };
                store.write(&store.file)?;
                Ok(store)
            }
            Err(e) => Err(io_err("stat")(e)),
        }
    }

    /// The role as last written.
    pub fn current(&self) -> &Role {
        &self.file.role
    }

    /// The recorded transitions, oldest first (at most [`HISTORY_LEN`]).
    pub fn history(&self) -> &[Transition] {
        &self.file.history
    }

    /// Path of the role file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `event`, persists the new role durably, and returns it. The caller may act on
    /// the new role only after this returns `Ok`.
    ///
    /// # Errors
    /// [`RoleError::Refused`] for an illegal event (nothing is written), [`RoleError::Io`] if
    /// the write fails (the role stays what it was, in memory and on disk).
    pub fn apply(&mut self, event: Event, cause: &str) -> Result<&Role, RoleError> {
        let now = unix_millis();
        let to = transition(&self.file.role, &event, now).map_err(|source| RoleError::Refused {
            path: self.path.clone(),
            source,
        })?;
        let mut next = self.file.clone();
        next.seq += 1;
        next.history.push(Transition {
            seq: next.seq,
            at_ms: now,
            from: self.file.role.clone(),
            event: event.clone(),
            to: to.clone(),
            cause: cause.to_string(),
        });
        if next.history.len() > HISTORY_LEN {
            let excess = next.history.len() - HISTORY_LEN;
            next.history.drain(..excess);
        }
        next.role = to;
        self.write(&next)?;
        info!(
            domain = %next.domain,
            from = self.file.role.name(),
            event = event.name(),
            to = next.role.name(),
            seq = next.seq,
            cause,
            "role transition persisted"
        );
        self.file = next;
        Ok(&self.file.role)
    }

    fn write(&self, file: &RoleFile) -> Result<(), RoleError> {
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| RoleError::Corrupt {
            path: self.path.clone(),
            reason: format!("serialize: {e}"),
        })?;
        write_atomic(&self.path, &bytes).map_err(|(op, source)| RoleError::Io {
            path: self.path.clone(),
            op,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> String {
        "nodeb".to_string()
    }
    fn primary() -> Role {
        Role::Primary {
            peer: p(),
            since_epoch: 1,
        }
    }
    fn backup(c: Option<u64>) -> Role {
        Role::Backup {
            peer: p(),
            last_committed: c,
        }
    }
    fn fencing(attempts: u32) -> Role {
        Role::Fencing {
            peer: p(),
            started_ms: 1000,
            attempts,
        }
    }
    fn fenced(by: FenceProof) -> Role {
        Role::Fenced { peer: p(), by }
    }

    /// Every legal transition: (from, event, to).
    fn legal() -> Vec<(Role, Event, Role)> {
        use Event as E;
        use Role as R;
        vec![
            (R::Stopped, E::StartUnprotected, R::Standalone),
            (R::Stopped, E::BackupStarted { peer: p() }, backup(None)),
            (
                R::Standalone,
                E::ProtectionStarted {
                    peer: p(),
                    epoch: 1,
                },
                primary(),
            ),
            (primary(), E::BackupLost, R::Standalone),
            (
                R::Standalone,
                E::BackupReturned { peer: p() },
                R::Resyncing { peer: p() },
            ),
            (
                R::Resyncing { peer: p() },
                E::ResyncDone { epoch: 9 },
                R::Primary {
                    peer: p(),
                    since_epoch: 9,
                },
            ),
            (R::Resyncing { peer: p() }, E::BackupLost, R::Standalone),
            (primary(), E::SwitchoverHandOff, backup(None)),
            (backup(None), E::Committed { epoch: 4 }, backup(Some(4))),
            (backup(Some(4)), E::Committed { epoch: 5 }, backup(Some(5))),
            // Fencing starts stamped with the clock given to `transition`.
            (backup(Some(5)), E::PeerLost, fencing(0)),
            (fencing(0), E::FenceFailed, fencing(1)),
            (fencing(1), E::PeerReturned, backup(None)),
            (
                fencing(1),
                E::Fenced {
                    by: FenceProof::Command,
                },
                fenced(FenceProof::Command),
            ),
            (
                fencing(0),
                E::Fenced {
                    by: FenceProof::Lease,
                },
                fenced(FenceProof::Lease),
            ),
            (
                backup(Some(3)),
                E::OperatorFailover,
                fenced(FenceProof::Operator),
            ),
            (
                fencing(2),
                E::OperatorFailover,
                fenced(FenceProof::Operator),
            ),
            (
                backup(Some(3)),
                E::SwitchoverTakeOver,
                fenced(FenceProof::Switchover),
            ),
            (
                fenced(FenceProof::Lease),
                E::ActivationStarted { from_epoch: 7 },
                R::Activating { from_epoch: 7 },
            ),
            (
                R::Activating { from_epoch: 7 },
                E::ActivationStarted { from_epoch: 7 },
                R::Activating { from_epoch: 7 },
            ),
            (
                R::Activating { from_epoch: 7 },
                E::Resuming,
                R::Activated { epoch: 7 },
            ),
            (R::Activated { epoch: 7 }, E::ActivationDone, R::Standalone),
            (R::Activated { epoch: 7 }, E::Stop, R::Stopped),
            (R::Activating { from_epoch: 7 }, E::Stop, R::Stopped),
            (primary(), E::Stop, R::Stopped),
            (R::Standalone, E::Stop, R::Stopped),
            (R::Stopped, E::Stop, R::Stopped),
        ]
    }

    #[test]
    fn every_legal_transition() {
        for (from, event, to) in legal() {
            let got = transition(&from, &event, 1000);
            assert_eq!(got, Ok(to.clone()), "{from:?} --{event:?}-->");
        }
    }

    #[test]
    fn illegal_transitions_are_refused_with_reason() {
        use Event as E;
        use Role as R;
        let cases: Vec<(Role, Event, &str)> = vec![
            // The safety property: no second activation once the guest may have run.
            (
                R::Activated { epoch: 7 },
                E::ActivationStarted { from_epoch: 7 },
                "may already have run",
            ),
            // No activation without fencing.
            (
                backup(Some(7)),
                E::ActivationStarted { from_epoch: 7 },
                "not been fenced",
            ),
            (
                fencing(0),
                E::ActivationStarted { from_epoch: 7 },
                "has not succeeded",
            ),
            // A redo must use the same checkpoint.
            (
                R::Activating { from_epoch: 7 },
                E::ActivationStarted { from_epoch: 8 },
                "same checkpoint",
            ),
            (backup(Some(7)), E::Committed { epoch: 6 }, "forward"),
            (R::Stopped, E::Resuming, "no such"),
            (R::Standalone, E::PeerLost, "no such"),
            (primary(), E::PeerLost, "no such"),
            (backup(None), E::BackupLost, "no such"),
            (
                backup(None),
                E::Fenced {
                    by: FenceProof::Lease,
                },
                "no such",
            ),
            (
                R::Stopped,
                E::ProtectionStarted {
                    peer: p(),
                    epoch: 1,
                },
                "no such",
            ),
            (
                primary(),
                E::ProtectionStarted {
                    peer: p(),
                    epoch: 1,
                },
                "no such",
            ),
            (R::Stopped, E::OperatorFailover, "no such"),
            (primary(), E::OperatorFailover, "no such"),
            (fenced(FenceProof::Command), E::Resuming, "no such"),
            (R::Standalone, E::ActivationDone, "no such"),
            (primary(), E::SwitchoverTakeOver, "no such"),
            (backup(None), E::SwitchoverHandOff, "no such"),
            (R::Standalone, E::ResyncDone { epoch: 2 }, "no such"),
        ];
        for (from, event, why) in cases {
            let e = transition(&from, &event, 0).expect_err(&format!("{from:?} {event:?}"));
            assert_eq!(e.from, from.name());
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn persisted_before_return_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RoleStore::open(dir.path(), "web1").unwrap();
        assert_eq!(s.current(), &Role::Stopped);
        s.apply(Event::BackupStarted { peer: p() }, "operator: protect")
            .unwrap();
        s.apply(Event::PeerLost, "no heartbeat on 2 links for 512 ms")
            .unwrap();
        s.apply(
            Event::Fenced {
                by: FenceProof::Lease,
            },
            "lease won",
        )
        .unwrap();
        s.apply(Event::ActivationStarted { from_epoch: 42 }, "fenced")
            .unwrap();
        // "Crash": drop the store with a torn temporary file next to the role file, as if
        // the next write had died halfway.
        let path = s.path().to_path_buf();
        fs::write(crate::persist::tmp_path(&path), b"{\"version\":1,\"dom").unwrap();
        drop(s);

        let mut s = RoleStore::open(dir.path(), "web1").unwrap();
        assert_eq!(s.current(), &Role::Activating { from_epoch: 42 });
        let h = s.history();
        assert_eq!(h.len(), 4);
        assert_eq!(h[1].cause, "no heartbeat on 2 links for 512 ms");
        assert_eq!(h[3].seq, 4);
        // Restarted in Activating: redo is allowed, and Resuming is persisted.
        s.apply(Event::ActivationStarted { from_epoch: 42 }, "restart redo")
            .unwrap();
        s.apply(Event::Resuming, "before cont").unwrap();
        drop(s);
        // Restarted in Activated: a second activation is refused, and nothing is written.
        let mut s = RoleStore::open(dir.path(), "web1").unwrap();
        let before = fs::read(s.path()).unwrap();
        let e = s
            .apply(Event::ActivationStarted { from_epoch: 42 }, "restart")
            .unwrap_err();
        assert!(matches!(e, RoleError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("role.json"), "{e}");
        assert_eq!(fs::read(s.path()).unwrap(), before);
        assert_eq!(s.current(), &Role::Activated { epoch: 42 });
    }

    #[test]
    fn history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RoleStore::open(dir.path(), "d").unwrap();
        s.apply(Event::BackupStarted { peer: p() }, "start")
            .unwrap();
        for e in 0..(HISTORY_LEN as u64 + 10) {
            s.apply(Event::Committed { epoch: e }, "ack").unwrap();
        }
        let s = RoleStore::open(dir.path(), "d").unwrap();
        assert_eq!(s.history().len(), HISTORY_LEN);
        assert_eq!(s.history().last().unwrap().seq, HISTORY_LEN as u64 + 11);
        assert_eq!(s.current(), &backup(Some(HISTORY_LEN as u64 + 9)));
    }

    #[test]
    fn bad_domain_and_foreign_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "..", "a/b", "x y"] {
            assert!(matches!(
                RoleStore::open(dir.path(), bad),
                Err(RoleError::BadDomain(_))
            ));
        }
        RoleStore::open(dir.path(), "one").unwrap();
        fs::create_dir_all(dir.path().join("two")).unwrap();
        fs::copy(
            dir.path().join("one/role.json"),
            dir.path().join("two/role.json"),
        )
        .unwrap();
        let e = RoleStore::open(dir.path(), "two").unwrap_err();
        assert!(e.to_string().contains("belongs to domain \"one\""), "{e}");
        fs::write(dir.path().join("two/role.json"), b"not json").unwrap();
        assert!(matches!(
            RoleStore::open(dir.path(), "two"),
            Err(RoleError::Corrupt { .. })
        ));
        // A newer release's file is named as such, never misread.
        let one = fs::read_to_string(dir.path().join("one/role.json")).unwrap();
        assert!(
            one.contains("\"version\": 1") || one.contains("\"version\":1"),
            "{one}"
        );
        fs::write(
            dir.path().join("one/role.json"),
            one.replacen("\"version\": 1", "\"version\": 7", 1)
                .replacen("\"version\":1", "\"version\":7", 1),
        )
        .unwrap();
        let e = RoleStore::open(dir.path(), "one").unwrap_err().to_string();
        assert!(
            e.contains("format version 7") && e.contains("written by a newer release"),
            "{e}"
        );
    }
}
