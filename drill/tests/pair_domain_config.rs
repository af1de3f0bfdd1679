//! `remusctl domain config` on a protected pair of real daemons (issue: configuration that
//! follows the VM, §1):
//! - on the primary: QEMU's devices (memory, vCPUs, the disk with its NBD medium, the NIC
//!   with its MAC) merged with the stored configuration (image, replica, bridge), no warning;
//! - on the backup (no VM): the stored configuration alone, and it says so;
//! - a stored configuration naming devices QEMU lacks (an add that never reached QEMU, a
//!   device removed behind its back): they are elided, the file is repaired, warnings say so;
//! - a malformed stored file: a clear error naming it, and the file is left as it was;
//! - after a kill-primary failover the new primary answers from the file it wrote at
//!   activation, live from its QEMU, its disk's data in its replica.

mod pair_support;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use remus_agent::api::{DeviceStep, DomainConfigView, Request, Response};
use remus_drill::net::Host;
use remus_drill::pair::config::{DOMAIN, GUEST_MAC};
use remus_drill::pair::{PairDrill, Scenario};

async fn config_of(
    pair: &PairDrill,
    h: Host,
) -> Result<std::result::Result<DomainConfigView, String>> {
    Ok(
        match pair
            .request(
                h,
                &Request::DomainConfig {
                    domain: DOMAIN.into(),
                },
                Duration::from_secs(30),
            )
            .await?
        {
            Response::DomainConfig(v) => Ok(v),
            Response::Error { message } => Err(message),
            other => bail!("domain config answered {other:?}"),
        },
    )
}

fn stored_file(pair: &PairDrill, h: Host) -> std::path::PathBuf {
    pair.files(h).state_dir.join(DOMAIN).join("config.json")
}

fn check_live(v: &DomainConfigView, node: &str, runs_from_replica: bool) -> Result<()> {
    ensure!(v.live && v.node == node, "{v:?}");
    ensure!(v.memory_mib == 128 && v.vcpus == 1, "{v:?}");
    ensure!(v.warnings.is_empty(), "warnings: {:?}", v.warnings);
    ensure!(
        v.disks.len() == 1
            && v.disks[0].id == "d0"
            && v.disks[0].step == DeviceStep::Present
            && v.disks[0]
                .medium
                .as_deref()
                .is_some_and(|m| m.contains("nbd"))
            && v.disks[0].replica.is_some()
            && v.disks[0].backing
                == if runs_from_replica {
                    v.disks[0].replica.clone()
                } else {
                    v.disks[0].image.clone()
                },
        "disks: {:?}",
        v.disks
    );
    ensure!(
        v.nics.len() == 1
            && v.nics[0].id == "net0"
            && v.nics[0].step == DeviceStep::Present
            && v.nics[0].mac.as_deref() == Some(GUEST_MAC)
            && v.nics[0].bridge.is_some(),
        "nics: {:?}",
        v.nics
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_config_merges_qemu_with_the_stored_configuration() -> Result<()> {
    let work = pair_support::scratch("pair-config")?;
    let o = pair_support::options(Scenario::KillPrimary, work.path())?;
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;

    let v = config_of(&pair, Host::Pri)
        .await?
        .map_err(anyhow::Error::msg)?;
    println!("pri: {}", serde_json::to_string(&v)?);
    check_live(&v, "pri", false)?;
    let stored = stored_file(&pair, Host::Pri);
    ensure!(
        v.stored == stored.display().to_string(),
        "{} vs {}",
        v.stored,
        stored.display()
    );

    // The CLI's human form.
    let remusctl = pair_support::binaries()?.remusd.with_file_name("remusctl");
    let out = std::process::Command::new(&remusctl)
        .args(["domain", "config", DOMAIN, "--socket"])
        .arg(&pair.files(Host::Pri).control_socket)
        .output()
        .with_context(|| format!("running {}", remusctl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && text.contains("live from QEMU")
            && text.contains("disk d0")
            && text.contains(&format!("mac {GUEST_MAC}")),
        "remusctl domain config: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The backup runs no VM: the stored configuration alone (here the policy's, no file).
    let b = config_of(&pair, Host::Bak)
        .await?
        .map_err(anyhow::Error::msg)?;
    ensure!(
        !b.live && b.disks.len() == 1 && b.nics.len() == 1,
        "bak: {b:?}"
    );
    ensure!(
        b.warnings
            .iter()
            .any(|w| w.contains("no stored configuration")),
        "bak warnings: {:?}",
        b.warnings
    );

    // Devices QEMU lacks: an add that never reached QEMU, a NIC removed behind its back.
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&stored)?)?;
    t["disks"].as_array_mut().context("disks")?.push(serde_json::json!({
        "id": "ghost", "image": "/nonexistent/ghost.img", "replica": "/nonexistent/ghost.rep", "step": "adding"
    }));
    t["nics"]
        .as_array_mut()
        .context("nics")?
        .push(serde_json::json!({
            "id": "net9", "mac": "52:54:00:99:99:99", "bridge": "nobr"
        }));
    std::fs::write(&stored, serde_json::to_vec_pretty(&t)?)?;
    let v = config_of(&pair, Host::Pri)
        .await?
        .map_err(anyhow::Error::msg)?;
    ensure!(
        v.disks.iter().all(|d| d.id != "ghost") && v.nics.iter().all(|n| n.id != "net9"),
        "elided: {v:?}"
    );
    ensure!(
        v.warnings
            .iter()
            .any(|w| w.contains("disk ghost: its add never reached QEMU"))
            && v.warnings
                .iter()
                .any(|w| w.contains("NIC net9: in the stored configuration but not in QEMU")),
        "warnings: {:?}",
        v.warnings
    );
    let repaired = std::fs::read_to_string(&stored)?;
    ensure!(
        !repaired.contains("ghost") && !repaired.contains("net9"),
        "not repaired: {repaired}"
    );
    // Repaired: the next answer is clean.
    check_live(
        &config_of(&pair, Host::Pri)
            .await?
            .map_err(anyhow::Error::msg)?,
        "pri",
        false,
    )?;

    // A malformed file: an error naming it, the file left as it was.
    let broken = repaired.replacen('{', "{ broken", 1);
    std::fs::write(&stored, &broken)?;
    let e = config_of(&pair, Host::Pri)
        .await?
        .err()
        .context("a malformed stored configuration was accepted")?;
    ensure!(
        e.contains(&stored.display().to_string()) && e.contains("unusable"),
        "{e}"
    );
    ensure!(
        std::fs::read_to_string(&stored)? == broken,
        "the file was changed"
    );
    std::fs::write(&stored, &repaired)?;

    // After a failover, the new primary answers live from the file it wrote at activation.
    let t = pair.trial(Scenario::KillPrimary, 1).await;
    ensure!(
        t.passed,
        "kill-primary failed: {:?}",
        t.verdicts.iter().filter(|v| !v.ok).collect::<Vec<_>>()
    );
    ensure!(
        stored_file(&pair, Host::Bak).exists(),
        "no stored file written at activation"
    );
    let v = config_of(&pair, Host::Bak)
        .await?
        .map_err(anyhow::Error::msg)?;
    println!("bak after failover: {}", serde_json::to_string(&v)?);
    check_live(&v, "bak", true)?;
    Ok(())
}
