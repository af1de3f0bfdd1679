//! The epoch loop against in-process stand-ins for the VM and the network buffer, over a
//! real encrypted TCP session and a real replica store.
//!
//! The "guest" is a thread writing into a shared file mapping while the stand-in VM is
//! running; the stand-in's device state is the guest's counter at the moment of `stop`. So a
//! checkpoint is consistent exactly when the replica's device state equals the counter the
//! replica RAM holds. The output buffer stand-in checks the output-commit invariant itself:
//! it refuses to release epoch k unless the backup's replica has committed k.
//! (The same loop against a real QEMU guest is in `tests/` at the workspace root.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use async_trait::async_trait;
use memmap2::MmapMut;
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::{NoDisk, PortError, VmControl};
use remus_engine::primary::{
    Compression, GuestMemory, Primary, PrimaryConfig, PrimaryExit, PrimaryParts,
};
use remus_engine::replica::ReplicaStore;
use remus_tracker::{CompareTracker, ScanPool};

use common::{loopback_session, map, CheckedBuffer, Ram, PAGE, PAGES};

/// The guest: while running, bump a counter (page 0) and scribble on pseudo-random pages.
struct Guest {
    running: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
}

fn spawn_guest(mut mem: MmapMut, stop: Arc<AtomicBool>) -> Guest {
    let running = Arc::new(AtomicBool::new(true));
    let parked = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let (r, p, c) = (running.clone(), parked.clone(), counter.clone());
    std::thread::spawn(move || {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        while !stop.load(Ordering::SeqCst) {
            if !r.load(Ordering::SeqCst) {
                p.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            p.store(false, Ordering::SeqCst);
            let n = c.load(Ordering::SeqCst) + 1;
            // The counter lives in guest RAM (page 0), written before it is published.
            mem[0..8].copy_from_slice(&n.to_le_bytes());
            c.store(n, Ordering::SeqCst);
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = 1 + (x as usize % (PAGES - 1));
                let off = page * PAGE + (x as usize >> 20) % (PAGE - 8);
                mem[off..off + 8].copy_from_slice(&n.to_le_bytes());
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    Guest {
        running,
        parked,
        counter,
    }
}

/// (epoch, RAM at that checkpoint) for the last few checkpoints.
type Snapshots = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

struct FakeVm {
    guest: Arc<Guest>,
    /// The engine's view of RAM, to record what each checkpoint must reproduce.
    ram: Arc<Ram>,
    /// (epoch, RAM at that checkpoint) for the last few checkpoints.
    snapshots: Snapshots,
    saves: u64,
}

#[async_trait]
impl VmControl for FakeVm {
    async fn stop(&mut self) -> Result<(), PortError> {
        self.guest.running.store(false, Ordering::SeqCst);
        while !self.guest.parked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        Ok(())
    }
    async fn cont(&mut self) -> Result<(), PortError> {
        self.guest.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn save_device_state(&mut self) -> Result<Vec<u8>, PortError> {
        let mut snaps = self.snapshots.lock().unwrap();
        snaps.push((self.saves + 1, self.ram.bytes().to_vec()));
        if snaps.len() > 4 {
            snaps.remove(0);
        }
        self.saves += 1;
        Ok(self
            .guest
            .counter
            .load(Ordering::SeqCst)
            .to_le_bytes()
            .to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_consistent_and_output_waits_for_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    let snapshots = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let guest = Arc::new(spawn_guest(map(&ram_path), stop.clone()));

    let psk = PreSharedKey::from_bytes(&[42; 48]).unwrap();
    let (status_tx, committed) = tokio::sync::watch::channel(None);

    let replica_dir = dir.path().join("replica");
    let replica = ReplicaStore::open("vm", &replica_dir, (PAGES * PAGE) as u64).unwrap();
    let (session, backup) = loopback_session(&psk, replica, Box::new(NoDisk), move |_, status| {
        status_tx.send(Some(status)).unwrap();
    })
    .await;
    let pool = Arc::new(ScanPool::new(2).unwrap());
    let net = CheckedBuffer::new(committed.clone());
    let released = net.released.clone();
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.compression = Compression::XorLz4;
    let (primary, handle) = Primary::new(
        cfg,
        PrimaryParts {
            vm: Box::new(FakeVm {
                guest: guest.clone(),
                ram: engine_view.clone(),
                snapshots: snapshots.clone(),
                saves: 0,
            }),
            net: Box::new(net),
            disk: Box::new(NoDisk),
            memory: engine_view.clone(),
            tracker: Box::new(CompareTracker::new(pool.clone())),
            pool,
            out: session.sender,
            replies: session.replies,
            initial_sync: None,
        },
    )
    .unwrap();
    let run = tokio::spawn(primary.run());
    let mut status = handle.status.clone();
    // Wait for 30 acknowledged checkpoints.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            status.changed().await.unwrap();
            if status.borrow().last_acked.is_some_and(|k| k >= 30) {
                break;
            }
        }
    })
    .await
    .expect("30 checkpoints within 60 s");
    handle.shutdown.send(true).unwrap();
    let exit = run.await.unwrap().unwrap();
    stop.store(true, Ordering::SeqCst);
    assert!(
        matches!(exit, PrimaryExit::Shutdown { last_acked: Some(k) } if k >= 30),
        "{exit:?}"
    );

    let (bexit, replica) = backup.await.unwrap();
    bexit.expect("backup ends cleanly on END");
    let a = replica.activation_inputs().unwrap();
    let dev_counter = u64::from_le_bytes(a.device_state[..8].try_into().unwrap());
    let ram_counter = u64::from_le_bytes(replica.ram()[0..8].try_into().unwrap());
    assert_eq!(
        dev_counter, ram_counter,
        "replica RAM and device state come from different instants"
    );
    assert!(ram_counter > 0, "the guest ran");
    let snaps = snapshots.lock().unwrap();
    let (_, expected) = snaps
        .iter()
        .find(|(e, _)| *e == a.epoch)
        .expect("snapshot of the committed checkpoint kept");
    let differing = (0..PAGES)
        .filter(|p| replica.ram()[p * PAGE..(p + 1) * PAGE] != expected[p * PAGE..(p + 1) * PAGE])
        .count();
    assert_eq!(
        differing, 0,
        "replica RAM differs from the primary at checkpoint {}",
        a.epoch
    );
    let released = released.lock().unwrap().clone();
    assert_eq!(
        released,
        (1..=a.epoch).collect::<Vec<_>>(),
        "every epoch released once, in order"
    );
    let s = handle.status.borrow().clone();
    assert!(s.summary.pause.p50_us > 0);
    assert!(!s.precopy_pages.is_empty());
}
