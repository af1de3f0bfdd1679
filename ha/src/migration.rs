//! The staged live migration's safety core: its phases, their persisted record, the
//! negotiation of its cookies, and the one rule that says what each side does with the VM
//! when a migration cannot go on (a crash, a lost connection, an operator's abort).
//!
//! The protocol is libvirt's migration v3 — **begin** (source: configuration and a cookie),
//! **prepare** (destination: checks, reserves, starts QEMU waiting for state, answers with
//! its cookie), **perform** (source: disks and RAM passes, then stop-and-copy), **finish**
//! (destination: verifies and resumes), **confirm** (source: kills its VM on success,
//! resumes it on failure) — with the phase of each side persisted (fsync + rename, like the
//! role) *before* the side acts on it. This module holds no I/O but the record's file: the
//! migration driver observes, asks [`recover`] and acts, as the supervisor does with
//! [`crate::decide`].
//!
//! # The rule: exactly one VM runs, and only it has released output
//! Until stop-and-copy only the source's VM has ever run, so any failure ends with the source
//! running and the destination discarding what it received. After stop-and-copy the source's
//! VM is paused on the final state and the destination may hold all of it: this is libvirt's
//! ambiguous case ("finish's reply lost — does the VM run on the destination?"). It is not
//! settled by a guess or a timeout but by the domain's **witness lease**, which one node at a
//! time can hold:
//! - before stopping its VM, the source persists `StopAndCopy` and holds the lease
//!   *preemptible by the destination* (the mode a protecting primary gives its backup);
//! - the destination resumes only after it has taken the lease (`Finishing` → `Running`);
//! - a source that lost the destination renews the lease *exclusive*: the witness serialises
//!   that renewal and the destination's takeover, so either the destination won (the source
//!   kills its paused VM: confirm) or the source did (the destination can no longer win, will
//!   discard, and the source resumes).
//!
//! A paused source VM released nothing since it paused, and the destination's VM releases
//! only once it runs, so at no moment can two VMs release output. Without a witness (fencing
//! by command, or none) nothing can decide the ambiguous case for the operator: a side that
//! cannot reach the other stays paused and says so, and `remusctl migrate --resolve` (the
//! operator, having looked at both hosts) settles it.
//!
//! One case loses the VM whatever the protocol does: the destination's daemon dies after
//! resuming (its QEMU dies with it, as any unprotected host crash). The source's paused
//! state is then *older* than output the destination released, so resuming it would show
//! clients a rollback: the source reports the VM lost instead ([`Recovery::VmLost`]); a
//! protected domain's backup is the answer to that risk, not the source's stale copy.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::persist;
pub use remus_stream::version::{self, Negotiated, NegotiationError, VersionRange};

/// Which end of a migration this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The node the VM runs on when the migration starts.
    Source,
    /// The node it moves to.
    Destination,
}

/// A side's phase. Source phases and destination phases are distinct values, so a record can
/// never hold a phase of the other side ([`transition`] refuses it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Source: begin sent (configuration and cookie); nothing moved yet.
    Begun,
    /// Source: prepare answered; disks and RAM are copied while the VM runs.
    Performing,
    /// Source: the VM is paused on the final state, which is being sent or was sent; the
    /// lease is held preemptible by the destination. The ambiguous phase.
    StopAndCopy,
    /// Source: the destination runs the VM; this side's VM is killed and cleaned up.
    Confirmed,
    /// Source: the migration ended without moving the VM; it runs here.
    Aborted,
    /// Destination: prepare accepted; QEMU waits for incoming state, resources reserved.
    Prepared,
    /// Destination: state is arriving.
    Receiving,
    /// Destination: all state arrived and verified; taking the lease before resuming.
    Finishing,
    /// Destination: the VM runs here (the lease was won).
    Running,
    /// Destination: what arrived was discarded; nothing runs here.
    Discarded,
}

impl Phase {
    /// The side the phase belongs to.
    pub fn side(self) -> Side {
        match self {
            Phase::Begun
            | Phase::Performing
            | Phase::StopAndCopy
            | Phase::Confirmed
            | Phase::Aborted => Side::Source,
            Phase::Prepared
            | Phase::Receiving
            | Phase::Finishing
            | Phase::Running
            | Phase::Discarded => Side::Destination,
        }
    }

