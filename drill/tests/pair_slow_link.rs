//! Protection over a slow link: both hosts' uplinks carry 40 Mbit/s with 10 ms of delay
//! (`remus_drill::impair`), so the first checkpoint — the whole guest — takes seconds to
//! reach the backup, longer than the 2 s `ack_timeout`. The primary must wait for it while
//! its bytes still move (`remus_engine::primary::ack_due`) instead of tearing protection
//! down and starting the whole transfer again, as a fixed deadline did: protection is
//! established once, never lost, and checkpoints keep being acknowledged.
//!
//! Reported: the time from `start` to the first acknowledged checkpoints, ACK and
//! output-held percentiles on that link.

mod pair_support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use remus_agent::api::Role;
use remus_drill::impair::Impairment;
use remus_drill::net::Host;
use remus_drill::pair::{PairDrill, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_checkpoint_slower_than_the_ack_timeout_is_waited_for() -> Result<()> {
    let work = pair_support::scratch("pair-slow")?.keep();
    println!("pair-slow work directory: {}", work.display());
    let mut o = pair_support::options(Scenario::KillBackup, &work)?;
    let link = Impairment {
        loss: 0.0,
        delay: Duration::from_millis(10),
        jitter: Duration::ZERO,
        rate_bps: Some(40_000_000),
    };
    o.impair = Some(link);
    o.checkpoints = 10;
    let mut pair = PairDrill::setup(&o, 1).await?;
    let t = Instant::now();
    pair.start_vm().await?;
    let protected_after = t.elapsed();
    // Then a while of steady state on that link.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = pair.status(Host::Pri).await?;
    let impaired = Host::BOTH.map(|h| pair.topology().impair_stats(h));
    drop(pair);
    let d = s.domains.first().context("no domain in pri's status")?;
    let sum = d.protection.as_ref().map(|p| p.summary.clone());
    println!(
        "link {link}: start -> {} acknowledged checkpoints in {protected_after:?}; then {} checkpoints, \
         protection lost {} times; ACK p50/p99 {:?}/{:?} us, output held p50/p99 {:?}/{:?} us; \
         unprotected {} ms in {} window(s); impairers (frames, dropped) {impaired:?}",
        o.checkpoints,
        d.counters.checkpoints,
        d.counters.protection_lost,
        sum.as_ref().map(|s| s.ack_latency.p50_us),
        sum.as_ref().map(|s| s.ack_latency.p99_us),
        sum.as_ref().map(|s| s.output_commit_delay.p50_us),
        sum.as_ref().map(|s| s.output_commit_delay.p99_us),
        d.counters.unprotected_ms,
        d.unprotected.len(),
    );
    ensure!(
        matches!(d.role, Role::Primary { .. }),
        "pri is not protecting: {:?}",
        d.role
    );
    ensure!(
        d.counters.protection_lost == 0,
        "protection was torn down {} time(s) on a slow but working link",
        d.counters.protection_lost
    );
    ensure!(
        d.unprotected.len() == 1,
        "more than the initial unprotected window: {:?}",
        d.unprotected
    );
    ensure!(
        impaired.iter().all(|i| i.is_some_and(|(f, _)| f > 1000)),
        "the links were not impaired: {impaired:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
