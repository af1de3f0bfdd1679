//! The pair drill with the etcd arbiter (`[witness] mode = "etcd"`): the same two real
//! `remusd` daemons, guest and client as the other pair tests, but the witness host runs a
//! real etcd (Debian's `etcd-server`) instead of `remus-witness`. The same verdicts judge
//! every trial: never two VMs releasing output (both daemons' status every 50 ms, `/proc`
//! when one cannot answer, the client's replies), nothing acknowledged lost, exactly one VM
//! afterwards.
//! - kill-primary ×2: the backup takes the lease the primary held preemptible by it (an etcd
//!   transaction on the holder record), runs the VM from its last checkpoint; the old
//!   primary's daemon restarts (a new etcd lease) and rejoins as backup;
//! - partition ×4, then isolate-primary: with the replication link cut both nodes still
//!   reach etcd and etcd's transactions let exactly one of them win; with the primary cut off
//!   entirely, it stops releasing output before its etcd lease can run out and the backup
//!   wins.
//!
//! - a three-member etcd cluster: its leader killed while the pair protects (no effect: the
//!   primary keeps its VM, its lease and its backup), then kill-primary on the two members
//!   left (the takeover needs their quorum, which they have); and the leader killed right
//!   after the primary, so the takeover meets the election of a new leader.
//! - the etcd quorum lost while the pair protects (two members of three killed): the primary
//!   keeps running on its backup's acknowledgements alone — the rule for an unreachable
//!   witness — its lease reported lost, the backup never takes over; the quorum back, the
//!   lease is held again and nothing ran twice.
//!
//! Run one pair test at a time (each boots a guest under TCG): the tests of this file take
//! [`ONE_AT_A_TIME`] first, so `cargo test` running them on two threads still runs them in
//! turn.

mod pair_support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use remus_agent::api::Role;
use remus_drill::net::Host;
use remus_drill::pair::config::{Arbiter, ETCD_PREFIX};
use remus_drill::pair::{run_pair, PairDrill, PairReport, Scenario};

