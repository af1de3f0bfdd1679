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
use std::os::unix::fs::DirBuilderExt;
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
    admit, against_newer, decide, incoming_session, lease_preemptible, must_win_lease, Acks,
    Action, Command as HaCommand, CopyVerdict, Failover as HaFailover, FenceProgress,
    Fencing as HaFencing, Lease, Peer, PeerClaim, SessionVerdict, Situation, Vm,
};
use remus_ha::fence::{CommandFencer, FenceError, FenceOutcome, Fencer, NoFencer, WitnessFencer};
use remus_ha::heartbeat::PeerLiveness;

use super::advert::DomainAdvert;
use remus_ha::role::{Event, FenceProof, Role, RoleStore};
use remus_ha::witness::{LeaseKeeper, LeaseMode, LeaseState};
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
use crate::domain::template::{merge, Template, TemplateStore};
use crate::domain::DomainPaths;
use crate::iproute::{ip, ip_in};
use remus_ha::lineage::CopyStamp;

mod act;
mod commands;
mod observe;
mod sessions;
mod status;
mod test_activation;
mod verify;

/// Time between protection attempts while the VM runs unprotected.
const PROTECT_RETRY: Duration = Duration::from_secs(1);
/// Time between fencing attempts after a failure.
const FENCE_RETRY: Duration = Duration::from_millis(300);
/// Time between activation attempts after a failure.
const ACTIVATE_RETRY: Duration = Duration::from_secs(3);
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

