//! `remusd`: the per-host daemon that runs, protects, replicates and fails over domains.
//!
//! Reading order, top to bottom like mini-redis:
//! - [`run`] builds the host-wide services (keys, the heartbeat detector, the witness
//!   client), one [`supervisor`] task per domain, the replication [`listener`], the control
//!   socket and the metrics exporter, then waits for SIGTERM/SIGINT;
//! - [`supervisor`] owns everything of one domain (its persisted role, its QEMU or its
//!   replica, its lease) and turns what it observes into [`remus_ha::decide`] situations;
//! - [`listener`] accepts the peer's replication sessions and hands each to its domain;
//! - [`handler`] answers `remusctl` and the exporter from the supervisors' snapshots.
//!
//! # Lifetimes, and what a restart means
//! QEMU is tied to this daemon (PDEATHSIG): a daemon that dies takes its VMs with it, so a
//! primary's restart is a failover to its backup, never an unprotected VM left releasing
//! output. A restarted daemon reads each domain's persisted role and finishes or undoes
//! what it was doing ([`supervisor`] documents each case); it never activates a checkpoint
//! twice.

pub mod advert;
pub mod domains;
pub mod handler;
pub mod listener;
pub mod metered;
pub mod reload;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use remus_engine::peer::ChannelAuth;
use remus_ha::heartbeat::{Detector, HeartbeatConfig, Link, PeerLiveness};
use remus_ha::witness::{LeaseArbiter, WitnessClient, WitnessClientConfig};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;

/// What every domain's supervisor shares.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// How the replication channel authenticates (`[auth]`); a reload during a key
    /// rotation replaces it (read it with [`Shared::channel_auth`]).
    pub auth: std::sync::RwLock<ChannelAuth>,
    /// The heartbeats' keys, shared with the detector (a reload replaces them in place).
    pub heartbeat_keys: remus_ha::PeerKeys,
    /// The heartbeat detector's verdict on the peer.
    pub liveness: watch::Receiver<PeerLiveness>,
    /// The peer's advertised per-domain view.
    pub peer_view: watch::Receiver<Option<remus_ha::heartbeat::PeerView>>,
    /// Replication traffic from the peer counts as proof of life (a replication link busy
    /// with checkpoints may delay heartbeats): supervisors report it here.
    pub traffic: remus_ha::heartbeat::TrafficProbe,
    /// The lease arbiter (`[witness]`: remus-witness or etcd), when one is configured.
    pub witness: Option<Arc<dyn LeaseArbiter>>,
    /// The same arbiter when it is remus-witness, whose requests are signed with this
    /// node's keys: a reload during a key rotation hands it the new key.
    pub witness_keys: Option<Arc<WitnessClient>>,
    /// The same arbiter's request counts and latencies (`witness` goes through it).
    pub arbiter_stats: Option<Arc<metered::Metered>>,
    /// The runtime of the heartbeat detector and the lease keepers (see [`HaRuntime`]).
    pub ha: tokio::runtime::Handle,
    /// When the daemon started.
    pub started: Instant,
    /// The heartbeat detector's per-link counters (drops by reason).
    pub heartbeat_stats: remus_ha::heartbeat::StatsReader,
    /// What the replication listener refused.
    pub listener: Arc<listener::ListenerCounters>,
    /// Set to stop every supervisor.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
impl Shared {
    /// How new replication connections authenticate now.
    pub fn channel_auth(&self) -> ChannelAuth {
        self.auth
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes newly loaded keys (a reload during a key rotation): new replication connections,
    /// the heartbeats and the witness client use them from now on; running sessions stay.
    pub fn rekey(&self, keys: crate::keys::NodeKeys) {
        *self
            .auth
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.channel;
        self.heartbeat_keys.replace(&keys.heartbeat);
        if let (Some(client), Some(key)) = (&self.witness_keys, keys.witness) {
            client.set_key(key);
        }
    }
}

/// A host-wide service could not start (key, heartbeat sockets, witness socket, replication
/// listener, control socket). Failures of one domain are handled by its supervisor.
pub async fn run(config: Config, config_path: std::path::PathBuf) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    serve(config, Some(config_path), async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
        }
    })
    .await
}

