//! The pair drill, double failure: the primary fails, the backup takes over and the guest
//! moves on, then the new primary fails too. The old primary's daemon restarts alone, and
//! `remusctl start` there must be refused on the witness's record of the newer copy. Then
//! the other daemon restarts, both with the VM stopped. The nodes' copy stamps (advertised
//! in the heartbeats) must show the takeover node's copy as the newer; `start` on the old
//! primary must be refused, naming the other node, and must start nothing; on the other
//! node it must start the guest from its disks with every value the client saw before the
//! second failure still there (the counter continues above the last value seen, not from
//! the old primary's older copy).

mod pair_support;

use anyhow::Result;
use remus_drill::pair::{run_pair, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_double_failure_start_refuses_the_older_copy() -> Result<()> {
    let work = pair_support::scratch("pair-double")?;
    let mut o = pair_support::options(Scenario::DoubleFailure, work.path())?;
    o.seed = Some(0x5eed_0005);
    let report = run_pair(&o).await?;
    pair_support::check(&report, work)
}