/// Held by each test for its whole run: two guests under TCG and etcd on a 2-core machine
/// would make each other's failures.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_with_etcd() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let work = pair_support::scratch("pair-etcd-kp")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.arbiter = Arbiter::Etcd;
    o.trials = 2;
    o.seed = Some(0x5eed_e7cd);
    let report = run_pair(&o).await?;
    for t in &report.trials {
        println!(
            "trial {}: VM {:?} -> {:?}; fencing {:?} ms ({:?}); failure -> running {:?} ms, -> first reply {:?} ms; lost {:?}, broken {:?}",
            t.trial,
            t.primary_before,
            t.primary_after,
            t.failover.as_ref().map(|f| f.fencing_ms),
            t.failover.as_ref().map(|f| f.fence_proof.clone()),
            t.failure_to_running_ms,
            t.failure_to_first_reply_ms,
            t.client.as_ref().map(|c| c.lost_replies),
            t.client.as_ref().map(|c| c.broken_connections),
        );
    }
    ensure!(report.trials.len() == 2, "{}", report.render());
    pair_support::check(&report, work)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_isolate_primary_with_etcd() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let work = pair_support::scratch("pair-etcd-part")?;
    let mut o = pair_support::options(Scenario::Partition, work.path())?;
    o.arbiter = Arbiter::Etcd;
    o.seed = Some(0x5eed_e7ce);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    // The daemons really use etcd: the status names it, and the holder record is there,
    // naming pri and its backup.
    let st = pair.status(Host::Pri).await?;
    let a = st.arbiter.as_ref().context("no arbiter in pri's status")?;
    ensure!(a.backend == "etcd", "{a:?}");
    let keys = pair.etcdctl(&["get", "--prefix", ETCD_PREFIX])?;
    ensure!(
        keys.contains(&format!("{ETCD_PREFIX}/domains/drill/holder"))
            && keys.contains("\"node\":\"pri\"")
            && keys.contains(&format!("{ETCD_PREFIX}/domains/drill/copy")),
        "etcd holds:\n{keys}"
    );
    println!("etcd holds:\n{keys}");
    let mut report = PairReport {
        scenario: Some(Scenario::Partition),
        seed: 0x5eed_e7ce,
        work_dir: work.path().display().to_string(),
        ..PairReport::default()
    };
    let partitions = 4;
    for i in 1..=partitions {
        let t = pair.trial(Scenario::Partition, i).await;
        println!(
            "partition trial {i}: VM {:?} -> {:?}; samples {}, two running {}, unknown {}; failover {:?}; client lost {:?} broken {:?}; passed {}",
            t.primary_before,
            t.primary_after,
            t.samples,
            t.two_running_samples,
            t.unknown_samples,
            t.failover.as_ref().map(|f| (f.fence_proof.clone(), f.from_epoch)),
            t.client.as_ref().map(|c| c.lost_replies),
            t.client.as_ref().map(|c| c.broken_connections),
            t.passed
        );
        let done = t
            .verdicts
            .iter()
            .any(|v| v.name == "trial_completed" && v.ok);
        report.trials.push(t);
        if !done {
            break;
        }
    }
    let t = pair.trial(Scenario::IsolatePrimary, partitions + 1).await;
    println!(
        "isolate-primary: failover {:?}; failure -> running {:?} ms; passed {}",
        t.failover, t.failure_to_running_ms, t.passed
    );
    report.trials.push(t);
    drop(pair);
    report.conclude();
    ensure!(
        report.trials.len() == partitions as usize + 1,
        "only {} of {} trials ran:\n{}",
        report.trials.len(),
        partitions + 1,
        report.render()
    );
    pair_support::check(&report, work)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_lost_during_protection_then_a_failover() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let work = pair_support::scratch("pair-etcd-3")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.arbiter = Arbiter::Etcd;
    o.etcd_members = 3;
    // Long enough to outlive a leader election (`config check` warns below 4 s with a
    // cluster; at 2 s the lease lapsed here while the new leader was elected).
    o.lease = Duration::from_secs(4);
    o.seed = Some(0x5eed_e7cf);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let view = |s: &remus_agent::api::DaemonStatus| -> Result<_> {
        let d = s
            .domains
            .iter()
            .find(|d| d.name == "drill")
            .context("no drill domain")?;
        Ok((
            d.role.clone(),
            d.vm.as_ref().map(|v| v.pid),
            d.protection.as_ref().and_then(|p| p.last_acked),
            d.lease.clone(),
            d.failovers.len(),
        ))
    };
    let (_, pid, acked, _, _) = view(&pair.status(Host::Pri).await?)?;
    let pid = pid.context("no VM on pri")?;
    let leader = pair.etcd_leader()?;
    pair.kill_etcd_member(leader)?;
    println!("etcd leader m{leader} killed while pri protects (VM pid {pid}, acked {acked:?})");
    // Three leases' worth of protection on the two members left.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        let (role, now_pid, _, lease, failovers) = view(&pair.status(Host::Pri).await?)?;
        let (bak_role, _, _, _, bak_failovers) = view(&pair.status(Host::Bak).await?)?;
        ensure!(
            matches!(role, Role::Primary { .. })
                && matches!(bak_role, Role::Backup { .. })
                && now_pid == Some(pid)
                && failovers == 0
                && bak_failovers == 0,
            "the pair changed after an etcd member was killed: pri {role:?} pid {now_pid:?}, \
             bak {bak_role:?}\n{}",
            pair.logs_text()
        );
        ensure!(
            lease.as_deref().is_some_and(|l| l.starts_with("held")),
            "pri's lease after the member was killed: {lease:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, _, acked_after, lease, _) = view(&pair.status(Host::Pri).await?)?;
    ensure!(
        acked_after > acked,
        "no checkpoint acknowledged: {acked:?} -> {acked_after:?}"
    );
    println!("still protected: acked {acked:?} -> {acked_after:?}, lease {lease:?}");
    let mut report = PairReport {
        scenario: Some(Scenario::KillPrimary),
        seed: 0x5eed_e7cf,
        work_dir: work.path().display().to_string(),
        ..PairReport::default()
    };
    let t = pair.trial(Scenario::KillPrimary, 1).await;
    println!(
        "kill-primary on two etcd members: failover {:?}; failure -> running {:?} ms; passed {}",
        t.failover, t.failure_to_running_ms, t.passed
    );
    report.trials.push(t);
    drop(pair);
    report.conclude();
    pair_support::check(&report, work)
}