    /// Whether the migration is over on this side (the record can be archived).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Confirmed | Phase::Aborted | Phase::Running | Phase::Discarded
        )
    }

    /// The phase's name as logs, status and the record spell it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Begun => "begun",
            Phase::Performing => "performing",
            Phase::StopAndCopy => "stop_and_copy",
            Phase::Confirmed => "confirmed",
            Phase::Aborted => "aborted",
            Phase::Prepared => "prepared",
            Phase::Receiving => "receiving",
            Phase::Finishing => "finishing",
            Phase::Running => "running",
            Phase::Discarded => "discarded",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A phase change that the protocol does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("migration phase {from} cannot go to {to}")]
pub struct PhaseError {
    /// The phase the record is in.
    pub from: Phase,
    /// The phase asked for.
    pub to: Phase,
}

/// Checks one phase change. The allowed ones are the protocol's order, plus the ends a
/// failure may take from each phase (never back to an earlier phase, never across sides,
/// never out of a final phase).
pub fn transition(from: Phase, to: Phase) -> Result<Phase, PhaseError> {
    use Phase::*;
    let ok = match from {
        Begun => matches!(to, Performing | Aborted),
        Performing => matches!(to, StopAndCopy | Aborted),
        // Paused on the final state: either side of the lease's verdict.
        StopAndCopy => matches!(to, Confirmed | Aborted),
        Prepared => matches!(to, Receiving | Discarded),
        Receiving => matches!(to, Finishing | Discarded),
        Finishing => matches!(to, Running | Discarded),
        Confirmed | Aborted | Running | Discarded => false,
    };
    if ok {
        Ok(to)
    } else {
        Err(PhaseError { from, to })
    }
}

/// What this side's QEMU is doing, as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Running (source before stop-and-copy; destination after resume).
    Running,
    /// Alive and paused (source in stop-and-copy), or waiting for incoming state
    /// (destination before finish).
    Paused,
    /// No QEMU for the domain here (it died, or died with a previous daemon).
    Gone,
}

/// The domain's witness lease, as this side can learn it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseView {
    /// This node holds it exclusively (the witness granted or renewed it so).
    Ours,
    /// The other side of the migration holds it.
    Peers,
    /// Nobody holds it.
    Free,
    /// The witness does not answer.
    Unknown,
    /// The domain is not fenced by a witness (command or none): no lease to ask.
    NoWitness,
}

/// What the other side says, if it can be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerView {
    /// Not reachable (or not answering within the deadline).
    Unreachable,
    /// Reachable, with no record of this migration (it never prepared, or discarded and
    /// archived).
    NoRecord,
    /// Reachable, in this phase.
    In(Phase),
}

/// Everything [`recover`] decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    /// This side's persisted phase.
    pub phase: Phase,
    /// This side's QEMU.
    pub vm: VmState,
    /// The domain's lease.
    pub lease: LeaseView,
    /// The other side.
    pub peer: PeerView,
}

/// What a side does when its migration cannot go on as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Source: the VM stays (or is resumed) here; persist `Aborted`. Any destination state
    /// is to be discarded (told to the destination when it is reachable).
    ResumeSource,
    /// Source: the destination runs the VM: kill the local VM if any, clean up, persist
    /// `Confirmed`.
    ConfirmSource,
    /// Destination: resume the VM (the lease is ours); persist `Running` first.
    ResumeDestination,
    /// Destination: kill the waiting QEMU, free what prepare reserved, persist `Discarded`.
    DiscardDestination,
    /// Take the domain's lease exclusively now and ask again: the witness grants it to one
    /// side only, and whoever gets it decides the outcome.
    AcquireLease,
    /// Keep the VM paused (source) or waiting (destination) and ask again later; nothing
    /// may be decided now. The reason is for the log and `remusctl status`.
    Wait(String),
    /// The VM does not run anywhere and no copy can be resumed without showing its clients
    /// a rollback (or none exists). Nothing is started; the reason says what happened.
    VmLost(String),
    /// Nothing to do: this side's migration is over.
    Done,
}

