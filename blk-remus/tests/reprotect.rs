//! Re-protection: a second replication session into an existing replica.
//!
//! Session 1 commits epochs 1..=5; then the link is lost with epoch 6 forwarded but never
//! acknowledged, and the guest keeps writing while the backup is away. The backup restarts
//! (its store is reopened from the WAL at committed epoch 5). Session 2 numbers its epochs
//! from 1 again: the store must accept them after `begin_session`, the primary's resync must
//! copy only the dirty regions, and after session 2's epochs 1..=3 the replica must be
//! byte-identical to the primary (`qemu-img compare`). All writes go through the real NBD
//! server with the real `qemu-io`.

mod common;

use std::sync::Arc;

use blk_remus::{
    BackupConfig, BackupError, BackupStore, BlockBackend, DiskEvent, FileBackend, Primary,
    PrimaryConfig, SyncMode, SyncProgress,
};
use bytes::Bytes;
use common::*;

const SIZE: u64 = 32 << 20;
const GRAN: u64 = 64 << 10;

/// Writes `cmds` through NBD with qemu-io.
async fn guest(srv: &Server, cmds: &[String]) {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ok(&srv.qemu_io("vm", &cmds).await);
}

/// Closes epoch `k` on the primary and commits it on the backup, like one engine epoch.
async fn epoch(primary: &Arc<Primary>, backup: &Arc<BackupStore>, k: u64) {
    let b = primary.barrier_async(k).await.unwrap();
    assert!(b.forwarded, "barrier {k} not forwarded");
    wait_complete(backup, k).await;
    backup.commit_async(k).await.unwrap();
    primary.acknowledged(k);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_session_restarts_epochs_and_resyncs_only_dirty_regions() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let pimg = dir.path().join("primary.img");
    let rimg = dir.path().join("replica.img");
    {
        let f = FileBackend::create(&pimg, SIZE).unwrap();
        for i in 0..32u64 {
            f.write_at(i << 20, Bytes::from(vec![i as u8 + 1; 70_000]), false)
                .unwrap();
        }
    }
    FileBackend::create(&rimg, SIZE).unwrap();
    let pcfg = PrimaryConfig {
        bitmap_path: Some(dir.path().join("dirty.bitmap")),
        granularity: GRAN,
        first_epoch: 1,
    };
    let primary =
        Arc::new(Primary::new(Arc::new(FileBackend::open(&pimg, false).unwrap()), &pcfg).unwrap());
    let bcfg = BackupConfig::new(dir.path().join("state"), &rimg);
    let srv = Server::start(
        dir.path(),
        vec![("vm", primary.clone() as Arc<dyn BlockBackend>)],
    )
    .await;

    // ---- Session 1: full sync in epoch 1, epochs 1..=5 committed.
    let backup = Arc::new(BackupStore::open(bcfg.clone()).unwrap());
    backup.begin_session().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    primary.connect_session(Arc::new(tx), 1).unwrap();
    let pumping = pump(backup.clone(), rx);
    let (ptx, _) = tokio::sync::watch::channel(SyncProgress::default());
    let full = primary.sync_async(SyncMode::Full, ptx).await.unwrap();
    assert_eq!(full.chunks, SIZE / GRAN);
    for k in 1..=5u64 {
        guest(
            &srv,
            &[format!("write -P {} {} 4096", 0x10 + k, k * 3 * GRAN + 17)],
        )
        .await;
        epoch(&primary, &backup, k).await;
    }
    assert!(backup.status().consistent, "{:?}", backup.status());
    assert!(
        images_equal(&pimg, &rimg),
        "replica differs after session 1"
    );

    // Epoch 6 reaches the backup's backlog (barrier included) but is never acknowledged.
    guest(&srv, &[format!("write -P 0x66 {} 4096", 100 * GRAN)]).await;
    assert!(primary.barrier_async(6).await.unwrap().forwarded);
    wait_complete(&backup, 6).await;

    // ---- Link lost; the guest keeps writing, unprotected.
    primary.disconnect().unwrap();
    pumping.await.unwrap().unwrap();
    let outage: [(u64, u64); 3] = [
        (7 * GRAN, GRAN),           // chunk 7
        (200 * GRAN - 10, 20),      // chunks 199, 200
        (300 * GRAN + 5, 2 * GRAN), // chunks 300..=302
    ];
    let mut cmds: Vec<String> = outage
        .iter()
        .map(|(o, l)| format!("write -P 0x77 {o} {l}"))
        .collect();
    cmds.push("flush".into());
    guest(&srv, &cmds).await;
    // {100} (unacknowledged epoch 6) + {7} + {199, 200} + {300, 301, 302}
    let dirty = primary.status().dirty_chunks;
    assert_eq!(dirty, 7);

    // ---- The backup restarts: its store comes back at committed epoch 5.
    drop(backup);
    let backup = Arc::new(BackupStore::open(bcfg.clone()).unwrap());
    assert_eq!(backup.committed(), 5);
    assert!(backup.status().consistent);
    // Without a new session, epoch 1 of session 2 is refused as a replay of the past.
    let refused = backup.receive(DiskEvent::SyncBegin {
        epoch: 1,
        full: false,
    });
    assert!(
        matches!(refused, Err(BackupError::InvalidEvent { epoch: 1, .. })),
        "{refused:?}"
    );

    // ---- Session 2: epochs restart at 1, dirty resync only.
    backup.begin_session().unwrap();
    let st = backup.status();
    assert_eq!((st.committed, st.complete, st.consistent), (0, 0, false));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    primary.connect_session(Arc::new(tx), 1).unwrap();
    assert_eq!(primary.status().epoch, 1);
    let pumping = pump(backup.clone(), rx);
    let (ptx, _) = tokio::sync::watch::channel(SyncProgress::default());
    // The guest writes while the resync runs (one region it copies, one it does not).
    let sync = primary.sync_async(SyncMode::Dirty, ptx);
    let during = [
        format!("write -P 0x88 {} 100", 300 * GRAN + 1000),
        format!("write -P 0x89 {} 100", 400 * GRAN),
    ];
    let (report, _) = tokio::join!(sync, guest(&srv, &during));
    let report = report.unwrap();
    println!(
        "session 2 resync: {report:?} (full sync was {} chunks)",
        full.chunks
    );
    assert_eq!((report.regions, report.chunks), (4, dirty), "{report:?}");
    assert_eq!(report.bytes_copied + report.bytes_zero, dirty * GRAN);
    assert!(!images_equal(&pimg, &rimg));
    for k in 1..=3u64 {
        guest(
            &srv,
            &[format!("write -P {} {} 8192", 0x90 + k, k * 5 * GRAN + 3)],
        )
        .await;
        epoch(&primary, &backup, k).await;
        assert_eq!(backup.committed(), k);
        assert!(backup.status().consistent, "sync ended in epoch 1");
    }
    srv.stop().await;
    assert!(
        images_equal(&pimg, &rimg),
        "replica differs from the primary after session 2"
    );
    assert_eq!(primary.status().dirty_chunks, 0);

    // A second restart finds session 2's state, and the replica activates.
    primary.disconnect().unwrap();
    pumping.await.unwrap().unwrap();
    drop(backup);
    let backup = BackupStore::open(bcfg).unwrap();
    assert_eq!(backup.committed(), 3);
    backup
        .activate()
        .expect("replica activatable at session 2's epoch 3");
}

