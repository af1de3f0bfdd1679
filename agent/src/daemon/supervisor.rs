//! One domain's supervisor: the task that owns its persisted role, its QEMU or its replica,
//! and its witness lease, and decides what to do when something changes.
//!
//! The loop waits for an input (a `remusctl` command, a replication session from the
//! listener, the heartbeat verdict, the lease, the end of a protection or receiving session,
//! a fencing result, or a 100 ms tick), then takes one [`Supervisor::step`]: it builds a
//! [`Situation`] from what it observes, asks [`decide`] for the [`Action`], and carries it
//! out, persisting the role *before* acting ([`RoleStore::apply`]). The runtime (what this
//! node holds for the domain) is an explicit [`Runtime`]; the role says what the node may
//! do, the runtime what it has.
//!
//! # Restart, per persisted role
//! - `stopped`: wait; accept the peer's replication (becoming its backup) or `start`;
//! - `standalone`, `primary`, `resyncing`: the VM died with the previous daemon (QEMU is
//!   tied to it); the backup has taken or will take over. Record `stop`, then wait like
//!   `stopped`: the survivor re-protects to us and we become its backup (failback);
//! - `backup`, `fencing`: reopen the replica (an interrupted apply is finished) and go on;
//! - `fenced`, `activating`: activate again from the same committed checkpoint (the guest
//!   has not run from it);
//! - `activated`: the guest may have run from the checkpoint, released output and written to
//!   the replica disk; activating it again would roll that back. Record `stop` and raise an
//!   alarm: an operator decides.
//!
//! # Output and the lease
//! A node releases guest output only while it can prove nobody else may run the VM
//! ([`remus_ha::decide`]'s first rule): ACKs of the backup while protected; the witness
//! lease while unprotected with witness fencing (its [`LeaseKeeper`] runs whenever the VM
//! runs here). A primary that loses both stops its VM (output stays held); it resumes the VM
//! if it wins the lease back, and kills it if the peer holds the lease.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use blk_remus::SyncMode;
use remus_engine::backup::{BackupError, BackupExit, BackupStatus, QuiesceRequest};
use remus_engine::primary::{PrimaryError, PrimaryExit};
use remus_engine::replica::ReplicaState;
use remus_engine::session::{BackupSession, Identity};
use remus_ha::auth::unix_millis;
use remus_ha::decide::{
    decide, Acks, Action, Failover as HaFailover, FenceProgress, Fencing as HaFencing, Lease, Peer,
    Situation,
};
use remus_ha::fence::{CommandFencer, FenceError, FenceOutcome, Fencer, NoFencer, WitnessFencer};
use remus_ha::heartbeat::{PeerLiveness, ViewRole};
use remus_ha::role::{Event, FenceProof, Role, RoleStore};
use remus_ha::witness::{LeaseKeeper, LeaseState};
use sch_plug::Netns;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::Shared;
use crate::api::{
    DomainCounters, DomainStatus, FailoverRecord, Request, Response, ResyncRecord, VmStatus,
};
use crate::config::{DomainConfig, Failover, FencingPolicy};
use crate::domain::backup::{ReceiveControls, ReplicaDomain, ReplicaFiles};
use crate::domain::disk_copy::{DiskCopy, DiskCopyStore};
use crate::domain::primary::{protect, ProtectOptions, Protection, RunningVm};
use crate::domain::DomainPaths;
use crate::iproute::{ip, ip_in};
use remus_ha::lineage::CopyStamp;

/// Time between protection attempts while the VM runs unprotected.
const PROTECT_RETRY: Duration = Duration::from_secs(1);
/// Time between fencing attempts after a failure.
const FENCE_RETRY: Duration = Duration::from_millis(300);
/// Time between activation attempts after a failure.
const ACTIVATE_RETRY: Duration = Duration::from_secs(3);
/// How long an ACK may take before the backup is considered lost.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// A lease closer than this to its local expiry no longer justifies running (the main
/// loop ticks every 100 ms; the witness's own expiry is only slightly later than ours).
const LEASE_MARGIN: Duration = Duration::from_millis(300);
/// How often the VM's run state is read over QMP.
const QUERY_PERIOD: Duration = Duration::from_millis(250);
/// How long `start` waits for the witness lease.
const LEASE_WAIT: Duration = Duration::from_secs(10);
/// How long a test activation waits for the receiver to commit a checkpoint and hold still.
const QUIESCE_WAIT: Duration = Duration::from_secs(30);
/// How long a test copy runs before it is judged.
const TEST_RUN: Duration = Duration::from_secs(5);

type Command = (Request, oneshot::Sender<Response>);

/// What the daemon keeps of a running supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    /// The domain.
    pub name: String,
    /// Its latest snapshot.
    pub status: watch::Receiver<DomainStatus>,
    /// Its command queue.
    pub commands: mpsc::Sender<Command>,
    /// Where the listener hands it replication sessions.
    pub sessions: mpsc::Sender<BackupSession>,
}

/// Starts the supervisor of `domain`.
///
/// # Errors
/// The role file cannot be opened (unreadable, corrupt, or another domain's).
pub fn spawn(
    domain: DomainConfig,
    shared: Arc<Shared>,
) -> Result<(SupervisorHandle, JoinHandle<()>)> {
    let node = &shared.config.node;
    let paths = DomainPaths::new(&node.run_dir, &node.state_dir, &domain.name);
    std::fs::create_dir_all(&node.state_dir)
        .with_context(|| format!("creating {}", node.state_dir.display()))?;
    let roles = RoleStore::open(&node.state_dir, &domain.name)
        .with_context(|| format!("domain {}: role file", domain.name))?;
    let disk_copy = DiskCopyStore::open(&domain.name, &paths.state)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ses_tx, ses_rx) = mpsc::channel(2);
    let initial = DomainStatus {
        name: domain.name.clone(),
        role: roles.current().clone(),
        vm: None,
        protection: None,
        replica: None,
        committed_epoch: None,
        lease: None,
        alarms: Vec::new(),
        failovers: Vec::new(),
        resyncs: Vec::new(),
        counters: DomainCounters::default(),
        copy: disk_copy.stamp(),
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let sup = Supervisor {
        d: domain.clone(),
        paths,
        shared,
        roles,
        disk_copy,
        runtime: Runtime::Idle,
        lease: None,
        fence: FenceRun::Idle,
        loss: None,
        status: status_tx,
        failovers: Vec::new(),
        resyncs: Vec::new(),
        counters: DomainCounters::default(),
        alarms: BTreeSet::new(),
        peer_in_lineage: false,
        next_protect: Instant::now(),
        protect_failures: 0,
        next_activation: Instant::now(),
        last_query: Instant::now() - QUERY_PERIOD,
        seen_acked: None,
        last_ack_at: Instant::now(),
        session_ended_here: false,
        test_run: None,
    };
    let span = tracing::info_span!("domain", name = %domain.name);
    let task = tokio::spawn(tracing::Instrument::instrument(
        sup.run(cmd_rx, ses_rx),
        span,
    ));
    Ok((
        SupervisorHandle {
            name: domain.name,
            status: status_rx,
            commands: cmd_tx,
            sessions: ses_tx,
        },
        task,
    ))
}

/// What this node holds for the domain.
enum Runtime {
    /// Nothing: no VM, no replica open.
    Idle,
    /// The replica of the peer's VM.
    Replica(Box<ReplicaRuntime>),
    /// A QEMU of this node.
    Vm(Box<VmRuntime>),
}

struct ReplicaRuntime {
    /// The replica between sessions (`None` while a session owns it).
    replica: Option<ReplicaDomain>,
    /// Its files, for copies taken while a session owns it.
    files: ReplicaFiles,
    /// The session being received.
    session: Option<Receiving>,
    /// Last committed checkpoint seen.
    committed: Option<u64>,
}

type ReceiveResult = (ReplicaDomain, Result<BackupExit, BackupError>);

struct Receiving {
    task: JoinHandle<ReceiveResult>,
    status: watch::Receiver<Option<watch::Receiver<BackupStatus>>>,
    /// Ends the session between two records.
    cancel: watch::Sender<bool>,
    /// Holds the receiver still right after a commit (test activation copies).
    quiesce: mpsc::Sender<QuiesceRequest>,
}

struct VmRuntime {
    vm: RunningVm,
    /// The protection session, while one runs.
    protection: Option<Protection>,
    /// ACK flow as far as the supervisor knows.
    acks: Acks,
    /// Whether the supervisor paused the VM (lease lost): it resumes it when it may.
    paused: bool,
    /// Whether guest output is held (protection running, or protection lost and not yet
    /// released).
    output_held: bool,
    /// Last run state read over QMP.
    running: bool,
}

