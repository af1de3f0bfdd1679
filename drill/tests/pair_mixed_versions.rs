//! Rolling upgrades (issue 17): a pair of one v0.1.0 `remusd` and one of this workspace
//! protects a real guest, in both role assignments, and survives a kill-primary failover
//! — and hands the VM over by a planned switchover, in both directions — with nothing the
//! client saw lost.
//!
//! v0.1.0 is built from this repository's history, by the commit RELEASES records
//! (`scripts/build-release.sh`, cached under `target/releases/v0.1.0`); a clone without that
//! commit fails here, it does not skip. The witness is this workspace's: an upgraded
//! witness must keep serving a v0.1.0 node (it answers witness version 2 to it), which is
//! the upgrade order `docs/upgrade.md` gives.
//!
//! Per assignment: both daemons start (each checked in `/proc` to run the binary it was
//! given), the VM starts on pri and must be protected to bak (10 acknowledged checkpoints),
//! pri must hold the witness lease, each daemon must answer the other release's
//! `remusctl status`, then the drill's own kill-primary trial runs with all its verdicts: the old primary gone,
//! the failover recorded, activation from a committed checkpoint, disk agreeing with memory,
//! resumed not rebooted, 0 lost replies and no broken connection, never two VMs releasing,
//! and the dead host's daemon (of the same release) rejoining as the survivor's backup, so
//! each assignment also protects in the other direction after the failover.

mod pair_support;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use remus_drill::net::Host;
use remus_drill::pair::config::{Dialect, DOMAIN};
use remus_drill::pair::{HostRelease, PairDrill, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v0_1_0_and_new_protect_a_vm_in_both_assignments() -> Result<()> {
    both_assignments(Scenario::KillPrimary, [0x0170_0001, 0x0170_0002]).await
}

/// `docs/upgrade.md`'s step 3, the gentle way: a planned switchover between the releases,
/// in both directions (v0.1.0 hands the VM to this release, and this release hands it back).
/// The `HANDOFF` record is in both releases' stream format; the drill's switchover trial
/// checks nothing was lost, the VM resumed rather than rebooted, and the old primary
/// became the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_between_v0_1_0_and_new_in_both_directions() -> Result<()> {
    both_assignments(Scenario::Switchover, [0x0170_0011, 0x0170_0012]).await
}

/// Runs one `scenario` trial on a mixed pair, once with v0.1.0 as the primary and once
/// with it as the backup, after the checks every mixed pair must pass.
async fn both_assignments(scenario: Scenario, seeds: [u64; 2]) -> Result<()> {
    let (old, took) = pair_support::release_binaries("v0.1.0")?;
    println!(
        "v0.1.0 binaries ({}) ready in {:.1} s",
        old.remusd
            .parent()
            .map_or_else(String::new, |d| d.display().to_string()),
        took.as_secs_f64()
    );
    let mut lines = Vec::new();
    for (name, old_host, seed) in [
        ("v0.1.0 primary, new backup", Host::Pri, seeds[0]),
        ("new primary, v0.1.0 backup", Host::Bak, seeds[1]),
    ] {
        let work = pair_support::scratch("pair-mixed")?;
        let mut o = pair_support::options(scenario, work.path())?;
        o.seed = Some(seed);
        o.hosts[old_host as usize] = HostRelease {
            remusd: Some(old.remusd.clone()),
            dialect: Dialect::V0_1_0,
        };
        let new_remusd = o
            .binaries
            .as_ref()
            .context("pair options without binaries")?
            .remusd
            .clone();
        // Built beside remusd by the same `cargo test --workspace --no-run`.
        let new_remusctl = new_remusd.with_file_name("remusctl");
        let mut pair = PairDrill::setup(&o, 1)
            .await
            .with_context(|| format!("{name}: setting up the pair"))?;
        for (h, want) in [
            (old_host, old.remusd.as_path()),
            (old_host.other(), new_remusd.as_path()),
        ] {
            let pid = pair
                .daemon_pid(h)
                .with_context(|| format!("{name}: remusd {h} is not running"))?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            ensure!(
                same_file(&exe, want),
                "{name}: remusd {h} runs {} instead of {}",
                exe.display(),
                want.display()
            );
        }
        pair.start_vm().await.with_context(|| {
            format!("{name}: the VM was not protected (10 acknowledged checkpoints)")
        })?;
        // The one witness (this workspace's) granted the primary its lease, whichever
        // release the primary is (witness wire version 2 for v0.1.0, 3 for this one).
        let lease = pair
            .status(Host::Pri)
            .await?
            .domains
            .first()
            .and_then(|d| d.lease.clone());
        ensure!(
            lease.as_deref().is_some_and(|l| l.starts_with("held")),
            "{name}: pri's witness lease while protecting: {lease:?}"
        );
        // Each daemon answers the other release's remusctl (the control protocol of 0.1.0).
        for (h, ctl) in [
            (old_host, new_remusctl.as_path()),
            (old_host.other(), old.remusctl.as_path()),
        ] {
            let sock = pair.files(h).control_socket.clone();
            let out = std::process::Command::new(ctl)
                .args(["status", "--socket"])
                .arg(&sock)
                .output()
                .with_context(|| format!("running {}", ctl.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && text.contains(DOMAIN),
                "{name}: `{} status` against remusd {h} failed ({}):\n{text}{}",
                ctl.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let t = pair.trial(scenario, 1).await;
        let line = format!(
            "{name}: {}; checkpoints acknowledged before the failure {:?} (last acked {:?}), \
             failover {:?} -> {:?}: detection {:?} ms, fencing {:?} ms ({}), activation {:?} ms, \
             failure -> running {:?} ms, -> first reply {:?} ms; lost replies {:?}, broken {:?}; \
             old primary re-protected as backup in {:?} ms",
            if t.passed { "passed" } else { "FAILED" },
            t.protection.as_ref().map(|p| p.checkpoints),
            t.acked_before,
            t.primary_before,
            t.primary_after,
            t.failover.as_ref().map(|f| f.detection_ms),
            t.failover.as_ref().map(|f| f.fencing_ms),
            t.failover.as_ref().map_or("-", |f| f.fence_proof.as_str()),
            t.failover.as_ref().map(|f| f.activation_ms),
            t.failure_to_running_ms,
            t.failure_to_first_reply_ms,
            t.client.as_ref().map(|c| c.lost_replies),
            t.client.as_ref().map(|c| c.broken_connections),
            t.reprotect_ms,
        );
        println!("{line}");
        lines.push(line);
        let mut report = remus_drill::pair::PairReport {
            scenario: Some(scenario),
            seed,
            work_dir: work.path().display().to_string(),
            trials: vec![t],
            ..Default::default()
        };
        report.conclude();
        drop(pair);
        pair_support::check(&report, work).with_context(|| name.to_string())?;
    }
    println!(
        "mixed-version pair, {}:\n  {}",
        scenario.name(),
        lines.join("\n  ")
    );
    Ok(())
}

/// Whether two paths name the same file (the build may be reached through a symlink).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