/// Runs the daemon until `shutdown` completes, then tears every domain down in order.
/// `config_path` is the file `remusctl reload` and SIGHUP re-read (`None`: reloads are
/// refused).
///
/// [`run`] is this with the signals; the one-process drill runs two of these, one per
/// node, each on a runtime of its own (dropping that runtime is its "host loss"). Nothing
/// here is process-wide except the QEMU launcher thread, which serves both alike (and the
/// SIGHUP handler, when there is a file: each daemon of the process reloads its own).
///
/// # Errors
/// As [`run`].
pub async fn serve(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    // Every key file's mode is checked (owner-only) before it is read, as remus-witness
    // and `config check` do.
    let keys = crate::keys::load(&config).context("this node's keys ([auth])")?;

    let control_path = config.node.control_socket.clone();
    // Bound before anything else starts: a second remusd on this host fails here, before
    // it could touch a domain.
    let server = crate::control::ControlServer::bind(&control_path)
        .await
        .with_context(|| format!("control socket {}", control_path.display()))?;

    let links = config
        .peer
        .links
        .iter()
        .map(|l| Link {
            local: l.local,
            remote: l.remote,
        })
        .collect();
    let mut hb = HeartbeatConfig::new(
        &config.node.name,
        &config.peer.name,
        links,
        keys.heartbeat.clone(),
    );
    hb.interval = config.heartbeat.interval;
    hb.timeout = config.heartbeat.timeout;
    let ha = HaRuntime::start().context("starting the heartbeat thread")?;
    let detector = {
        // Not held across the await: the guard is not `Send`, and `serve` must be (the
        // one-process drill spawns it).
        let started = {
            let _in_ha = ha.handle.enter();
            ha.handle.spawn(Detector::start(hb))
        };
        started
            .await
            .context("heartbeat thread")?
            .context("starting the heartbeat detector")?
    };

    let (witness, witness_client) = match &config.witness {
        Some(w) => arbiter(&config, w, &keys, &ha.handle).await?,
        None => (None, None),
    };
    let arbiter_stats = witness.map(|w| Arc::new(metered::Metered::new(w)));
    let witness = arbiter_stats
        .clone()
        .map(|m| -> Arc<dyn LeaseArbiter> { m });

    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config: config.clone(),
        auth: std::sync::RwLock::new(keys.channel.clone()),
        heartbeat_keys: keys.heartbeat.clone(),
        liveness: detector.liveness(),
        peer_view: detector.peer_view(),
        traffic: detector.traffic_probe(),
        witness,
        witness_keys: witness_client,
        arbiter_stats,
        ha: ha.handle.clone(),
        started: Instant::now(),
        heartbeat_stats: detector.stats_reader(),
        listener: Arc::default(),
        shutdown: stop_rx.clone(),
    });

    let domains = domains::Domains::default();
    for d in &config.domains {
        let (handle, task) = supervisor::spawn(d.clone(), shared.clone())
            .with_context(|| format!("domain {}: starting its supervisor", d.name))?;
        domains.insert(handle, task);
    }
    let listener = listener::Listener::bind(config.node.listen, shared.clone(), domains.clone())
        .await
        .with_context(|| format!("replication listener on {}", config.node.listen))?;
    tokio::spawn(listener.serve());

    let reloader = Arc::new(reload::Reloader::new(
        config_path.clone(),
        shared.clone(),
        domains.clone(),
    ));
    let handler = Arc::new(handler::DaemonHandler::new(
        shared.clone(),
        domains.clone(),
        reloader.clone(),
    ));
    // Tell the peer what runs here, so its supervisors can tell "host gone" from "VM gone".
    ha.handle
        .spawn(handler::advertise(handler.clone(), detector));
    if config_path.is_some() {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = hup.recv() => {
                        info!("SIGHUP: reloading the policy");
                        if let Err(e) = reloader.reload().await {
                            error!("{e}");
                        }
                    }
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                }
            }
        });
    }
    let control = {
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            server.run(handler, shutdown).await
        })
    };
    if let Some(m) = &config.metrics {
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        let addr = m.listen;
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve_metrics(addr, handler, shutdown).await {
                tracing::error!(%addr, error = %e, "metrics exporter stopped");
            }
        });
    }
    info!(
        node = %config.node.name,
        peer = %config.peer.name,
        domains = config.domains.len(),
        control = %control_path.display(),
        "remusd running"
    );
    // systemd (Type=notify): every host-wide service is up and each domain has its
    // supervisor, so `systemctl start` returns only now and a unit ordered after remusd
    // finds the control socket answering.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "running; {} domain(s), peer {}",
            config.domains.len(),
            config.peer.name
        )),
    ]);
    let watchdog = watchdog_pings(stop_rx.clone(), domains.clone());

    tokio::select! {
        () = shutdown => {}
        r = control => {
            match r {
                Ok(Ok(())) => warn!("control socket closed"),
                Ok(Err(e)) => return Err(anyhow::anyhow!(e))
                    .with_context(|| format!("control socket {}", control_path.display())),
                Err(e) => warn!(error = %e, "control socket task failed"),
            }
        }
    }
    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: supervisors tear their domains down"),
    ]);
    let _ = stop_tx.send(true);
    watchdog.abort();
    for t in domains.take_tasks() {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    drop(ha);
    Ok(())
}

