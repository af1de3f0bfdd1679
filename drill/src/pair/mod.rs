//! The pair drill: the real thing on two "hosts". Two `remusd` daemons, each in its own
//! network namespace with its own configuration and directories, a `remus-witness` on a
//! third, and the drill's TCP client on a fourth, all on one switch ([`Topology`]). The
//! drill starts the VM on host "pri" through the control socket, lets it be protected to
//! "bak", then injects a [`Scenario`]'s failure at a random (seeded) point of the epoch
//! cycle, and judges what both daemons, `/proc` and the client show.
//!
//! Nothing in here stands in for the product: the daemons decide and act by themselves;
//! the drill only kills processes, cuts links, sends the operator's requests and watches.
//!
//! How the drill watches (see [`observe`]): both daemons' status every 50 ms; a daemon that
//! cannot answer is *unknown* unless `/proc` proves it runs no QEMU; every sample with both
//! nodes running or unknown counts against "never two running".
//!
//! Trials reuse one pair where the scenario allows ([`Scenario::reuses_pair`]): after a
//! kill-primary trial the dead host's daemon is restarted and rejoins as backup, and the next
//! trial kills the new primary. The guest boots once per pair.
//!
//! Files: everything lives under the work directory (`pair-<k>/`): each node's
//! `remus.toml`, `run/`, `state/`, control socket and `remusd-<node>.log` (every start of a
//! daemon appended after a header line), the witness's log and lease file, the shared key.

pub mod config;
pub mod control;
pub mod hosts;
pub mod observe;
pub mod report;
pub mod scenario;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::client::Client;
use super::guest;
use super::net::{self, Host, Topology};
use config::{NodeFiles, PairConfig, DOMAIN, WITNESS_PORT};
use control::Control;
use hosts::{qemu_pids_under, Binaries, Proc};
use observe::{Observer, Watched};
use remus_agent::api::{DaemonStatus, Request, Response};
pub use report::{PairReport, ProtectionFigures, TrialReport, Verdict};
pub use scenario::Scenario;

/// What one host runs when it is not the pair's own build: a `remusd` of another release
/// and the policy dialect that release reads (a mixed-version pair, issue 17).
#[derive(Clone, Debug, Default)]
pub struct HostRelease {
    /// Its `remusd` (`None`: the pair's, [`PairOptions::binaries`]).
    pub remusd: Option<PathBuf>,
    /// The dialect of its `remus.toml`.
    pub dialect: config::Dialect,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Scratch directory (guest RAM lives under it: prefer a tmpfs such as /dev/shm).
    pub work_dir: PathBuf,
    /// The failure to inject.
    pub scenario: Scenario,
    /// Trials of it.
    pub trials: u32,
    /// Checkpoints acknowledged before each failure (counted from when protection is seen).
    pub checkpoints: u64,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// QEMU accelerator.
    pub accel: String,
    /// Seed of the failure moments (`None`: from the clock).
    pub seed: Option<u64>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Witness lease.
    pub lease: Duration,
    /// How long a partition is held before it heals.
    pub partition_hold: Duration,
    /// The binaries (`None`: [`Binaries::locate`]): the witness, and each host's `remusd`
    /// unless [`Self::hosts`] names another.
    pub binaries: Option<Binaries>,
    /// Per host (pri, bak; indexed by [`Host`]): another release's `remusd` and its policy
    /// dialect. Default: both run [`Self::binaries`]' `remusd` with the current policy.
    pub hosts: [HostRelease; 2],
    /// `REMUS_LOG` for the daemons and the witness.
    pub daemon_log_filter: String,
    /// UNSAFE: the daemons release guest output at once (the drill then shows lost state).
    pub unsafe_no_output_buffering: bool,
    /// Loss, delay and jitter on both hosts' uplinks, from setup on ([`crate::impair`]).
    pub impair: Option<crate::impair::Impairment>,
    /// Per-node keys (`auth.mode = "keys"`, the witness pinning each node) instead of one
    /// pre-shared key.
    pub per_node_keys: bool,
    /// Who arbitrates the leases on the witness host: `remus-witness` (default) or a real
    /// etcd (Debian's `etcd-server`; the lease is then rounded up to whole seconds, at
    /// least 2, as etcd's TTLs are).
    pub arbiter: config::Arbiter,
    /// With the etcd arbiter: members of the etcd cluster on the witness host (default 1).
    pub etcd_members: usize,
    /// Kill-primary with an etcd cluster: the etcd leader is SIGKILLed right after the
    /// primary, so the backup's takeover meets the election of a new leader.
    pub kill_etcd_leader_with_primary: bool,
}

