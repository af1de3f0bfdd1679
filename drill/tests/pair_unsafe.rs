//! The pair drill can fail: with output buffering switched off in both daemons
//! (`unsafe_no_output_buffering`), killing the primary must show the client state the
//! failover lost. Replies sent after the last committed checkpoint reach the client at once,
//! and the backup resumes from before them, so the drill reports lost replies (and usually a
//! connection that hangs for good) and marks the trial failed.
//!
//! Whether a given kill leaves anything uncommitted depends on where in the epoch it falls
//! and on the client's timing, so up to five trials run and one of them must show lost
//! state; every trial that shows it must also be judged failed by the drill.

mod pair_support;

use anyhow::{ensure, Result};
use remus_drill::pair::{PairDrill, PairReport, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_output_buffering_the_pair_drill_reports_lost_state() -> Result<()> {
    let work = pair_support::scratch("pair-unsafe")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.seed = Some(0x5eed_0005);
    o.unsafe_no_output_buffering = true;
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let mut report = PairReport {
        scenario: Some(Scenario::KillPrimary),
        seed: 0x5eed_0005,
        unsafe_no_output_buffering: true,
        work_dir: work.path().display().to_string(),
        ..PairReport::default()
    };
    for i in 1..=5 {
        let t = pair.trial(Scenario::KillPrimary, i).await;
        let lost = t.client.as_ref().map_or(0, |c| c.lost_replies);
        let completed = t
            .verdicts
            .iter()
            .any(|v| v.name == "trial_completed" && v.ok);
        println!(
            "unsafe trial {i}: lost {lost}, broken {:?}, passed {}",
            t.client.as_ref().map(|c| c.broken_connections),
            t.passed
        );
        report.trials.push(t);
        if lost > 0 || !completed {
            break;
        }
    }
    drop(pair);
    report.conclude();
    let text = report.render();
    println!("{text}");
    ensure!(
        text.contains("UNSAFE: output buffering was off"),
        "the report does not say it ran unsafe:\n{text}"
    );
    let showing: Vec<_> = report
        .trials
        .iter()
        .filter(|t| t.client.as_ref().is_some_and(|c| c.lost_replies > 0))
        .collect();
    ensure!(
        !showing.is_empty(),
        "no trial showed lost state with output buffering off:\n{text}"
    );
    for t in showing {
        let kept = t.verdicts.iter().find(|v| v.name == "clients_kept");
        ensure!(
            kept.is_some_and(|v| !v.ok) && !t.passed,
            "trial {} lost replies but the drill did not fail it:\n{text}",
            t.trial
        );
    }
    ensure!(!report.passed, "an unsafe drill that lost state passed");
    Ok(())
}