/// When a supervisor's loop last completed a step, for the systemd watchdog: a daemon whose
/// supervisor is wedged must stop pinging it, so systemd restarts the daemon (and its QEMU
/// dies with it: the peer takes over, as for any other death of the agent).
#[derive(Debug)]
pub struct Progress {
    since: Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since the loop last completed a step.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

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
    /// When its loop last completed a step.
    pub progress: Arc<Progress>,
    /// A policy reload's new configuration of the domain (only live keys differ).
    pub config: Arc<watch::Sender<DomainConfig>>,
    /// Set to end this supervisor (a reload removed the domain, stopped here).
    pub retire: Arc<watch::Sender<bool>>,
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
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&node.state_dir)
        .with_context(|| format!("creating {}", node.state_dir.display()))?;
    let roles = RoleStore::open(&node.state_dir, &domain.name)
        .with_context(|| format!("domain {}: role file", domain.name))?;
    let disk_copy = DiskCopyStore::open(&domain.name, &paths.state)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ses_tx, ses_rx) = mpsc::channel(2);
    let (config_tx, config_rx) = watch::channel(domain.clone());
    let (retire_tx, retire_rx) = watch::channel(false);
    let initial = DomainStatus {
        name: domain.name.clone(),
        role: roles.current().into(),
        vm: None,
        protection: None,
        replica: None,
        committed_epoch: None,
        lease: None,
        alarms: Vec::new(),
        failovers: Vec::new(),
        resyncs: Vec::new(),
        counters: DomainCounters::default(),
        copy: disk_copy.stamp().into(),
        unprotected: Vec::new(),
        verify: None,
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let progress = Arc::new(Progress::new());
    let sup = Supervisor {
        progress: progress.clone(),
        unprotected: Vec::new(),
        unprotected_dropped_ms: 0,
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
        seen_verify: None,
        seen_verify_session: 0,
        verify_running: None,
        verify_last: None,
    };
    // `domain`, so journald entries carry DOMAIN=<name> (`journalctl DOMAIN=web`).
    let span = tracing::info_span!("domain", domain = %domain.name);
    let task = tokio::spawn(tracing::Instrument::instrument(
        sup.run(cmd_rx, ses_rx, config_rx, retire_rx),
        span,
    ));
    Ok((
        SupervisorHandle {
            name: domain.name,
            status: status_rx,
            commands: cmd_tx,
            sessions: ses_tx,
            progress,
            config: Arc::new(config_tx),
            retire: Arc::new(retire_tx),
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
    /// Marked after every step, read by the watchdog.
    progress: Arc<Progress>,
    /// Times the guest ran here without acknowledged checkpoints, the newest (maybe open)
    /// last; and the length of those already dropped from the list.
    unprotected: Vec<crate::api::UnprotectedWindow>,
    unprotected_dropped_ms: u64,
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
    /// The last finished verify counted: (protection session number, run).
    seen_verify: Option<(u64, u32)>,
    /// Protection sessions started (run numbers restart with each).
    seen_verify_session: u64,
    /// The verify in progress, as last observed.
    verify_running: Option<crate::api::verify::VerifyRunning>,
    /// The last finished verify.
    verify_last: Option<crate::api::verify::VerifyLast>,
}

impl Supervisor {
    /// Where this node's VMs get their NICs (`[node] vm_netns`, else remusd's own).
    fn vm_netns(&self) -> Netns {
        self.shared
            .config
            .node
            .vm_netns
            .as_deref()
            .map_or_else(Netns::current, Netns::named)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sessions: mpsc::Receiver<BackupSession>,
        mut config: watch::Receiver<DomainConfig>,
        mut retire: watch::Receiver<bool>,
    ) {
        self.recover().await;
        self.step().await;
        self.publish();
        self.progress.mark();
        // Test hook: a supervisor that stops stepping (the watchdog must notice).
        test_hold("stall").await;
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
                    // Answered by a task of its own once the run is over.
                    Request::Verify { resync, .. } => self.verify(resync, reply),
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
                Ok(()) = config.changed() => {
                    let d = config.borrow_and_update().clone();
                    self.retune(d);
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = async { let _ = retire.wait_for(|r| *r).await; } => break,
            }
            self.step().await;
            self.publish();
            self.progress.mark();
        }
        self.teardown().await;
    }

    /// A policy reload's new configuration. `config::reload::plan` let other than live keys
    /// differ only if the domain was stopped here; should it have started since (a command
    /// between the plan and now), only the live keys are taken and the rest is refused
    /// here. The running protection takes the new period and ACK deadlines at its next
    /// epoch boundary; later sessions and decisions use the rest.
    fn retune(&mut self, d: DomainConfig) {
        let frozen = crate::config::reload::frozen_changes(&self.d, &d);
        if frozen.is_empty() || matches!(self.runtime, Runtime::Idle) {
            self.d = d;
        } else {
            warn!(
                domain = %self.d.name,
                keys = ?frozen,
                "policy reload: the domain started meanwhile; only its interval, ACK deadlines and failover mode change now"
            );
            crate::config::reload::take_live(&mut self.d, &d);
        }
        info!(
            domain = %self.d.name,
            interval_ms = self.d.checkpoint_interval.as_millis() as u64,
            ack_timeout_ms = self.d.ack_timeout.as_millis() as u64,
            ack_wait_max_ms = self.d.ack_wait_max.as_millis() as u64,
            failover = ?self.d.failover,
            "policy reload"
        );
        if let Runtime::Vm(v) = &self.runtime {
            if let Some(p) = &v.protection {
                p.handle.retune(crate::domain::primary::tuning_of(&self.d));
            }
        }
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

    // ---------------------------------------------------------------- deciding

    /// One step: observe, ask [`decide`], act. No rule lives here: every choice is
    /// `decide`'s, and each action persists its role change before it acts.
    async fn step(&mut self) {
        self.observe_vm().await;
        self.observe_protection();
        self.observe_replica();

        let role = self.role();
        let situation = self.situation(&role);
        self.set_lease_mode(&situation);
        let action = decide(&situation);
        match action {
            Action::Wait | Action::HoldOutput | Action::KeepRunning => {}
            Action::RunUnprotected => self.run_unprotected().await,
            Action::Protect => {
                self.run_unprotected().await;
                self.protect().await;
            }
            Action::PauseVm => self.pause_vm(&role).await,
            Action::KillVm(why) => self.kill_vm(&why.to_string()).await,
            Action::RecordStopped(why) => {
                self.apply(Event::Stop, &why.to_string());
            }
            Action::Fence => self.fence_peer(&role).await,
            Action::PeerReturned => {
                self.loss = None;
                self.fence = FenceRun::Idle;
                self.apply(Event::PeerReturned, "the primary is heard again");
            }
            Action::Activate { acquire_lease } => {
                if Instant::now() >= self.next_activation {
                    if let Err(e) = self.activate(acquire_lease).await {
                        error!(domain = %self.d.name, error = %format!("{e:#}"), "activation failed");
                        self.alarm(&format!("activation failed: {e:#}"));
                        self.next_activation = Instant::now() + ACTIVATE_RETRY;
                    }
                }
            }
            Action::AbandonBackup => {
                if let Runtime::Vm(v) = &self.runtime {
                    if let Some(p) = &v.protection {
                        if !*p.handle.abandon.borrow() {
                            warn!(domain = %self.d.name, "the backup is lost (heartbeats and replication silent): ending protection without waiting out the ACK timeout");
                        }
                        p.handle.abandon_backup();
                    }
                }
            }
            Action::ReleaseOutputAndRunUnprotected => {
                // Only ever chosen for a primary or a resyncing node.
                self.apply(
                    Event::BackupLost,
                    "the backup stopped acknowledging and cannot run the VM",
                );
                self.release_output().await;
                self.resume_if_paused().await;
            }
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

/// Test hook: `REMUSD_TEST_HOLD=<point>:<ms>` sleeps at `point`: right after role
/// `activating` or `activated` is persisted during activation, so a test can kill the daemon
/// at exactly that point; or `stall`, the supervisor loop after its first step, so a test
/// can see the watchdog stop.
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
