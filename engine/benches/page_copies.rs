//! Bytes of page data written per dirty page on each side of a checkpoint, by stage.
//!
//! Runs the real epoch loop and the real backup receiver over an encrypted loopback session
//! (the session tests' stand-ins: a guest thread scribbling on a shared RAM file, a stand-in
//! VM, an output buffer that checks output commit), for each page encoding, and reads the
//! engine's copy counters (`remus_engine::copies`) over the checkpoints after the first (the
//! steady state: the first checkpoint is written straight into the replica). Bytes per page
//! are divided by the pages the primary sent (primary stages) or the backup decoded (backup
//! stages).
//!
//! `cargo bench -p remus-engine --bench page_copies` (`CHECKPOINTS=n` to change the 40).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use remus_engine::copies::{Copies, Stage};
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::NoDisk;
use remus_engine::primary::{Compression, Primary, PrimaryConfig, PrimaryParts};
use remus_engine::replica::ReplicaStore;
use remus_tracker::{CompareTracker, ScanPool};

use common::{loopback_session, map, spawn_guest, CheckedBuffer, FakeVm, Ram, PAGE, PAGES};

/// Runs `checkpoints` checkpoints after the first with `compression`; returns what the
/// counters saw over them.
async fn run(compression: Compression, checkpoints: u64) -> Copies {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    let guest = spawn_guest(map(&ram_path), None);
    let psk = PreSharedKey::from_bytes(&[42; 48]).expect("key");
    let (status_tx, committed) = tokio::sync::watch::channel(None);
    let replica = ReplicaStore::open("vm", &dir.path().join("replica"), (PAGES * PAGE) as u64)
        .expect("replica store");
    let (session, backup) = loopback_session(&psk, replica, Box::new(NoDisk), move |_, st| {
        let _ = status_tx.send(Some(st));
    })
    .await;
    let pool = Arc::new(ScanPool::new(2).expect("scan threads"));
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.compression = compression;
    let parts = PrimaryParts {
        vm: Box::new(FakeVm::new(guest.clone(), engine_view.clone(), None)),
        net: Box::new(CheckedBuffer::new(committed)),
        disk: Box::new(NoDisk),
        memory: engine_view,
        tracker: Box::new(CompareTracker::new(pool.clone())),
        pool,
        out: session.sender,
        replies: session.replies,
        initial_sync: None,
    };
    let (primary, handle) = Primary::new(cfg, parts).expect("primary loop");
    let task = tokio::spawn(primary.run());
    let acked = |n: u64| {
        let mut status = handle.status.clone();
        async move {
            status
                .wait_for(|s| s.last_acked.is_some_and(|k| k >= n))
                .await
                .map(|_| ())
        }
    };
    acked(1).await.expect("first checkpoint acknowledged");
    let start = Copies::now();
    acked(1 + checkpoints)
        .await
        .expect("checkpoints acknowledged");
    let counted = Copies::now().since(&start);
    handle.shutdown.send_replace(true);
    let _ = task.await;
    let _ = backup.await;
    guest.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    counted
}

fn main() {
    let checkpoints: u64 = std::env::var("CHECKPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let modes = [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("xor-lz4", Compression::XorLz4),
    ];
    let runs: Vec<(&str, Copies)> = modes
        .iter()
        .map(|&(name, c)| (name, rt.block_on(run(c, checkpoints))))
        .collect();
    println!(
        "bytes of page data written per dirty page, by stage and page encoding: {checkpoints} \
         checkpoints after the first, {} MiB guest writing 8-byte stamps on random pages",
        (PAGES * PAGE) >> 20
    );
    print!("| stage |");
    for (name, _) in &runs {
        print!(" {name} |");
    }
    println!();
    print!("|---|");
    for _ in &runs {
        print!("---|");
    }
    println!();
    for (label, primary) in [("primary", true), ("backup", false)] {
        for stage in Stage::ALL.iter().filter(|s| s.on_primary() == primary) {
            print!("| {label}: {} |", stage.name());
            for (_, c) in &runs {
                print!(" {:.0} |", c.per_page(*stage));
            }
            println!();
        }
        print!("| **{label} total** |");
        for (_, c) in &runs {
            print!(" **{:.0}** |", c.per_page_total(primary));
        }
        println!();
    }
    print!("| pages sent / received |");
    for (_, c) in &runs {
        print!(" {} / {} |", c.pages_sent, c.pages_received);
    }
    println!();
}
