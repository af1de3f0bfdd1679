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
//! Run one pair test at a time (each boots a guest under TCG).

mod pair_support;

use anyhow::{ensure, Context, Result};
use remus_drill::net::Host;
use remus_drill::pair::config::{Arbiter, ETCD_CLIENT_PORT, ETCD_PREFIX};
use remus_drill::pair::{run_pair, PairDrill, PairReport, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_with_etcd() -> Result<()> {
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

/// `etcdctl get --prefix` of the drill's keys, run on the witness host.
fn etcd_keys(pair: &mut PairDrill) -> Result<String> {
    let ns = pair
        .topology()
        .witness_ns()
        .context("no witness namespace")?
        .to_string();
    let endpoint = format!(
        "http://{}:{ETCD_CLIENT_PORT}",
        pair.topology().addrs.context("no addresses")?.witness
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "etcdctl"])
        .arg(format!("--endpoints={endpoint}"))
        .args(["get", "--prefix", ETCD_PREFIX])
        .env("ETCDCTL_API", "3")
        .output()
        .context("etcdctl (Debian package etcd-client)")?;
    ensure!(out.status.success(), "etcdctl: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_isolate_primary_with_etcd() -> Result<()> {
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
    let keys = etcd_keys(&mut pair)?;
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