/// The lease arbiter `[witness]` names, built on the HA runtime (its sockets and, for etcd,
/// its gRPC connection tasks live there): `remus-witness`'s client, or an etcd arbiter that
/// must answer now — connected, authenticated and its key prefix checked for foreign data.
/// An etcd that cannot be reached or refuses the credentials stops the daemon here: a node
/// whose policy asks for lease fencing never runs without it.
async fn arbiter(
    config: &Config,
    w: &crate::config::WitnessConfig,
    keys: &crate::keys::NodeKeys,
    ha: &tokio::runtime::Handle,
) -> Result<(Option<Arc<dyn LeaseArbiter>>, Option<Arc<WitnessClient>>)> {
    match &w.backend {
        crate::config::WitnessBackend::Witness { address, .. } => {
            // Validation requires [witness] public_key in keys mode.
            let key = keys
                .witness
                .clone()
                .context("[witness] needs public_key with auth.mode = \"keys\"")?;
            let mut wc = WitnessClientConfig::new(&config.node.name, *address, key);
            wc.ttl = w.lease;
            let client = ha
                .spawn(WitnessClient::new(wc))
                .await
                .context("heartbeat thread")?
                .with_context(|| format!("witness client for {address}"))?;
            let client = Arc::new(client);
            Ok((Some(client.clone()), Some(client)))
        }
        crate::config::WitnessBackend::Etcd(e) => {
            let settings = crate::keys::etcd_settings(&config.node.name, w.lease, e)
                .context("[witness] mode = \"etcd\"")?;
            let domains: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
            let arbiter = ha
                .spawn(async move {
                    let a = remus_etcd_arbiter::EtcdArbiter::connect(settings).await?;
                    a.check_domains(&domains).await?;
                    Ok::<_, remus_etcd_arbiter::EtcdError>(a)
                })
                .await
                .context("heartbeat thread")?
                .context("[witness] mode = \"etcd\": the lease arbiter is unusable")?;
            info!(
                endpoints = %e.endpoints.join(","),
                prefix = %e.prefix,
                "lease arbiter: etcd answers, prefix checked"
            );
            Ok((Some(Arc::new(arbiter)), None))
        }
    }
}

/// Tells systemd (`sd_notify(3)`, when `NOTIFY_SOCKET` is set) about the daemon's state;
/// outside systemd it does nothing. A failure is logged, never fatal: the service runs the
/// same either way.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// A supervisor that has not completed a step for this long is wedged. Longer than the
/// longest wait a step makes on purpose (a switchover waits up to 60 s for the old
/// primary's engine to hand off), so only a real wedge stops the pings.
const STALL_LIMIT: Duration = Duration::from_secs(90);

/// With `WatchdogSec=` set in the unit, pings systemd at half the watchdog interval from the
/// main runtime, but only while every domain's supervisor keeps stepping (within
/// [`STALL_LIMIT`]; `REMUSD_TEST_STALL_LIMIT_MS` shortens it for tests). A stalled main
/// runtime stops the pings within the watchdog interval, a wedged supervisor within the
/// limit; systemd then restarts the daemon (its QEMU dies with it: a failover, as for any
/// other death of the agent).
fn watchdog_pings(
    mut stop: watch::Receiver<bool>,
    domains: domains::Domains,
) -> tokio::task::JoinHandle<()> {
    let mut usec = 0u64;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    let limit = std::env::var("REMUSD_TEST_STALL_LIMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(STALL_LIMIT, Duration::from_millis);
    tokio::spawn(async move {
        if !enabled || usec == 0 {
            return;
        }
        let period = Duration::from_micros(usec / 2);
        info!(?period, ?limit, "systemd watchdog enabled");
        let mut quiet = remus_ha::lograte::LogLimit::default();
        loop {
            let stalled: Vec<String> = domains
                .handles()
                .iter()
                .filter(|h| h.progress.idle_for() > limit)
                .map(|h| format!("{} ({} s)", h.name, h.progress.idle_for().as_secs()))
                .collect();
            if stalled.is_empty() {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            } else if let Some(folded) = quiet.admit(std::time::Instant::now()) {
                let status = format!("watchdog withheld: no progress in {}", stalled.join(", "));
                error!(folded, "{status}");
                notify_systemd(&[sd_notify::NotifyState::Status(&status)]);
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// A runtime on a thread of its own for the heartbeat detector, the witness client and the
/// lease keepers.
///
/// Why: failure detection must not depend on the rest of the daemon being prompt. Starting
/// a VM, opening a replica or probing soft-dirty support briefly block worker threads of
/// the main runtime; on a 2-core host that stalled heartbeats past a 500 ms timeout and made
/// the peer declare this node lost while it was healthy. Timers and sockets of this runtime
/// are driven by its own thread whatever the main runtime is doing.
pub struct HaRuntime {
    /// Where to spawn onto it.
    pub handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HaRuntime {
    /// Starts the thread and its runtime.
    ///
    /// # Errors
    /// The runtime or the thread could not be created.
    pub fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("remusd-ha".into())
            .spawn(move || {
                raise_priority();
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Gives the calling thread a real-time round-robin priority (the lowest, 1), as cluster
/// managers such as corosync do for their membership thread: on a host whose CPUs are busy
/// with emulated guests, a normal-priority heartbeat thread was delayed past the detection
/// timeout. The thread sleeps almost all the time, so it cannot starve anything. Best
/// effort: without the privilege it logs why and runs at normal priority.
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `pthread_self` is always valid for the calling thread, and `param` is a fully
    // initialised `sched_param` that outlives the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_RR, &param) };
    if rc != 0 {
        warn!(
            error = %std::io::Error::from_raw_os_error(rc),
            "heartbeat thread: no real-time priority; detection may be delayed on a busy host"
        );
    }
}

impl Drop for HaRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
