//! The local drill: protect a real guest, kill its primary at a random point of the epoch
//! cycle, activate the backup, and check that nothing committed was lost and nothing
//! uncommitted survived.
//!
//! Both agents' roles run in this process on one host (separate
//! directories, the real encrypted replication session over loopback, real QEMU, real NBD
//! disk replication). The guest is the project's test guest (`tests/images/build-guest.sh`):
//! a counter that logs every increment to its disk before setting it in memory and prints
//! `counter=<n>` on its console, and periodically `check ok|mismatch mem=<m> disk=<d>`.
//!
//! Verdicts, each computed from what was observed:
//! - **continuity**: the first counter the activated guest prints is the replica disk's last
//!   committed record `d` or `d + 1` (memory and disk from the same checkpoint), and the
//!   counter then advances by one per tick;
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
//! The network ([`net`]) models two hosts and a client on a switch, each a namespace; the
//! primary host's loss is its uplink cut and its QEMU killed at the same moment.
//!
//! With `unsafe_no_output_buffering` the same drill runs with the guest's output released at
//! once; it must then report lost state (that is the proof the check can fail).
//!
//! What the local drill does not cover yet is listed in [`DrillReport::not_covered`] and
//! printed with every report, so the drill never claims more than it checked.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use remus_engine::peer::PreSharedKey;
use remus_engine::replica::ReplicaState;
use remus_engine::session::{accept_backup, Identity};
use serde::Serialize;
use tokio::net::TcpListener;

use remus_agent::config::Config;
use remus_agent::domain::backup::{ReceiveControls, ReplicaDomain};
use remus_agent::domain::disk_copy::DiskCopy;
use remus_agent::domain::primary::{protect, ProtectOptions, RunningVm};
use remus_agent::domain::DomainPaths;

use crate::client::{self, analyse, Client, ClientVerdict, Moments};
use crate::guest;
use crate::net::{self, Topology};

/// Slots of the guest's disk log (the workload's default).
const LOG_SLOTS: u64 = 8192;

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
    /// When, after the last acknowledgement, the primary's QEMU was killed (ms).
    pub kill_after_ack_ms: u64,
    /// From the kill to the backup knowing the primary is gone (ms).
    pub detection_ms: u64,
    /// From the kill to the activated VM running (ms).
    pub recovery_ms: u64,
    /// From the kill to the activated guest's first output (ms).
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
    /// What this drill does not exercise yet.
    pub not_covered: Vec<&'static str>,
}

/// What the local drill does not exercise yet (printed with every report).
pub const NOT_COVERED: &[&str] = &[
    "failure detection by heartbeats: the backup learns of the failure from the replication \
     connection closing",
    "fencing and the witness: the drill's policy uses fencing mode none",
    "separate hosts: both roles run in one process; only their networks are separate \
     (namespaces on one switch), and the replication link is loopback",
    "the plug-qdisc egress backend: the drill uses the relay (this kernel lacks sch_plug)",
    "one client, one connection, requests one at a time: no concurrent or bulk traffic",
];

fn policy(o: &DrillOptions, port: u16, topo: &Topology) -> String {
    let dir = &o.work_dir;
    format!(
        r#"
[node]
name = "pri"
listen = "127.0.0.1:{port}"
run_dir = "{run}"
state_dir = "{state}"

[peer]
name = "bak"
address = "127.0.0.1:{port}"

[[peer.link]]
local = "127.0.0.1:{hb}"
remote = "127.0.0.2:{hb}"

[auth]
mode = "psk"
psk_file = "{psk}"

[[domain]]
name = "drill"
checkpoint_interval_ms = {interval}

{machine}
[domain.fencing]
mode = "none"
"#,
        run = dir.join("run").display(),
        state = dir.join("state").display(),
        psk = dir.join("psk").display(),
        hb = port.wrapping_add(1),
        interval = o.interval.as_millis(),
        machine = guest::GuestMachine {
            accel: &o.accel,
            memory_mib: o.memory_mib,
            kernel: &o.kernel,
            initrd: &o.initrd,
            guest_cidr: &topo.guest_cidr,
            mac: "52:54:00:77:00:10",
            bridge: net::HOST_BRIDGE,
            image: &dir.join("primary.img"),
            replica: &dir.join("replica.img"),
            unsafe_no_output_buffering: o.unsafe_no_output_buffering,
        }
        .domain_tables(),
    )
}

