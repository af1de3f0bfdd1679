//! The agent declares the backup lost before the ACK timeout (its failure detector heard
//! nothing for the detection timeout): the loop must end at once with `BackupLost`
//! (`BackupLoss::Abandoned`) instead of waiting out a long ACK timeout, and must not have
//! released the output of the checkpoint the backup never acknowledged.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::{DiskWriteHeld, NoDisk, OutputBuffer, PortError, ReplicaDisk};
use remus_engine::primary::{
    BackupLoss, Compression, EpochPhase, Primary, PrimaryConfig, PrimaryExit, PrimaryParts,
};
use remus_engine::replica::ReplicaStore;
use remus_tracker::{CompareTracker, ScanPool};

use common::{loopback_session, map, spawn_guest, FakeVm, Ram, PAGE, PAGES};

/// Commits checkpoints before `stuck_at`, then never finishes a commit: the backup goes
/// silent with its connection open, as a hung host does.
struct StuckDisk {
    stuck_at: u64,
}

#[async_trait]
impl ReplicaDisk for StuckDisk {
    async fn hold(&mut self, _w: DiskWriteHeld) -> Result<(), PortError> {
        Err(PortError::new("disk", "hold", "no disk"))
    }
    async fn barrier(&mut self, _e: u64, _w: u64, _b: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn commit(&mut self, epoch: u64) -> Result<(), PortError> {
        if epoch >= self.stuck_at {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn discard_uncommitted(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}

/// Records what it released.
struct RecordingBuffer {
    released: Arc<Mutex<Vec<u64>>>,
}

#[async_trait]
impl OutputBuffer for RecordingBuffer {
    fn max_closed_epochs(&self) -> usize {
        2
    }
    async fn close_epoch(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn release(&mut self, epoch: u64) -> Result<(), PortError> {
        self.released.lock().unwrap().push(epoch);
        Ok(())
    }
    async fn release_all(&mut self) -> Result<(), PortError> {
        self.released.lock().unwrap().push(u64::MAX);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_backup_ends_the_loop_at_once_with_output_held() {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    let guest = spawn_guest(map(&ram_path), None);
    let psk = PreSharedKey::from_bytes(&[9; 48]).unwrap();
    let replica =
        ReplicaStore::open("vm", &dir.path().join("replica"), (PAGES * PAGE) as u64).unwrap();
    let stuck_at = 4;
    let (session, _backup) =
        loopback_session(&psk, replica, Box::new(StuckDisk { stuck_at }), |_, _| {}).await;
    let pool = Arc::new(ScanPool::new(2).unwrap());
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.compression = Compression::XorLz4;
    // Long enough that only the abandon can end the wait in this test.
    cfg.ack_timeout = Duration::from_secs(120);
    cfg.ack_wait_max = Duration::from_secs(120);
    let released = Arc::new(Mutex::new(Vec::new()));
    let (primary, handle) = Primary::new(
        cfg,
        PrimaryParts {
            vm: Box::new(FakeVm::new(guest.clone(), engine_view.clone(), None)),
            net: Box::new(RecordingBuffer {
                released: released.clone(),
            }),
            disk: Box::new(NoDisk),
            memory: engine_view,
            tracker: Box::new(CompareTracker::new(pool.clone())),
            pool,
            out: session.sender,
            replies: session.replies,
            initial_sync: None,
        },
    )
    .unwrap();
    let run = tokio::spawn(primary.run());
    // Wait until the loop waits for the ACK of the stuck checkpoint.
    let mut status = handle.status.clone();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let s = status.borrow_and_update().clone();
            if s.last_acked == Some(stuck_at - 1)
                && matches!(s.phase, EpochPhase::AwaitingAck { epoch } if epoch >= stuck_at)
            {
                return;
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("the loop waits for the stuck checkpoint's ACK");
    let asked = Instant::now();
    handle.abandon_backup();
    let exit = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the loop ends long before its 120 s ACK timeout")
        .unwrap();
    println!("loop ended {:?} after the abandon", asked.elapsed());
    match exit {
        Ok(PrimaryExit::BackupLost {
            reason: BackupLoss::Abandoned,
            last_acked,
        }) => assert_eq!(last_acked, Some(stuck_at - 1)),
        other => panic!("expected BackupLost(Abandoned), got {other:?}"),
    }
    let released = released.lock().unwrap().clone();
    assert!(
        released.iter().all(|&e| e < stuck_at),
        "released output the backup never acknowledged: {released:?}"
    );
    assert!(
        released.contains(&(stuck_at - 1)),
        "acknowledged output was not released: {released:?}"
    );
}
