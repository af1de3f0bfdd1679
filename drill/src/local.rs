//! The local drill: two real daemons' supervisors in this process protect a real guest;
//! the primary's host is lost at a random point of the epoch cycle, the backup detects it by
//! its heartbeats, fences at a witness, activates, and the drill checks that nothing
//! committed was lost and nothing uncommitted survived.
//!
//! Both nodes are [`remus_agent::daemon::serve`] — the same code `remusd` runs — each on a
//! runtime of its own ([`crate::inproc`]), with a `remus-witness` server task beside them;
//! the drill reaches them only through their control sockets, as an operator would. The
//! primary's loss is its uplink cut and its daemon's runtime dropped at the same moment
//! (tasks stop where they stand, sockets close, its QEMU is killed). The guest is the
//! project's test guest (`tests/images/build-guest.sh`): a counter that logs every increment
//! to its disk before setting it in memory and prints `counter=<n>` on its console, and
//! periodically `check ok|mismatch mem=<m> disk=<d>`.
//!
//! Verdicts, each computed from what was observed:
//! - **continuity**: the first counter the activated guest prints is the replica disk's last
//!   committed record `d` or `d + 1` (memory and disk from the same checkpoint), and the
//!   counter then advances by one per tick. `d` is read from the backup's replica after its
//!   receiving session ended and before the failover was declared (checked: a read that
//!   cannot be shown to come before is reported as not judged, and fails);
//! - **no reboot**: the activated guest resumed (its console shows no fresh start);
//! - **disk agrees with memory**: every `check` line after activation says `ok`;
//! - **uncommitted work discarded**: the primary's progress past the checkpoint is reported
//!   (it was never acknowledged, so it must not reappear);
//! - **no client saw lost state, and its connection survived**: the guest also serves the
//!   counter over TCP on a NIC behind the egress buffer; a client in its own network
//!   namespace sends `INC` every 50 ms on one connection through the failover (see
//!   [`client`]). No reply it got from the primary may be produced again by the activated
//!   guest (`lost_replies == 0`), the connection must not break, replies must keep
//!   increasing and must come both before and after the failover.
//!
//! The network ([`net`]) models two hosts and a client on a switch, each a namespace; each
//! daemon's VM NICs live in its host's namespace (`[node] vm_netns`), the daemons' own
//! traffic (replication, heartbeats, lease) on loopback addresses of their own.
//!
//! With `unsafe_no_output_buffering` the same drill runs with the guest's output released at
//! once; it must then report lost state (that is the proof the check can fail).
//!
//! What the local drill does not cover is listed in [`DrillReport::not_covered`] and printed
//! with every report, so the drill never claims more than it checked.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use remus_agent::api::{DaemonStatus, DomainStatus, FailoverRecord, Request, Response};
use remus_agent::config::Config;
use remus_ha::witness::{WitnessServer, WitnessServerConfig};
use remus_ha::HaKey;
use serde::Serialize;

use crate::client::{self, analyse, Client, ClientVerdict, Moments};
use crate::guest;
use crate::inproc::InProcessDaemon;
use crate::net::{self, Host, HostAddrs, Topology};
use crate::pair::config::{self as files, NodeFiles, PairConfig, DOMAIN, WITNESS_PORT};
use crate::pair::control::Control;

/// Slots of the guest's disk log (the workload's default).
const LOG_SLOTS: u64 = 8192;
/// Witness lease (the pair drill's).
const LEASE: Duration = Duration::from_millis(1500);
/// How long one status request may take.
const CALL: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// Guest kernel (uncompressed `vmlinux` boots fastest under TCG).
    pub kernel: PathBuf,
    /// Guest initramfs with the workload.
    pub initrd: PathBuf,
    /// Scratch directory (guest RAM lives here: prefer a tmpfs such as /dev/shm).
    pub work_dir: PathBuf,
    /// Checkpoints to acknowledge before the failure is injected.
    pub checkpoints: u64,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// QEMU accelerator (`tcg` here; `kvm` on hosts that have it).
    pub accel: String,
    /// Seed for the failure's moment in the epoch cycle (`None`: from the clock).
    pub seed: Option<u64>,
    /// Release the guest's network output at once instead of holding it until the backup
    /// acknowledges (the policy's `unsafe_no_output_buffering`): the drill must then fail.
    pub unsafe_no_output_buffering: bool,
}