/// The recovery rule, one place for every phase (module docs: "The rule"). Pure: the driver
/// gathers [`Facts`] and carries out the answer, persisting the new phase before acting.
pub fn recover(f: &Facts) -> Recovery {
    use Phase::*;
    match f.phase {
        // Only the source's VM has ever run: it stays.
        Begun | Performing => match f.vm {
            VmState::Running | VmState::Paused => Recovery::ResumeSource,
            VmState::Gone => Recovery::VmLost(
                "the source's VM died before stop-and-copy; the destination never had its \
                 state (a protected domain fails over to its backup as usual)"
                    .into(),
            ),
        },
        StopAndCopy => source_after_stop(f),
        Confirmed => Recovery::Done,
        Aborted => match f.vm {
            VmState::Paused => Recovery::ResumeSource,
            _ => Recovery::Done,
        },
        // The destination never had the whole state: discard.
        Prepared | Receiving => Recovery::DiscardDestination,
        Finishing => destination_finishing(f),
        Running => match f.vm {
            VmState::Gone => Recovery::VmLost(
                "the destination's VM died after it resumed (its daemon or host failed); the \
                 source's paused copy is older than output already released, so it is not \
                 resumed"
                    .into(),
            ),
            _ => Recovery::Done,
        },
        Discarded => Recovery::Done,
    }
}

/// The source, paused on the final state: the destination may be running the VM.
fn source_after_stop(f: &Facts) -> Recovery {
    // The destination's own word, when it can be had, is the best evidence.
    match f.peer {
        PeerView::In(Phase::Running) => return Recovery::ConfirmSource,
        PeerView::In(Phase::Finishing) => {
            // It has everything and is taking the lease: let it finish.
            return Recovery::Wait("the destination is finishing (taking the lease)".into());
        }
        PeerView::In(Phase::Prepared | Phase::Receiving | Phase::Discarded)
        | PeerView::NoRecord => {
            // It never resumed and, once told, never will: the VM goes on here. With a
            // witness, the source still renews the lease exclusive before resuming.
            return match (f.vm, f.lease) {
                (VmState::Gone, _) => lost_paused_source(),
                (_, LeaseView::Ours | LeaseView::NoWitness) => Recovery::ResumeSource,
                (_, LeaseView::Free) => Recovery::AcquireLease,
                // Impossible by the protocol (the destination takes the lease only with
                // the whole state): decide nothing on it.
                (_, LeaseView::Peers) => Recovery::Wait(
                    "the destination holds the lease but says it has not resumed; waiting for \
                     it to finish or discard"
                        .into(),
                ),
                (_, LeaseView::Unknown) => Recovery::Wait(
                    "the witness does not answer; the lease must be renewed exclusive before \
                     the VM resumes here"
                        .into(),
                ),
            };
        }
        // A source phase on the destination's side cannot happen; treat it as unreachable.
        PeerView::In(_) | PeerView::Unreachable => {}
    }
    match (f.lease, f.vm) {
        // The destination took the lease: it runs (or will run) the VM.
        (LeaseView::Peers, _) => Recovery::ConfirmSource,
        // We hold it exclusive again: the destination can no longer win it, so it discards.
        (LeaseView::Ours, VmState::Running | VmState::Paused) => Recovery::ResumeSource,
        (LeaseView::Ours, VmState::Gone) => lost_paused_source(),
        (LeaseView::Free, VmState::Gone) => Recovery::Wait(
            "the source's paused VM is gone; the destination may still finish from the final \
             state it holds"
                .into(),
        ),
        (LeaseView::Free, _) => Recovery::AcquireLease,
        (LeaseView::Unknown, _) => Recovery::Wait(
            "neither the destination nor the witness answers: the VM stays paused until one \
             of them says who runs it"
                .into(),
        ),
        (LeaseView::NoWitness, _) => Recovery::Wait(
            "the destination does not answer and no witness fences this domain: check the \
             destination host, then `remusctl migrate --resolve DOMAIN source|destination`"
                .into(),
        ),
    }
}

