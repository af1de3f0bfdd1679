//! `remusd`: the per-host remus daemon.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("remusd: the daemon is not implemented yet")
}