/// Runs one local drill.
///
/// # Errors
/// A step that could not be carried out (QEMU does not start, the image is missing …).
/// A drill that ran but found lost or inconsistent state is not an error: its report says
/// `passed: false` and why.
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
    // The policy wants absolute paths (a daemon's working directory is not the caller's).
    let mut o = o.clone();
    o.kernel = std::path::absolute(&o.kernel)?;
    o.initrd = std::path::absolute(&o.initrd)?;
    o.work_dir = std::path::absolute(&o.work_dir)?;
    let o = &o;
    let key: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    std::fs::write(o.work_dir.join("psk"), &key)?;
    // Owner-only, or remusd refuses the key.
    std::fs::set_permissions(
        o.work_dir.join("psk"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    for f in ["primary.img", "replica.img"] {
        std::fs::File::create(o.work_dir.join(f))?.set_len(64 << 20)?;
    }
    // Declared first so it is dropped last, after every VM and relay that uses it.
    let topo = tokio::task::spawn_blocking(Topology::create)
        .await?
        .context("building the drill's network")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let cfg = Config::from_str(&policy(o, port, &topo), "drill policy")
        .map_err(|e| anyhow::anyhow!("drill policy: {e}"))?;
    let domain = cfg.domains[0].clone();
    let psk = PreSharedKey::from_bytes(&key).context("drill key")?;

    let bak_paths = DomainPaths::new(
        &o.work_dir.join("bak/run"),
        &o.work_dir.join("bak/state"),
        "drill",
    );
    let mut replica = ReplicaDomain::open(&domain, bak_paths.clone())?;
    let psk_b = psk.clone();
    let backup = tokio::spawn(async move {
        let (sock, _) = listener.accept().await?;
        let session =
            accept_backup(sock, &psk_b, "bak", "pri", None, Duration::from_secs(10)).await?;
        let exit = replica.receive(session, ReceiveControls::default()).await;
        let noticed = Instant::now();
        anyhow::Ok((replica, exit, noticed))
    });

    let pri_paths = DomainPaths::new(
        &o.work_dir.join("pri/run"),
        &o.work_dir.join("pri/state"),
        "drill",
    );
    let mut vm = RunningVm::start(
        &domain,
        pri_paths.clone(),
        &topo.primary_netns(),
        DiskCopy::Image,
    )
    .await?;
    guest::wait_for(
        &pri_paths.console(),
        Duration::from_secs(90),
        "guest boot",
        |t| t.contains("counter="),
    )
    .await?;
    // Before protection the buffer passes traffic straight through: the client must get
    // replies now, or the network (not the failover) is broken.
    let mut client = Client::start(topo.client_netns(), topo.guest_ip, net::SERVICE_PORT);
    if !client
        .wait_for(Duration::from_secs(30), |l| l.replies.len() >= 5)
        .await
    {
        let log = client.stop().await;
        bail!(
            "the guest's counter service at {}:{} did not answer the client before \
             protection ({} replies, breaks: {:?})",
            topo.guest_ip,
            net::SERVICE_PORT,
            log.replies.len(),
            log.breaks
        );
    }
    let protected_at = Instant::now();
    let protection = protect(
        &vm,
        &ProtectOptions {
            peer_addr: format!("127.0.0.1:{port}"),
            psk,
            identity: Identity {
                node: "pri".into(),
                peer_node: "bak".into(),
                domain: "drill".into(),
            },
            ack_timeout: Duration::from_secs(5),
            ack_wait_max: domain.ack_wait_max,
            disk_sync: blk_remus::SyncMode::Full,
        },
    )
    .await?;
    let mut status = protection.handle.status.clone();
    let target = o.checkpoints;
    let reached = tokio::time::timeout(Duration::from_secs(30 + target * 2), async {
        loop {
            if status.borrow().last_acked.is_some_and(|k| k >= target) {
                return true;
            }
            if status.changed().await.is_err() {
                return false;
            }
        }
    })
    .await
    .with_context(|| format!("{target} acknowledged checkpoints"))?;
    if !reached {
        let why = match protection.task.await {
            Ok(Ok(exit)) => format!("{exit:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        bail!("the primary loop ended before {target} checkpoints: {why}");
    }
    let s = status.borrow().clone();

    // The failure: the primary's QEMU dies at a random point of the epoch cycle.
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
    });
    let kill_after = Duration::from_millis(seed % (o.interval.as_millis() as u64 + 1));
    tokio::time::sleep(kill_after).await;
    // The primary host is lost: its network goes with its QEMU (nothing the agent might
    // still release after the kill can reach the client, as on a real host failure).
    let killed_at = Instant::now();
    let cut = tokio::process::Command::new("ip")
        .args(["-n", &topo.primary, "link", "set", "uplink", "down"])
        .status();
    vm.qemu.kill()?;
    let cut = cut.await?;
    if !cut.success() {
        bail!("cutting the primary's uplink in {}: {cut}", topo.primary);
    }
    let _ = protection.task.await;
    let primary_counters = guest::counters(&pri_paths.console());
    let (replica, _exit, noticed) = backup.await??;
    let detection = noticed.saturating_duration_since(killed_at);

    let committed = match replica.replica().state() {
        ReplicaState::Committed(k) => k,
        other => bail!("the replica holds no committed checkpoint ({other})"),
    };
    let disk_value =
        guest::disk_log_last(&domain.disks[0].replica, LOG_SLOTS)?.map_or(0, |(_, v)| v);
    let activation_at = Instant::now();
    let (mut activated, epoch) = replica.activate(&topo.backup_netns()).await?;
    activated.resume_activated().await?;
    let recovery = killed_at.elapsed();
    guest::wait_for(
        &bak_paths.console(),
        Duration::from_secs(30),
        "activated guest output",
        |t| t.contains("counter="),
    )
    .await?;
    let first_output = killed_at.elapsed();
    guest::wait_for(
        &bak_paths.console(),
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
        &bak_paths.console(),
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
    let after = guest::counters(&bak_paths.console());
    let checks = guest::checks(&bak_paths.console());
    let console = std::fs::read_to_string(bak_paths.console()).unwrap_or_default();
    let _ = activated.qemu.kill();

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
    Ok(DrillReport {
        passed: continuity
            && resumed_not_rebooted
            && disk_agrees_with_memory
            && epoch == committed
            && clients_kept,
        checkpoints: s.last_acked.unwrap_or(0),
        pause_p50_us: s.summary.pause.p50_us,
        pause_p99_us: s.summary.pause.p99_us,
        output_held_p50_us: s.summary.output_commit_delay.p50_us,
        precopy_pages: s.precopy_pages.clone(),
        tracker: s.tracker.clone(),
        memory_mib: o.memory_mib,
        memory_scan_floor_us: remus_tracker::compare::read_floor(o.memory_mib << 20).as_micros()
            as u64,
        kill_after_ack_ms: kill_after.as_millis() as u64,
        detection_ms: detection.as_millis() as u64,
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
        output_buffering: domain.netbuf.output_buffering,
        client,
        clients_kept,
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
            "  failure injected           {} ms after the last ACK (QEMU SIGKILL)",
            self.kill_after_ack_ms
        );
        let _ = writeln!(
            s,
            "  detection                  {} ms (replication connection closed)",
            self.detection_ms
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