impl VmRuntime {
    /// A VM just started or activated here: running, unprotected, its output passing.
    fn unprotected(vm: RunningVm) -> Self {
        Self {
            vm,
            protection: None,
            acks: Acks::Stopped,
            paused: false,
            output_held: false,
            running: true,
        }
    }
}

/// Fencing of the peer for the current loss.
enum FenceRun {
    Idle,
    Running(JoinHandle<Result<FenceOutcome, FenceError>>),
    Failed { retry_at: Instant },
    Succeeded,
}

impl FenceRun {
    fn progress(&self) -> FenceProgress {
        match self {
            FenceRun::Idle => FenceProgress::Idle,
            FenceRun::Running(_) => FenceProgress::InProgress,
            FenceRun::Failed { .. } => FenceProgress::Failed,
            FenceRun::Succeeded => FenceProgress::Succeeded,
        }
    }
}

/// The current loss of the peer, for the failover record.
#[derive(Clone, Copy)]
struct Loss {
    declared_at_ms: u64,
    detection_ms: u64,
    fence_started: Instant,
    fencing_ms: Option<u64>,
}

impl Loss {
    /// A loss declared now, after `detection_ms` of silence; `fencing_ms` is `Some(0)` when
    /// nothing needs fencing (operator, switchover).
    fn now(detection_ms: u64, fencing_ms: Option<u64>) -> Self {
        Self {
            declared_at_ms: unix_millis(),
            detection_ms,
            fence_started: Instant::now(),
            fencing_ms,
        }
    }
}

/// Something that finished in the background.
enum Finished {
    Protection(Result<Result<PrimaryExit, PrimaryError>, tokio::task::JoinError>),
    Receiving(Box<Result<ReceiveResult, tokio::task::JoinError>>),
    Fence(Result<Result<FenceOutcome, FenceError>, tokio::task::JoinError>),
}

