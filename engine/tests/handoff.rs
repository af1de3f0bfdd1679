//! Planned switchover at the engine level: the in-process loop over a real encrypted TCP
//! session and a real replica store, with a stand-in VM that records every stop/cont.
//!
//! The hand-off is requested from inside the stand-in VM while it saves checkpoint N, so the
//! final checkpoint is deterministically N+1 (the loop looks at the request at the next
//! boundary).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use remus_engine::backup::{BackupError, BackupExit};
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::{DiskWriteHeld, NoDisk, PortError, ReplicaDisk};
use remus_engine::primary::{
    BackupLoss, Compression, Primary, PrimaryConfig, PrimaryExit, PrimaryParts,
};
use remus_engine::replica::{ReplicaState, ReplicaStore};
use remus_tracker::{CompareTracker, ScanPool};
use tokio::sync::watch;

/// Commits of epochs ≥ `block` never finish (the backup hangs without closing anything).
struct StallingDisk {
    block: Arc<AtomicU64>,
}

#[async_trait]
impl ReplicaDisk for StallingDisk {
    async fn hold(&mut self, w: DiskWriteHeld) -> Result<(), PortError> {
        NoDisk.hold(w).await
    }
    async fn barrier(&mut self, e: u64, w: u64, b: u64) -> Result<(), PortError> {
        NoDisk.barrier(e, w, b).await
    }
    async fn commit(&mut self, epoch: u64) -> Result<(), PortError> {
        if epoch >= self.block.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn discard_uncommitted(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}

struct Run {
    /// Holds the replica's files until the test is done.
    _dir: tempfile::TempDir,
    exit: PrimaryExit,
    backup: tokio::task::JoinHandle<(Result<BackupExit, BackupError>, ReplicaStore)>,
    calls: Vec<VmCall>,
    guest: Arc<Guest>,
    snapshots: Snapshots,
    released: Vec<u64>,
    released_all: bool,
    final_epoch: u64,
}

/// Protects the guest, asks for a hand-off while checkpoint `at` is saved, and runs the loop
/// to its end. `stall_final` makes the backup hang on the final checkpoint's commit.
async fn run(at: u64, stall_final: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    let guest = spawn_guest(map(&ram_path), None);
    let psk = PreSharedKey::from_bytes(&[5; 48]).unwrap();
    let (status_tx, status_rx) = watch::channel(None);
    let block = Arc::new(AtomicU64::new(u64::MAX));
    let replica =
        ReplicaStore::open("vm", &dir.path().join("replica"), (PAGES * PAGE) as u64).unwrap();
    let disk = Box::new(StallingDisk {
        block: block.clone(),
    });
    let (session, backup) = loopback_session(&psk, replica, disk, move |_, status| {
        status_tx.send(Some(status)).unwrap();
    })
    .await;
    let pool = Arc::new(ScanPool::new(2).unwrap());
    let mut vm = FakeVm::new(guest.clone(), engine_view.clone(), None);
    let calls = vm.calls.clone();
    let snapshots = vm.snapshots.clone();
    let trigger: Arc<Mutex<Option<watch::Sender<bool>>>> = Arc::new(Mutex::new(None));
    let t = trigger.clone();
    vm.on_save = Some(Box::new(move |epoch| {
        if epoch == at {
            t.lock().unwrap().as_ref().unwrap().send_replace(true);
            if stall_final {
                block.store(at + 1, Ordering::SeqCst);
            }
        }
    }));
    let net = CheckedBuffer::new(status_rx);
    let (released, released_all) = (net.released.clone(), net.released_all.clone());
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.ack_timeout = Duration::from_millis(700);
    cfg.compression = Compression::XorLz4;
    let (primary, handle) = Primary::new(
        cfg,
        PrimaryParts {
            vm: Box::new(vm),
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
    *trigger.lock().unwrap() = Some(handle.handoff.clone());
    let exit = tokio::time::timeout(Duration::from_secs(60), primary.run())
        .await
        .expect("the loop ends")
        .unwrap();
    let calls = calls.lock().unwrap().clone();
    let released = released.lock().unwrap().clone();
    Run {
        _dir: dir,
        exit,
        backup,
        calls,
        guest,
        snapshots,
        released,
        released_all: released_all.load(Ordering::SeqCst),
        final_epoch: at + 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_leaves_the_vm_stopped_at_a_committed_final_checkpoint() {
    let r = run(4, false).await;
    let k = r.final_epoch;
    assert!(
        matches!(r.exit, PrimaryExit::HandedOff { epoch } if epoch == k),
        "expected HandedOff at {k}, got {:?}",
        r.exit
    );
    // Every checkpoint stops, saves and (but the last) resumes; the last stop is never
    // followed by a cont.
    let last_stop = r.calls.iter().rposition(|c| *c == VmCall::Stop).unwrap();
    assert_eq!(
        &r.calls[last_stop..],
        &[VmCall::Stop, VmCall::Save],
        "{:?}",
        r.calls
    );
    let stops = r.calls.iter().filter(|c| **c == VmCall::Stop).count();
    let conts = r.calls.iter().filter(|c| **c == VmCall::Cont).count();
    assert_eq!((stops as u64, conts as u64), (k, k - 1), "{:?}", r.calls);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !r.guest.running.load(std::sync::atomic::Ordering::SeqCst),
        "the VM stays stopped"
    );
    assert_eq!(
        r.released,
        (1..=k).collect::<Vec<_>>(),
        "output of k released"
    );
    assert!(r.released_all, "nothing stays held after the hand-off");

    let (bexit, replica) = tokio::time::timeout(Duration::from_secs(10), r.backup)
        .await
        .expect("the backup ends")
        .unwrap();
    assert_eq!(bexit.unwrap(), BackupExit::HandedOff { epoch: k });
    assert_eq!(replica.state(), ReplicaState::Committed(k));
    let a = replica.activation_inputs().unwrap();
    let snaps = r.snapshots.lock().unwrap();
    let (_, want, _) = snaps.iter().find(|(e, _, _)| *e == k).unwrap();
    assert!(
        replica.ram() == &want[..],
        "the replica is the VM at the final checkpoint"
    );
    let dev = u64::from_le_bytes(a.device_state[..8].try_into().unwrap());
    assert_eq!(
        dev,
        r.guest.counter.load(std::sync::atomic::Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_without_the_final_ack_resumes_the_vm() {
    let r = run(3, true).await;
    let k = r.final_epoch;
    let PrimaryExit::BackupLost { reason, last_acked } = &r.exit else {
        panic!("expected BackupLost, got {:?}", r.exit);
    };
    assert_eq!(*last_acked, Some(k - 1));
    assert!(
        matches!(reason, BackupLoss::SwitchoverAbandoned { epoch, .. } if *epoch == k),
        "{reason}"
    );
    assert_eq!(
        &r.calls[r.calls.len() - 3..],
        &[VmCall::Stop, VmCall::Save, VmCall::Cont],
        "the final checkpoint's stop is followed by a cont: {:?}",
        r.calls
    );
    assert!(r.guest.running.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        r.released,
        (1..k).collect::<Vec<_>>(),
        "output of k stays held"
    );
    assert!(!r.released_all);
    r.backup.abort();
}

/// A `HANDOFF` naming a checkpoint the backup has not committed is refused (NACK, protocol)
/// and the replica stays at its committed checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_of_an_uncommitted_checkpoint_is_refused() {
    use remus_engine::primary::Reply;
    use remus_engine::wire::Outgoing;
    use remus_stream::{EncodingChoice, NackReason, PageEncoding, Record};

    let dir = tempfile::tempdir().unwrap();
    let psk = PreSharedKey::from_bytes(&[6; 48]).unwrap();
    let replica = ReplicaStore::open("vm", &dir.path().join("replica"), 16 * PAGE as u64).unwrap();
    let (mut p, backup) = loopback_session(&psk, replica, Box::new(NoDisk), |_, _| {}).await;
    let epoch = 1;
    for o in [
        Outgoing::Record(Record::CheckpointBegin { epoch }),
        Outgoing::DiskBarrier(epoch),
        Outgoing::Pages {
            epoch,
            pfns: vec![3],
            new: vec![0x5a; PAGE],
            old: None,
            choice: EncodingChoice::Fixed(PageEncoding::Raw),
        },
        Outgoing::DeviceState {
            epoch,
            blob: Arc::new(vec![1; 8]),
        },
        Outgoing::CheckpointEnd { epoch, done: None },
        // Checkpoint 2 was never sent, let alone committed.
        Outgoing::Record(Record::HandOff { epoch: 2 }),
    ] {
        p.sender.send(o).await.unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(10), p.replies.recv())
            .await
            .expect("a reply within 10 s")
            .expect("reply channel open");
        // The backup's capabilities announcement comes first.
        if !matches!(r, Reply::Capabilities(_)) {
            replies.push(r);
        }
    }
    assert_eq!(replies[0], Reply::Ack(1));
    let nack = replies.pop().unwrap();
    let Reply::Nack { epoch, reason } = nack else {
        panic!("expected a NACK, got {nack:?}");
    };
    assert_eq!(epoch, 2);
    assert!(
        reason.starts_with(&NackReason::Protocol.to_string()),
        "{reason}"
    );
    assert!(reason.contains("HANDOFF"), "{reason}");
    let (exit, replica) = backup.await.unwrap();
    assert!(
        matches!(
            exit,
            Err(BackupError::Refused {
                epoch: 2,
                reason: NackReason::Protocol,
                ..
            })
        ),
        "{exit:?}"
    );
    assert_eq!(replica.state(), ReplicaState::Committed(1));
}