/// The result of one drill.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    /// Every verdict held.
    pub passed: bool,
    /// Checkpoints the backup acknowledged before the failure.
    pub checkpoints: u64,
    /// The VM's pause per checkpoint, median and 99th percentile (µs).
    pub pause_p50_us: u64,
    /// See `pause_p50_us`.
    pub pause_p99_us: u64,
    /// How long each epoch's output was held before release, median (µs).
    pub output_held_p50_us: u64,
    /// Pages sent by each pre-copy round before the first checkpoint.
    pub precopy_pages: Vec<u64>,
    /// The dirty-page tracker the primary used.
    pub tracker: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Reading all of guest RAM once on every core, measured in the same run: the floor
    /// under a compare tracker's pause (µs).
    pub memory_scan_floor_us: u64,
    /// When, after the last acknowledgement, the primary's host was lost (ms).
    pub kill_after_ack_ms: u64,
    /// From the last news of the primary to the backup declaring it lost (ms; the backup's
    /// failover record).
    pub detection_ms: u64,
    /// Fencing at the witness (ms; the backup's failover record).
    pub fencing_ms: u64,
    /// From fencing done to the VM running (ms; the backup's failover record).
    pub activation_ms: u64,
    /// How the old primary was proven gone (the failover record's `fence_proof`).
    pub fence_proof: String,
    /// From the host loss to the activated VM seen running (ms).
    pub recovery_ms: u64,
    /// From the host loss to the activated guest's first output (ms).
    pub first_output_ms: u64,
    /// The checkpoint the backup activated.
    pub activated_epoch: u64,
    /// The counter in the replica disk's last committed record.
    pub committed_disk_counter: u64,
    /// The last counter the primary printed before it died.
    pub primary_reached: u64,
    /// The first counter the activated guest printed.
    pub resumed_at: u64,
    /// Increments the primary made after the committed checkpoint, discarded by the failover.
    pub uncommitted_discarded: u64,
    /// Verdict: memory and disk from the same checkpoint, and the counter continuous.
    pub continuity: bool,
    /// Verdict: the activated guest resumed instead of booting.
    pub resumed_not_rebooted: bool,
    /// Verdict: every check line after activation reported disk == memory.
    pub disk_agrees_with_memory: bool,
    /// The guest's output was held until acknowledged (false: the unsafe configuration).
    pub output_buffering: bool,
    /// What the network client saw (its verdicts: `lost_replies`, `broken_connections`,
    /// `values_increasing`, replies before and after the failover).
    pub client: ClientVerdict,
    /// Verdict: the client saw no lost state, its connection survived, and it got replies
    /// on both sides of the failover.
    pub clients_kept: bool,
    /// Why a verdict could not be judged, if one could not (the drill then fails).
    pub not_judged: Vec<String>,
    /// What this drill does not exercise yet.
    pub not_covered: Vec<&'static str>,
}

/// What the local drill does not exercise yet (printed with every report).
pub const NOT_COVERED: &[&str] = &[
    "separate hosts: both daemons run in one process on one kernel (a runtime and a \
     heartbeat thread each); their VMs' networks are separate namespaces on one switch, \
     their own traffic uses loopback, and the host loss is a dropped runtime plus a cut \
     uplink — the pair drill (`remus-drill`) runs them as processes on separate networks",
    "the plug-qdisc egress backend: the drill uses the relay (this kernel lacks sch_plug)",
    "one client, one connection, requests one at a time: no concurrent or bulk traffic",
];