struct Supervisor {
    d: DomainConfig,
    paths: DomainPaths,
    shared: Arc<Shared>,
    roles: RoleStore,
    /// Which file of each disk holds this node's newest data (what `start` boots).
    disk_copy: DiskCopyStore,
    runtime: Runtime,
    lease: Option<LeaseKeeper>,
    fence: FenceRun,
    loss: Option<Loss>,
    status: watch::Sender<DomainStatus>,
    failovers: Vec<FailoverRecord>,
    resyncs: Vec<ResyncRecord>,
    counters: DomainCounters,
    alarms: BTreeSet<String>,
    /// Whether the peer's replica follows this node's current disks (then a returning
    /// backup needs only the dirty regions).
    peer_in_lineage: bool,
    next_protect: Instant,
    /// Protection attempts that failed in a row (spaces the next ones).
    protect_failures: u32,
    next_activation: Instant,
    last_query: Instant,
    /// Last acknowledged checkpoint counted in `counters`.
    seen_acked: Option<u64>,
    /// When the backup last acknowledged a checkpoint.
    last_ack_at: Instant,
    /// Whether a replication session ended while this daemon ran (see `had_session`).
    session_ended_here: bool,
    /// A test activation booting or checking its copy (it answers the operator itself).
    test_run: Option<JoinHandle<()>>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sessions: mpsc::Receiver<BackupSession>,
    ) {
        self.recover().await;
        let mut liveness = self.shared.liveness.clone();
        let mut stop = self.shared.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut lease_rx = self.lease.as_ref().map(|l| l.state());
            tokio::select! {
                Some((req, reply)) = commands.recv() => match req {
                    // Answered by a task of its own once the copy has run (seconds).
                    Request::TestActivate { .. } => self.test_activate(reply).await,
                    req => {
                        let r = self.command(req).await;
                        let _ = reply.send(r);
                    }
                },
                Some(session) = sessions.recv() => self.on_session(session).await,
                _ = liveness.changed() => {}
                _ = async { match lease_rx.as_mut() { Some(r) => { let _ = r.changed().await; } None => std::future::pending().await } } => {}
                f = finished(&mut self.runtime, &mut self.fence) => self.on_finished(f).await,
                _ = tick.tick() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
            self.step().await;
            self.publish();
        }
        self.teardown().await;
    }

    // ---------------------------------------------------------------- observing

    fn role(&self) -> Role {
        self.roles.current().clone()
    }

    fn peer(&self) -> Peer {
        let l = *self.shared.liveness.borrow();
        let p = l.summary();
        // A peer that is alive but says its VM of this domain is gone (QEMU died under a
        // live daemon) is as good as lost for this domain: nothing will checkpoint it.
        if p == Peer::Alive && matches!(self.roles.current(), Role::Backup { .. }) {
            if let Some(v) = self.shared.peer_view.borrow().as_ref() {
                if let Some(dv) = v.domains.iter().find(|x| x.domain == self.d.name) {
                    // `Backup` too: a switchover whose HANDOFF record was lost after the
                    // final ACK leaves the old primary a backup with its VM killed.
                    if matches!(dv.role, ViewRole::Stopped | ViewRole::Backup) && self.had_session()
                    {
                        return Peer::Lost;
                    }
                }
            }
        }
        p
    }

    /// Whether this daemon saw a replication session end and holds its committed
    /// checkpoint (a daemon restarted after a double failure does not qualify: it cannot
    /// know whether its checkpoint is the newest).
    fn had_session(&self) -> bool {
        self.session_ended_here
            && matches!(&self.runtime, Runtime::Replica(r) if r.committed.is_some() && r.session.is_none())
    }

    /// The lease as [`decide`] must see it: held only with [`LEASE_MARGIN`] to spare, so
    /// that no decision to release output or resume the VM is taken on a lease about to
    /// expire (the peer may win it right after).
    fn lease(&self) -> Lease {
        match &self.lease {
            None => Lease::NotHeld,
            Some(k) => match &*k.state().borrow() {
                LeaseState::Held { until, .. }
                    if tokio::time::Instant::now() + LEASE_MARGIN < *until =>
                {
                    Lease::Held
                }
                LeaseState::Denied { .. } => Lease::Denied,
                _ => Lease::NotHeld,
            },
        }
    }

    /// With witness fencing, a VM may run only while this node holds the lease with some
    /// margin, or while its backup is demonstrably following it (fresh ACKs). Checked
    /// before [`decide`] because a partition shows here first: the lease runs out while the
    /// epoch loop is still waiting out its ACK timeout, and the peer may win the lease and
    /// activate right after it expires at the witness.
    fn must_pause_for_lease(&self) -> bool {
        if self.fencing() != HaFencing::Witness {
            return false;
        }
        let Runtime::Vm(v) = &self.runtime else {
            return false;
        };
        if v.paused {
            return false;
        }
        let lease_ok = self.lease() == Lease::Held;
        let acks_fresh = v.protection.is_some()
            && self.last_ack_at.elapsed() < self.shared.config.heartbeat.timeout;
        !lease_ok && !acks_fresh
    }

    /// Whether this node's VM is paused (it released nothing since) while the live peer
    /// says it runs the domain: then the peer took it over (it won the lease or fenced this
    /// node), and the paused VM here must go, whatever the lease keeper reports (a witness
    /// this node cannot reach would otherwise keep it waiting). A running VM here is left
    /// alone: two nodes must not kill each other's VM on one stale view.
    fn peer_runs_the_vm(&self) -> bool {
        let Runtime::Vm(v) = &self.runtime else {
            return false;
        };
        if !v.paused || self.shared.liveness.borrow().summary() != Peer::Alive {
            return false;
        }
        let view = self.shared.peer_view.borrow();
        view.as_ref()
            .and_then(|v| v.domains.iter().find(|x| x.domain == self.d.name))
            .is_some_and(|dv| {
                matches!(
                    dv.role,
                    ViewRole::Standalone
                        | ViewRole::Primary
                        | ViewRole::Resyncing
                        | ViewRole::Activating
                        | ViewRole::Activated
                )
            })
    }

    fn fencing(&self) -> HaFencing {
        match self.d.fencing {
            FencingPolicy::Command { .. } => HaFencing::Command,
            FencingPolicy::Witness => HaFencing::Witness,
            FencingPolicy::None => HaFencing::None,
        }
    }

    fn committed(&self) -> Option<u64> {
        match &self.runtime {
            Runtime::Replica(r) => r.committed,
            _ => None,
        }
    }

    // ---------------------------------------------------------------- restart

    async fn recover(&mut self) {
        let role = self.role();
        info!(domain = %self.d.name, role = role.name(), "recovering from the persisted role");
        match role {
            Role::Stopped => {}
            Role::Standalone | Role::Primary { .. } | Role::Resyncing { .. } => {
                self.alarm(
                    "the VM died with the previous remusd; the peer takes over or must be started",
                );
                self.apply(Event::Stop, "restart: the VM died with the previous daemon");
            }
            Role::Activated { epoch } => {
                self.alarm(&format!(
                    "restarted after resuming checkpoint {epoch}: not activating it again (the guest may have run from it); an operator must decide"
                ));
                self.apply(
                    Event::Stop,
                    "restart in activated: the activated VM died with the previous daemon; never activate twice",
                );
            }
            Role::Backup { .. }
            | Role::Fencing { .. }
            | Role::Fenced { .. }
            | Role::Activating { .. } => {
                if let Err(e) = self.open_replica() {
                    self.alarm(&format!("cannot open the replica: {e:#}"));
                }
                if matches!(role, Role::Fencing { .. }) {
                    // Resume fencing for the loss that was being handled.
                    self.loss = Some(Loss::now(0, None));
                }
            }
        }
    }

    /// Ends the session being received, if any, and takes the replica back. The receiver
    /// stops between records (a checkpoint being committed completes first); one that does
    /// not stop within 5 s is aborted and the replica reopened from its files (an
    /// interrupted apply is redone there).
    async fn end_session(&mut self) {
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        let Some(mut s) = r.session.take() else {
            return;
        };
        let _ = s.cancel.send(true);
        match tokio::time::timeout(Duration::from_secs(5), &mut s.task).await {
            Ok(Ok((rd, res))) => {
                info!(domain = %self.d.name, result = ?res.map(|_| ()).map_err(|e| e.to_string()), "replication session ended");
                r.committed = rd.committed();
                r.replica = Some(rd);
            }
            other => {
                warn!(domain = %self.d.name, timed_out = other.is_err(), "the receiver did not stop; reopening the replica");
                s.task.abort();
                let _ = s.task.await;
                self.runtime = Runtime::Idle;
                if let Err(e) = self.open_replica() {
                    self.alarm(&format!("cannot reopen the replica: {e:#}"));
                }
            }
        }
    }

    fn open_replica(&mut self) -> Result<()> {
        if matches!(self.runtime, Runtime::Replica(_)) {
            return Ok(());
        }
        let rd = ReplicaDomain::open(&self.d, self.paths.clone())?;
        let committed = rd.committed();
        self.runtime = Runtime::Replica(Box::new(ReplicaRuntime {
            files: rd.files(),
            replica: Some(rd),
            session: None,
            committed,
        }));
        Ok(())
    }

    // ---------------------------------------------------------------- role

    /// Persists `event`; on refusal the error is logged and the role is unchanged.
    fn apply(&mut self, event: Event, cause: &str) -> bool {
        let name = event.name();
        match self.roles.apply(event, cause) {
            Ok(r) => {
                info!(domain = %self.d.name, event = name, role = r.name(), cause, "role");
                true
            }
            Err(e) => {
                error!(domain = %self.d.name, event = name, error = %e, "role transition refused");
                false
            }
        }
    }

    fn alarm(&mut self, what: &str) {
        warn!(domain = %self.d.name, alarm = what);
        self.alarms.insert(what.to_string());
    }

    fn clear_alarms(&mut self, prefix: &str) {
        self.alarms.retain(|a| !a.starts_with(prefix));
    }

    // ---------------------------------------------------------------- inputs

    async fn on_session(&mut self, session: BackupSession) {
        let role = self.role();
        match role {
            Role::Stopped => {
                if !self.apply(
                    Event::BackupStarted {
                        peer: self.shared.config.peer.name.clone(),
                    },
                    "the peer started protecting the domain to this node",
                ) {
                    return;
                }
                self.alarms.clear();
            }
            Role::Backup { .. } => {}
            Role::Fencing { .. } => {
                // The primary is evidently alive: stop fencing it.
                if let FenceRun::Running(t) = std::mem::replace(&mut self.fence, FenceRun::Idle) {
                    t.abort();
                }
                self.loss = None;
                if !self.apply(
                    Event::PeerReturned,
                    "the primary opened a replication session",
                ) {
                    return;
                }
            }
            other => {
                warn!(
                    domain = %self.d.name,
                    role = other.name(),
                    "refusing the peer's replication session: this node runs or is taking over the VM"
                );
                return;
            }
        }
        // The replicas are about to receive the peer's data: from now on they, not the
        // images, are this node's newest copy. Recorded before the first write can land.
        if let Err(e) = self.disk_copy.set(
            DiskCopy::Replica,
            CopyStamp::received_from(self.peer_stamp()),
            &format!("backup of {}", self.shared.config.peer.name),
        ) {
            self.alarm(&format!("refusing replication: {e}"));
            return;
        }
        // A new session supersedes a half-open one (the primary reconnected).
        self.end_session().await;
        if let Err(e) = self.open_replica() {
            self.alarm(&format!("cannot open the replica: {e:#}"));
            return;
        }
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        let Some(mut rd) = r.replica.take() else {
            return;
        };
        let (st_tx, st_rx) = watch::channel(None);
        let (cancel, cancel_rx) = watch::channel(false);
        let (quiesce, quiesce_rx) = mpsc::channel(1);
        let controls = ReceiveControls {
            status: Some(st_tx),
            cancel: Some(cancel_rx),
            quiesce: Some(quiesce_rx),
        };
        let task = tokio::spawn(async move {
            let res = rd.receive(session, controls).await;
            (rd, res)
        });
        tokio::spawn(report_backup_traffic(
            st_rx.clone(),
            self.shared.traffic.clone(),
        ));
        r.session = Some(Receiving {
            task,
            status: st_rx,
            cancel,
            quiesce,
        });
        self.clear_alarms("replication");
    }

    async fn on_finished(&mut self, f: Finished) {
        match f {
            Finished::Protection(r) => {
                let Runtime::Vm(v) = &mut self.runtime else {
                    return;
                };
                v.protection = None;
                v.acks = Acks::Stopped;
                self.counters.protection_lost += 1;
                match r {
                    Ok(Ok(PrimaryExit::BackupLost { reason, last_acked })) => {
                        warn!(domain = %self.d.name, %reason, ?last_acked, "protection lost");
                        self.alarm("running unprotected: the backup is lost");
                    }
                    Ok(Ok(PrimaryExit::HandedOff { epoch })) => {
                        // Only a switchover asks for a hand-off, and it awaits the task itself.
                        warn!(domain = %self.d.name, epoch, "unexpected hand-off");
                    }
                    Ok(Ok(PrimaryExit::Shutdown { last_acked })) => {
                        info!(domain = %self.d.name, ?last_acked, "protection ended");
                    }
                    Ok(Err(e)) => {
                        error!(domain = %self.d.name, error = %e, "protection failed");
                        self.alarm(&format!("protection failed: {e}"));
                    }
                    Err(e) => error!(domain = %self.d.name, error = %e, "protection task failed"),
                }
                // Still resyncing (no checkpoint acknowledged): the backup cannot activate
                // from this session, so output goes straight back to pass-through.
                if matches!(self.role(), Role::Resyncing { .. }) {
                    self.apply(
                        Event::BackupLost,
                        "the returning backup was lost during resync",
                    );
                    self.release_output().await;
                }
            }
            Finished::Receiving(r) => {
                let r = *r;
                let Runtime::Replica(rr) = &mut self.runtime else {
                    return;
                };
                rr.session = None;
                self.session_ended_here = true;
                match r {
                    Ok((rd, res)) => {
                        rr.committed = rd.committed();
                        rr.replica = Some(rd);
                        match res {
                            Ok(BackupExit::Ended { committed }) => {
                                info!(domain = %self.d.name, ?committed, "the primary ended replication")
                            }
                            Ok(BackupExit::HandedOff { epoch }) => {
                                info!(domain = %self.d.name, epoch, "the primary handed the VM over");
                                self.loss = Some(Loss::now(0, Some(0)));
                                self.apply(
                                    Event::SwitchoverTakeOver,
                                    &format!("switchover: the primary stopped its VM after checkpoint {epoch}"),
                                );
                            }
                            Err(e) => {
                                warn!(domain = %self.d.name, error = %e, "replication session ended");
                            }
                        }
                    }
                    Err(e) => {
                        error!(domain = %self.d.name, error = %e, "receiving task failed; reopening the replica");
                        self.runtime = Runtime::Idle;
                        if let Err(e) = self.open_replica() {
                            self.alarm(&format!("cannot reopen the replica: {e:#}"));
                        }
                    }
                }
            }
            Finished::Fence(r) => {
                let outcome = match r {
                    Ok(x) => x,
                    Err(e) => Err(FenceError::CommandFailed {
                        domain: self.d.name.clone(),
                        peer: self.shared.config.peer.name.clone(),
                        program: "the fencing task".into(),
                        attempts: 1,
                        last: remus_ha::fence::AttemptFailure::Spawn(e.to_string()),
                    }),
                };
                self.on_fenced(outcome);
            }
        }
    }

    fn on_fenced(&mut self, outcome: Result<FenceOutcome, FenceError>) {
        match outcome {
            Ok(o) => {
                info!(domain = %self.d.name, proof = ?o.proof, elapsed_ms = o.elapsed.as_millis() as u64, "peer fenced");
                if let (Some(lease), Some(client)) = (o.lease.clone(), self.shared.witness.clone())
                {
                    self.lease = Some(self.spawn_keeper(client, Some(lease)));
                }
                self.fence = FenceRun::Succeeded;
                if let Some(l) = &mut self.loss {
                    l.fencing_ms = Some(l.fence_started.elapsed().as_millis() as u64);
                }
                if matches!(self.role(), Role::Fencing { .. }) {
                    self.apply(Event::Fenced { by: o.proof }, "fencing succeeded");
                }
                self.clear_alarms("fencing");
            }
            Err(e) => {
                warn!(domain = %self.d.name, error = %e, "fencing failed");
                self.fence = FenceRun::Failed {
                    retry_at: Instant::now() + FENCE_RETRY,
                };
                if matches!(self.role(), Role::Fencing { .. }) {
                    self.apply(Event::FenceFailed, &e.to_string());
                }
                self.alarms.retain(|a| !a.starts_with("fencing"));
                self.alarm(&format!("fencing failing: {e}"));
            }
        }
    }

    // ---------------------------------------------------------------- deciding

    async fn step(&mut self) {
        self.observe_vm().await;
        self.observe_protection();
        self.observe_replica();

        let role = self.role();
        if self.peer_runs_the_vm() {
            self.kill_vm("the peer runs the VM now (it says so in its heartbeats)")
                .await;
            return;
        }
        if self.must_pause_for_lease() {
            self.stop_vm(&role).await;
            return;
        }
        let peer = self.peer();
        // A peer heard again before fencing succeeded ends the loss.
        if matches!(role, Role::Fencing { .. })
            && peer == Peer::Alive
            && !matches!(self.fence, FenceRun::Running(_) | FenceRun::Succeeded)
        {
            self.loss = None;
            self.fence = FenceRun::Idle;
            self.apply(Event::PeerReturned, "the primary is heard again");
            return;
        }
        let situation = Situation {
            role: &role,
            peer,
            acks: match &self.runtime {
                Runtime::Vm(v) => v.acks,
                _ => Acks::Stopped,
            },
            lease: self.lease(),
            fencing: self.fencing(),
            fence: self.fence.progress(),
            failover: match self.d.failover {
                Failover::Automatic => HaFailover::Automatic,
                Failover::Manual => HaFailover::Manual,
            },
            has_committed_checkpoint: self.committed().is_some(),
            vm_running: matches!(self.runtime, Runtime::Vm(_)),
        };
        let action = decide(&situation);
        match action {
            Action::Wait | Action::HoldOutput => {}
            Action::KeepRunning => self.keep_running().await,
            Action::StopVm => self.stop_vm(&role).await,
            Action::Fence => self.fence_peer(&role).await,
            Action::Activate => {
                if Instant::now() >= self.next_activation {
                    if let Err(e) = self.activate().await {
                        error!(domain = %self.d.name, error = %format!("{e:#}"), "activation failed");
                        self.alarm(&format!("activation failed: {e:#}"));
                        self.next_activation = Instant::now() + ACTIVATE_RETRY;
                    }
                }
            }
            Action::ReleaseOutputAndRunUnprotected => {
                if matches!(role, Role::Primary { .. }) {
                    self.apply(
                        Event::BackupLost,
                        "the backup stopped acknowledging and cannot run the VM",
                    );
                }
                self.release_output().await;
                self.resume_if_paused().await;
            }
        }
        self.maybe_protect().await;
    }

    /// Reads the VM's state; a QEMU that exited ends the runtime.
    async fn observe_vm(&mut self) {
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        if let Ok(Some(status)) = v.vm.qemu.try_wait() {
            let tail = v.vm.qemu.stderr_tail();
            error!(domain = %self.d.name, %status, stderr = %tail, "QEMU exited");
            if let Some(p) = v.protection.take() {
                p.task.abort();
            }
            self.runtime = Runtime::Idle;
            self.stop_lease(false).await;
            self.alarm(&format!(
                "QEMU exited ({status}); the VM is down on this node"
            ));
            self.apply(Event::Stop, "QEMU exited");
            return;
        }
        if self.last_query.elapsed() >= QUERY_PERIOD {
            self.last_query = Instant::now();
            let control = v.vm.control.clone();
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), control.query_status()).await
            {
                v.running = s == remus_qemu::RunState::running
                    // The epoch loop's own brief stops are not a stopped VM.
                    || (v.protection.is_some() && !v.paused);
            }
        }
    }

    /// Follows the first acknowledgement of a protection session into the role.
    fn observe_protection(&mut self) {
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        let Some(p) = &v.protection else {
            return;
        };
        let st = p.handle.status.borrow().clone();
        if let Some(k) = st.last_acked {
            let new = match self.seen_acked {
                Some(s) if k >= s => k - s,
                _ => 1,
            };
            self.counters.checkpoints += new;
            if new > 0 {
                self.last_ack_at = Instant::now();
            }
            self.seen_acked = Some(k);
        }
        // A session's resync counts once the backup acknowledged its first checkpoint
        // (attempts that failed before are retried and would only repeat it).
        let syncs: Vec<_> = if st.last_acked.is_none() {
            Vec::new()
        } else {
            p.disk_syncs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect()
        };
        for s in syncs {
            self.resyncs.push(ResyncRecord {
                disk: s.disk,
                mode: match s.mode {
                    SyncMode::Full => "full".into(),
                    SyncMode::Dirty => "dirty".into(),
                },
                regions: s.report.regions,
                bytes_copied: s.report.bytes_copied,
                bytes_zero: s.report.bytes_zero,
            });
        }
        if let (Some(k), Role::Resyncing { .. }) = (st.last_acked, self.roles.current()) {
            if self.apply(
                Event::ResyncDone { epoch: k },
                "the backup acknowledged the first checkpoint",
            ) {
                self.peer_in_lineage = true;
                self.protect_failures = 0;
                self.clear_alarms("running unprotected");
            }
        }
    }

    fn observe_replica(&mut self) {
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        if let Some(s) = &r.session {
            if let Some(st) = s.status.borrow().as_ref() {
                let st = st.borrow();
                if let ReplicaState::Committed(k) = st.replica {
                    if r.committed != Some(k) {
                        self.counters.checkpoints += 1;
                    }
                    r.committed = Some(k);
                } else {
                    // A new session's first checkpoint is being written over the replica:
                    // nothing is activatable until it commits.
                    r.committed = None;
                }
            }
        }
    }

    // ---------------------------------------------------------------- acting

    async fn keep_running(&mut self) {
        let role = self.role();
        if matches!(
            role,
            Role::Standalone | Role::Resyncing { .. } | Role::Activated { .. }
        ) {
            self.resume_if_paused().await;
            if let Runtime::Vm(v) = &self.runtime {
                if v.output_held && v.protection.is_none() {
                    self.release_output().await;
                }
            }
        }
        if matches!(role, Role::Standalone) && self.lease() == Lease::Denied {
            self.kill_vm("the peer holds the witness lease").await;
        }
    }

    async fn stop_vm(&mut self, role: &Role) {
        if matches!(self.runtime, Runtime::Vm(_)) && self.lease() == Lease::Denied {
            self.kill_vm("the peer holds the witness lease: it runs the VM now")
                .await;
            return;
        }
        match &mut self.runtime {
            Runtime::Vm(v) => {
                if !v.paused {
                    warn!(domain = %self.d.name, role = role.name(), "stopping the VM: nothing proves the peer cannot run it");
                    let ended_protection = if let Some(p) = v.protection.take() {
                        // Output of unacknowledged epochs stays held.
                        let _ = p.handle.shutdown.send(true);
                        p.task.abort();
                        v.acks = Acks::Stopped;
                        true
                    } else {
                        false
                    };
                    if let Err(e) = v.vm.control.stop().await {
                        error!(domain = %self.d.name, error = %e, "QMP stop failed; killing QEMU");
                        self.kill_vm("QMP stop failed").await;
                        return;
                    }
                    v.paused = true;
                    v.running = false;
                    self.alarm(
                        "VM paused: neither backup ACKs nor the witness lease prove it safe to run",
                    );
                    // A resync ended here has no checkpoint the backup could run: the role
                    // must say unprotected, or nothing would ever protect the VM again once
                    // it resumes. (A primary's role follows from its stopped ACKs.)
                    if ended_protection && matches!(role, Role::Resyncing { .. }) {
                        self.apply(Event::BackupLost, "the resync was ended to pause the VM");
                    }
                }
            }
            _ => {
                if matches!(role, Role::Activated { .. }) {
                    self.apply(
                        Event::Stop,
                        "activated VM not running: never activate twice",
                    );
                }
            }
        }
    }

    async fn resume_if_paused(&mut self) {
        if let Runtime::Vm(v) = &mut self.runtime {
            if v.paused {
                match v.vm.control.cont().await {
                    Ok(_) => {
                        info!(domain = %self.d.name, "VM resumed: running is proven safe again");
                        v.paused = false;
                        self.alarms.retain(|a| !a.starts_with("VM paused"));
                    }
                    Err(e) => error!(domain = %self.d.name, error = %e, "QMP cont failed"),
                }
            }
        }
    }

    async fn release_output(&mut self) {
        if let Runtime::Vm(v) = &mut self.runtime {
            let mut nics = v.vm.nics.clone();
            if let Err(e) = remus_engine::ports::OutputBuffer::release_all(&mut nics).await {
                error!(domain = %self.d.name, error = %e, "releasing held output");
                return;
            }
            v.output_held = false;
        }
    }

    async fn kill_vm(&mut self, why: &str) {
        if let Runtime::Vm(mut v) = std::mem::replace(&mut self.runtime, Runtime::Idle) {
            warn!(domain = %self.d.name, why, "killing this node's QEMU");
            if let Some(p) = v.protection.take() {
                p.task.abort();
            }
            let _ = v.vm.qemu.kill_and_wait().await;
        }
        self.stop_lease(false).await;
        self.alarm(&format!("VM killed: {why}"));
        self.apply(Event::Stop, why);
    }

    async fn stop_lease(&mut self, release: bool) {
        if let Some(k) = self.lease.take() {
            let _ = k.stop(release).await;
        }
    }

    async fn fence_peer(&mut self, role: &Role) {
        if matches!(role, Role::Backup { .. }) {
            let detection_ms = match *self.shared.liveness.borrow() {
                PeerLiveness::Lost { detected_after, .. } => detected_after.as_millis() as u64,
                _ => 0,
            };
            self.loss = Some(Loss::now(detection_ms, None));
            // Stop receiving: the session is dead or half-open.
            self.end_session().await;
            if !self.apply(
                Event::PeerLost,
                &format!("no heartbeat for {detection_ms} ms"),
            ) {
                return;
            }
            self.fence = FenceRun::Idle;
        }
        match &self.fence {
            FenceRun::Running(_) | FenceRun::Succeeded => return,
            FenceRun::Failed { retry_at } if Instant::now() < *retry_at => return,
            _ => {}
        }
        let fencer: Arc<dyn Fencer> = match &self.d.fencing {
            FencingPolicy::Command {
                argv,
                timeout,
                retries,
            } => match CommandFencer::new(argv.clone(), *timeout, *retries) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    self.on_fenced(Err(e));
                    return;
                }
            },
            FencingPolicy::Witness => match &self.shared.witness {
                Some(w) => Arc::new(WitnessFencer::new(w.clone())),
                None => {
                    self.alarm("fencing: witness fencing without a [witness] section");
                    return;
                }
            },
            FencingPolicy::None => {
                warn!(domain = %self.d.name, "UNSAFE: fencing mode none: nothing proves the peer gone");
                Arc::new(NoFencer)
            }
        };
        let domain = self.d.name.clone();
        let peer = self.shared.config.peer.name.clone();
        self.fence = FenceRun::Running(tokio::spawn(
            async move { fencer.fence(&domain, &peer).await },
        ));
    }

    /// Activates the replica: persisted in two steps around the moment the guest may run.
    async fn activate(&mut self) -> Result<()> {
        let started = Instant::now();
        // Fencing with the lease held: decide says activate; record the proof first.
        if matches!(self.role(), Role::Fencing { .. }) {
            self.apply(
                Event::Fenced {
                    by: FenceProof::Lease,
                },
                "the witness lease is held",
            );
        }
        let proof = match self.role() {
            Role::Fenced { by, .. } => format!("{by:?}").to_lowercase(),
            Role::Activating { .. } => "redo".into(),
            other => return Err(anyhow!("activation in role {}", other.name())),
        };
        if self.fencing() == HaFencing::Witness && self.lease() != Lease::Held {
            // Switchover or operator failover with a witness: the lease must be ours too.
            self.acquire_lease(LEASE_WAIT).await?;
        }
        self.end_session().await;
        let Runtime::Replica(r) = &mut self.runtime else {
            self.open_replica()?;
            return Err(anyhow!("the replica was not open; retrying"));
        };
        let rd = match r.replica.take() {
            Some(rd) => rd,
            None => ReplicaDomain::open(&self.d, self.paths.clone())?,
        };
        let epoch = match rd.replica().state() {
            ReplicaState::Committed(k) => k,
            other => {
                self.runtime = Runtime::Replica(Box::new(ReplicaRuntime {
                    files: rd.files(),
                    replica: Some(rd),
                    session: None,
                    committed: None,
                }));
                return Err(anyhow!(
                    "no committed checkpoint to activate (replica {other:?})"
                ));
            }
        };
        self.runtime = Runtime::Idle;
        if !self.apply(
            Event::ActivationStarted { from_epoch: epoch },
            "activating the last committed checkpoint",
        ) {
            return Err(anyhow!("the role refused activation"));
        }
        // Activation is one long step: say where it is as it goes.
        self.publish();
        test_hold("activating").await;
        let netns = Netns::current();
        let (vm, from) = match rd.activate(&netns).await {
            Ok(x) => x,
            Err(e) => {
                // Nothing ran: the role stays `activating` and the next attempt redoes it.
                self.open_replica().ok();
                return Err(e);
            }
        };
        if !self.apply(Event::Resuming, "resuming the activated guest") {
            return Err(anyhow!("the role refused resuming"));
        }
        // This node now runs the guest as its authority: a new generation of its data,
        // recorded before the guest can write to it. A failure to record it is an alarm,
        // not a reason to leave the guest stopped: the stamp only guides a later `start`.
        let stamp = CopyStamp::next_run(self.disk_copy.stamp(), self.peer_stamp());
        let copy = self.disk_copy.current();
        if let Err(e) = self.disk_copy.set(copy, stamp, "activated the replica") {
            self.alarm(&format!(
                "cannot record the copy's generation {}: {e}",
                stamp.generation
            ));
        }
        self.record_at_witness(stamp);
        self.publish();
        test_hold("activated").await;
        vm.resume_activated().await?;
        self.apply(Event::ActivationDone, "the activated VM runs");
        let activation_ms = started.elapsed().as_millis() as u64;
        let loss = self.loss.take();
        let rec = FailoverRecord {
            declared_at_ms: loss.map_or_else(unix_millis, |l| l.declared_at_ms),
            detection_ms: loss.map_or(0, |l| l.detection_ms),
            fencing_ms: loss.and_then(|l| l.fencing_ms).unwrap_or(0),
            activation_ms,
            fence_proof: proof,
            from_epoch: from,
        };
        info!(domain = %self.d.name, ?rec, "failover complete");
        self.failovers.push(rec);
        self.counters.failovers += 1;
        self.fence = FenceRun::Idle;
        self.peer_in_lineage = false;
        self.seen_acked = None;
        self.alarms.clear();
        self.alarm("running unprotected: waiting for the peer to return as backup");
        self.runtime = Runtime::Vm(Box::new(VmRuntime::unprotected(vm)));
        if self.fencing() == HaFencing::Witness && self.lease.is_none() {
            if let Some(w) = self.shared.witness.clone() {
                self.lease = Some(self.spawn_keeper(w, None));
            }
        }
        Ok(())
    }

    /// A lease keeper on the HA runtime (renewals must not wait for a busy main runtime).
    fn spawn_keeper(
        &self,
        client: Arc<remus_ha::witness::WitnessClient>,
        initial: Option<remus_ha::witness::Lease>,
    ) -> LeaseKeeper {
        let _in_ha = self.shared.ha.enter();
        LeaseKeeper::spawn(client, self.d.name.clone(), initial)
    }

    /// Starts a [`LeaseKeeper`] and waits until it holds the lease.
    async fn acquire_lease(&mut self, wait: Duration) -> Result<()> {
        let Some(w) = self.shared.witness.clone() else {
            return Err(anyhow!("witness fencing without a [witness] section"));
        };
        if self.lease.is_none() {
            self.lease = Some(self.spawn_keeper(w, None));
        }
        let mut st = self.lease.as_ref().expect("just set").state();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = tokio::time::Instant::now();
            let state = st.borrow().clone();
            match state {
                s if s.held_at(now) => return Ok(()),
                LeaseState::Denied { holder } => {
                    self.stop_lease(false).await;
                    return Err(anyhow!("the witness lease is held by {holder}"));
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, st.changed())
                .await
                .is_err()
            {
                self.stop_lease(false).await;
                return Err(anyhow!(
                    "the witness did not grant the lease within {wait:?}"
                ));
            }
        }
    }

    /// While the VM runs unprotected and the peer is alive, tries to protect it.
    async fn maybe_protect(&mut self) {
        if !matches!(self.role(), Role::Standalone) || Instant::now() < self.next_protect {
            return;
        }
        let Runtime::Vm(v) = &self.runtime else {
            return;
        };
        if v.protection.is_some() || v.paused || self.peer() != Peer::Alive {
            return;
        }
        if self.fencing() == HaFencing::Witness && self.lease() != Lease::Held {
            return;
        }
        // The peer must not be running the VM itself.
        if let Some(view) = self.shared.peer_view.borrow().as_ref() {
            if let Some(dv) = view.domains.iter().find(|x| x.domain == self.d.name) {
                if !matches!(dv.role, ViewRole::Stopped | ViewRole::Backup) {
                    self.next_protect = Instant::now() + PROTECT_RETRY;
                    return;
                }
            }
        }
        // Attempts that keep failing (the peer refuses or loses every session) back off to
        // 16 s: each one costs a pre-copy of all RAM and a disk resync.
        self.next_protect = Instant::now() + PROTECT_RETRY * (1u32 << self.protect_failures.min(4));
        self.protect_failures += 1;
        let cfg = &self.shared.config;
        let opts = ProtectOptions {
            peer_addr: cfg.peer.address.to_string(),
            psk: self.shared.psk.clone(),
            identity: Identity {
                node: cfg.node.name.clone(),
                peer_node: cfg.peer.name.clone(),
                domain: self.d.name.clone(),
            },
            ack_timeout: ACK_TIMEOUT,
            disk_sync: if self.peer_in_lineage {
                SyncMode::Dirty
            } else {
                SyncMode::Full
            },
        };
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        match protect(&v.vm, &opts).await {
            Ok(p) => {
                info!(domain = %self.d.name, sync = ?opts.disk_sync, "protection session opened");
                tokio::spawn(report_primary_traffic(
                    p.handle.status.clone(),
                    self.shared.traffic.clone(),
                ));
                v.protection = Some(p);
                v.acks = Acks::Flowing;
                self.last_ack_at = Instant::now();
                // Held from now on, unless buffering is switched off (unsafe): then it never is.
                v.output_held = self.d.netbuf.output_buffering;
                self.seen_acked = None;
                self.apply(
                    Event::BackupReturned {
                        peer: cfg.peer.name.clone(),
                    },
                    "the peer accepted a replication session",
                );
            }
            Err(e) => {
                tracing::debug!(domain = %self.d.name, error = %format!("{e:#}"), "protection attempt failed");
            }
        }
    }

    // ---------------------------------------------------------------- commands

    async fn command(&mut self, req: Request) -> Response {
        let r = match req {
            Request::Start { older_copy, .. } => self.start(older_copy).await,
            Request::Failover { .. } => self.operator_failover().await,
            Request::Switchover { .. } => self.switchover().await,
            Request::TestActivate { .. } => Err(anyhow!("a test activation answers by itself")),
            Request::Status => Err(anyhow!("status is not a command")),
        };
        self.publish();
        match r {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("domain {}: {e:#}", self.d.name),
            },
        }
    }

    /// An operator's start: refused unless this node's role is `stopped`, the peer's is
    /// too, and the peer advertises no newer copy of the domain's data than this node's
    /// (`older_copy` overrides the last check only).
    async fn start(&mut self, older_copy: bool) -> Result<String> {
        let role = self.role();
        if role != Role::Stopped {
            return Err(anyhow!(
                "role is {}: only a stopped domain can be started",
                role.name()
            ));
        }
        // A daemon that has just started may not have heard the peer yet, and a peer that
        // has just started may not advertise its domains yet: wait until the peer's stamp
        // for this domain is known or the peer is declared lost (at most the heartbeat
        // timeout and a second), so that the copy check below sees the peer's stamp
        // whenever the peer is up.
        let deadline = tokio::time::Instant::now()
            + self.shared.config.heartbeat.timeout
            + Duration::from_secs(1);
        let mut live = self.shared.liveness.clone();
        let mut view = self.shared.peer_view.clone();
        loop {
            let lost = matches!(*live.borrow_and_update(), PeerLiveness::Lost { .. });
            view.borrow_and_update();
            if lost || self.peer_stamp().is_some() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = live.changed() => if r.is_err() { break },
                r = view.changed() => if r.is_err() { break },
            }
        }
        if let Some(view) = self.shared.peer_view.borrow().as_ref() {
            if let Some(dv) = view.domains.iter().find(|x| x.domain == self.d.name) {
                if dv.role != ViewRole::Stopped {
                    return Err(anyhow!(
                        "the peer's role for the domain is {:?}: it must be stopped",
                        dv.role
                    ));
                }
            }
        }
        let own = self.disk_copy.stamp();
        let peer_stamp = self.peer_stamp();
        let peer = self.shared.config.peer.name.as_str();
        let mut lineage = match peer_stamp {
            Some(p) => against_newer(own, p, older_copy, peer, &format!("{peer}'s copy"), || {
                format!(
                    "{peer} holds a newer copy of the domain's data ({p}) than this \
                         node ({own})"
                )
            })?,
            None => format!("{peer} not heard: could not check that its copy is not newer"),
        };
        // Then the witness, which keeps the newest stamp any node recorded: it knows of a
        // newer copy even when the node holding it is down for good.
        if let Some(w) = self.shared.witness.clone() {
            match w.record_copy(&self.d.name, own).await {
                Ok(r) => {
                    let by = r.node.unwrap_or_else(|| "another node".into());
                    let verdict = against_newer(
                        own,
                        r.stamp,
                        older_copy,
                        &by,
                        "the witness's record",
                        || {
                            format!(
                                "the witness recorded a newer copy of the domain's data ({}) \
                                 from {by} than this node's ({own})",
                                r.stamp
                            )
                        },
                    )?;
                    lineage.push_str(&format!("; {verdict}"));
                }
                Err(e) => {
                    warn!(
                        domain = %self.d.name,
                        error = %e,
                        "start: cannot compare this node's copy with the witness's record"
                    );
                    lineage.push_str("; the witness could not be asked");
                }
            }
        }
        if self.fencing() == HaFencing::Witness {
            self.acquire_lease(LEASE_WAIT).await?;
        }
        let copy = self.disk_copy.current();
        let stamp = CopyStamp::next_run(own, peer_stamp);
        if let Err(e) = self.disk_copy.set(copy, stamp, "started by the operator") {
            self.stop_lease(true).await;
            return Err(e.into());
        }
        self.record_at_witness(stamp);
        self.runtime = Runtime::Idle;
        self.apply(Event::StartUnprotected, "operator: start");
        let vm = match RunningVm::start(&self.d, self.paths.clone(), &Netns::current(), copy).await
        {
            Ok(vm) => vm,
            Err(e) => {
                self.apply(Event::Stop, "start failed");
                self.stop_lease(true).await;
                return Err(e);
            }
        };
        let pid = vm.qemu.pid();
        self.runtime = Runtime::Vm(Box::new(VmRuntime::unprotected(vm)));
        self.peer_in_lineage = false;
        self.next_protect = Instant::now();
        self.alarm("running unprotected: waiting for the peer to accept as backup");
        Ok(format!(
            "VM started from its {}s (QEMU pid {pid}; copy {own}, {lineage}; now generation \
             {}); protecting it to {}",
            copy.name(),
            stamp.generation,
            self.shared.config.peer.name
        ))
    }

    /// Planned handover, asked of the primary: a final checkpoint with the VM left stopped,
    /// acknowledged by the backup, which then takes over from exactly that checkpoint.
    /// Nothing is lost (the final checkpoint holds everything the guest did) and nothing
    /// runs twice (this node's VM never resumes: it is killed once the backup has it).
    async fn switchover(&mut self) -> Result<String> {
        let role = self.role();
        if !matches!(role, Role::Primary { .. }) {
            return Err(anyhow!(
                "role is {}: a switchover is asked of the protecting primary",
                role.name()
            ));
        }
        let Runtime::Vm(v) = &mut self.runtime else {
            return Err(anyhow!("no VM runs here"));
        };
        let Some(p) = v.protection.take() else {
            return Err(anyhow!("the VM is not protected: nothing to hand over to"));
        };
        p.handle.hand_off();
        let exit = tokio::time::timeout(Duration::from_secs(60), p.task).await;
        let epoch = match exit {
            Ok(Ok(Ok(PrimaryExit::HandedOff { epoch }))) => epoch,
            other => {
                v.acks = Acks::Stopped;
                let why = match other {
                    Ok(Ok(Ok(x))) => format!("{x:?}"),
                    Ok(Ok(Err(e))) => e.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no hand-off within 60 s".into(),
                };
                return Err(anyhow!(
                    "the backup did not take the final checkpoint ({why}); the VM keeps running here"
                ));
            }
        };
        self.apply(Event::SwitchoverHandOff, "operator: switchover");
        if let Runtime::Vm(mut v) = std::mem::replace(&mut self.runtime, Runtime::Idle) {
            let _ = v.vm.qemu.kill_and_wait().await;
        }
        // Give the lease back at once so the new primary need not wait for it to expire.
        self.stop_lease(true).await;
        self.peer_in_lineage = false;
        self.alarms.clear();
        self.open_replica()?;
        Ok(format!(
            "handed over at checkpoint {epoch}; {} runs the VM, this node is its backup",
            self.shared.config.peer.name
        ))
    }

    /// Boots a throwaway copy of the committed replica in a network namespace of its own
    /// (its NICs reach nothing), checks that it runs, and discards it. `reply` is answered
    /// when the check is over (by a task of its own; the supervisor goes on meanwhile).
    ///
    /// Protection goes on throughout: while a session runs, the receiver is held still
    /// right after its next checkpoint commits, the RAM and disk files of that checkpoint are
    /// copied, and the receiver goes on (the primary's next ACK is late by the copy time).
    /// Between sessions the replica is copied as it is.
    async fn test_activate(&mut self, reply: oneshot::Sender<Response>) {
        match self.start_test_activation().await {
            Ok(run) => {
                let name = self.d.name.clone();
                self.test_run = Some(tokio::spawn(async move {
                    let r = run.await;
                    info!(domain = %name, result = ?r, "test activation");
                    let _ = reply.send(match r {
                        Ok(message) => Response::Done { message },
                        Err(e) => Response::Error {
                            message: format!("domain {name}: test activation: {e:#}"),
                        },
                    });
                }));
            }
            Err(e) => {
                let _ = reply.send(Response::Error {
                    message: format!("domain {}: test activation: {e:#}", self.d.name),
                });
            }
        }
    }

    /// Takes (or arranges) the copy and returns the rest of the test as a future.
    async fn start_test_activation(
        &mut self,
    ) -> Result<impl std::future::Future<Output = Result<String>> + Send + 'static> {
        let role = self.role();
        if !matches!(role, Role::Backup { .. }) {
            return Err(anyhow!(
                "role is {}: a test activation is asked of the backup",
                role.name()
            ));
        }
        if self.test_run.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(anyhow!("a test activation is already running"));
        }
        let Runtime::Replica(r) = &mut self.runtime else {
            return Err(anyhow!("the replica is not open"));
        };
        let scratch = Scratch::new(
            self.shared
                .config
                .node
                .run_dir
                .join(format!("{}-test-activation", self.d.name)),
        );
        let files = r.files.clone();
        let copied = match &r.session {
            // Both passes run in the task; the receiver is held still for the second.
            Some(s) => Copy::WhileReceiving(s.quiesce.clone()),
            None => {
                if r.committed.is_none() {
                    return Err(anyhow!("the replica holds no committed checkpoint"));
                }
                // No session can start while the supervisor awaits this.
                let (f, dir) = (files.clone(), scratch.path.clone());
                let copy = tokio::task::spawn_blocking(move || f.finish(f.precopy(&dir)?))
                    .await
                    .context("the copying task failed")??;
                Copy::Done(Box::new(copy))
            }
        };
        let d = self.d.clone();
        Ok(async move {
            let started = Instant::now();
            let (copy, held) = match copied {
                Copy::Done(c) => (*c, None),
                Copy::WhileReceiving(quiesce) => {
                    let (f, dir) = (files.clone(), scratch.path.clone());
                    let pre = tokio::task::spawn_blocking(move || f.precopy(&dir))
                        .await
                        .context("the copying task failed")??;
                    let (request, quiesced, resume) = QuiesceRequest::new();
                    quiesce
                        .try_send(request)
                        .map_err(|_| {
                            anyhow!("the replication session ended during the copy (or another copy holds the receiver)")
                        })?;
                    let at = tokio::time::timeout(QUIESCE_WAIT, quiesced)
                        .await
                        .map_err(|_| {
                            anyhow!("no checkpoint committed within {QUIESCE_WAIT:?} (is the session's first checkpoint still on its way?)")
                        })?
                        .map_err(|_| anyhow!("the replication session ended before a checkpoint committed"))?;
                    let held_from = Instant::now();
                    let copy = tokio::task::spawn_blocking(move || files.finish(pre))
                        .await
                        .context("the copying task failed");
                    drop(resume);
                    let held = held_from.elapsed();
                    let copy = copy??;
                    if copy.epoch != at {
                        return Err(anyhow!(
                            "copied checkpoint {}, but the receiver held {at}",
                            copy.epoch
                        ));
                    }
                    (copy, Some(held))
                }
            };
            let epoch = copy.epoch;
            let final_pass = copy.final_pass_bytes;
            let (test_domain, test_paths) = (copy.domain, copy.paths);
            let copied_in = started.elapsed();
            let netns = IsolatedNetns::create(&d)?;
            let (mut vm, from) = ReplicaDomain::open(&test_domain, test_paths)?
                .activate(&netns.netns())
                .await?;
            vm.resume_activated().await?;
            let console = vm.paths.console();
            let before = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
            tokio::time::sleep(TEST_RUN).await;
            let state = vm.control.query_status().await?;
            let after = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
            let alive = vm.qemu.try_wait().ok().flatten().is_none();
            let _ = vm.qemu.kill_and_wait().await;
            drop(netns);
            drop(scratch);
            if !alive || state != remus_qemu::RunState::running {
                return Err(anyhow!(
                    "the test copy of checkpoint {from} is not running ({state:?})"
                ));
            }
            let held = held.map_or_else(
                || "copied between sessions".to_string(),
                |h| {
                    format!(
                        "receiver held still {} ms for the last {final_pass} bytes of the copy, protection uninterrupted",
                        h.as_millis()
                    )
                },
            );
            Ok(format!(
                "test activation of checkpoint {epoch}: {held}; copied in {} ms; ran {} s in an isolated network, console output {} bytes in that time; discarded",
                copied_in.as_millis(),
                TEST_RUN.as_secs(),
                after.saturating_sub(before)
            ))
        })
    }

    async fn operator_failover(&mut self) -> Result<String> {
        let role = self.role();
        if !matches!(role, Role::Backup { .. } | Role::Fencing { .. }) {
            return Err(anyhow!(
                "role is {}: a failover is asked of the backup",
                role.name()
            ));
        }
        if self.committed().is_none() {
            return Err(anyhow!("the replica holds no committed checkpoint"));
        }
        if self.fencing() == HaFencing::Witness {
            self.acquire_lease(LEASE_WAIT).await.context(
                "the primary still holds the witness lease (it is alive and running the VM)",
            )?;
        }
        if let FenceRun::Running(t) = std::mem::replace(&mut self.fence, FenceRun::Idle) {
            t.abort();
        }
        self.loss = Some(Loss::now(0, Some(0)));
        self.apply(Event::OperatorFailover, "operator: failover");
        self.activate().await?;
        let epoch = self.failovers.last().map_or(0, |f| f.from_epoch);
        Ok(format!(
            "activated checkpoint {epoch}; the VM runs on {}",
            self.shared.config.node.name
        ))
    }

    /// Sends a new stamp to the witness, if one is configured, in the background: the
    /// guest must not wait for it. The local record is already durable; the witness's copy
    /// lets a node whose peer is down for good learn that its own copy is older.
    fn record_at_witness(&self, stamp: CopyStamp) {
        let Some(w) = self.shared.witness.clone() else {
            return;
        };
        let domain = self.d.name.clone();
        tokio::spawn(async move {
            match w.record_copy(&domain, stamp).await {
                Ok(r) if r.stamp > stamp => warn!(
                    %domain,
                    recorded = %r.stamp,
                    by = ?r.node,
                    "the witness holds a newer copy stamp than the one this node runs"
                ),
                Ok(_) => debug!(%domain, %stamp, "copy stamp recorded at the witness"),
                Err(e) => warn!(%domain, error = %e, "cannot record the copy stamp at the witness"),
            }
        });
    }

    /// The peer's last advertised stamp on its copy of this domain (`None`: never heard,
    /// or it does not advertise the domain).
    fn peer_stamp(&self) -> Option<CopyStamp> {
        self.shared
            .peer_view
            .borrow()
            .as_ref()?
            .domains
            .iter()
            .find(|x| x.domain == self.d.name)
            .map(|x| x.copy)
    }

    // ---------------------------------------------------------------- reporting

    fn publish(&mut self) {
        let (vm, protection, replica) = match &self.runtime {
            Runtime::Vm(v) => (
                Some(VmStatus {
                    pid: v.vm.qemu.pid(),
                    running: v.running && !v.paused,
                    output_held: v.output_held,
                }),
                v.protection
                    .as_ref()
                    .map(|p| p.handle.status.borrow().clone()),
                None,
            ),
            Runtime::Replica(r) => (
                None,
                None,
                r.session
                    .as_ref()
                    .and_then(|s| s.status.borrow().as_ref().map(|st| st.borrow().clone())),
            ),
            Runtime::Idle => (None, None, None),
        };
        let lease = self.lease.as_ref().map(|k| match &*k.state().borrow() {
            s if s.held_at(tokio::time::Instant::now()) => "held".to_string(),
            LeaseState::Acquiring => "acquiring".into(),
            LeaseState::Denied { holder } => format!("denied by {holder}"),
            _ => "lost".into(),
        });
        let st = DomainStatus {
            name: self.d.name.clone(),
            role: self.role(),
            vm,
            protection,
            replica,
            committed_epoch: self.committed(),
            lease,
            alarms: self.alarms.iter().cloned().collect(),
            failovers: self.failovers.clone(),
            resyncs: self.resyncs.clone(),
            counters: self.counters,
            copy: self.disk_copy.stamp(),
        };
        self.status.send_replace(st);
    }

    async fn teardown(&mut self) {
        info!(domain = %self.d.name, "stopping");
        if let Some(t) = self.test_run.take() {
            // Dropping the test's future kills its QEMU and removes its namespace and files.
            t.abort();
            let _ = t.await;
        }
        match std::mem::replace(&mut self.runtime, Runtime::Idle) {
            Runtime::Vm(mut v) => {
                if let Some(p) = v.protection.take() {
                    let _ = p.handle.shutdown.send(true);
                    let _ = tokio::time::timeout(Duration::from_secs(5), p.task).await;
                }
                // Output not acknowledged stays unreleased: it dies with the VM.
                let _ = v.vm.qemu.kill_and_wait().await;
            }
            Runtime::Replica(mut r) => {
                if let Some(s) = r.session.take() {
                    s.task.abort();
                }
            }
            Runtime::Idle => {}
        }
        self.stop_lease(false).await;
    }
}