fn lost_paused_source() -> Recovery {
    Recovery::VmLost(
        "the source's VM died while paused for stop-and-copy and the destination did not \
         resume it"
            .into(),
    )
}

/// The destination, holding the whole verified state, not yet resumed.
fn destination_finishing(f: &Facts) -> Recovery {
    if f.vm == VmState::Gone {
        // The waiting QEMU died (with a previous daemon): the state is gone.
        return Recovery::DiscardDestination;
    }
    match f.lease {
        LeaseView::Ours => Recovery::ResumeDestination,
        // The source renewed it exclusive: it resumed (or will).
        LeaseView::Peers => Recovery::DiscardDestination,
        LeaseView::Free => Recovery::AcquireLease,
        LeaseView::Unknown => Recovery::Wait(
            "the witness does not answer; the VM resumes here only once the lease is ours".into(),
        ),
        // No lease to settle it: only the source's own phase can.
        LeaseView::NoWitness => match f.peer {
            PeerView::In(Phase::StopAndCopy | Phase::Confirmed) => Recovery::ResumeDestination,
            PeerView::In(Phase::Begun | Phase::Performing | Phase::Aborted)
            | PeerView::NoRecord => Recovery::DiscardDestination,
            PeerView::In(_) | PeerView::Unreachable => Recovery::Wait(
                "the source does not answer and no witness fences this domain: check the \
                 source host, then `remusctl migrate --resolve DOMAIN source|destination`"
                    .into(),
            ),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Cookies: versions and capabilities, negotiated once at begin/prepare.

/// The migration protocol versions this build speaks.
pub const PROTOCOL: VersionRange = VersionRange { min: 1, max: 1 };

/// What a side announces in begin (source) or prepare (destination). Capabilities are names,
/// so a newer peer's unknown ones are simply not in common (Xen's stream v2 rule: unknown
/// optional records are skipped, never misread).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    /// Protocol versions spoken.
    pub versions: VersionRange,
    /// Capabilities offered (`page-lz4`, `page-xor-lz4`, `disk-bitmap`, `config-record` …).
    pub capabilities: BTreeSet<String>,
}

/// The cookies' negotiation: the one rule of every peer protocol
/// ([`remus_stream::version::negotiate`]); `required` capabilities must be common.
pub fn negotiate(
    ours: &Cookie,
    theirs: &Cookie,
    required: &[&str],
) -> Result<Negotiated, NegotiationError> {
    version::negotiate(
        ours.versions,
        ours.capabilities.iter().map(String::as_str),
        theirs.versions,
        theirs.capabilities.iter().map(String::as_str),
        required,
    )
}

// ---------------------------------------------------------------------------------------
// The persisted record.

/// Version of the record's file format; a newer file is refused, never misread.
pub const RECORD_VERSION: u32 = 1;

/// One side's record of a migration, persisted before each phase is acted on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// File format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The migration's id (chosen by the source, echoed by the destination).
    pub id: String,
    /// The domain.
    pub domain: String,
    /// This node's side.
    pub side: Side,
    /// The other node's name.
    pub peer: String,
    /// The current phase.
    pub phase: Phase,
    /// Every phase entered, with the wall-clock time in ms since the Unix epoch.
    pub history: Vec<(Phase, u64)>,
}

/// Reading or writing a migration record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read.
    #[error("migration record {path}: read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file could not be written durably.
    #[error("migration record {path}: {step}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The failed step (create, fsync, rename …).
        step: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a record.
    #[error("migration record {path}: malformed: {source}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The file was written by a newer release.
    #[error(
        "migration record {path}: format version {found} is newer than this release's \
         {RECORD_VERSION}; refusing to guess"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// The record is inconsistent (a phase of the other side, another domain).
    #[error("migration record {path}: {problem}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A phase change the protocol does not allow.
    #[error("migration {id} of domain {domain}: {source}")]
    Phase {
        /// The migration.
        id: String,
        /// The domain.
        domain: String,
        /// The refused change.
        source: PhaseError,
    },
}