/// The drill domain on `h`: (role, VM pid, VM running, last acked, lease, failovers).
async fn drill_domain(
    pair: &PairDrill,
    h: Host,
) -> Result<(Role, Option<u32>, bool, Option<u64>, Option<String>, usize)> {
    let s = pair.status(h).await?;
    let d = s
        .domains
        .iter()
        .find(|d| d.name == "drill")
        .context("no drill domain")?;
    Ok((
        d.role.clone(),
        d.vm.as_ref().map(|v| v.pid),
        d.vm.as_ref().is_some_and(|v| v.running),
        d.protection.as_ref().and_then(|p| p.last_acked),
        d.lease.clone(),
        d.failovers.len(),
    ))
}

/// For `window`: pri primary with VM `pid` running and acknowledged checkpoints advancing,
/// bak its backup, no failover on either; returns pri's lease states seen.
async fn protected_throughout(
    pair: &PairDrill,
    pid: u32,
    window: Duration,
    step: &str,
) -> Result<Vec<String>> {
    let (_, _, _, before, _, _) = drill_domain(pair, Host::Pri).await?;
    let until = std::time::Instant::now() + window;
    let mut leases = Vec::new();
    while std::time::Instant::now() < until {
        let (role, now_pid, running, _, lease, failovers) = drill_domain(pair, Host::Pri).await?;
        let (bak_role, bak_pid, _, _, _, bak_failovers) = drill_domain(pair, Host::Bak).await?;
        ensure!(
            matches!(role, Role::Primary { .. })
                && now_pid == Some(pid)
                && running
                && matches!(bak_role, Role::Backup { .. })
                && bak_pid.is_none()
                && failovers == 0
                && bak_failovers == 0,
            "{step}: pri {role:?} pid {now_pid:?} running {running}, bak {bak_role:?} pid \
             {bak_pid:?}, failovers {failovers}/{bak_failovers}\n{}",
            pair.logs_text()
        );
        let l = lease.unwrap_or_default();
        let kind = l.split(',').next().unwrap_or_default().to_string();
        if leases.last() != Some(&kind) {
            leases.push(kind);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, _, after, _, _) = drill_domain(pair, Host::Pri).await?;
    ensure!(
        after > before,
        "{step}: no checkpoint acknowledged: {before:?} -> {after:?}"
    );
    println!("{step}: protected, acked {before:?} -> {after:?}, pri's lease {leases:?}");
    Ok(leases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_quorum_lost_while_protecting_then_back() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let work = pair_support::scratch("pair-etcd-q")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.arbiter = Arbiter::Etcd;
    o.etcd_members = 3;
    o.lease = Duration::from_secs(4);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let (_, pid, _, _, _, _) = drill_domain(&pair, Host::Pri).await?;
    let pid = pid.context("no VM on pri")?;
    protected_throughout(&pair, pid, Duration::from_secs(2), "before").await?;
    pair.kill_etcd_member(1)?;
    pair.kill_etcd_member(2)?;
    let leases = protected_throughout(&pair, pid, Duration::from_secs(8), "quorum lost").await?;
    ensure!(
        leases.last().map(String::as_str) == Some("lost"),
        "without a quorum pri's lease should end lost (it runs on ACKs): {leases:?}"
    );
    pair.restart_etcd_member(1).await?;
    pair.restart_etcd_member(2).await?;
    pair.wait_etcd_healthy(Duration::from_secs(30)).await?;
    let leases = protected_throughout(&pair, pid, Duration::from_secs(6), "quorum back").await?;
    ensure!(
        leases.last().map(String::as_str) == Some("held"),
        "with the quorum back pri holds its lease again: {leases:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_and_the_etcd_leader_at_once() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let work = pair_support::scratch("pair-etcd-kl")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.arbiter = Arbiter::Etcd;
    o.etcd_members = 3;
    o.lease = Duration::from_secs(4);
    o.kill_etcd_leader_with_primary = true;
    o.seed = Some(0x5eed_e7d0);
    let report = run_pair(&o).await?;
    for t in &report.trials {
        println!(
            "trial {}: fencing {:?} ms; failure -> running {:?} ms; lost {:?}",
            t.trial,
            t.failover.as_ref().map(|f| f.fencing_ms),
            t.failure_to_running_ms,
            t.client.as_ref().map(|c| c.lost_replies),
        );
    }
    ensure!(report.trials.len() == 1, "{}", report.render());
    pair_support::check(&report, work)
}
