//! A cold start boots the node's newest copy of the disks: a real QEMU (TCG) guest whose
//! counter, on a fresh boot, continues from the last record of the log on its disk.
//!
//! The image's log is empty and the replica's ends at 500, so the first counter value the
//! guest prints says which file it booted: 1 from the image, 501 from the replica. A replica
//! whose resync was interrupted is not a whole disk, and starting from it is refused with a
//! message that names the disk.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use remus_agent::config::Config;
use remus_agent::domain::disk_copy::DiskCopy;
use remus_agent::domain::primary::RunningVm;
use remus_agent::domain::DomainPaths;
use remus_agent::iproute::{ip, ip_in};
use remus_drill::guest::{self, GuestMachine};
use remus_drill::image::ensure_guest_image;
use remus_guest::disklog::{DiskLog, Record};
use sch_plug::Netns;

const DISK_BYTES: u64 = 64 << 20;
const LOG_SLOTS: u64 = 8192;

/// A network namespace with the guest NIC's bridge, deleted on drop.
struct Ns(String);

impl Ns {
    fn create() -> Result<Self> {
        let ns = Ns(format!("remus-start-{}", std::process::id()));
        let _ = ip(&["netns", "del", &ns.0]);
        ip(&["netns", "add", &ns.0])?;
        ip_in(&ns.0, &["link", "add", "vmbr", "type", "bridge"])?;
        ip_in(&ns.0, &["link", "set", "vmbr", "up"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn policy(dir: &Path, kernel: &Path, initrd: &Path) -> String {
    let machine = GuestMachine {
        accel: "tcg",
        memory_mib: 128,
        kernel,
        initrd,
        guest_cidr: "10.79.0.10/24",
        mac: "52:54:00:79:00:10",
        bridge: "vmbr",
        image: &dir.join("image.img"),
        replica: &dir.join("replica.img"),
        unsafe_no_output_buffering: false,
    }
    .domain_tables();
    format!(
        r#"
[node]
name = "a"
listen = "127.0.0.1:7790"
run_dir = "{run}"
state_dir = "{state}"

[peer]
name = "b"
address = "127.0.0.1:7791"

[[peer.link]]
local = "127.0.0.1:7792"
remote = "127.0.0.2:7792"

[auth]
mode = "psk"
psk_file = "{psk}"

[[domain]]
name = "vm"

{machine}
[domain.fencing]
mode = "none"
"#,
        run = dir.join("run").display(),
        state = dir.join("state").display(),
        psk = dir.join("psk").display(),
    )
}

/// Boots `copy` and returns the first counter value the guest printed.
async fn first_counter(
    domain: &remus_agent::config::DomainConfig,
    paths: &DomainPaths,
    ns: &Ns,
    copy: DiskCopy,
) -> Result<u64> {
    let _ = std::fs::remove_file(paths.console());
    let mut vm = RunningVm::start(domain, paths.clone(), &Netns::named(&ns.0), copy).await?;
    let seen = guest::wait_for(
        &paths.console(),
        Duration::from_secs(120),
        "the guest's first counter line",
        |t| t.contains("counter="),
    )
    .await;
    let counters = guest::counters(&paths.console());
    let _ = vm.qemu.kill_and_wait().await;
    seen?;
    counters.first().copied().context("no counter value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_boots_the_newest_copy_of_the_disks() -> Result<()> {
    let image = ensure_guest_image()?;
    let work = tempfile::Builder::new()
        .prefix("remus-start-")
        .tempdir_in("/dev/shm")?;
    let dir = work.path();
    std::fs::write(dir.join("psk"), [7u8; 48])?;
    std::fs::set_permissions(
        dir.join("psk"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    for f in ["image.img", "replica.img"] {
        std::fs::File::create(dir.join(f))?.set_len(DISK_BYTES)?;
    }
    let log = DiskLog::open(dir.join("replica.img").to_str().unwrap(), LOG_SLOTS)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    log.append(Record { seq: 9, value: 500 })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(log);
    let cfg = Config::from_str(&policy(dir, &image.kernel, &image.initrd), "test policy")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let domain = cfg.domains[0].clone();
    let paths = DomainPaths::new(&dir.join("run"), &dir.join("state"), "vm");
    let ns = Ns::create()?;

    let from_replica = first_counter(&domain, &paths, &ns, DiskCopy::Replica).await?;
    ensure!(
        from_replica == 501,
        "booted from the replica, the counter started at {from_replica}, not 501"
    );
    let from_image = first_counter(&domain, &paths, &ns, DiskCopy::Image).await?;
    ensure!(
        from_image == 1,
        "booted from the image, the counter started at {from_image}, not 1"
    );

    // A resync that never finished leaves the replica marked inconsistent: refused.
    let store = blk_remus::BackupStore::open(blk_remus::BackupConfig::new(
        paths.disk_state("d0"),
        dir.join("replica.img"),
    ))?;
    store.begin_session()?;
    drop(store);
    let err = match RunningVm::start(
        &domain,
        paths.clone(),
        &Netns::named(&ns.0),
        DiskCopy::Replica,
    )
    .await
    {
        Ok(mut vm) => {
            let _ = vm.qemu.kill_and_wait().await;
            anyhow::bail!("a replica mid-resync was booted");
        }
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("domain vm: disk d0 (replica)") && err.contains("not a whole disk"),
        "{err}"
    );
    Ok(())
}
