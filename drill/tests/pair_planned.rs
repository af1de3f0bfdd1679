//! The pair drill's operations and the backup's loss, chained on one pair of real daemons:
//! - switchover: lossless handover (no lost reply, no broken connection), the VM on the
//!   other node, the old primary its backup;
//! - test-activate on the backup: the request succeeds and the primary's protection never
//!   stops (acknowledgements keep growing in every sample), the client unaffected;
//! - kill-backup: the primary keeps answering the client (output released after
//!   detection); the restarted backup is re-protected with a dirty-region disk resync far
//!   smaller than the disk, and acknowledgements flow again;
//! - isolate-backup: the backup's host cut off: the primary declares it lost by heartbeats,
//!   ends protection at once (not after the ACK timeout), renews its lease exclusive and
//!   keeps answering; the isolated backup never runs the VM; healed, it is re-protected.

mod pair_support;

use anyhow::Result;
use remus_drill::pair::{PairDrill, PairReport, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_test_activate_and_kill_backup() -> Result<()> {
    let work = pair_support::scratch("pair-ops")?;
    let mut o = pair_support::options(Scenario::Switchover, work.path())?;
    o.seed = Some(0x5eed_0003);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let mut report = PairReport {
        seed: 0x5eed_0003,
        work_dir: work.path().display().to_string(),
        ..PairReport::default()
    };
    for (i, s) in [
        Scenario::Switchover,
        Scenario::TestActivate,
        Scenario::KillBackup,
        Scenario::IsolateBackup,
    ]
    .into_iter()
    .enumerate()
    {
        let t = pair.trial(s, i as u32 + 1).await;
        println!(
            "{}: passed {}; failure/request -> running {:?} ms, -> first reply {:?} ms; client {:?}; resync {:?}; re-protected in {:?} ms",
            s.name(),
            t.passed,
            t.failure_to_running_ms,
            t.failure_to_first_reply_ms,
            t.client.as_ref().map(|c| (c.lost_replies, c.broken_connections, c.client_stall_ms)),
            t.resync,
            t.reprotect_ms
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
    drop(pair);
    report.conclude();
    anyhow::ensure!(
        report.trials.len() == 4,
        "only {} of 4 scenarios ran:\n{}",
        report.trials.len(),
        report.render()
    );
    pair_support::check(&report, work)
}