impl PairOptions {
    /// The defaults used by `remus-drill` and the tests.
    pub fn new(kernel: PathBuf, initrd: PathBuf, work_dir: PathBuf, scenario: Scenario) -> Self {
        Self {
            kernel,
            initrd,
            work_dir,
            scenario,
            trials: 1,
            checkpoints: 10,
            interval: Duration::from_millis(200),
            memory_mib: 128,
            accel: "tcg".into(),
            seed: None,
            heartbeat_interval: Duration::from_millis(
                remus_agent::config::DEFAULT_HEARTBEAT_INTERVAL_MS,
            ),
            heartbeat_timeout: Duration::from_millis(
                remus_agent::config::DEFAULT_HEARTBEAT_TIMEOUT_MS,
            ),
            lease: Duration::from_millis(1500),
            partition_hold: Duration::from_secs(4),
            binaries: None,
            hosts: Default::default(),
            daemon_log_filter: std::env::var("REMUS_PAIR_LOG").unwrap_or_else(|_| "info".into()),
            unsafe_no_output_buffering: false,
            impair: None,
            per_node_keys: false,
            arbiter: config::Arbiter::Witness,
            etcd_members: 1,
            kill_etcd_leader_with_primary: false,
        }
    }
}

/// One host's daemon.
pub struct Node {
    /// Which host.
    pub host: Host,
    /// Its files.
    pub files: NodeFiles,
    /// Its control socket.
    pub control: Control,
    /// Its namespace.
    netns: String,
    /// The running daemon, if any.
    proc: Option<Proc>,
}

impl Node {
    /// Whether its daemon process is alive.
    pub fn daemon_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// The daemon's pid, if one was started and is alive.
    pub fn daemon_pid(&mut self) -> Option<u32> {
        let r = self.daemon_running();
        self.proc.as_ref().filter(|_| r).map(Proc::pid)
    }
}

/// A running pair: topology, witness, both daemons and the observer.
///
/// Field order is drop order: the observer and the processes go before the network.
pub struct PairDrill {
    observer: Observer,
    nodes: [Node; 2],
    witness: Option<Proc>,
    /// The etcd members on the witness host (etcd arbiter; `None`: killed).
    etcd: Vec<Option<Proc>>,
    /// The host that runs the VM (protected) between trials.
    pub primary: Host,
    opts: PairOptions,
    bins: Binaries,
    cfg: PairConfig,
    rng: StdRng,
    /// This pair's directory.
    pub dir: PathBuf,
    topo: Topology,
}

/// The last `n` lines of a file (for error messages naming what a daemon said).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The part of a console log written after `mark` (the log's text at some earlier moment);
/// all of it if the log was rewritten since (QEMU truncates its serial file when it starts).
pub fn console_since(now: &str, mark: &str) -> String {
    match now.strip_prefix(mark) {
        Some(rest) => rest.to_string(),
        None => now.to_string(),
    }
}

/// `counter=` values of a console text.
pub fn counters_in(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("counter="))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// `check …` lines of a console text.
pub fn checks_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("check ").map(str::to_string))
        .collect()
}

