//! Re-protection end to end at the engine + blk-remus level: a second replication session
//! into a replica that a previous session left at committed checkpoint k.
//!
//! Session 1 protects a running guest (RAM + one replicated disk, real files, real encrypted
//! TCP session) until checkpoint 5 is acknowledged; then the backup dies (its task is
//! aborted: no END, the connection drops) and the primary's loop reports the backup lost.
//! The guest keeps running unprotected, writing RAM and disk (the disk's dirty bitmap
//! records where). The backup restarts: replica store and disk store are reopened from
//! their files. Session 2 starts at epoch 1 with a fresh full memory pre-copy and a *dirty*
//! disk resync. The test checks that
//! - the replica is not activatable from the moment session 2 begins until its first
//!   checkpoint commits (and the output-commit check never releases an epoch the backup has
//!   not committed *in session 2*);
//! - the disk resync copied exactly the regions dirtied since the last acknowledged epoch,
//!   fewer than a full copy;
//! - after session 2's checkpoints the replica RAM, device state and disk are exactly the
//!   primary's at the last committed checkpoint, and survive another backup restart.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use blk_remus::{BackupConfig, BackupStore, FileBackend, SyncMode, SyncProgress};
use common::*;
use remus_engine::backup::BackupExit;
use remus_engine::disk::{spawn_disk_forwarder, PrimaryDisk, PrimaryDisks, ReplicaDisks};
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::PortError;
use remus_engine::primary::{Compression, Primary, PrimaryConfig, PrimaryExit, PrimaryParts};
use remus_engine::replica::{ReplicaState, ReplicaStore};
use remus_tracker::{CompareTracker, ScanPool};
use tokio::sync::{oneshot, watch};

struct Setup {
    dir: tempfile::TempDir,
    psk: PreSharedKey,
    engine_view: Arc<Ram>,
    guest: Arc<Guest>,
    disk: Arc<blk_remus::Primary>,
    pool: Arc<ScanPool>,
}

impl Setup {
    fn replica_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("replica")
    }
    fn disk_cfg(&self) -> BackupConfig {
        BackupConfig::new(
            self.dir.path().join("disk-state"),
            self.dir.path().join("replica.img"),
        )
    }
    fn primary_image(&self) -> std::path::PathBuf {
        self.dir.path().join("primary.img")
    }
}

/// One session's running pieces.
struct Session {
    backup: tokio::task::JoinHandle<(
        Result<BackupExit, remus_engine::backup::BackupError>,
        ReplicaStore,
    )>,
    backup_status: watch::Receiver<remus_engine::backup::BackupStatus>,
    store: Weak<BackupStore>,
    primary: tokio::task::JoinHandle<Result<PrimaryExit, remus_engine::primary::PrimaryError>>,
    handle: remus_engine::primary::PrimaryHandle,
    vm_snapshots: Snapshots,
    released: Arc<std::sync::Mutex<Vec<u64>>>,
    sync: oneshot::Receiver<blk_remus::SyncReport>,
    /// Dirty chunks the primary's bitmap held when the session connected its disk.
    dirty_at_connect: u64,
}

