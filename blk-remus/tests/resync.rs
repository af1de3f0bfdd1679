//! Initial full sync while the guest writes, then an outage: writes made while the backup is
//! unreachable are tracked in the persistent dirty bitmap (surviving an agent restart), and the
//! resync copies exactly those regions.

mod common;

use std::sync::Arc;

use blk_remus::{
    BackupConfig, BackupStore, BlockBackend, FileBackend, Primary, PrimaryConfig, SyncMode,
    SyncProgress,
};
use bytes::Bytes;
use common::*;

const SIZE: u64 = 64 << 20;
const GRAN: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_then_outage_then_dirty_resync() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let pimg = dir.path().join("primary.img");
    let rimg = dir.path().join("replica.img");
    let bm = dir.path().join("dirty.bitmap");
    // The primary holds data before protection starts; the replica is blank.
    {
        let f = FileBackend::create(&pimg, SIZE).unwrap();
        for i in 0..64u64 {
            f.write_at(
                i * (1 << 20) + 4096 * i,
                Bytes::from(vec![i as u8 + 1; 100_000]),
                false,
            )
            .unwrap();
        }
    }
    FileBackend::create(&rimg, SIZE).unwrap();
    let pcfg = PrimaryConfig {
        bitmap_path: Some(bm.clone()),
        granularity: GRAN,
        first_epoch: 1,
    };
    let local = Arc::new(FileBackend::open(&pimg, false).unwrap());
    let primary = Arc::new(Primary::new(local, &pcfg).unwrap());
    let bcfg = BackupConfig::new(dir.path().join("state"), &rimg);
    let backup = Arc::new(BackupStore::open(bcfg.clone()).unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    primary.connect(Arc::new(tx));
    let pumping = pump(backup.clone(), rx);
    let srv = Server::start(
        dir.path(),
        vec![("vm", primary.clone() as Arc<dyn BlockBackend>)],
    )
    .await;

    // Full sync with the guest writing at the same time (overlapping the regions copied).
    let (ptx, prx) = tokio::sync::watch::channel(SyncProgress::default());
    let sync = primary.sync_async(SyncMode::Full, ptx);
    let cmds: Vec<String> = (0..64u64)
        .map(|i| format!("write -P {} {} 8192", 0x80 + i, (63 - i) * (1 << 20) + 1000))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (report, out) = tokio::join!(sync, srv.qemu_io("vm", &cmds));
    ok(&out);
    let report = report.unwrap();
    let p = *prx.borrow();
    assert_eq!((p.total_bytes, p.done_bytes), (SIZE, SIZE));
    assert_eq!(report.chunks, SIZE / GRAN);
    assert!(
        report.bytes_zero > SIZE / 2,
        "zero regions should be skipped: {report:?}"
    );
    assert!(report.bytes_copied >= 64 * 100_000, "{report:?}");
    println!("full sync: {report:?}");
    primary.barrier_async(1).await.unwrap();
    wait_complete(&backup, 1).await;
    backup.commit_async(1).await.unwrap();
    assert!(backup.status().consistent);
    assert!(
        images_equal(&pimg, &rimg),
        "replica differs after full sync + concurrent writes"
    );
    primary.acknowledged(1);

    // Epoch 2: one write reaches the backup's backlog but is never acknowledged.
    ok(&srv
        .qemu_io("vm", &[&format!("write -P 0x33 {} 4096", 300 * GRAN)])
        .await);
    // Outage: the engine declares the backup lost; the forwarder is dropped, which ends the
    // pump. The unacknowledged chunk 300 must join the dirty set.
    primary.disconnect().unwrap();
    pumping.await.unwrap().unwrap();
    assert_eq!(primary.status().dirty_chunks, 1);
    let writes: [(u64, u64); 4] = [
        (16 * GRAN, GRAN),          // exactly chunk 16
        (48 * GRAN + 100, 10),      // inside chunk 48
        (80 * GRAN - 10, 20),       // spans chunks 79 and 80
        (200 * GRAN + 5, 3 * GRAN), // chunks 200..=203
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x5a {o} {l}"))
        .collect();
    let mut cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    cmds.push("flush");
    ok(&srv.qemu_io("vm", &cmds).await);
    let b2 = primary.barrier_async(2).await.unwrap();
    assert!(!b2.forwarded);
    srv.stop().await;
    // Expected dirty set: {16}, {48}, {79, 80}, {200..=203}, {300}: 5 regions, 9 chunks.
    assert_eq!(primary.status().dirty_chunks, 9);

    // Agent restart: the bitmap comes back from its file.
    drop(primary);
    let local = Arc::new(FileBackend::open(&pimg, false).unwrap());
    let primary = Arc::new(
        Primary::new(
            local,
            &PrimaryConfig {
                first_epoch: 3,
                ..pcfg
            },
        )
        .unwrap(),
    );
    assert_eq!(primary.status().dirty_chunks, 9);

    // The backup restarts too, at committed epoch 1; the resync brings it up to date.
    drop(backup);
    let backup = Arc::new(BackupStore::open(bcfg).unwrap());
    assert_eq!(backup.committed(), 1);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    primary.connect(Arc::new(tx));
    let pumping = pump(backup.clone(), rx);
    let (ptx, _prx) = tokio::sync::watch::channel(SyncProgress::default());
    let report = primary.sync_async(SyncMode::Dirty, ptx).await.unwrap();
    println!("resync: {report:?}");
    assert_eq!(report.regions, 5, "{report:?}");
    assert_eq!(report.chunks, 9, "{report:?}");
    assert_eq!(
        report.bytes_copied + report.bytes_zero,
        9 * GRAN,
        "{report:?}"
    );
    assert!(!images_equal(&pimg, &rimg));
    primary.barrier_async(3).await.unwrap();
    wait_complete(&backup, 3).await;
    backup.commit_async(3).await.unwrap();
    assert!(images_equal(&pimg, &rimg), "replica differs after resync");
    primary.acknowledged(3);
    primary.persist_bitmap().unwrap();
    assert_eq!(primary.status().dirty_chunks, 0);
    drop(primary);
    pumping.await.unwrap().unwrap();
}
