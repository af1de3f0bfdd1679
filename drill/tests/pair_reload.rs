//! Policy reload on a protected pair of real daemons (issue: configuration follows the VM):
//! - SIGHUP after raising the primary's checkpoint interval from 200 ms to 1 s: the next
//!   epochs use it (the checkpoint rate falls from about 5/s to about 1/s), the VM is not
//!   restarted (same QEMU pid) and stays protected;
//! - `remusctl reload` (the control request) of a file that changes the VM's memory, and of
//!   a file with a syntax error: each refused naming file and line, nothing changes (the
//!   rate stays at the new interval's);
//! - a domain added by reload appears (stopped), its machine may change while it is
//!   stopped, and it is removed again by the next reload; removing the protected domain is
//!   refused, naming its role.

mod pair_support;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use remus_agent::api::{Request, Response, Role};
use remus_drill::net::Host;
use remus_drill::pair::config::DOMAIN;
use remus_drill::pair::{PairDrill, Scenario};

/// Checkpoints acknowledged by `h` during `window`, per second.
async fn ack_rate(pair: &PairDrill, h: Host, window: Duration) -> Result<f64> {
    let acked = |s: &remus_agent::api::DaemonStatus| {
        s.domains
            .iter()
            .find(|d| d.name == DOMAIN)
            .and_then(|d| d.protection.as_ref()?.last_acked)
    };
    let a = acked(&pair.status(h).await?).context("not protected at the window's start")?;
    tokio::time::sleep(window).await;
    let b = acked(&pair.status(h).await?).context("not protected at the window's end")?;
    Ok((b.saturating_sub(a)) as f64 / window.as_secs_f64())
}

async fn reload(pair: &PairDrill) -> Result<std::result::Result<String, String>> {
    Ok(
        match pair
            .request(Host::Pri, &Request::Reload, Duration::from_secs(60))
            .await?
        {
            Response::Done { message } => Ok(message),
            Response::Error { message } => Err(message),
            Response::Status(_) | Response::Verified(_) => {
                bail!("reload answered with a status or a report")
            }
        },
    )
}

fn domain_names(s: &remus_agent::api::DaemonStatus) -> Vec<String> {
    s.domains.iter().map(|d| d.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_retunes_a_protected_vm_and_refuses_what_cannot_change() -> Result<()> {
    let work = pair_support::scratch("pair-reload")?;
    let o = pair_support::options(Scenario::KillPrimary, work.path())?;
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let vm_pid = |s: &remus_agent::api::DaemonStatus| {
        s.domains
            .iter()
            .find(|d| d.name == DOMAIN)
            .and_then(|d| d.vm)
            .map(|v| v.pid)
    };
    let pid_before = vm_pid(&pair.status(Host::Pri).await?).context("no VM on pri")?;
    let before = ack_rate(&pair, Host::Pri, Duration::from_secs(4)).await?;
    println!("ACK rate at 200 ms: {before:.2}/s");

    // SIGHUP with a 1 s interval.
    let config = pair.files(Host::Pri).config.clone();
    let original = std::fs::read_to_string(&config)?;
    ensure!(
        original.contains("checkpoint_interval_ms = 200"),
        "{original}"
    );
    let slow = original.replacen(
        "checkpoint_interval_ms = 200",
        "checkpoint_interval_ms = 1000",
        1,
    );
    std::fs::write(&config, &slow)?;
    let pid = pair
        .daemon_pid(Host::Pri)
        .context("pri's remusd is not running")?;
    // SAFETY: kill(2) with a pid of a child this test started and a valid signal number.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    ensure!(
        rc == 0,
        "kill -HUP {pid}: {}",
        std::io::Error::last_os_error()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ack_rate(&pair, Host::Pri, Duration::from_secs(6)).await?;
    println!("ACK rate after SIGHUP to 1000 ms: {after:.2}/s");
    ensure!(
        before >= 2.5 && after <= 1.5 && after > 0.0,
        "ACK rate {before:.2}/s at 200 ms, {after:.2}/s after the reload to 1 s"
    );
    let s = pair.status(Host::Pri).await?;
    ensure!(
        vm_pid(&s) == Some(pid_before),
        "the VM was restarted: {:?}",
        vm_pid(&s)
    );

    // A change that cannot be applied live: refused with file:line, nothing changes.
    let bigger = slow.replacen("memory_mib = ", "memory_mib = 1", 1);
    std::fs::write(&config, &bigger)?;
    let line = bigger
        .lines()
        .position(|l| l.starts_with("[domain.qemu]"))
        .context("no [domain.qemu]")?
        + 1;
    let refused = reload(&pair).await?;
    let msg = refused.err().context("a memory change was accepted")?;
    println!("refused: {msg}");
    ensure!(
        msg.contains(&format!("{}:{line}:", config.display()))
            && msg.contains("domain `drill`: qemu: not applied: changed while the domain is primary on this node"),
        "{msg}"
    );
    // A syntax error: refused with its line.
    std::fs::write(&config, slow.replacen("[peer]", "[peer", 1))?;
    let msg = reload(&pair)
        .await?
        .err()
        .context("a broken file was accepted")?;
    ensure!(
        msg.contains(&config.display().to_string()) && msg.contains("syntax"),
        "{msg}"
    );
    // Removing the protected domain: refused, naming its role.
    let without: String = slow[..slow.find("[[domain]]").context("no [[domain]]")?].to_string();
    std::fs::write(&config, &without)?;
    let msg = reload(&pair)
        .await?
        .err()
        .context("removing a running domain was accepted")?;
    ensure!(
        msg.contains(
            "domain `drill`: not applied: removed from the policy while it is primary on this node"
        ),
        "{msg}"
    );
    let still = ack_rate(&pair, Host::Pri, Duration::from_secs(4)).await?;
    ensure!(
        still <= 1.5 && still > 0.0,
        "ACK rate after refused reloads: {still:.2}/s"
    );

    // A domain added (stopped here), then removed.
    let extra = slow.clone()
        + &format!(
            "\n[[domain]]\nname = \"extra\"\n\n[domain.qemu]\nmemory_mib = 64\nkernel = \"{}\"\n\n[domain.fencing]\nmode = \"witness\"\n",
            o.kernel.display()
        );
    std::fs::write(&config, &extra)?;
    let done = reload(&pair)
        .await?
        .map_err(|e| anyhow::anyhow!("adding a domain: {e}"))?;
    ensure!(done.contains("added extra"), "{done}");
    let s = pair.status(Host::Pri).await?;
    let added = s.domains.iter().find(|d| d.name == "extra");
    ensure!(
        added.is_some_and(|d| d.role == Role::Stopped),
        "domains after adding: {:?}",
        domain_names(&s)
    );
    // Stopped here, its machine may change.
    std::fs::write(
        &config,
        extra.replacen("memory_mib = 64", "memory_mib = 96", 1),
    )?;
    let done = reload(&pair)
        .await?
        .map_err(|e| anyhow::anyhow!("reconfiguring a stopped domain: {e}"))?;
    ensure!(done.contains("reconfigured extra (stopped here)"), "{done}");
    std::fs::write(&config, &slow)?;
    let done = reload(&pair)
        .await?
        .map_err(|e| anyhow::anyhow!("removing a domain: {e}"))?;
    ensure!(done.contains("removed extra"), "{done}");
    let s = pair.status(Host::Pri).await?;
    ensure!(
        domain_names(&s) == [DOMAIN],
        "domains after removing: {:?}",
        domain_names(&s)
    );
    ensure!(vm_pid(&s) == Some(pid_before), "the VM was restarted");
    Ok(())
}
