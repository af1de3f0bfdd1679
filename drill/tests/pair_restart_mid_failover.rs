//! The pair drill, restart-mid-failover: the backup's daemon is held (`REMUSD_TEST_HOLD=
//! activated:3000`) right after it persisted `activated` and before `cont`, and SIGKILLed
//! there during a real failover. Restarted without the hold it must not resume the
//! checkpoint a second time: no QEMU, role `stopped`, and its role file's history holds
//! exactly one `resuming` transition.

mod pair_support;

use anyhow::Result;
use remus_drill::pair::{run_pair, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_while_activated_never_resumes_twice() -> Result<()> {
    let work = pair_support::scratch("pair-rmf")?;
    let mut o = pair_support::options(Scenario::RestartMidFailover, work.path())?;
    o.seed = Some(0x5eed_0004);
    let report = run_pair(&o).await?;
    pair_support::check(&report, work)
}
