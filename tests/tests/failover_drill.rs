//! The local failover drill, end to end: a real QEMU (TCG) guest protected for ≥ 30
//! checkpoints, its QEMU killed at a random point of the epoch cycle, the backup activated
//! from its replica.
//!
//! Everything is real: QEMU from Debian, the guest built by `tests/images/build-guest.sh`,
//! its disk served over NBD by blk-remus and replicated per epoch, checkpoints over the
//! encrypted peer channel on loopback, the replica applied by the engine's backup. The drill
//! (`remus_agent::drill`) computes its verdicts from the guest's console and the replica
//! disk; this test checks them and the figures they come from.

use std::time::Duration;

use anyhow::{ensure, Result};
use remus_agent::drill::{run_local, DrillOptions};
use remus_tests::guest::ensure_guest_image;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_continues_from_the_last_committed_checkpoint() -> Result<()> {
    let image = ensure_guest_image()?;
    let work = tempfile::Builder::new()
        .prefix("remus-drill-test-")
        .tempdir_in("/dev/shm")?;
    let report = run_local(&DrillOptions {
        kernel: image.kernel,
        initrd: image.initrd,
        work_dir: work.path().to_path_buf(),
        checkpoints: 31,
        interval: Duration::from_millis(200),
        memory_mib: 128,
        accel: "tcg".into(),
        seed: None,
    })
    .await?;
    println!("{}", report.render());
    ensure!(
        report.checkpoints >= 31,
        "only {} checkpoints",
        report.checkpoints
    );
    ensure!(
        report.activated_epoch >= 31,
        "activated checkpoint {}",
        report.activated_epoch
    );
    // Memory and disk from the same committed checkpoint: the guest logs each increment to
    // disk before setting it in memory, so it resumes at the committed record or one more.
    ensure!(
        report.resumed_at == report.committed_disk_counter
            || report.resumed_at == report.committed_disk_counter + 1,
        "resumed at {} with {} committed on disk",
        report.resumed_at,
        report.committed_disk_counter
    );
    ensure!(
        report.resumed_at > 31,
        "the guest started over ({})",
        report.resumed_at
    );
    ensure!(
        report.primary_reached + 1 >= report.resumed_at,
        "resumed beyond anything the primary ever reached"
    );
    ensure!(report.continuity && report.resumed_not_rebooted && report.disk_agrees_with_memory);
    ensure!(report.passed);
    Ok(())
}