/// Distinct loopback addresses per drill (pid and a counter), so drills of different
/// processes, or one after another, never share a port.
fn loopback_addrs() -> HostAddrs {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let a = |last: u8| Ipv4Addr::new(127, (pid & 0xff) as u8, (n & 0xff) as u8, last);
    HostAddrs {
        pri: a(11),
        bak: a(12),
        witness: a(13),
        client: a(14),
    }
}

/// The [`Instant`] of a unix time in ms (the daemons' records use unix time).
fn instant_of_unix_ms(ms: u64) -> Instant {
    let now = remus_ha::auth::unix_millis();
    let ago = Duration::from_millis(now.saturating_sub(ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// The drill's domain in a daemon's status (none: unreachable or not listed).
async fn domain_of(c: &Control) -> Option<DomainStatus> {
    let s: DaemonStatus = c.status(CALL).await.ok()?;
    s.domains.into_iter().find(|d| d.name == DOMAIN)
}

/// Polls `c` every 20 ms until `pred` holds for the drill's domain, or `timeout`.
async fn wait_domain(
    c: &Control,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&DomainStatus) -> bool,
) -> Result<DomainStatus> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(d) = domain_of(c).await {
            if pred(&d) {
                return Ok(d);
            }
            last = Some(d);
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: not seen within {timeout:?} at {}; last status: {}",
                c.path().display(),
                last.map_or_else(
                    || "none (unreachable)".to_string(),
                    |d| serde_json::to_string(&d).unwrap_or_default()
                )
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one local drill.
///
/// # Errors
/// A step that could not be carried out (QEMU does not start, the image is missing, a
/// daemon refuses to start …). A drill that ran but found lost or inconsistent state is not
/// an error: its report says `passed: false` and why.
pub async fn run_local(o: &DrillOptions) -> Result<DrillReport> {
    for p in [&o.kernel, &o.initrd] {
        if !p.exists() {
            bail!(
                "guest image {} is missing: build it with tests/images/build-guest.sh",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(&o.work_dir)
        .with_context(|| format!("creating {}", o.work_dir.display()))?;
    let work_dir = std::path::absolute(&o.work_dir)?;
    // Declared first so it is dropped last, after every VM and relay that uses it.
    let topo = tokio::task::spawn_blocking(Topology::create)
        .await?
        .context("building the drill's network")?;
    let addrs = loopback_addrs();
    let cfg = PairConfig {
        kernel: std::path::absolute(&o.kernel)?,
        initrd: std::path::absolute(&o.initrd)?,
        work_dir: work_dir.clone(),
        interval: o.interval,
        memory_mib: o.memory_mib,
        accel: o.accel.clone(),
        heartbeat_interval: Duration::from_millis(
            remus_agent::config::DEFAULT_HEARTBEAT_INTERVAL_MS,
        ),
        heartbeat_timeout: Duration::from_millis(remus_agent::config::DEFAULT_HEARTBEAT_TIMEOUT_MS),
        lease: LEASE,
        addrs,
        guest_cidr: topo.guest_cidr.clone(),
        unsafe_no_output_buffering: o.unsafe_no_output_buffering,
        vm_netns: Some((topo.primary.clone(), topo.backup.clone())),
        dialects: [files::Dialect::Current; 2],
        keys: None,
        arbiter: crate::pair::config::Arbiter::Witness,
        etcd_members: 0,
    };
    files::write_all(&cfg)?;
    let (pri_files, bak_files) = (
        NodeFiles::of(&work_dir, Host::Pri),
        NodeFiles::of(&work_dir, Host::Bak),
    );

    // The witness, as `remus-witness` runs it.
    let key = HaKey::from_file(&files::psk_path(&work_dir)).context("the drill's key")?;
    let witness = WitnessServer::bind(WitnessServerConfig::new(
        (addrs.witness, WITNESS_PORT).into(),
        key,
        work_dir.join("witness-leases.json"),
    ))
    .await
    .context("the drill's witness")?;
    let (witness_stop, witness_stopped) = tokio::sync::oneshot::channel::<()>();
    let witness = tokio::spawn(witness.run(async move {
        let _ = witness_stopped.await;
    }));

    let load = |f: &NodeFiles| {
        Config::load(&f.config).map_err(|e| anyhow::anyhow!("{}: {e}", f.config.display()))
    };
    let ready = Duration::from_secs(30);
    let mut pri =
        InProcessDaemon::start(load(&pri_files)?, Some(pri_files.config.clone()), ready).await?;
    let bak =
        InProcessDaemon::start(load(&bak_files)?, Some(bak_files.config.clone()), ready).await?;

    let result = drill(o, &topo, &mut pri, &bak, &pri_files, &bak_files, &cfg).await;
    drop(pri);
    drop(bak);
    let _ = witness_stop.send(());
    let _ = witness.await;
    result
}

async fn drill(
    o: &DrillOptions,
    topo: &Topology,
    pri: &mut InProcessDaemon,
    bak: &InProcessDaemon,
    pri_files: &NodeFiles,
    bak_files: &NodeFiles,
    cfg: &PairConfig,
) -> Result<DrillReport> {
    match pri
        .control()
        .call(
            &Request::Start {
                domain: DOMAIN.into(),
                older_copy: false,
            },
            Duration::from_secs(60),
        )
        .await
        .context("remusctl start")?
    {
        Response::Done { .. } => {}
        other => bail!("{} refused to start {DOMAIN}: {other:?}", pri.name()),
    }
    guest::wait_for(
        &pri_files.console(),
        Duration::from_secs(90),
        "guest boot",
        |t| t.contains("counter="),
    )
    .await?;
    // The client must get replies now, or the network (not the failover) is broken.
    let mut client = Client::start(topo.client_netns(), topo.guest_ip, net::SERVICE_PORT);
    if !client
        .wait_for(Duration::from_secs(30), |l| l.replies.len() >= 5)
        .await
    {
        let log = client.stop().await;
        bail!(
            "the guest's counter service at {}:{} did not answer the client ({} replies, breaks: {:?})",
            topo.guest_ip,
            net::SERVICE_PORT,
            log.replies.len(),
            log.breaks
        );
    }
    let acked = |d: &DomainStatus| d.protection.as_ref().and_then(|p| p.last_acked);
    let first = wait_domain(pri.control(), Duration::from_secs(120), "first ACK", |d| {
        acked(d).is_some()
    })
    .await?;
    let protected_at = Instant::now();
    let target = acked(&first).unwrap_or(0) + o.checkpoints;
    let s = wait_domain(
        pri.control(),
        Duration::from_secs(30 + o.checkpoints * 2),
        &format!("{} acknowledged checkpoints", o.checkpoints),
        |d| acked(d).is_some_and(|k| k >= target),
    )
    .await?;
    let p = s
        .protection
        .clone()
        .context("the primary's status has no protection")?;
    let last_acked = acked(&s).unwrap_or(0);

    // The failure: the primary's host is lost at a random point of the epoch cycle, its
    // network with it (nothing it might still release can reach the client).
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
    });
    let kill_after = Duration::from_millis(seed % (o.interval.as_millis() as u64 + 1));
    tokio::time::sleep(kill_after).await;
    let killed_at = Instant::now();
    topo.cut_uplink(Host::Pri)?;
    pri.crash()?;
    let primary_counters = guest::counters(&pri_files.console());

    // The replica once the backup's session has ended (its status shows no session: the
    // last commit is applied) and before it activates: the committed disk record.
    let ended = wait_domain(
        bak.control(),
        Duration::from_secs(10),
        "the backup's receiving session ended",
        |d| d.replica.is_none(),
    )
    .await?;
    let disk_value = guest::disk_log_last(&bak_files.replica, LOG_SLOTS)?.map_or(0, |(_, v)| v);
    let disk_read_ms = remus_ha::auth::unix_millis();
    let committed = ended.committed_epoch;

    let running = wait_domain(
        bak.control(),
        Duration::from_secs(45),
        "the backup's VM running",
        |d| d.vm.is_some_and(|v| v.running) && !d.failovers.is_empty(),
    )
    .await?;
    let recovery = killed_at.elapsed();
    let record: FailoverRecord = running
        .failovers
        .last()
        .cloned()
        .context("no failover record")?;
    let activation_at = instant_of_unix_ms(record.declared_at_ms + record.fencing_ms);
    let mut not_judged = Vec::new();
    if disk_read_ms > record.declared_at_ms {
        not_judged.push(format!(
            "continuity: the replica was read {} ms after the failover was declared, so it may hold the activated guest's writes",
            disk_read_ms - record.declared_at_ms
        ));
    }
    let epoch = record.from_epoch;
    guest::wait_for(
        &bak_files.console(),
        Duration::from_secs(30),
        "activated guest output",
        |t| t.contains("counter="),
    )
    .await?;
    let first_output = killed_at.elapsed();
    guest::wait_for(
        &bak_files.console(),
        Duration::from_secs(30),
        "two check lines",
        |t| t.lines().filter(|l| l.starts_with("check ")).count() >= 2,
    )
    .await?;
    // Let the client reach the activated guest (or give up on a dead connection and
    // reconnect), and the counter run past everything the client saw from the primary, so
    // every value the failover lost has been produced again.
    let max_before = client.log().max_value_before(activation_at);
    let _ = client
        .wait_for(client::STALL_LIMIT + Duration::from_secs(10), |l| {
            l.replies.iter().filter(|r| r.at >= activation_at).count() >= 5
        })
        .await;
    let _ = guest::wait_for(
        &bak_files.console(),
        Duration::from_secs(10),
        "the counter past the client's last value",
        |t| {
            t.lines()
                .filter_map(|l| l.trim().strip_prefix("counter="))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .any(|v| v > max_before)
        },
    )
    .await;
    let client_log = client.stop().await;
    let after = guest::counters(&bak_files.console());
    let checks = guest::checks(&bak_files.console());
    let console = std::fs::read_to_string(bak_files.console()).unwrap_or_default();

    // Replies the activated guest produced: received after activation, and not older than
    // the committed checkpoint. (A reply the primary released just before it died can reach a
    // starved client after the activation; its value is below the committed record, and it
    // belongs to the primary's history, not to the activated guest's.)
    let replies_after: Vec<u64> = client_log
        .replies
        .iter()
        .filter(|r| r.at >= activation_at && r.value >= disk_value)
        .map(|r| r.value)
        .collect();
    let continuity = continuity(disk_value, &after, &replies_after);
    let resumed_at = after
        .iter()
        .chain(&replies_after)
        .copied()
        .min()
        .unwrap_or(0);
    let primary_reached = primary_counters
        .last()
        .copied()
        .unwrap_or(0)
        .max(max_before);
    let resumed_not_rebooted = !console.contains("remus-guest: start") && resumed_at > 1;
    let disk_agrees_with_memory = !checks.is_empty() && checks.iter().all(|c| c.starts_with("ok "));
    let client = analyse(
        &client_log,
        &Moments {
            protected: protected_at,
            killed: killed_at,
            activation: activation_at,
        },
        &after,
    );
    let clients_kept = client.lost_replies == 0
        && client.broken_connections == 0
        && client.values_increasing
        && client.replies_before_failover > 0
        && client.replies_after_failover > 0;
    if committed.is_some_and(|c| c != epoch) {
        not_judged.push(format!(
            "the backup activated checkpoint {epoch}, but its replica had {committed:?} committed when its session ended"
        ));
    }
    Ok(DrillReport {
        passed: continuity
            && resumed_not_rebooted
            && disk_agrees_with_memory
            && epoch >= last_acked
            && clients_kept
            && not_judged.is_empty(),
        checkpoints: last_acked,
        pause_p50_us: p.summary.pause.p50_us,
        pause_p99_us: p.summary.pause.p99_us,
        output_held_p50_us: p.summary.output_commit_delay.p50_us,
        precopy_pages: p.precopy_pages.clone(),
        tracker: p.tracker.clone(),
        memory_mib: o.memory_mib,
        memory_scan_floor_us: remus_tracker::compare::read_floor(o.memory_mib << 20).as_micros()
            as u64,
        kill_after_ack_ms: kill_after.as_millis() as u64,
        detection_ms: record.detection_ms,
        fencing_ms: record.fencing_ms,
        activation_ms: record.activation_ms,
        fence_proof: record.fence_proof.clone(),
        recovery_ms: recovery.as_millis() as u64,
        first_output_ms: first_output.as_millis() as u64,
        activated_epoch: epoch,
        committed_disk_counter: disk_value,
        primary_reached,
        resumed_at,
        uncommitted_discarded: primary_reached.saturating_sub(resumed_at.saturating_sub(1)),
        continuity,
        resumed_not_rebooted,
        disk_agrees_with_memory,
        output_buffering: !cfg.unsafe_no_output_buffering,
        client,
        clients_kept,
        not_judged,
        not_covered: NOT_COVERED.to_vec(),
    })
}

impl DrillReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let v = |b: bool| if b { "ok" } else { "FAILED" };
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "remus local failover drill: {}",
            if self.passed { "PASSED" } else { "FAILED" }
        );
        let _ = writeln!(s, "  checkpoints acknowledged   {}", self.checkpoints);
        let _ = writeln!(
            s,
            "  pause p50 / p99            {:.1} / {:.1} ms",
            self.pause_p50_us as f64 / 1000.0,
            self.pause_p99_us as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "  memory-scan floor          {:.1} ms ({} MiB read once on all cores, same run; tracker: {})",
            self.memory_scan_floor_us as f64 / 1000.0,
            self.memory_mib,
            self.tracker
        );
        let _ = writeln!(
            s,
            "  output held p50            {:.1} ms{}",
            self.output_held_p50_us as f64 / 1000.0,
            if self.output_buffering {
                ""
            } else {
                " (the engine's epoch bookkeeping: nothing was held)"
            }
        );
        let _ = writeln!(
            s,
            "  failure injected           {} ms after the last ACK (uplink cut, daemon and QEMU gone)",
            self.kill_after_ack_ms
        );
        let _ = writeln!(
            s,
            "  detection / fencing / activation  {} / {} / {} ms (heartbeats; proof: {})",
            self.detection_ms, self.fencing_ms, self.activation_ms, self.fence_proof
        );
        let _ = writeln!(s, "  recovery (kill -> running) {} ms", self.recovery_ms);
        let _ = writeln!(
            s,
            "  kill -> first guest output {} ms",
            self.first_output_ms
        );
        let _ = writeln!(s, "  activated checkpoint       {}", self.activated_epoch);
        let _ = writeln!(
            s,
            "  counter: committed on disk {}, primary reached {}, resumed at {} ({} uncommitted increments discarded)",
            self.committed_disk_counter, self.primary_reached, self.resumed_at, self.uncommitted_discarded
        );
        let _ = writeln!(s, "  continuity                 {}", v(self.continuity));
        let _ = writeln!(
            s,
            "  resumed, not rebooted      {}",
            v(self.resumed_not_rebooted)
        );
        let _ = writeln!(
            s,
            "  disk agrees with memory    {}",
            v(self.disk_agrees_with_memory)
        );
        let c = &self.client;
        let ms = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |m| format!("{m} ms"));
        let _ = writeln!(
            s,
            "  network output             {}",
            if self.output_buffering {
                "held until the backup acknowledged"
            } else {
                "UNSAFE: released at once (unsafe_no_output_buffering)"
            }
        );
        let _ = writeln!(
            s,
            "  client replies             {} ({} before the failover, {} after)",
            c.replies, c.replies_before_failover, c.replies_after_failover
        );
        let _ = writeln!(
            s,
            "  client round trip p50      {:.1} ms unprotected, {:.1} ms protected",
            c.rtt_unprotected_p50_us as f64 / 1000.0,
            c.rtt_protected_p50_us as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "  client stall               {} (kill -> first reply {})",
            ms(c.client_stall_ms),
            ms(c.kill_to_first_reply_ms)
        );
        let _ = writeln!(
            s,
            "  client values              last from the primary {}, first after the failover {}",
            c.max_value_before_failover, c.first_value_after_failover
        );
        let _ = writeln!(
            s,
            "  lost replies               {} {}",
            c.lost_replies,
            v(c.lost_replies == 0)
        );
        let _ = writeln!(
            s,
            "  broken connections         {} {}",
            c.broken_connections,
            v(c.broken_connections == 0)
        );
        for b in &c.breaks {
            let _ = writeln!(s, "    - {b}");
        }
        let _ = writeln!(s, "  reply values increasing    {}", v(c.values_increasing));
        let _ = writeln!(s, "  clients kept               {}", v(self.clients_kept));
        for n in &self.not_judged {
            let _ = writeln!(s, "  NOT JUDGED                 {n}");
        }
        let _ = writeln!(s, "  not covered by this drill yet:");
        for n in &self.not_covered {
            let _ = writeln!(s, "    - {n}");
        }
        s
    }
}

