//! A real QEMU (TCG) guest protected for ≥ 30 checkpoints, then its primary killed and the
//! backup activated from the replica: the guest continues from the last committed counter,
//! and its disk agrees with its memory.
//!
//! Everything is real: QEMU from Debian, the guest built by `tests/images/build-guest.sh`,
//! its disk served over NBD by blk-remus and replicated per epoch, checkpoints over the
//! encrypted peer channel on loopback, the replica applied by the engine's backup.
//!
//! The guest's ticker increments a counter every 50 ms, appending each value to a log on its
//! disk *before* setting it in memory, and prints `counter=<n>`. At any checkpoint the
//! disk's last record `d` is the memory value `m` or `m + 1`, so after activation the first
//! value printed must be `d` or `d + 1` where `d` is read from the *replica* disk: that proves
//! memory and disk came from the same committed checkpoint, that the guest did not restart
//! (it would count from `d`… but print `d + 1` only by luck — the console also shows no boot),
//! and that nothing past the commit survived.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use remus_agent::config::Config;
use remus_agent::domain::backup::ReplicaDomain;
use remus_agent::domain::primary::{protect, ProtectOptions, RunningVm};
use remus_agent::domain::DomainPaths;
use remus_engine::peer::PreSharedKey;
use remus_engine::session::{accept_backup, Identity};
use remus_tests::console::{checks, counters, wait_for};
use remus_tests::guest::{disk_log_last, ensure_guest_image};
use sch_plug::Netns;
use tokio::net::TcpListener;

const DISK_BYTES: u64 = 64 << 20;
const LOG_SLOTS: u64 = 8192;