/// How a test activation gets its copy.
enum Copy {
    /// Already taken (between sessions).
    Done(Box<crate::domain::backup::ReplicaCopy>),
    /// To be taken while a session runs: first pass alongside it, second pass with its
    /// receiver held still through this channel.
    WhileReceiving(mpsc::Sender<QuiesceRequest>),
}

/// A test activation's scratch directory, removed on drop (also when the test is aborted).
struct Scratch {
    path: std::path::PathBuf,
}

impl Scratch {
    fn new(path: std::path::PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&path);
        Self { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A network namespace of its own for a test activation, with the bridges the domain's
/// NICs join, deleted on drop.
struct IsolatedNetns {
    name: String,
}

impl IsolatedNetns {
    fn create(d: &DomainConfig) -> Result<Self> {
        let name = format!("remus-test-{}-{}", d.name, std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).context("test activation: creating its namespace")?;
        let me = Self { name };
        for nic in &d.nics {
            let _ = ip_in(&me.name, &["link", "add", &nic.bridge, "type", "bridge"]);
            ip_in(&me.name, &["link", "set", &nic.bridge, "up"])
                .with_context(|| format!("test activation: bridge {}", nic.bridge))?;
        }
        Ok(me)
    }

    fn netns(&self) -> Netns {
        Netns::named(&self.name)
    }
}

impl Drop for IsolatedNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// One rule for a start against another holder's stamp (the peer's, the witness's record):
/// refused when `other` is newer than `own` unless `older_copy`, the refusal saying `newer()`
/// and naming `by` as the node to start on; otherwise the phrase for the start's message.
fn against_newer(
    own: CopyStamp,
    other: CopyStamp,
    older_copy: bool,
    by: &str,
    whose: &str,
    newer: impl FnOnce() -> String,
) -> Result<String> {
    if other <= own {
        return Ok(format!("not older than {whose}"));
    }
    if older_copy {
        return Ok(format!(
            "OLDER than {whose} ({other}): started anyway (--older-copy)"
        ));
    }
    Err(anyhow!(
        "{}: start it on {by}; to go back to this node's copy instead, losing what only \
         {by}'s holds, pass --older-copy",
        newer()
    ))
}

/// Reports every record the peer's primary makes this receiver act on (a checkpoint begun,
/// committed or refused) to the heartbeat detector as proof of life, as it happens; ends
/// with the session.
async fn report_backup_traffic(
    mut status: watch::Receiver<Option<watch::Receiver<BackupStatus>>>,
    probe: remus_ha::heartbeat::TrafficProbe,
) {
    let mut st = loop {
        if let Some(st) = status.borrow_and_update().clone() {
            break st;
        }
        if status.changed().await.is_err() {
            return;
        }
    };
    while st.changed().await.is_ok() {
        probe.seen();
    }
}

/// Reports every acknowledgement from the peer's backup to the heartbeat detector as proof
/// of life (the epoch loop's own phase changes are not traffic); ends with the session.
async fn report_primary_traffic(
    mut status: watch::Receiver<remus_engine::primary::PrimaryStatus>,
    probe: remus_ha::heartbeat::TrafficProbe,
) {
    let mut acked = status.borrow_and_update().last_acked;
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().last_acked;
        if now > acked {
            probe.seen();
            acked = now;
        }
    }
}

/// Waits for whatever the runtime or the fencing has running in the background.
async fn finished(runtime: &mut Runtime, fence: &mut FenceRun) -> Finished {
    let bg = async {
        match runtime {
            Runtime::Vm(v) => match v.protection.as_mut() {
                Some(p) => Finished::Protection((&mut p.task).await),
                None => std::future::pending().await,
            },
            Runtime::Replica(r) => match r.session.as_mut() {
                Some(s) => Finished::Receiving(Box::new((&mut s.task).await)),
                None => std::future::pending().await,
            },
            Runtime::Idle => std::future::pending().await,
        }
    };
    let f = async {
        match fence {
            FenceRun::Running(t) => {
                let r = t.await;
                *fence = FenceRun::Idle;
                Finished::Fence(r)
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        x = bg => x,
        x = f => x,
    }
}

/// Test hook: `REMUSD_TEST_HOLD=<role>:<ms>` sleeps right after `role` is persisted during
/// activation, so a test can kill the daemon at exactly that point.
async fn test_hold(role: &str) {
    if let Ok(v) = std::env::var("REMUSD_TEST_HOLD") {
        if let Some((r, ms)) = v.split_once(':') {
            if r == role {
                if let Ok(ms) = ms.parse::<u64>() {
                    warn!(role, ms, "REMUSD_TEST_HOLD: holding");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
    }
}
