//! The pair drill, kill-primary, ten trials on one pair: two real `remusd` daemons in two
//! network namespaces, a real `remus-witness`, the test guest under QEMU (TCG) and a TCP
//! client. Each trial SIGKILLs the current primary's daemon group (its QEMU dies with it) and
//! cuts its uplink at a random point of the epoch cycle; the backup must detect the loss,
//! win the witness lease, and run the VM from a committed checkpoint, with the client's
//! connection intact and no reply of lost state. The dead host's daemon is then restarted
//! and must rejoin as backup; the next trial kills the new primary.

mod pair_support;

use anyhow::Result;
use remus_drill::pair::{run_pair, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_ten_trials() -> Result<()> {
    let work = pair_support::scratch("pair-kp")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.trials = 10;
    o.seed = Some(0x5eed_0001);
    let report = run_pair(&o).await?;
    for t in &report.trials {
        println!(
            "trial {}: VM {:?} -> {:?}; injected {:?} ms after an ACK; acked {:?}, committed {:?}, resumed from {:?}; detection {:?} ms, fencing {:?} ms, activation {:?} ms; failure -> running {:?} ms, -> first reply {:?} ms; lost {:?}, broken {:?}",
            t.trial,
            t.primary_before,
            t.primary_after,
            t.injected_after_ack_ms,
            t.acked_before,
            t.committed_before,
            t.failover.as_ref().map(|f| f.from_epoch),
            t.failover.as_ref().map(|f| f.detection_ms),
            t.failover.as_ref().map(|f| f.fencing_ms),
            t.failover.as_ref().map(|f| f.activation_ms),
            t.failure_to_running_ms,
            t.failure_to_first_reply_ms,
            t.client.as_ref().map(|c| c.lost_replies),
            t.client.as_ref().map(|c| c.broken_connections),
        );
    }
    anyhow::ensure!(
        report.trials.len() == 10,
        "only {} of 10 trials ran:\n{}",
        report.trials.len(),
        report.render()
    );
    pair_support::check(&report, work)
}