/// The continuity verdict: memory and disk from the same checkpoint, and no increment
/// skipped or repeated after activation.
///
/// Ticker and client share the counter, so the activated guest's values are split between
/// its console (`console`, every tick) and the client's replies (`replies`, each `INC`);
/// together they must form one run of consecutive values (up to the client's last reply:
/// the reply to a later `INC` may still have been in flight when the client stopped). The
/// guest logs each increment to disk before setting it in memory, so the first tick is at
/// least the committed record `disk` and the run starts no later than `disk + 1` (a reply
/// retransmitted from the checkpoint's socket buffers may start it earlier).
fn continuity(disk: u64, console: &[u64], replies: &[u64]) -> bool {
    let Some(&first_tick) = console.first() else {
        return false;
    };
    let all: std::collections::BTreeSet<u64> = console.iter().chain(replies).copied().collect();
    let upto = replies
        .last()
        .copied()
        .unwrap_or_else(|| console.last().copied().unwrap_or(0));
    let run: Vec<u64> = all.range(..=upto).copied().collect();
    first_tick >= disk
        && all.first().is_some_and(|&v| v <= disk + 1)
        && console.windows(2).all(|w| w[1] > w[0])
        && run.windows(2).all(|w| w[1] == w[0] + 1)
}

#[cfg(test)]
mod tests {
    use super::continuity;

    #[test]
    fn continuity_table() {
        // (case, disk record, console after activation, client replies after, verdict)
        type Case = (&'static str, u64, &'static [u64], &'static [u64], bool);
        let cases: &[Case] = &[
            ("ticks only, from disk + 1", 10, &[11, 12, 13], &[], true),
            ("ticks only, from the disk record", 10, &[10, 11], &[], true),
            (
                "ticks and replies interleaved",
                10,
                &[11, 13, 16],
                &[12, 14, 15],
                true,
            ),
            (
                "a retransmitted reply first",
                10,
                &[12, 13],
                &[10, 11, 14],
                true,
            ),
            (
                "reply in flight at the end",
                10,
                &[11, 12, 14, 15],
                &[13],
                true,
            ),
            ("an increment skipped", 10, &[11, 13], &[14], false),
            ("memory behind disk", 10, &[9, 10], &[], false),
            ("memory ahead of disk", 10, &[13, 14], &[], false),
            ("no console after activation", 10, &[], &[11], false),
            ("console going back", 10, &[11, 12, 11], &[], false),
        ];
        for (name, disk, console, replies, ok) in cases {
            assert_eq!(continuity(*disk, console, replies), *ok, "{name}");
        }
    }
}