/// The record of a domain's migration in flight, at `<state_dir>/<domain>/migration.json`.
#[derive(Debug)]
pub struct MigrationStore {
    path: PathBuf,
    record: MigrationRecord,
}

impl MigrationStore {
    /// The record's path for a domain.
    pub fn path_for(state_dir: &Path, domain: &str) -> PathBuf {
        state_dir.join(domain).join("migration.json")
    }

    /// Starts a record in `phase` (`Begun` on the source, `Prepared` on the destination),
    /// written durably before this returns.
    pub fn create(
        state_dir: &Path,
        id: &str,
        domain: &str,
        peer: &str,
        phase: Phase,
        now_ms: u64,
    ) -> Result<Self, RecordError> {
        let path = Self::path_for(state_dir, domain);
        let first = match phase.side() {
            Side::Source => Phase::Begun,
            Side::Destination => Phase::Prepared,
        };
        if phase != first {
            return Err(RecordError::Inconsistent {
                path,
                problem: format!("a migration starts in {first}, not {phase}"),
            });
        }
        let store = Self {
            path,
            record: MigrationRecord {
                version: RECORD_VERSION,
                id: id.to_string(),
                domain: domain.to_string(),
                side: phase.side(),
                peer: peer.to_string(),
                phase,
                history: vec![(phase, now_ms)],
            },
        };
        store.write()?;
        Ok(store)
    }

