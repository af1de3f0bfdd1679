//! Online disk verify on a real pair (`remusctl verify`'s control request to the primary's
//! `remusd`, two daemons, the test guest writing its disk log under QEMU):
//! - a healthy protected pair verifies with zero differing regions;
//! - garbage written by hand into the backup's replica image, far from the guest's disk log
//!   at the start of the disk (the backup rewrites only what the guest writes), is reported
//!   as exactly the one region that holds it;
//! - `verify --resync` re-copies that region, and the next verify reports zero;
//! - verify asked of the backup is refused with a reason.
//!
//! Figures (bytes hashed, time, rate, the disk read floor of the same run, pause added) are
//! printed.

mod pair_support;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use remus_agent::api::{Request, Response, VerifyReport};
use remus_drill::net::Host;
use remus_drill::pair::{PairDrill, Scenario};

const DOMAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Where the garbage goes: 40 MiB + 12345 into the 64 MiB disk (the guest's log is a ring
/// of 512-byte slots at its start).
const CORRUPT_AT: u64 = (40 << 20) + 12345;

async fn verify(pair: &PairDrill, h: Host, resync: bool) -> Result<Box<VerifyReport>> {
    let domain = remus_drill::pair::config::DOMAIN.to_string();
    match pair
        .request(h, &Request::Verify { domain, resync }, DOMAIN_TIMEOUT)
        .await?
    {
        Response::Verified(r) => {
            print!("{}", remus_agent::cli::daemon_cmd::render_verify(&r));
            Ok(r)
        }
        other => bail!("verify answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_corrupted_replica_region_and_resync_repairs_it() -> Result<()> {
    let work = pair_support::scratch("pair-verify")?;
    let mut o = pair_support::options(Scenario::Switchover, work.path())?;
    o.seed = Some(0x5eed_0014);
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    pair.wait_protected(Host::Pri, 5, Duration::from_secs(120))
        .await?;

    // The backup refuses: it holds the replica.
    let domain = remus_drill::pair::config::DOMAIN.to_string();
    match pair
        .request(
            Host::Bak,
            &Request::Verify {
                domain: domain.clone(),
                resync: false,
            },
            Duration::from_secs(10),
        )
        .await?
    {
        Response::Error { message } => {
            println!("asked of the backup: {message}");
            ensure!(message.contains("asked of the primary"), "{message}");
        }
        other => bail!("the backup answered a verify with {other:?}"),
    }

    let healthy = verify(&pair, Host::Pri, false).await?;
    ensure!(
        healthy.clean() && healthy.regions_checked == healthy.regions_total,
        "a healthy pair must verify clean: {healthy:?}"
    );

    // Garbage into the replica, by hand, while protected.
    let replica = pair.files(Host::Bak).replica.clone();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&replica)
            .with_context(|| format!("opening {}", replica.display()))?;
        f.seek(SeekFrom::Start(CORRUPT_AT))?;
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8 | 1).collect();
        f.write_all(&garbage)?;
        f.sync_all()?;
    }
    let region_start = CORRUPT_AT & !((1 << 20) - 1);
    let found = verify(&pair, Host::Pri, false).await?;
    ensure!(
        found.differing_count == 1
            && found.differing[0].offset == region_start
            && found.differing[0].length == 1 << 20,
        "verify must report exactly the corrupted region {region_start}..+1MiB: {found:?}"
    );
    ensure!(found.resynced.is_none());

    let repaired = verify(&pair, Host::Pri, true).await?;
    ensure!(
        repaired.differing_count == 1 && repaired.resynced.is_some_and(|s| s.regions == 1),
        "verify --resync must find and re-copy the region: {repaired:?}"
    );
    let after = verify(&pair, Host::Pri, false).await?;
    ensure!(
        after.clean(),
        "after the resync the replica must verify clean: {after:?}"
    );

    let st = pair.status(Host::Pri).await?;
    let d = st
        .domains
        .iter()
        .find(|d| d.name == domain)
        .context("domain in status")?;
    println!(
        "status: verify {:?}; counters runs {} differing {}",
        d.verify, d.counters.verify_runs, d.counters.verify_differing_regions
    );
    ensure!(d.counters.verify_runs >= 4 && d.counters.verify_differing_regions >= 2);
    let pause = pair
        .status(Host::Pri)
        .await?
        .domains
        .iter()
        .find_map(|d| d.protection.as_ref().map(|p| p.summary.clone()));
    println!("epoch summary at the end: {pause:?}");
    drop(pair);
    drop(work);
    Ok(())
}