async fn start_session(s: &Setup, mode: SyncMode) -> Session {
    // Backup restart: both stores are (re)opened from their files.
    let replica = ReplicaStore::open("vm", &s.replica_dir(), (PAGES * PAGE) as u64).unwrap();
    let store = Arc::new(BackupStore::open(s.disk_cfg()).unwrap());
    let weak = Arc::downgrade(&store);
    let (status_tx, mut status_rx) = watch::channel(None);
    let disk = Box::new(ReplicaDisks::new(vec![("disk vm/d0".into(), store)]));
    let (session, backup) = loopback_session(&s.psk, replica, disk, move |_, status| {
        status_tx.send(Some(status)).unwrap();
    })
    .await;

    // The disk joins the session at epoch 1, then streams its sync.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (fw_tx, fw_rx) = watch::channel(0u64);
    spawn_disk_forwarder(0, rx, session.sender.clone(), fw_tx);
    s.disk.connect_session(Arc::new(tx), 1).unwrap();
    let dirty_at_connect = s.disk.status().dirty_chunks;
    let (sync_tx, sync_rx) = oneshot::channel();
    let (report_tx, report_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let disk = s.disk.clone();
    tokio::spawn(async move {
        // Held back until the backup has begun the session (see below): the first checkpoint
        // cannot close before the sync is streamed, so nothing can commit before then.
        if go_rx.await.is_err() {
            return;
        }
        let (ptx, _) = watch::channel(SyncProgress::default());
        match disk.sync_async(mode, ptx).await {
            Ok(r) => {
                let _ = sync_tx.send(Ok(()));
                let _ = report_tx.send(r);
            }
            Err(e) => {
                let _ = sync_tx.send(Err(PortError::new("disk", "sync", e)));
            }
        }
    });

    let vm = FakeVm::new(
        s.guest.clone(),
        s.engine_view.clone(),
        Some(&s.primary_image()),
    );
    let vm_snapshots = vm.snapshots.clone();
    let net = CheckedBuffer::new(status_rx.clone());
    let released = net.released.clone();
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.ack_timeout = Duration::from_secs(2);
    cfg.compression = Compression::XorLz4;
    let (primary, handle) = Primary::new(
        cfg,
        PrimaryParts {
            vm: Box::new(vm),
            net: Box::new(net),
            disk: Box::new(PrimaryDisks {
                disks: vec![PrimaryDisk {
                    object: "disk vm/d0".into(),
                    primary: s.disk.clone(),
                    forwarded: fw_rx,
                }],
            }),
            memory: s.engine_view.clone(),
            tracker: Box::new(CompareTracker::new(s.pool.clone())),
            pool: s.pool.clone(),
            out: session.sender,
            replies: session.replies,
            initial_sync: Some(sync_rx),
        },
    )
    .unwrap();
    let primary = tokio::spawn(primary.run());
    // The session begins on the backup before any record is read (the stream header goes
    // out with the primary's first record): from here until its first checkpoint commits,
    // the replica must not be activatable. Nothing can commit yet, so this state is seen.
    let backup_status = status_rx
        .wait_for(Option::is_some)
        .await
        .unwrap()
        .clone()
        .unwrap();
    let mut st = backup_status.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        st.wait_for(|st| st.replica == ReplicaState::Syncing),
    )
    .await
    .expect("the backup begins the session")
    .unwrap();
    go_tx.send(()).unwrap();
    Session {
        backup,
        backup_status,
        store: weak,
        primary,
        handle,
        vm_snapshots,
        released,
        sync: report_rx,
        dirty_at_connect,
    }
}

async fn wait_acked(handle: &remus_engine::primary::PrimaryHandle, k: u64) {
    let mut status = handle.status.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        status.wait_for(|s| s.last_acked.is_some_and(|a| a >= k)),
    )
    .await
    .unwrap_or_else(|_| panic!("checkpoint {k} acknowledged within 60 s"))
    .unwrap();
}