fn policy(dir: &Path, kernel: &Path, initrd: &Path, port: u16) -> String {
    format!(
        r#"
[node]
name = "pri"
listen = "127.0.0.1:{port}"
run_dir = "{run}"
state_dir = "{state}"

[peer]
name = "bak"
address = "127.0.0.1:{port}"

[[peer.link]]
local = "127.0.0.1:{hb}"
remote = "127.0.0.2:{hb}"

[auth]
mode = "psk"
psk_file = "{psk}"

[[domain]]
name = "e2e"
checkpoint_interval_ms = 200

[domain.qemu]
accel = "tcg"
machine = "pc"
memory_mib = 128
vcpus = 1
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet panic=-1 remus.mode=ticker remus.interval=50 remus.check_every=5"

[[domain.disk]]
id = "d0"
image = "{disk}"
replica = "{replica}"

[domain.fencing]
mode = "none"
"#,
        run = dir.join("run").display(),
        state = dir.join("state").display(),
        psk = dir.join("psk").display(),
        hb = port + 1,
        kernel = kernel.display(),
        initrd = initrd.display(),
        disk = dir.join("primary.img").display(),
        replica = dir.join("replica.img").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_guest_activates_from_the_last_committed_checkpoint() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let image = ensure_guest_image()?;
    // Guest RAM and the replica RAM live in tmpfs, as on a real host.
    let shm = tempfile::Builder::new()
        .prefix("remus-e2e-")
        .tempdir_in("/dev/shm")?;
    let dir = shm.path();
    std::fs::write(dir.join("psk"), [7u8; 48])?;
    for f in ["primary.img", "replica.img"] {
        std::fs::File::create(dir.join(f))?.set_len(DISK_BYTES)?;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let cfg = Config::from_str(
        &policy(dir, &image.kernel, &image.initrd, port),
        "e2e policy",
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let domain = cfg.domains[0].clone();
    let psk = PreSharedKey::from_bytes(&[7u8; 48]).expect("48-byte key");

    // The backup: its own directories, receiving into a replica until the session breaks.
    let bak_paths = DomainPaths::new(&dir.join("bak/run"), &dir.join("bak/state"), "e2e");
    let mut replica = ReplicaDomain::open(&domain, bak_paths.clone())?;
    let psk_b = psk.clone();
    let backup = tokio::spawn(async move {
        let (sock, _) = listener.accept().await?;
        let session =
            accept_backup(sock, &psk_b, "bak", "pri", None, Duration::from_secs(10)).await?;
        let exit = replica.receive(session, None).await;
        anyhow::Ok((replica, exit))
    });

    // The primary: boot the guest, then protect it.
    let pri_paths = DomainPaths::new(&dir.join("pri/run"), &dir.join("pri/state"), "e2e");
    let mut vm = RunningVm::start(&domain, pri_paths.clone(), &Netns::current()).await?;
    wait_for(
        &pri_paths.console(),
        Duration::from_secs(60),
        "guest ticking",
        |t| t.contains("counter="),
    )
    .await?;
    let opts = ProtectOptions {
        peer_addr: format!("127.0.0.1:{port}"),
        psk,
        identity: Identity {
            node: "pri".into(),
            peer_node: "bak".into(),
            domain: "e2e".into(),
        },
        ack_timeout: Duration::from_secs(5),
    };
    let protection = protect(&vm, &opts).await?;
    let mut status = protection.handle.status.clone();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if status.borrow().last_acked.is_some_and(|k| k >= 31) {
                break;
            }
            status.changed().await.expect("primary loop alive");
        }
    })
    .await
    .context("31 acknowledged checkpoints within 120 s")?;
    let s = status.borrow().clone();
    println!(
        "protected: last acked {:?}, pause p50 {} us p99 {} us, held p50 {} us, pre-copy pages {:?}",
        s.last_acked,
        s.summary.pause.p50_us,
        s.summary.pause.p99_us,
        s.summary.output_commit_delay.p50_us,
        s.precopy_pages
    );

    // The primary host dies: QEMU killed outright at a random point of the epoch cycle, so
    // the guest usually ran past the last committed checkpoint.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let delay = Duration::from_millis(60 + u64::from(nanos % 200));
    tokio::time::sleep(delay).await;
    vm.qemu.kill()?;
    println!("primary QEMU killed {delay:?} after checkpoint 31 was acknowledged");
    let exit = protection.task.await?;
    println!("primary loop ended: {exit:?}");
    let primary_counters = counters(&pri_paths.console());
    let (replica, session_end) = backup.await??;
    println!("backup session ended: {session_end:?}");
    let committed = match replica.replica().state() {
        remus_engine::replica::ReplicaState::Committed(k) => k,
        other => anyhow::bail!("replica not committed after 31 acks: {other}"),
    };
    ensure!(
        committed >= 31,
        "replica at checkpoint {committed}, 31 were acknowledged"
    );
    let (_, disk_value) = disk_log_last(&dir.join("replica.img"), LOG_SLOTS)?
        .context("the replica disk holds no counter record")?;

    let (mut activated, epoch) = replica.activate(&Netns::current()).await?;
    ensure!(epoch == committed);
    wait_for(
        &bak_paths.console(),
        Duration::from_secs(30),
        "activated guest ticking",
        |t| t.lines().filter(|l| l.starts_with("check ")).count() >= 2,
    )
    .await?;
    let after = counters(&bak_paths.console());
    let first = *after.first().context("no counter after activation")?;
    let last_primary = *primary_counters
        .last()
        .context("primary printed no counter")?;
    println!(
        "checkpoint {committed}: replica disk counter {disk_value}; primary reached {last_primary}; \
         activated guest continued at {first}"
    );
    ensure!(
        first == disk_value || first == disk_value + 1,
        "activated guest continued at {first}, the committed disk says {disk_value}"
    );
    ensure!(first > 31, "the guest restarted from scratch ({first})");
    ensure!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "counter not continuous after activation: {after:?}"
    );
    let boot = std::fs::read_to_string(bak_paths.console())?;
    ensure!(
        !boot.contains("remus-guest: start"),
        "the activated guest booted afresh instead of resuming"
    );
    for c in checks(&bak_paths.console()) {
        ensure!(
            c.starts_with("ok "),
            "disk and memory disagree after activation: {c}"
        );
    }
    activated.qemu.kill()?;
    Ok(())
}
