//! A disk on the NBD backend (the production path: the agent's NBD server replicates the
//! writes), here served by qemu-nbd: the guest's log records reach the image through it.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use remus_qemu::{DiskBackend, QemuProcess};

/// Highest sequence number among the log records in `image` (format: guest's disklog.rs).
fn last_record(image: &[u8]) -> Option<u64> {
    image
        .chunks_exact(512)
        .filter(|s| s[0..4] == *b"RMSC")
        .map(|s| u64::from_le_bytes(s[4..12].try_into().unwrap()))
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_reach_the_image_through_nbd() {
    let images = guest_images();
    let scratch = Scratch::new("nbd");
    let image = scratch.path("disk.raw");
    raw_disk(&image, 1 << 20);
    let socket = scratch.path("nbd.sock");
    let mut server = tokio::process::Command::new("qemu-nbd")
        .arg("--socket")
        .arg(&socket)
        .args([
            "--export-name",
            "vm-disk0",
            "--format",
            "raw",
            "--persistent",
        ])
        .arg(&image)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-nbd (from qemu-utils) must be installed");
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let params = "remus.mode=ticker remus.interval=50 remus.check_every=5";
    let mut spec = guest_spec(&images, &scratch, "nbd", params, &image);
    spec.disks[0].backend = DiskBackend::Nbd {
        socket: socket.clone(),
        export: "vm-disk0".into(),
    };
    let mut qemu = QemuProcess::spawn(&spec).await.expect("spawn");
    let _qmp = qemu.connect_qmp().await.expect("QMP");
    let text = wait_console(&spec, Duration::from_secs(120), "a check line", |c| {
        c.contains("check ")
    })
    .await;
    assert!(text.contains("check ok"), "console: {text}");
    let printed = *counters(&text).last().unwrap();
    qemu.kill_and_wait().await.unwrap();
    server.kill().await.unwrap();

    let on_disk = last_record(&std::fs::read(&image).unwrap()).expect("no record in the image");
    assert!(
        on_disk >= printed,
        "image holds record {on_disk}, console printed {printed}"
    );
}