impl PairDrill {
    /// Builds the network, writes the files, starts the witness and both daemons, and
    /// waits until both answer on their control sockets. Directory: `work_dir/pair-<k>`.
    ///
    /// # Errors
    /// A step that could not be carried out (binary missing, namespace, a daemon that exits
    /// or never answers: its log's tail is in the error).
    pub async fn setup(opts: &PairOptions, k: u32) -> Result<Self> {
        for p in [&opts.kernel, &opts.initrd] {
            if !p.exists() {
                bail!(
                    "guest image {} is missing: build it with tests/images/build-guest.sh",
                    p.display()
                );
            }
        }
        let bins = match &opts.binaries {
            Some(b) => b.clone(),
            None => Binaries::locate()?,
        };
        let dir = std::path::absolute(opts.work_dir.join(format!("pair-{k}")))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let impair = opts.impair;
        let topo = tokio::task::spawn_blocking(move || {
            let mut t = Topology::create_pair()?;
            if let Some(imp) = impair {
                for h in Host::BOTH {
                    t.impair(h, imp)?;
                }
            }
            Ok::<_, crate::net::TopologyError>(t)
        })
        .await?
        .context("building the pair drill's network")?;
        let addrs = topo.addrs.context("pair topology without addresses")?;
        let cfg = PairConfig {
            kernel: std::path::absolute(&opts.kernel)?,
            initrd: std::path::absolute(&opts.initrd)?,
            work_dir: dir.clone(),
            interval: opts.interval,
            memory_mib: opts.memory_mib,
            accel: opts.accel.clone(),
            heartbeat_interval: opts.heartbeat_interval,
            heartbeat_timeout: opts.heartbeat_timeout,
            lease: match opts.arbiter {
                config::Arbiter::Witness => opts.lease,
                config::Arbiter::Etcd => {
                    Duration::from_secs(opts.lease.as_millis().div_ceil(1000).max(2) as u64)
                }
            },
            addrs,
            guest_cidr: topo.guest_cidr.clone(),
            unsafe_no_output_buffering: opts.unsafe_no_output_buffering,
            vm_netns: None,
            dialects: [opts.hosts[0].dialect, opts.hosts[1].dialect],
            keys: if opts.per_node_keys {
                Some(config::PairKeys::generate().context("generating the drill's node keys")?)
            } else {
                None
            },
            arbiter: opts.arbiter,
            etcd_members: opts.etcd_members.max(1),
        };
        config::write_all(&cfg)?;
        let node = |host: Host| {
            let files = NodeFiles::of(&dir, host);
            Node {
                host,
                control: Control::new(&files.control_socket),
                files,
                netns: topo.host_ns(host).to_string(),
                proc: None,
            }
        };
        let nodes = [node(Host::Pri), node(Host::Bak)];
        let watched = |n: &Node| Watched {
            control: n.control.clone(),
            run_dir: n.files.run_dir.clone(),
        };
        let observer = Observer::start(watched(&nodes[0]), watched(&nodes[1]));
        let seed = opts.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()))
        });
        let mut d = Self {
            observer,
            nodes,
            witness: None,
            etcd: Vec::new(),
            primary: Host::Pri,
            opts: opts.clone(),
            bins,
            cfg,
            rng: StdRng::seed_from_u64(seed.wrapping_add(u64::from(k))),
            dir,
            topo,
        };
        d.start_witness().await?;
        for h in Host::BOTH {
            d.start_daemon(h, None).await?;
        }
        Ok(d)
    }

    /// `h`'s daemon pid, if it runs (to signal it: SIGHUP reloads its policy).
    pub fn daemon_pid(&mut self, h: Host) -> Option<u32> {
        self.node_mut(h).daemon_pid()
    }

    fn node(&self, h: Host) -> &Node {
        &self.nodes[h as usize]
    }

    fn node_mut(&mut self, h: Host) -> &mut Node {
        &mut self.nodes[h as usize]
    }

    /// The node files of `h`.
    pub fn files(&self, h: Host) -> &NodeFiles {
        &self.node(h).files
    }

    /// The network.
    pub fn topology(&mut self) -> &mut Topology {
        &mut self.topo
    }

    /// The observer.
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// The options.
    pub fn options(&self) -> &PairOptions {
        &self.opts
    }

    async fn start_witness(&mut self) -> Result<()> {
        if self.cfg.arbiter == config::Arbiter::Etcd {
            return self.start_etcd().await;
        }
        let ns = self
            .topo
            .witness_ns()
            .context("pair topology without a witness namespace")?
            .to_string();
        let log = self.dir.join("witness.log");
        let mut args = vec![
            "--listen".to_string(),
            format!("{}:{WITNESS_PORT}", self.cfg.addrs.witness),
            "--state-file".to_string(),
            self.dir.join("witness-leases.json").display().to_string(),
        ];
        match &self.cfg.keys {
            None => args.extend([
                "--key-file".to_string(),
                config::psk_path(&self.dir).display().to_string(),
            ]),
            Some(k) => {
                args.extend([
                    "--private-key-file".to_string(),
                    config::key_path(&self.dir, "witness").display().to_string(),
                ]);
                for (name, key) in [
                    (Host::Pri.name(), &k.nodes[0]),
                    (Host::Bak.name(), &k.nodes[1]),
                    (Host::Pri.name(), &k.pri_next),
                ] {
                    args.extend(["--node".to_string(), format!("{name}={}", key.public())]);
                }
            }
        }
        let env = vec![("RUST_LOG".to_string(), self.opts.daemon_log_filter.clone())];
        let mut p = Proc::spawn("remus-witness", &ns, &self.bins.witness, &args, &env, &log)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening ")) {
                break;
            }
            if !p.running() || Instant::now() > deadline {
                bail!(
                    "remus-witness did not start listening (log {}):\n{}",
                    log.display(),
                    log_tail(&log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.witness = Some(p);
        Ok(())
    }

    /// Starts the etcd cluster (Debian's `etcd-server`; [`PairOptions::etcd_members`]
    /// members) on the witness host, their data in this pair's directory, and waits until
    /// every member serves clients.
    async fn start_etcd(&mut self) -> Result<()> {
        let n = self.cfg.etcd_members.max(1);
        let ip = self.cfg.addrs.witness;
        let peer = |i: usize| {
            format!(
                "http://{ip}:{}",
                config::etcd_port(config::ETCD_PEER_PORT, i)
            )
        };
        let initial = (0..n)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        self.etcd = (0..n).map(|_| None).collect();
        for i in 0..n {
            let p = self.spawn_etcd(i, &initial)?;
            self.etcd[i] = Some(p);
        }
        for i in 0..n {
            let log = self.dir.join(format!("etcd-m{i}.log"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if std::fs::read_to_string(&log)
                    .is_ok_and(|t| t.contains("ready to serve client requests"))
                {
                    break;
                }
                let running = self.etcd[i].as_mut().is_some_and(Proc::running);
                if !running || Instant::now() > deadline {
                    bail!(
                        "etcd member m{i} did not start serving (is Debian's etcd-server \
                         installed? scripts/install-deps.sh; log {}):\n{}",
                        log.display(),
                        log_tail(&log, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// etcd's `--initial-cluster`: every member's name and peer URL.
    fn etcd_initial_cluster(&self) -> String {
        let ip = self.cfg.addrs.witness;
        (0..self.cfg.etcd_members.max(1))
            .map(|i| {
                format!(
                    "m{i}=http://{ip}:{}",
                    config::etcd_port(config::ETCD_PEER_PORT, i)
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Restarts killed etcd member `i` on its data and waits until it reports healthy
    /// (which needs a quorum).
    ///
    /// # Errors
    /// It runs already, or does not become healthy within 30 s.
    pub async fn restart_etcd_member(&mut self, i: usize) -> Result<()> {
        if self.etcd.get(i).is_none_or(Option::is_some) {
            bail!("etcd member {i} is not a killed member");
        }
        let p = self.spawn_etcd(i, &self.etcd_initial_cluster())?;
        self.etcd[i] = Some(p);
        Ok(())
    }

    /// Waits until every running etcd member reports healthy (a quorum is needed for it).
    ///
    /// # Errors
    /// Not within `wait`.
    pub async fn wait_etcd_healthy(&self, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let running: Vec<String> = self
            .etcd
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| config::etcd_endpoint(self.cfg.addrs.witness, i))
            .collect();
        loop {
            let ns = self
                .topo
                .witness_ns()
                .context("pair topology without a witness namespace")?;
            let ok = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "etcdctl"])
                .arg(format!("--endpoints={}", running.join(",")))
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd members {running:?} not healthy within {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn spawn_etcd(&self, i: usize, initial: &str) -> Result<Proc> {
        let ns = self
            .topo
            .witness_ns()
            .context("pair topology without a witness namespace")?
            .to_string();
        let ip = self.cfg.addrs.witness;
        let client = config::etcd_endpoint(ip, i);
        let peer = format!(
            "http://{ip}:{}",
            config::etcd_port(config::ETCD_PEER_PORT, i)
        );
        let args = vec![
            format!("--name=m{i}"),
            format!(
                "--data-dir={}",
                self.dir.join(format!("etcd-m{i}")).display()
            ),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial}"),
        ];
        let log = self.dir.join(format!("etcd-m{i}.log"));
        Ok(Proc::spawn(
            &format!("etcd m{i}"),
            &ns,
            Path::new("etcd"),
            &args,
            &[],
            &log,
        )?)
    }

    /// The etcd members' client URLs.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        (0..self.etcd.len())
            .map(|i| config::etcd_endpoint(self.cfg.addrs.witness, i))
            .collect()
    }

    /// `etcdctl ARGS` on the witness host, against every member; its output.
    ///
    /// # Errors
    /// etcdctl missing or failing.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let ns = self
            .topo
            .witness_ns()
            .context("pair topology without a witness namespace")?;
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "etcdctl"])
            .arg(format!("--endpoints={}", self.etcd_endpoints().join(",")))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .context("etcdctl (Debian package etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The index of the etcd member that leads the cluster now.
    ///
    /// # Errors
    /// No member answers, or none names itself the leader.
    pub fn etcd_leader(&self) -> Result<usize> {
        let text = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("etcdctl's json")?;
        for e in v.as_array().context("etcdctl's json is not a list")? {
            let st = &e["Status"];
            if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                let url = e["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self.etcd_endpoints().iter().position(|u| u == url) {
                    return Ok(i);
                }
            }
        }
        bail!("no etcd member leads: {text}")
    }

    /// SIGKILLs etcd member `i`.
    ///
    /// # Errors
    /// No such member, or it could not be killed.
    pub fn kill_etcd_member(&mut self, i: usize) -> Result<()> {
        let mut p = self
            .etcd
            .get_mut(i)
            .and_then(Option::take)
            .with_context(|| format!("no running etcd member {i}"))?;
        p.kill_group()?;
        Ok(())
    }

    /// Starts `h`'s daemon (optionally with `REMUSD_TEST_HOLD=hold`) and waits until it
    /// answers a status request.
    ///
    /// # Errors
    /// The daemon exits or does not answer within 30 s: the error holds its log's tail.
    pub async fn start_daemon(&mut self, h: Host, hold: Option<&str>) -> Result<()> {
        let bin = self.opts.hosts[h as usize]
            .remusd
            .clone()
            .unwrap_or_else(|| self.bins.remusd.clone());
        let filter = self.opts.daemon_log_filter.clone();
        let n = self.node_mut(h);
        if n.daemon_running() {
            bail!("remusd {h} is already running");
        }
        // The daemon replaces a stale socket itself; remove ours so "answers" means the new one.
        let _ = std::fs::remove_file(&n.files.control_socket);
        let mut env = vec![("REMUS_LOG".to_string(), filter)];
        if let Some(hold) = hold {
            env.push(("REMUSD_TEST_HOLD".to_string(), hold.to_string()));
        }
        let args = vec!["--config".to_string(), n.files.config.display().to_string()];
        let p = Proc::spawn(
            &format!("remusd {h}"),
            &n.netns,
            &bin,
            &args,
            &env,
            &n.files.log,
        )?;
        n.proc = Some(p);
        let control = n.control.clone();
        let log = n.files.log.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match control.status(Duration::from_millis(500)).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let alive = self.node_mut(h).daemon_running();
                    if !alive || Instant::now() > deadline {
                        bail!(
                            "remusd {h} {} ({e}); its log {}:\n{}",
                            if alive {
                                "does not answer within 30 s"
                            } else {
                                "exited"
                            },
                            log.display(),
                            log_tail(&log, 30)
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs `h`'s daemon's whole process group and checks in `/proc` that neither it nor
    /// any QEMU of the node is left. Returns the QEMU pids that were alive just before.
    ///
    /// # Errors
    /// The group could not be killed, or a QEMU of the node survived.
    pub fn kill_daemon(&mut self, h: Host) -> Result<Vec<u32>> {
        let run = self.files(h).run_dir.clone();
        let before = qemu_pids_under(&run);
        if let Some(mut p) = self.node_mut(h).proc.take() {
            p.kill_group()?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // By command line, and by pid too: a QEMU in the middle of exiting has no
            // command line left in /proc but is not dead yet.
            let mut left = qemu_pids_under(&run);
            left.extend(before.iter().copied().filter(|&p| hosts::qemu_alive(p)));
            if left.is_empty() {
                return Ok(before);
            }
            if Instant::now() > deadline {
                bail!("remusd {h} killed but QEMU pids {left:?} of the node are still alive");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `request` to `h`'s daemon.
    ///
    /// # Errors
    /// No answer (see [`control::CallError`]).
    pub async fn request(&self, h: Host, request: &Request, timeout: Duration) -> Result<Response> {
        Ok(self.node(h).control.call(request, timeout).await?)
    }

    /// `h`'s status now.
    ///
    /// # Errors
    /// No answer.
    pub async fn status(&self, h: Host) -> Result<DaemonStatus> {
        Ok(self.node(h).control.status(Duration::from_secs(2)).await?)
    }

    /// Starts the VM on `pri` (`Request::Start`), waits for the guest to boot and for
    /// protection to `bak` to acknowledge the configured number of checkpoints.
    ///
    /// # Errors
    /// The daemon refuses, the guest does not boot, or protection does not start; the error
    /// names what was waited for and holds the daemons' log tails.
    pub async fn start_vm(&mut self) -> Result<()> {
        let r = self
            .request(
                Host::Pri,
                &Request::Start {
                    domain: DOMAIN.into(),
                    older_copy: false,
                },
                Duration::from_secs(120),
            )
            .await?;
        if let Response::Error { message } = r {
            bail!(
                "remusd pri refused to start the VM: {message}; log:\n{}",
                log_tail(&self.files(Host::Pri).log, 30)
            );
        }
        guest::wait_for(
            &self.files(Host::Pri).console(),
            Duration::from_secs(120),
            "guest boot on pri",
            |t| t.contains("counter="),
        )
        .await?;
        self.primary = Host::Pri;
        let n = self.opts.checkpoints;
        self.wait_protected(Host::Pri, n, Duration::from_secs(240))
            .await
            .map(|_| ())
    }

    /// Waits until `h` is `primary` and its acknowledged checkpoint has grown by `n` since
    /// it was first seen so; returns how long that took.
    ///
    /// # Errors
    /// Timeout, with both daemons' last observations and log tails.
    pub async fn wait_protected(&self, h: Host, n: u64, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let from = self.observer.len();
        let ok = self
            .observer
            .wait_for(timeout, |l| {
                let ticks = l.ticks.get(from..).unwrap_or_default();
                let acked: Vec<u64> = ticks
                    .iter()
                    .map(|t| t.of(h))
                    .filter(|o| o.role.as_deref() == Some("primary"))
                    .filter_map(|o| o.last_acked)
                    .collect();
                match (acked.first(), acked.last()) {
                    (Some(a), Some(b)) => *b >= a + n,
                    _ => false,
                }
            })
            .await;
        if !ok {
            bail!(
                "{h} did not protect the VM ({n} acknowledged checkpoints) within {timeout:?}; \
                 last samples: {}\n{}",
                self.last_samples_text(),
                self.logs_text()
            );
        }
        Ok(start.elapsed())
    }

    /// Both daemons' last observation, one line.
    pub fn last_samples_text(&self) -> String {
        self.observer.with(|l| {
            l.ticks.last().map_or_else(
                || "none".to_string(),
                |t| format!("pri {:?} / bak {:?}", t.pri, t.bak),
            )
        })
    }

    /// Both daemons' log tails.
    pub fn logs_text(&self) -> String {
        Host::BOTH
            .iter()
            .map(|&h| {
                let f = &self.files(h).log;
                format!("--- {} (tail) ---\n{}", f.display(), log_tail(f, 25))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `h`'s status until its acknowledged checkpoint changes; returns the new one and
    /// when it was seen (the start of an epoch cycle, for placing a failure in it).
    ///
    /// # Errors
    /// No acknowledgement within 30 s.
    pub async fn wait_ack_edge(&self, h: Host) -> Result<(u64, Instant)> {
        let acked = |s: &DaemonStatus| {
            s.domains
                .first()
                .and_then(|d| d.protection.as_ref())
                .and_then(|p| p.last_acked)
        };
        let first = acked(&self.status(h).await?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(s) = self
                .node(h)
                .control
                .status(Duration::from_millis(500))
                .await
            {
                if let Some(a) = acked(&s) {
                    if Some(a) != first {
                        return Ok((a, Instant::now()));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("{h}: no new acknowledgement within 30 s (last {first:?})")
    }

    /// A random moment within one epoch, from the drill's seeded generator.
    pub fn random_delay(&mut self) -> Duration {
        use rand::Rng;
        let ms = self.opts.interval.as_millis() as u64;
        Duration::from_millis(self.rng.random_range(0..=ms))
    }

    /// Starts the client and waits until the guest answers it (5 replies).
    ///
    /// # Errors
    /// The guest does not answer within 30 s.
    pub async fn start_client(&self) -> Result<Client> {
        let mut c = Client::start(
            self.topo.client_netns(),
            self.topo.guest_ip,
            net::SERVICE_PORT,
        );
        if !c
            .wait_for(Duration::from_secs(30), |l| l.replies.len() >= 5)
            .await
        {
            let log = c.stop().await;
            bail!(
                "the guest's service at {}:{} did not answer the client ({} replies, breaks {:?})",
                self.topo.guest_ip,
                net::SERVICE_PORT,
                log.replies.len(),
                log.breaks
            );
        }
        Ok(c)
    }

    /// The console text of `h` now (a mark for [`console_since`]).
    pub fn console(&self, h: Host) -> String {
        std::fs::read_to_string(self.files(h).console()).unwrap_or_default()
    }
}

/// Runs a pair drill: `opts.trials` trials of `opts.scenario`, reusing a pair where the
/// scenario allows.
///
/// # Errors
/// A pair could not be set up or its VM started. A trial that fails half-way is recorded
/// as a failed trial (verdict `trial_completed`) and ends the drill; the report is returned.
pub async fn run_pair(opts: &PairOptions) -> Result<PairReport> {
    std::fs::create_dir_all(&opts.work_dir)
        .with_context(|| format!("creating {}", opts.work_dir.display()))?;
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
    });
    let opts = PairOptions {
        seed: Some(seed),
        ..opts.clone()
    };
    let mut report = PairReport {
        scenario: Some(opts.scenario),
        seed,
        unsafe_no_output_buffering: opts.unsafe_no_output_buffering,
        impairment: opts.impair.map(|i| i.to_string()),
        work_dir: opts.work_dir.display().to_string(),
        ..PairReport::default()
    };
    let mut pair: Option<PairDrill> = None;
    let mut k = 0;
    for trial in 1..=opts.trials.max(1) {
        if pair.is_none() || !opts.scenario.reuses_pair() {
            drop(pair.take());
            k += 1;
            let mut p = PairDrill::setup(&opts, k).await?;
            p.start_vm().await?;
            pair = Some(p);
        }
        let Some(p) = pair.as_mut() else {
            unreachable!("set just above")
        };
        let t = p.trial(opts.scenario, trial).await;
        let stop = !t.passed
            && t.verdicts
                .iter()
                .any(|v| v.name == "trial_completed" && !v.ok);
        println_progress(&t);
        report.trials.push(t);
        if stop {
            break;
        }
    }
    report.conclude();
    Ok(report)
}

fn println_progress(t: &TrialReport) {
    tracing::info!(
        trial = t.trial,
        passed = t.passed,
        to_running_ms = ?t.failure_to_running_ms,
        to_first_reply_ms = ?t.failure_to_first_reply_ms,
        "pair drill: trial done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_since_handles_append_and_rewrite() {
        // (case, now, mark, expected)
        let cases: &[(&str, &str, &str, &str)] = &[
            ("appended", "a\nb\nc\n", "a\n", "b\nc\n"),
            ("rewritten by a new QEMU", "x\n", "a\nb\n", "x\n"),
            ("no mark", "a\n", "", "a\n"),
        ];
        for (name, now, mark, want) in cases {
            assert_eq!(console_since(now, mark), *want, "{name}");
        }
        assert_eq!(
            counters_in("counter=3\nfoo\n counter=4\ncounter=x\n"),
            vec![3, 4]
        );
        assert_eq!(
            checks_in("check ok mem=1 disk=1\nx\n"),
            vec!["ok mem=1 disk=1"]
        );
    }
}