/// Waits until every handle on the old disk store is gone (an aborted commit may still run
/// on a blocking thread), so the "restarted" backup never shares the files with it.
async fn wait_dropped(store: &Weak<BackupStore>) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while store.strong_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the old backup store is released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_session_into_a_committed_replica() {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    // The primary's disk holds data before protection; the replica image is blank.
    let pimg = dir.path().join("primary.img");
    {
        use blk_remus::BlockBackend;
        let f = FileBackend::create(&pimg, DISK_SIZE).unwrap();
        f.write_at(
            DISK_SIZE / 2,
            bytes::Bytes::from(vec![0xd5; 300_000]),
            false,
        )
        .unwrap();
    }
    FileBackend::create(dir.path().join("replica.img"), DISK_SIZE).unwrap();
    let disk = Arc::new(
        blk_remus::Primary::new(
            Arc::new(FileBackend::open(&pimg, false).unwrap()),
            &blk_remus::PrimaryConfig {
                bitmap_path: Some(dir.path().join("dirty.bitmap")),
                granularity: DISK_GRAN,
                first_epoch: 1,
            },
        )
        .unwrap(),
    );
    let guest = spawn_guest(map(&ram_path), Some(disk.clone()));
    let s = Setup {
        dir,
        psk: PreSharedKey::from_bytes(&[7; 48]).unwrap(),
        engine_view,
        guest,
        disk,
        pool: Arc::new(ScanPool::new(2).unwrap()),
    };

    // ---- Session 1: full sync, until checkpoint 5 is acknowledged.
    let s1 = start_session(&s, SyncMode::Full).await;
    wait_acked(&s1.handle, 5).await;
    let full = s1.sync.await.unwrap();
    assert_eq!(full.chunks, DISK_SIZE / DISK_GRAN);

    // ---- The backup dies: no END, the connection just drops.
    s1.backup.abort();
    let _ = s1.backup.await;
    let exit = tokio::time::timeout(Duration::from_secs(10), s1.primary)
        .await
        .expect("the primary notices")
        .unwrap()
        .unwrap();
    let PrimaryExit::BackupLost {
        last_acked: Some(acked1),
        ..
    } = exit
    else {
        panic!("expected BackupLost, got {exit:?}");
    };
    assert!(acked1 >= 5);
    s.disk.disconnect().unwrap();
    wait_dropped(&s1.store).await;
    drop(s1.handle);

    // ---- Unprotected: the guest writes RAM and disk; the disk's bitmap records where.
    assert!(s.guest.running.load(Ordering::SeqCst), "the VM was resumed");
    let_guest_run(&s.guest, 300).await;

    // The restarted backup finds session 1's last checkpoint.
    {
        let r = ReplicaStore::open("vm", &s.replica_dir(), (PAGES * PAGE) as u64).unwrap();
        let k = match r.state() {
            ReplicaState::Committed(k) | ReplicaState::Applying(k) => k,
            other => panic!("replica after session 1: {other}"),
        };
        assert!(
            k >= acked1,
            "replica at {k}, primary saw {acked1} acknowledged"
        );
    }

    // ---- Session 2: epochs restart at 1, fresh memory pre-copy, dirty disk resync.
    let s2 = start_session(&s, SyncMode::Dirty).await;
    let mut replica_states = Vec::new();
    {
        let mut st = s2.backup_status.clone();
        let cur = st.borrow_and_update().replica;
        replica_states.push(cur);
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                st.changed().await.unwrap();
                let r = st.borrow_and_update().replica;
                if replica_states.last() != Some(&r) {
                    replica_states.push(r);
                }
                if matches!(r, ReplicaState::Committed(k) if k >= 3) {
                    break;
                }
            }
        })
        .await
        .expect("session 2 commits 3 checkpoints");
    }
    assert_eq!(
        &replica_states[..2],
        &[ReplicaState::Syncing, ReplicaState::Committed(1)],
        "session 2: not activatable until its own checkpoint 1 commits: {replica_states:?}"
    );
    let resync = s2.sync.await.unwrap();
    println!(
        "session 2 disk resync: {} of {} chunks ({} regions), full sync was {} chunks",
        resync.chunks,
        DISK_SIZE / DISK_GRAN,
        resync.regions,
        full.chunks
    );
    assert_eq!(resync.chunks, s2.dirty_at_connect, "{resync:?}");
    assert!(resync.chunks > 0, "the outage dirtied the disk");
    assert!(
        resync.chunks <= DISK_HOT / DISK_GRAN + 1,
        "only the dirtied regions are copied: {resync:?}"
    );
    wait_acked(&s2.handle, 3).await;
    s2.handle.shutdown.send(true).unwrap();
    let exit = s2.primary.await.unwrap().unwrap();
    let PrimaryExit::Shutdown {
        last_acked: Some(acked2),
    } = exit
    else {
        panic!("expected Shutdown, got {exit:?}");
    };
    let (bexit, replica) = s2.backup.await.unwrap();
    assert_eq!(
        bexit.expect("backup ends cleanly on END"),
        BackupExit::Ended {
            committed: Some(acked2)
        }
    );
    s.guest.stop.store(true, Ordering::SeqCst);
    s.disk.disconnect().unwrap();
    wait_dropped(&s2.store).await;
    assert_eq!(
        s2.released.lock().unwrap().clone(),
        (1..=acked2).collect::<Vec<_>>(),
        "session 2 released its own epochs, in order"
    );

    // ---- The replica is exactly the primary at session 2's last checkpoint.
    let a = replica.activation_inputs().unwrap();
    assert_eq!(a.epoch, acked2);
    let dev = u64::from_le_bytes(a.device_state[..8].try_into().unwrap());
    let ram = u64::from_le_bytes(replica.ram()[0..8].try_into().unwrap());
    assert_eq!(
        dev, ram,
        "replica RAM and device state from different instants"
    );
    let snaps = s2.vm_snapshots.lock().unwrap();
    let (_, want_ram, want_disk) = snaps
        .iter()
        .find(|(e, _, _)| *e == a.epoch)
        .expect("snapshot of the committed checkpoint kept");
    let differing = (0..PAGES)
        .filter(|p| replica.ram()[p * PAGE..(p + 1) * PAGE] != want_ram[p * PAGE..(p + 1) * PAGE])
        .count();
    assert_eq!(
        differing, 0,
        "replica RAM differs at checkpoint {}",
        a.epoch
    );
    drop(replica);
    // Another backup restart: both stores come back at session 2's checkpoint.
    let replica = ReplicaStore::open("vm", &s.replica_dir(), (PAGES * PAGE) as u64).unwrap();
    assert_eq!(replica.state(), ReplicaState::Committed(acked2));
    let store = BackupStore::open(s.disk_cfg()).unwrap();
    assert_eq!(store.committed(), acked2);
    let backend = store.activate().expect("the disk replica is activatable");
    drop(backend);
    let got_disk = std::fs::read(s.dir.path().join("replica.img")).unwrap();
    assert_eq!(
        u64::from_le_bytes(got_disk[0..8].try_into().unwrap()),
        dev,
        "the replica disk's counter is the checkpoint's"
    );
    let bad = (0..got_disk.len() / 4096)
        .filter(|c| got_disk[c * 4096..(c + 1) * 4096] != want_disk[c * 4096..(c + 1) * 4096])
        .count();
    assert_eq!(
        bad, 0,
        "replica disk differs from the primary's at checkpoint {}",
        a.epoch
    );
}