/// A restart in the middle of session 2's resync: the store must come back inconsistent
/// (the WAL header of the new session says so), never as the old session's image.
#[test]
fn restart_during_a_resync_stays_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let rimg = dir.path().join("replica.img");
    FileBackend::create(&rimg, 1 << 20).unwrap();
    let cfg = BackupConfig::new(dir.path().join("state"), &rimg);
    let s = BackupStore::open(cfg.clone()).unwrap();
    // Session 1 commits epochs 1..=3 (sync included).
    s.begin_session().unwrap();
    s.receive(DiskEvent::SyncBegin {
        epoch: 1,
        full: true,
    })
    .unwrap();
    s.receive(DiskEvent::SyncEnd { epoch: 1 }).unwrap();
    for k in 1..=3 {
        s.receive(DiskEvent::Barrier {
            epoch: k,
            writes: 0,
            bytes: 0,
        })
        .unwrap();
    }
    s.commit(3).unwrap();
    assert!(s.status().consistent);
    drop(s);
    // Session 2 begins; the backup restarts before its sync commits.
    let s = BackupStore::open(cfg.clone()).unwrap();
    assert_eq!(s.committed(), 3);
    s.begin_session().unwrap();
    s.receive(DiskEvent::SyncBegin {
        epoch: 1,
        full: false,
    })
    .unwrap();
    drop(s);
    let s = BackupStore::open(cfg).unwrap();
    let st = s.status();
    assert_eq!((st.committed, st.consistent), (0, false), "{st:?}");
    assert!(matches!(s.activate(), Err(BackupError::Inconsistent)));
}
