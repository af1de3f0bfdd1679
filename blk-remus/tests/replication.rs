//! Primary → backup replication through the real NBD path: qemu-io writes to the primary's
//! export, events flow in-process to a backup store, and commits move the replica from epoch
//! boundary to epoch boundary. Then failover (discard + activate) and serving the replica.

mod common;

use std::sync::Arc;

use blk_remus::{BackupConfig, BackupStore, BlockBackend, FileBackend, Primary, PrimaryConfig};
use common::*;

const SIZE: u64 = 8 << 20;

async fn run(memory_limit: u64) {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let pimg = dir.path().join("primary.img");
    let rimg = dir.path().join("replica.img");
    FileBackend::create(&pimg, SIZE).unwrap();
    FileBackend::create(&rimg, SIZE).unwrap();
    let local = Arc::new(FileBackend::open(&pimg, false).unwrap());
    let primary = Arc::new(Primary::new(local, &PrimaryConfig::default()).unwrap());
    let mut cfg = BackupConfig::new(dir.path().join("state"), &rimg);
    cfg.memory_limit = memory_limit;
    let backup = Arc::new(BackupStore::open(cfg).unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    primary.connect(Arc::new(tx));
    let pumping = pump(backup.clone(), rx);
    let srv = Server::start(
        dir.path(),
        vec![("vm", primary.clone() as Arc<dyn BlockBackend>)],
    )
    .await;

    // Epoch 1: data, zeroes and a discard.
    ok(&srv
        .qemu_io(
            "vm",
            &[
                "write -P 0x01 0 1M",
                "write -P 0x02 2M 64k",
                "write -z 4096 4096",
                "discard 2M 4096",
            ],
        )
        .await);
    let b1 = primary.barrier_async(1).await.unwrap();
    assert!(b1.forwarded && b1.writes == 4, "{b1:?}");
    let epoch1 = std::fs::read(&pimg).unwrap();
    // Epoch 2 overwrites part of epoch 1 and writes new regions.
    ok(&srv
        .qemu_io("vm", &["write -P 0x03 512k 1M", "write -f -P 0x04 6M 128k"])
        .await);
    primary.barrier_async(2).await.unwrap();
    let epoch2 = std::fs::read(&pimg).unwrap();
    // Epoch 3 stays uncommitted.
    ok(&srv.qemu_io("vm", &["write -P 0x05 0 4M"]).await);

    wait_complete(&backup, 2).await;
    wait_backlog(&backup, 3).await;
    let st = backup.status();
    assert_eq!(
        (st.committed, st.complete, st.backlog_epochs),
        (0, 2, 3),
        "{st:?}"
    );
    if memory_limit < (1 << 20) {
        assert!(
            st.spilled_bytes > 0,
            "expected spilling with limit {memory_limit}: {st:?}"
        );
    }
    let r1 = backup.commit_async(1).await.unwrap();
    assert_eq!((r1.epoch, r1.epochs, r1.writes), (1, 1, 4));
    // Byte-level: the replica is exactly epoch 1; epoch 2's writes have not reached it.
    assert!(
        std::fs::read(&rimg).unwrap() == epoch1,
        "replica differs from epoch 1 image"
    );
    assert_eq!(read_range(&rimg, 6 << 20, 16), vec![0; 16]);
    backup.commit_async(2).await.unwrap();
    assert!(
        std::fs::read(&rimg).unwrap() == epoch2,
        "replica differs from epoch 2 image"
    );
    assert!(
        !images_equal(&pimg, &rimg),
        "epoch 3 must not be on the replica yet"
    );
    primary.acknowledged(2);

    primary.barrier_async(3).await.unwrap();
    wait_complete(&backup, 3).await;
    backup.commit_async(3).await.unwrap();
    assert!(
        images_equal(&pimg, &rimg),
        "after commit(3) the replica equals the primary"
    );

    // Epoch 4 is lost in the failover: discard, activate, and serve the replica.
    ok(&srv.qemu_io("vm", &["write -P 0x06 0 64k"]).await);
    primary.barrier_async(4).await.unwrap();
    wait_complete(&backup, 4).await;
    srv.stop().await;
    primary.disconnect().unwrap();
    pumping.await.unwrap().unwrap();
    let backup = Arc::try_unwrap(backup).expect("sole owner");
    assert_eq!(backup.discard_uncommitted(), 1);
    let replica = backup.activate().unwrap();
    let srv = Server::start(
        dir.path(),
        vec![("vm", Arc::new(replica) as Arc<dyn BlockBackend>)],
    )
    .await;
    ok(&srv
        .qemu_io(
            "vm",
            &[
                "read -P 0x05 0 4M",
                "read -P 0x04 6M 128k",
                "write -P 0x07 0 4096",
            ],
        )
        .await);
    assert_eq!(read_range(&rimg, 0, 4096), vec![0x07; 4096]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_move_replica_between_epoch_boundaries() {
    run(256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_with_spilled_epochs() {
    run(100 << 10).await;
}

/// Backup restart with a committed WAL: reopening replays and keeps the committed epoch;
/// the backlog of a dead connection is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_committed_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let rimg = dir.path().join("replica.img");
    FileBackend::create(&rimg, SIZE).unwrap();
    let cfg = BackupConfig::new(dir.path().join("state"), &rimg);
    let b = BackupStore::open(cfg.clone()).unwrap();
    use blk_remus::{DiskEvent, WriteKind};
    let w = |epoch, offset, byte| DiskEvent::Write {
        epoch,
        offset,
        kind: WriteKind::Data(bytes::Bytes::from(vec![byte; 4096])),
    };
    b.receive(w(1, 0, 9)).unwrap();
    b.receive(DiskEvent::Barrier {
        epoch: 1,
        writes: 1,
        bytes: 4096,
    })
    .unwrap();
    b.receive(w(2, 0, 8)).unwrap();
    // Table of invalid events and why.
    let bad = [
        (w(1, 0, 1), "epoch already closed"),
        (
            DiskEvent::Barrier {
                epoch: 2,
                writes: 5,
                bytes: 4096,
            },
            "barrier count mismatch",
        ),
        (w(3, 0, 1), "epoch 2 never closed"),
        (w(2, SIZE - 1, 1), "out of range"),
    ];
    for (ev, why) in bad {
        assert!(b.receive(ev).is_err(), "{why}");
    }
    assert!(matches!(
        b.commit(2),
        Err(blk_remus::BackupError::NotComplete { .. })
    ));
    b.commit(1).unwrap();
    drop(b);
    let b = BackupStore::open(cfg).unwrap();
    let st = b.status();
    assert_eq!(
        (st.committed, st.backlog_epochs, st.consistent),
        (1, 0, true)
    );
    assert_eq!(read_range(&rimg, 0, 4096), vec![9; 4096]);
}

/// A copy of the committed replica in two passes: the bulk while commits go on, then the
/// ranges written since. It opens at exactly the committed epoch, uncommitted epochs are not
/// in it, and a replica mid-sync is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_pass_copy_holds_exactly_the_committed_epoch() {
    use blk_remus::{DiskEvent, WriteKind};
    let dir = tempfile::tempdir().unwrap();
    let rimg = dir.path().join("replica.img");
    FileBackend::create(&rimg, SIZE).unwrap();
    let b = BackupStore::open(BackupConfig::new(dir.path().join("state"), &rimg)).unwrap();
    let w = |epoch, offset, byte| DiskEvent::Write {
        epoch,
        offset,
        kind: WriteKind::Data(bytes::Bytes::from(vec![byte; 4096])),
    };
    let barrier = |epoch| DiskEvent::Barrier {
        epoch,
        writes: 1,
        bytes: 4096,
    };
    b.receive(w(1, 0, 1)).unwrap();
    b.receive(barrier(1)).unwrap();
    b.commit(1).unwrap();
    let copy_img = dir.path().join("copy.img");
    b.precopy(&copy_img).unwrap();
    // Commits go on after the bulk pass: epoch 2 overwrites page 0 and writes page 1.
    b.receive(w(2, 0, 2)).unwrap();
    b.receive(barrier(2)).unwrap();
    b.commit(2).unwrap();
    // Epoch 3 complete but not committed: not part of the copy.
    b.receive(w(3, 8192, 3)).unwrap();
    b.receive(barrier(3)).unwrap();
    let (epoch, copied) = b.finish_copy(&copy_img).unwrap();
    assert_eq!(
        (epoch, copied),
        (2, 4096),
        "only epoch 2's range copied again"
    );
    b.commit(3).unwrap();
    let c = BackupStore::open(BackupConfig::new(dir.path().join("copy-state"), &copy_img)).unwrap();
    let st = c.status();
    assert_eq!(
        (st.committed, st.backlog_epochs, st.consistent),
        (0, 0, true)
    );
    assert_eq!(read_range(&copy_img, 0, 4096), vec![2; 4096]);
    assert_eq!(
        read_range(&copy_img, 8192, 4096),
        vec![0; 4096],
        "epoch 3 not copied"
    );
    assert_eq!(read_range(&rimg, 8192, 4096), vec![3; 4096]);
    // Mid-sync the replica is no image the VM had: refused.
    let dir2 = tempfile::tempdir().unwrap();
    let rimg2 = dir2.path().join("replica.img");
    FileBackend::create(&rimg2, SIZE).unwrap();
    let s = BackupStore::open(BackupConfig::new(dir2.path().join("state"), &rimg2)).unwrap();
    s.receive(DiskEvent::SyncBegin {
        epoch: 1,
        full: true,
    })
    .unwrap();
    s.receive(w(1, 0, 7)).unwrap();
    s.receive(barrier(1)).unwrap();
    s.commit(1).unwrap();
    let c2 = dir2.path().join("c.img");
    s.precopy(&c2).unwrap();
    let err = s.finish_copy(&c2).unwrap_err();
    assert!(matches!(err, blk_remus::BackupError::Inconsistent), "{err}");
}
