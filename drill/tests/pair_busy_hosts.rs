//! No false failovers on busy hosts over lossy links: a protected pair at the product's
//! default heartbeat and lease settings runs for `REMUS_BUSY_SECS` seconds (60 in the
//! suite; `scripts/soak.sh` runs 300) while every core of this machine is saturated by busy
//! loops at normal priority, one pinned per core, and both hosts' uplinks lose 1 % of their
//! frames and delay them 10 ms ± 5 ms each way (`remus_drill::impair`, in user space: this
//! kernel has no netem). Nobody may fail over, lose protection or pause for lack of a
//! lease, and checkpoints must keep being acknowledged. The heartbeat thread runs SCHED_RR
//! and replication traffic counts as life, which is what this proves sufficient at the
//! default timeout.
//!
//! Reported: checkpoints acknowledged under load, pause and ACK p50/p99, the longest
//! silence of the replication stream seen by the 1 s sampler, samples in which a daemon
//! saw its peer other than alive, and the frames the impairers moved and dropped.

mod pair_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use remus_agent::api::{DaemonStatus, DomainStatus, PeerLiveness, Role};
use remus_drill::impair::Impairment;
use remus_drill::net::Host;
use remus_drill::pair::{PairDrill, Scenario};

/// Busy loops, one per core, killed when dropped.
struct Burners(Vec<Child>);

impl Burners {
    fn start() -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut v = Vec::new();
        for core in 0..cores {
            let c = Command::new("taskset")
                .args(["-c", &core.to_string(), "sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a busy loop with taskset (util-linux)")?;
            v.push(c);
        }
        Ok(Self(v))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn web(s: &DaemonStatus) -> Result<&DomainStatus> {
    s.domains.first().context("no domain in the status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_hosts_do_not_fail_over() -> Result<()> {
    let secs: u64 = std::env::var("REMUS_BUSY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let work = pair_support::scratch("pair-busy")?.keep();
    println!("pair-busy work directory: {}", work.display());
    // The product's defaults: the drill's own options are the defaults of `remusd`.
    let mut o = pair_support::options(Scenario::KillBackup, &work)?;
    o.impair = Some(Impairment::LOSSY_WAN);
    println!(
        "heartbeat {:?}/{:?}, lease {:?}, {secs} s with every core busy, both uplinks {}",
        o.heartbeat_interval,
        o.heartbeat_timeout,
        o.lease,
        Impairment::LOSSY_WAN
    );
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    pair.wait_protected(Host::Pri, 5, Duration::from_secs(60))
        .await?;
    let before = [pair.status(Host::Pri).await?, pair.status(Host::Bak).await?];

    let burners = Burners::start()?;
    let start = Instant::now();
    let (mut samples, mut not_alive, mut longest_silence) = (0u64, 0u64, 0u64);
    let mut unanswered = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for h in Host::BOTH {
            match tokio::time::timeout(Duration::from_secs(5), pair.status(h)).await {
                Ok(Ok(s)) => {
                    samples += 1;
                    if !matches!(s.peer_liveness, PeerLiveness::Alive { .. }) {
                        not_alive += 1;
                        println!(
                            "{h} saw its peer {:?} at {:?}",
                            s.peer_liveness,
                            start.elapsed()
                        );
                    }
                    longest_silence = longest_silence.max(s.replication_heard_ms_ago.unwrap_or(0));
                }
                _ => unanswered += 1,
            }
        }
    }
    drop(burners);
    let took = start.elapsed().as_secs_f64();
    let after = [pair.status(Host::Pri).await?, pair.status(Host::Bak).await?];
    let impaired = Host::BOTH.map(|h| pair.topology().impair_stats(h));
    drop(pair);

    let (p0, p1) = (web(&before[0])?, web(&after[0])?);
    let (b0, b1) = (web(&before[1])?, web(&after[1])?);
    let acked = p1.counters.checkpoints - p0.counters.checkpoints;
    let summary = p1.protection.as_ref().map(|p| p.summary.clone());
    println!(
        "busy {took:.0} s: {acked} checkpoints acknowledged ({:.1}/s); pause p50/p99 {:?}/{:?} us, ACK p50/p99 {:?}/{:?} us; \
         longest replication silence sampled {longest_silence} ms; samples {samples} ({unanswered} unanswered), peer not alive in {not_alive}; \
         unprotected ms pri {} -> {}; impairers (frames, dropped) pri {:?} bak {:?}; \
         the detectors' longest silence pri {:?} bak {:?} ms (timeout {:?}), longest heartbeat gap pri {:?} bak {:?} ms",
        acked as f64 / took,
        summary.as_ref().map(|s| s.pause.p50_us),
        summary.as_ref().map(|s| s.pause.p99_us),
        summary.as_ref().map(|s| s.ack_latency.p50_us),
        summary.as_ref().map(|s| s.ack_latency.p99_us),
        p0.counters.unprotected_ms,
        p1.counters.unprotected_ms,
        impaired[0],
        impaired[1],
        after[0].peer_longest_silence_ms,
        after[1].peer_longest_silence_ms,
        o.heartbeat_timeout,
        after[0].heartbeat_longest_gap_ms,
        after[1].heartbeat_longest_gap_ms,
    );
    ensure!(
        impaired
            .iter()
            .all(|i| i.is_some_and(|(f, d)| f > 1000 && d > 0)),
        "the links were not impaired as asked: {impaired:?}"
    );
    ensure!(
        matches!(p1.role, Role::Primary { .. }) && matches!(b1.role, Role::Backup { .. }),
        "roles changed under load: pri {:?}, bak {:?}",
        p1.role,
        b1.role
    );
    ensure!(
        p1.counters.protection_lost == p0.counters.protection_lost
            && b1.counters.failovers == b0.counters.failovers
            && p1.counters.failovers == p0.counters.failovers,
        "a false failover under load: pri lost protection {} -> {}, bak failovers {} -> {}",
        p0.counters.protection_lost,
        p1.counters.protection_lost,
        b0.counters.failovers,
        b1.counters.failovers
    );
    ensure!(
        p1.counters.unprotected_ms == p0.counters.unprotected_ms,
        "pri ran unprotected (a pause or a lost backup) under load: {} -> {} ms",
        p0.counters.unprotected_ms,
        p1.counters.unprotected_ms
    );
    ensure!(
        p1.alarms.iter().all(|a| !a.contains("paused")),
        "pri paused its VM under load: {:?}",
        p1.alarms
    );
    ensure!(
        acked >= secs / 2,
        "only {acked} checkpoints acknowledged in {took:.0} s under load"
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
