//! Per-node keys (`auth.mode = "keys"`) on a pair of real daemons and a real witness:
//! - kill-primary twice: the replication channel (Noise XX), the heartbeats (per-direction
//!   keys from the nodes' X25519 secret) and the witness protocol (a key per node) carry a
//!   failover and a rejoin with nothing lost;
//! - a rotation of the primary's key by reload, in the documented order (bak pins the new
//!   key beside the old, pri switches to it, bak drops the old pin): the VM keeps running
//!   (same QEMU), stays protected, and no failover happens. Then bak's daemon is restarted,
//!   so the next session's handshake must prove pri's *new* key against bak's one pin: it
//!   re-protects. A rotation that broke the heartbeats would make bak take over within
//!   the heartbeat timeout, which the test sees as a role change.

mod pair_support;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use remus_agent::api::{DaemonStatus, Request, Response, Role};
use remus_drill::net::Host;
use remus_drill::pair::config::{key_path, DOMAIN};
use remus_drill::pair::{run_pair, PairDrill, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_with_per_node_keys() -> Result<()> {
    let work = pair_support::scratch("pair-keys-kp")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.per_node_keys = true;
    o.trials = 2;
    o.seed = Some(0x5eed_0c01);
    let report = run_pair(&o).await?;
    println!("{}", report.render());
    ensure!(report.trials.len() == 2, "{}", report.render());
    pair_support::check(&report, work)
}

async fn reload(pair: &PairDrill, h: Host) -> Result<String> {
    match pair
        .request(h, &Request::Reload, Duration::from_secs(60))
        .await?
    {
        Response::Done { message } => Ok(message),
        Response::Error { message } => bail!("reload on {h:?} refused: {message}"),
        other => bail!("reload answered {other:?}"),
    }
}

/// (role, VM pid, last acknowledged checkpoint) of the drill's domain on `h`.
fn domain_of(s: &DaemonStatus) -> Result<(Role, Option<u32>, Option<u64>)> {
    let d = s
        .domains
        .iter()
        .find(|d| d.name == DOMAIN)
        .context("no drill domain")?;
    Ok((
        d.role.clone(),
        d.vm.as_ref().map(|v| v.pid),
        d.protection.as_ref().and_then(|p| p.last_acked),
    ))
}

/// Waits `window` and checks pri is still primary with the same VM, acknowledged
/// checkpoints advanced, and bak is still its backup.
async fn still_protected(pair: &PairDrill, pid: u32, window: Duration, step: &str) -> Result<()> {
    let (_, _, before) = domain_of(&pair.status(Host::Pri).await?)?;
    tokio::time::sleep(window).await;
    let (role, now_pid, after) = domain_of(&pair.status(Host::Pri).await?)?;
    let (bak_role, _, _) = domain_of(&pair.status(Host::Bak).await?)?;
    ensure!(
        matches!(role, Role::Primary { .. }) && matches!(bak_role, Role::Backup { .. }),
        "{step}: roles pri {role:?}, bak {bak_role:?}\n{}",
        pair.logs_text()
    );
    ensure!(now_pid == Some(pid), "{step}: the VM changed: {now_pid:?}");
    ensure!(
        after > before,
        "{step}: no checkpoint acknowledged in {window:?} ({before:?} -> {after:?})\n{}",
        pair.logs_text()
    );
    println!("{step}: protected, acked {before:?} -> {after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_primarys_key_by_reload_keeps_the_vm_protected() -> Result<()> {
    let work = pair_support::scratch("pair-keys-rot")?;
    let mut o = pair_support::options(Scenario::KillPrimary, work.path())?;
    o.per_node_keys = true;
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let (_, pid, _) = domain_of(&pair.status(Host::Pri).await?)?;
    let pid = pid.context("no VM on pri")?;
    let window = Duration::from_secs(3);
    still_protected(&pair, pid, window, "before the rotation").await?;

    let pri_conf = pair.files(Host::Pri).config.clone();
    let bak_conf = pair.files(Host::Bak).config.clone();
    let pri_text = std::fs::read_to_string(&pri_conf)?;
    let bak_text = std::fs::read_to_string(&bak_conf)?;
    let old_pin = bak_text
        .lines()
        .find(|l| l.starts_with("public_keys = "))
        .context("bak pins no key")?
        .to_string();
    let old_pub = old_pin
        .trim_start_matches("public_keys = [\"")
        .trim_end_matches("\"]")
        .to_string();
    let new_pub = remus_agent::keys::load_node_key(&key_path(&pair.dir, "pri.next"))?
        .public()
        .to_string();
    ensure!(old_pub != new_pub && old_pub.len() == 44, "{old_pin}");

    // 1. bak pins pri's new key beside the old one.
    std::fs::write(
        &bak_conf,
        bak_text.replacen(
            &old_pin,
            &format!("public_keys = [\"{old_pub}\", \"{new_pub}\"]"),
            1,
        ),
    )?;
    let m = reload(&pair, Host::Bak).await?;
    ensure!(m.contains("keys reloaded"), "{m}");
    still_protected(&pair, pid, window, "bak pins both keys").await?;

    // 2. pri switches to its new key.
    let old_file = key_path(&pair.dir, Host::Pri.name());
    let new_file = key_path(&pair.dir, "pri.next");
    std::fs::write(
        &pri_conf,
        pri_text.replacen(
            &old_file.display().to_string(),
            &new_file.display().to_string(),
            1,
        ),
    )?;
    let m = reload(&pair, Host::Pri).await?;
    ensure!(m.contains("keys reloaded"), "{m}");
    still_protected(&pair, pid, window, "pri uses its new key").await?;

    // 3. bak drops the old pin: only pri's new key opens bak's channels now.
    std::fs::write(
        &bak_conf,
        bak_text.replacen(&old_pin, &format!("public_keys = [\"{new_pub}\"]"), 1),
    )?;
    let m = reload(&pair, Host::Bak).await?;
    ensure!(m.contains("keys reloaded"), "{m}");
    still_protected(&pair, pid, window, "bak pins the new key only").await?;

    // 4. A new session: bak's daemon restarts, pri must re-protect through a handshake
    //    that proves its new key.
    pair.kill_daemon(Host::Bak)?;
    pair.start_daemon(Host::Bak, None).await?;
    pair.wait_protected(Host::Pri, 3, Duration::from_secs(240))
        .await
        .context("re-protection after bak's restart, with pri's new key")?;
    still_protected(&pair, pid, window, "re-protected after bak's restart").await?;

    // A key file others can read is refused by a reload, naming it; nothing changes.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o644))?;
    std::fs::write(&pri_conf, std::fs::read_to_string(&pri_conf)? + "\n")?;
    let refused = pair
        .request(Host::Pri, &Request::Reload, Duration::from_secs(60))
        .await?;
    std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o600))?;
    match refused {
        Response::Error { message } => ensure!(
            message.contains(&new_file.display().to_string()),
            "{message}"
        ),
        other => bail!("a reload with an exposed key file was accepted: {other:?}"),
    }
    still_protected(&pair, pid, window, "after the refused reload").await?;
    Ok(())
}