    /// Loads a domain's record, if there is one.
    pub fn open(state_dir: &Path, domain: &str) -> Result<Option<Self>, RecordError> {
        let path = Self::path_for(state_dir, domain);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        // The version first, so a newer format is named as such rather than as malformed.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        match serde_json::from_slice::<Versioned>(&bytes) {
            Ok(v) if v.version > RECORD_VERSION => {
                return Err(RecordError::Newer {
                    path,
                    found: v.version,
                })
            }
            Ok(_) => {}
            Err(source) => return Err(RecordError::Malformed { path, source }),
        }
        let record: MigrationRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(source) => return Err(RecordError::Malformed { path, source }),
        };
        let problem = if record.domain != domain {
            Some(format!("names domain {}, not {domain}", record.domain))
        } else if record.phase.side() != record.side {
            Some(format!(
                "phase {} does not belong to the {:?} side",
                record.phase, record.side
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(RecordError::Inconsistent { path, problem });
        }
        Ok(Some(Self { path, record }))
    }

    /// The record.
    pub fn record(&self) -> &MigrationRecord {
        &self.record
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves to `to` and writes the record durably; nothing changes (in memory or on disk)
    /// when the change is not allowed or the write fails.
    pub fn advance(&mut self, to: Phase, now_ms: u64) -> Result<Phase, RecordError> {
        let next = transition(self.record.phase, to).map_err(|source| RecordError::Phase {
            id: self.record.id.clone(),
            domain: self.record.domain.clone(),
            source,
        })?;
        let before = self.record.clone();
        self.record.phase = next;
        self.record.history.push((next, now_ms));
        if let Err(e) = self.write() {
            self.record = before;
            return Err(e);
        }
        Ok(next)
    }

    fn write(&self) -> Result<(), RecordError> {
        let bytes =
            serde_json::to_vec_pretty(&self.record).map_err(|source| RecordError::Malformed {
                path: self.path.clone(),
                source,
            })?;
        persist::write_atomic_creating_dir(&self.path, &bytes).map_err(|(step, source)| {
            RecordError::Write {
                path: self.path.clone(),
                step,
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LeaseView as L;
    use PeerView as P;
    use Phase::*;
    use VmState as V;

    fn kind(r: &Recovery) -> &'static str {
        match r {
            Recovery::ResumeSource => "resume-source",
            Recovery::ConfirmSource => "confirm-source",
            Recovery::ResumeDestination => "resume-destination",
            Recovery::DiscardDestination => "discard-destination",
            Recovery::AcquireLease => "acquire-lease",
            Recovery::Wait(_) => "wait",
            Recovery::VmLost(_) => "vm-lost",
            Recovery::Done => "done",
        }
    }

    /// One row per rule: (phase, vm, lease, peer, expected, why).
    #[test]
    fn recovery_table() {
        #[rustfmt::skip]
        let rows: &[(Phase, V, L, P, &str, &str)] = &[
            // Before stop-and-copy only the source's VM ever ran.
            (Begun, V::Running, L::Unknown, P::Unreachable, "resume-source", "begin lost"),
            (Performing, V::Running, L::Peers, P::In(Receiving), "resume-source", "abort mid-copy: the destination never resumed, whatever the lease says"),
            (Performing, V::Gone, L::Ours, P::Unreachable, "vm-lost", "source QEMU died with its daemon before the final state left"),
            // Stop-and-copy: the destination's word first.
            (StopAndCopy, V::Paused, L::Unknown, P::In(Running), "confirm-source", "finish's reply lost but the destination says it runs"),
            (StopAndCopy, V::Paused, L::Free, P::In(Finishing), "wait", "the destination is taking the lease: let it"),
            (StopAndCopy, V::Paused, L::Ours, P::In(Receiving), "resume-source", "the destination never got everything"),
            (StopAndCopy, V::Paused, L::Free, P::NoRecord, "acquire-lease", "the destination forgot it: take the lease before resuming"),
            (StopAndCopy, V::Paused, L::Unknown, P::In(Discarded), "wait", "the destination discarded but the lease cannot be renewed yet"),
            (StopAndCopy, V::Paused, L::NoWitness, P::In(Discarded), "resume-source", "no witness: the destination's discard settles it"),
            (StopAndCopy, V::Gone, L::Ours, P::In(Receiving), "vm-lost", "paused source died and the destination has no whole state"),
            // Stop-and-copy, destination silent: the lease decides.
            (StopAndCopy, V::Paused, L::Peers, P::Unreachable, "confirm-source", "the destination took the lease: it runs the VM"),
            (StopAndCopy, V::Gone, L::Peers, P::Unreachable, "confirm-source", "ditto, after a source daemon restart"),
            (StopAndCopy, V::Paused, L::Ours, P::Unreachable, "resume-source", "renewed exclusive: the destination can no longer win it"),
            (StopAndCopy, V::Paused, L::Free, P::Unreachable, "acquire-lease", "nobody holds it: whoever takes it decides"),
            (StopAndCopy, V::Gone, L::Free, P::Unreachable, "wait", "source copy gone; the destination may still finish"),
            (StopAndCopy, V::Gone, L::Ours, P::Unreachable, "vm-lost", "source copy gone and the destination can no longer win"),
            (StopAndCopy, V::Paused, L::Unknown, P::Unreachable, "wait", "nobody can say: stay paused, release nothing"),
            (StopAndCopy, V::Paused, L::NoWitness, P::Unreachable, "wait", "no witness: the operator resolves"),
            // Final source phases.
            (Confirmed, V::Gone, L::Peers, P::Unreachable, "done", "confirmed is final"),
            (Aborted, V::Paused, L::Ours, P::Unreachable, "resume-source", "crash between persisting Aborted and resuming"),
            (Aborted, V::Running, L::Ours, P::Unreachable, "done", "aborted and running"),
            // Destination without the whole state.
            (Prepared, V::Paused, L::Unknown, P::Unreachable, "discard-destination", "prepare's answer lost"),
            (Receiving, V::Paused, L::Free, P::In(Performing), "discard-destination", "connection lost mid-copy"),
            // Destination with the whole state: the lease decides.
            (Finishing, V::Paused, L::Ours, P::Unreachable, "resume-destination", "lease won"),
            (Finishing, V::Paused, L::Peers, P::Unreachable, "discard-destination", "the source renewed exclusive first"),
            (Finishing, V::Paused, L::Free, P::Unreachable, "acquire-lease", "take it, then decide"),
            (Finishing, V::Paused, L::Unknown, P::In(StopAndCopy), "wait", "with a witness, never resume without the lease"),
            (Finishing, V::Gone, L::Ours, P::Unreachable, "discard-destination", "the waiting QEMU died with its daemon"),
            (Finishing, V::Paused, L::NoWitness, P::In(StopAndCopy), "resume-destination", "no witness: the paused source will confirm"),
            (Finishing, V::Paused, L::NoWitness, P::In(Aborted), "discard-destination", "no witness: the source resumed"),
            (Finishing, V::Paused, L::NoWitness, P::Unreachable, "wait", "no witness and no source: the operator resolves"),
            // Running destination.
            (Running, V::Running, L::Ours, P::Unreachable, "done", "it runs"),
            (Running, V::Gone, L::Ours, P::In(StopAndCopy), "vm-lost", "died after resuming: the source's copy is older than released output"),
            (Discarded, V::Gone, L::Peers, P::Unreachable, "done", "discarded is final"),
        ];
        for (phase, vm, lease, peer, want, why) in rows {
            let f = Facts {
                phase: *phase,
                vm: *vm,
                lease: *lease,
                peer: *peer,
            };
            let got = recover(&f);
            assert_eq!(kind(&got), *want, "{why}: {f:?} -> {got:?}");
        }
    }

    /// The safety property over every combination: a source told to resume never meets a
    /// destination told to resume under the same lease view, and a side whose peer is
    /// known to run the VM never resumes.
    #[test]
    fn never_both_resume() {
        let phases_src = [Begun, Performing, StopAndCopy, Confirmed, Aborted];
        let phases_dst = [Prepared, Receiving, Finishing, Running, Discarded];
        let vms = [V::Running, V::Paused, V::Gone];
        for s in phases_src {
            for d in phases_dst {
                // The lease as each side would see it: one holder at most.
                for holder in [None, Some(Side::Source), Some(Side::Destination)] {
                    let view = |me: Side| match holder {
                        None => L::Free,
                        Some(h) if h == me => L::Ours,
                        Some(_) => L::Peers,
                    };
                    for vs in vms {
                        for vd in vms {
                            for reach in [true, false] {
                                let src = recover(&Facts {
                                    phase: s,
                                    vm: vs,
                                    lease: view(Side::Source),
                                    peer: if reach { P::In(d) } else { P::Unreachable },
                                });
                                let dst = recover(&Facts {
                                    phase: d,
                                    vm: vd,
                                    lease: view(Side::Destination),
                                    peer: if reach { P::In(s) } else { P::Unreachable },
                                });
                                // A source past stop-and-copy resumes only holding the lease,
                                // or with a destination that never had the whole state.
                                let src_runs = src == Recovery::ResumeSource;
                                // A source confirms (kills its VM) against a reachable
                                // destination only when that one runs the VM.
                                if reach && src == Recovery::ConfirmSource {
                                    assert_eq!(
                                        d, Running,
                                        "confirm against {d}, holder {holder:?}"
                                    );
                                }
                                // A running destination releases output only while it
                                // holds the lease (`decide` pauses a VM without lease or
                                // ACKs), so it counts as running only as the holder.
                                let dst_runs = dst == Recovery::ResumeDestination
                                    || d == Running
                                        && dst == Recovery::Done
                                        && holder == Some(Side::Destination);
                                // Only the combinations the protocol can reach matter: a
                                // destination in Finishing/Running implies a source at or
                                // past StopAndCopy.
                                let reachable = !matches!(d, Finishing | Running)
                                    || matches!(s, StopAndCopy | Confirmed | Aborted);
                                if reachable && s != Aborted && s != Confirmed {
                                    assert!(
                                        !(src_runs && dst_runs),
                                        "both resume: src {s} {vs:?}, dst {d} {vd:?}, \
                                         holder {holder:?}, reachable {reach}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn phases_go_forward_only_and_stay_on_their_side() {
        assert_eq!(transition(Begun, Performing), Ok(Performing));
        assert_eq!(transition(Performing, StopAndCopy), Ok(StopAndCopy));
        assert_eq!(transition(StopAndCopy, Confirmed), Ok(Confirmed));
        assert_eq!(transition(StopAndCopy, Aborted), Ok(Aborted));
        assert_eq!(transition(Finishing, Running), Ok(Running));
        for (from, to) in [
            (StopAndCopy, Performing),
            (Begun, StopAndCopy),
            (Confirmed, Aborted),
            (Begun, Prepared),
            (Receiving, Running),
            (Running, Discarded),
            (Prepared, Confirmed),
        ] {
            let e = transition(from, to).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("migration phase {from} cannot go to {to}")
            );
        }
        for p in [Begun, Performing, StopAndCopy, Confirmed, Aborted] {
            assert_eq!(p.side(), Side::Source);
        }
        for p in [Prepared, Receiving, Finishing, Running, Discarded] {
            assert_eq!(p.side(), Side::Destination);
        }
    }

    fn cookie(min: u32, max: u32, caps: &[&str]) -> Cookie {
        Cookie {
            versions: VersionRange { min, max },
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version_and_common_capabilities() {
        let ours = cookie(1, 2, &["page-lz4", "disk-bitmap", "config-record"]);
        let n = negotiate(&ours, &cookie(1, 1, &["page-lz4", "future-thing"]), &[]).unwrap();
        assert_eq!(n.version, 1);
        assert_eq!(
            n.capabilities,
            ["page-lz4".to_string()].into_iter().collect()
        );
        let n = negotiate(&ours, &cookie(2, 5, &["disk-bitmap"]), &["disk-bitmap"]).unwrap();
        assert_eq!(n.version, 2);
        let e = negotiate(&ours, &cookie(3, 4, &[]), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no common protocol version: this node speaks 1..=2, the peer 3..=4"
        );
        let e = negotiate(&ours, &cookie(2, 1, &[]), &[]).unwrap_err();
        assert!(e.to_string().contains("empty version range 2..=1"), "{e}");
        let e = negotiate(&ours, &cookie(1, 2, &["page-lz4"]), &["disk-bitmap"]).unwrap_err();
        assert_eq!(e, NegotiationError::Missing("disk-bitmap".into()));
    }

    #[test]
    fn the_record_is_persisted_before_each_phase_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MigrationStore::create(dir.path(), "m1", "web", "gamma", Begun, 10).unwrap();
        s.advance(Performing, 20).unwrap();
        s.advance(StopAndCopy, 30).unwrap();
        let again = MigrationStore::open(dir.path(), "web").unwrap().unwrap();
        assert_eq!(again.record().phase, StopAndCopy);
        assert_eq!(
            again.record().history,
            vec![(Begun, 10), (Performing, 20), (StopAndCopy, 30)]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(again.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A refused change leaves memory and disk as they were.
        let e = s.advance(Running, 40).unwrap_err();
        assert!(e.to_string().contains("migration m1 of domain web"), "{e}");
        assert_eq!(s.record().phase, StopAndCopy);
        let again = MigrationStore::open(dir.path(), "web").unwrap().unwrap();
        assert_eq!(again.record().history.len(), 3);

        assert!(MigrationStore::open(dir.path(), "db").unwrap().is_none());
        let e = MigrationStore::create(dir.path(), "m2", "db", "gamma", Finishing, 1).unwrap_err();
        assert!(
            e.to_string().contains("starts in prepared, not finishing"),
            "{e}"
        );
    }

    #[test]
    fn bad_record_files_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = MigrationStore::path_for(dir.path(), "web");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let cases = [
            ("{not json", "malformed"),
            (
                r#"{"version": 9, "anything": 1}"#,
                "format version 9 is newer",
            ),
            (
                r#"{"version":1,"id":"m","domain":"db","side":"source","peer":"p",
                   "phase":"begun","history":[]}"#,
                "names domain db, not web",
            ),
            (
                r#"{"version":1,"id":"m","domain":"web","side":"source","peer":"p",
                   "phase":"finishing","history":[]}"#,
                "does not belong to the Source side",
            ),
            (
                r#"{"version":1,"id":"m","domain":"web","side":"source","peer":"p",
                   "phase":"sideways","history":[]}"#,
                "malformed",
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            let e = MigrationStore::open(dir.path(), "web")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains(&path.display().to_string()),
                "{e}"
            );
        }
    }
}
