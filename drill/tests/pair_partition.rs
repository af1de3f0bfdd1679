//! The pair drill's split-brain scenarios with the witness, on one pair of real daemons:
//! - partition ×10: pri and bak lose each other (both still reach the witness and the
//!   client) for 3 s, then heal. Never two VMs running — judged from both daemons' VM
//!   states every 50 ms, from `/proc` whenever a daemon cannot answer, and from the client
//!   (no reply of lost state, values never going back) — and exactly one VM afterwards;
//! - isolate-primary ×1: the primary's uplink is cut entirely; it must stop releasing
//!   output before the backup (which must win the lease) runs the VM.

mod pair_support;

use anyhow::Result;
use remus_drill::pair::{PairDrill, PairReport, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_with_witness_never_runs_two() -> Result<()> {
    let work = pair_support::scratch("pair-part")?;
    let mut o = pair_support::options(Scenario::Partition, work.path())?;
    o.seed = Some(0x5eed_0002);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let mut report = PairReport {
        scenario: Some(Scenario::Partition),
        seed: 0x5eed_0002,
        work_dir: work.path().display().to_string(),
        ..PairReport::default()
    };
    for i in 1..=10 {
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
    let t = pair.trial(Scenario::IsolatePrimary, 11).await;
    println!(
        "isolate-primary: failover {:?}; failure -> running {:?} ms; passed {}",
        t.failover, t.failure_to_running_ms, t.passed
    );
    report.trials.push(t);
    drop(pair);
    report.conclude();
    anyhow::ensure!(
        report.trials.len() == 11,
        "only {} of 11 trials ran:\n{}",
        report.trials.len(),
        report.render()
    );
    pair_support::check(&report, work)
}
