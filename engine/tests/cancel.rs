//! Controlling the backup's receiver from outside: cancelling it while the replication
//! connection is half-open, and holding it still between two checkpoints.
//!
//! The primary side is driven by hand over a real encrypted TCP session: it sends complete
//! and partial checkpoints and then goes silent *without closing the connection*, which is
//! what a cut link looks like to the backup. The daemon's detector then cancels the receiver;
//! these tests check that `run` ends with `Cancelled`, that a partial checkpoint is
//! discarded, and that a checkpoint already being committed is finished (and acknowledged)
//! before the cancel takes effect. The quiesce test checks that a held receiver leaves the
//! replica's files at exactly the committed checkpoint while the primary keeps sending, and
//! acknowledges the next checkpoint once let go.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use remus_engine::backup::{BackupError, BackupStatus, QuiesceRequest};
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::{DiskWriteHeld, PortError, ReplicaDisk};
use remus_engine::primary::Reply;
use remus_engine::replica::{ReplicaState, ReplicaStore};
use remus_engine::session::PrimarySession;
use remus_engine::wire::Outgoing;
use remus_stream::{EncodingChoice, PageEncoding, Record};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use common::{loopback_session, BackupTask};

const PAGE: usize = 4096;
const RAM: u64 = 64 * PAGE as u64;

/// A disk with nothing to replicate whose commit can be held open by the test.
struct GatedDisk {
    /// Notified when a commit starts.
    entered: Arc<Notify>,
    /// The commit waits for this.
    release: Arc<Notify>,
}

#[async_trait]
impl ReplicaDisk for GatedDisk {
    async fn hold(&mut self, _w: DiskWriteHeld) -> Result<(), PortError> {
        Err(PortError::new("disk", "hold", "no disk"))
    }
    async fn barrier(&mut self, _e: u64, _w: u64, _b: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn commit(&mut self, _epoch: u64) -> Result<(), PortError> {
        self.entered.notify_one();
        self.release.notified().await;
        Ok(())
    }
    async fn discard_uncommitted(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}

/// What a test holds of the backup side.
struct Controls {
    cancel: watch::Sender<bool>,
    quiesce: mpsc::Sender<QuiesceRequest>,
    /// The receiver's status, once the session's header arrived (with the first record).
    status: oneshot::Receiver<watch::Receiver<BackupStatus>>,
}

/// A session whose backup runs with a cancel and quiesce requests; returns the primary's ends,
/// the backup task and the controls.
async fn session(
    dir: &std::path::Path,
    disk: Box<dyn ReplicaDisk>,
) -> (PrimarySession, BackupTask, Controls) {
    let psk = PreSharedKey::from_bytes(&[9; 40]).unwrap();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (quiesce_tx, quiesce_rx) = mpsc::channel(1);
    let (status_tx, status_rx) = oneshot::channel();
    let replica = ReplicaStore::open("vm", &dir.join("replica"), RAM).unwrap();
    let (p, backup) = loopback_session(&psk, replica, disk, move |b, status| {
        b.set_cancel(cancel_rx);
        b.set_quiesce(quiesce_rx);
        let _ = status_tx.send(status);
    })
    .await;
    let controls = Controls {
        cancel: cancel_tx,
        quiesce: quiesce_tx,
        status: status_rx,
    };
    (p, backup, controls)
}

/// Sends checkpoint `epoch` (pages 0..2 filled with `fill`); `end` closes it.
async fn send_checkpoint(p: &PrimarySession, epoch: u64, fill: u8, end: bool) {
    let send = |o| p.sender.send(o);
    send(Outgoing::Record(Record::CheckpointBegin { epoch }))
        .await
        .unwrap();
    send(Outgoing::DiskBarrier(epoch)).await.unwrap();
    send(Outgoing::Pages {
        epoch,
        pfns: vec![0, 1],
        new: vec![fill; 2 * PAGE],
        old: None,
        choice: EncodingChoice::Fixed(PageEncoding::Raw),
    })
    .await
    .unwrap();
    send(Outgoing::DeviceState {
        epoch,
        blob: Arc::new(vec![fill; 16]),
    })
    .await
    .unwrap();
    if end {
        send(Outgoing::CheckpointEnd { epoch, done: None })
            .await
            .unwrap();
    }
}

/// Asks the receiver to hold still; returns where it says it holds and the let-go.
async fn ask_quiesce(
    requests: &mpsc::Sender<QuiesceRequest>,
) -> (oneshot::Receiver<u64>, oneshot::Sender<()>) {
    let (request, quiesced, resume) = QuiesceRequest::new();
    requests.send(request).await.unwrap();
    (quiesced, resume)
}

/// The next reply other than the backup's capabilities announcement.
async fn reply(p: &mut PrimarySession) -> Reply {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), p.replies.recv())
            .await
            .expect("a reply within 10 s")
            .expect("reply channel open");
        if !matches!(r, Reply::Capabilities(_)) {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_waiting_ends_the_session_and_discards_the_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, backup, c) = session(dir.path(), Box::new(remus_engine::ports::NoDisk)).await;
    let cancel = c.cancel;
    send_checkpoint(&p, 1, 0x11, true).await;
    assert_eq!(reply(&mut p).await, Reply::Ack(1));
    send_checkpoint(&p, 2, 0x22, true).await;
    assert_eq!(reply(&mut p).await, Reply::Ack(2));
    // Checkpoint 3 starts and the primary goes silent; the connection stays open.
    send_checkpoint(&p, 3, 0x33, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !backup.is_finished(),
        "a silent, open session keeps the receiver waiting"
    );
    cancel.send(true).unwrap();
    let (exit, replica) = tokio::time::timeout(Duration::from_secs(5), backup)
        .await
        .expect("cancel ends the receiver promptly")
        .unwrap();
    let err = exit.unwrap_err();
    assert!(
        matches!(
            err,
            BackupError::Cancelled {
                replica: ReplicaState::Committed(2),
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("domain vm")
            && msg.contains("cancelled")
            && msg.contains("committed checkpoint 2"),
        "{msg}"
    );
    let a = replica.activation_inputs().unwrap();
    assert_eq!((a.epoch, a.device_state), (2, vec![0x22; 16]));
    assert_eq!(
        &replica.ram()[..PAGE],
        &[0x22; PAGE][..],
        "the partial checkpoint 3 is discarded"
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_commit_lets_the_commit_finish_first() {
    let dir = tempfile::tempdir().unwrap();
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let disk = GatedDisk {
        entered: entered.clone(),
        release: release.clone(),
    };
    let (mut p, backup, c) = session(dir.path(), Box::new(disk)).await;
    let cancel = c.cancel;
    // Checkpoint 1 commits normally (the gate is opened at once).
    send_checkpoint(&p, 1, 0x11, true).await;
    entered.notified().await;
    release.notify_one();
    assert_eq!(reply(&mut p).await, Reply::Ack(1));
    // Checkpoint 2 is complete and being committed when the cancel comes.
    send_checkpoint(&p, 2, 0x22, true).await;
    entered.notified().await;
    cancel.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !backup.is_finished(),
        "a commit in progress is not interrupted"
    );
    release.notify_one();
    assert_eq!(
        reply(&mut p).await,
        Reply::Ack(2),
        "the commit completed and was acknowledged"
    );
    let (exit, replica) = tokio::time::timeout(Duration::from_secs(5), backup)
        .await
        .expect("the receiver ends after the commit")
        .unwrap();
    assert!(
        matches!(
            exit,
            Err(BackupError::Cancelled {
                replica: ReplicaState::Committed(2),
                ..
            })
        ),
        "{exit:?}"
    );
    assert_eq!(replica.activation_inputs().unwrap().epoch, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesced_receiver_holds_the_committed_checkpoint_until_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, backup, c) = session(dir.path(), Box::new(remus_engine::ports::NoDisk)).await;
    send_checkpoint(&p, 1, 0x11, true).await;
    assert_eq!(reply(&mut p).await, Reply::Ack(1));
    let status = c.status.await.unwrap();
    // Asked between checkpoints: served right after a commit, the one whose ACK was just
    // seen (if the receiver had not yet looked for requests) or the next one.
    let (quiesced, resume) = ask_quiesce(&c.quiesce).await;
    send_checkpoint(&p, 2, 0x22, true).await;
    let held_at = tokio::time::timeout(Duration::from_secs(5), quiesced)
        .await
        .expect("quiesced within 5 s")
        .unwrap();
    assert!(held_at == 1 || held_at == 2, "held at {held_at}");
    // The primary goes on: checkpoint 3 is sent whole, but nothing after the held
    // checkpoint is taken while the receiver is held.
    send_checkpoint(&p, 3, 0x33, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut acks = Vec::new();
    while let Ok(r) = p.replies.try_recv() {
        acks.push(r);
    }
    let expected: Vec<Reply> = (2..=held_at).map(Reply::Ack).collect();
    assert_eq!(
        acks, expected,
        "only checkpoints up to the held one are acknowledged"
    );
    assert_eq!(status.borrow().committed_count, held_at);
    let fill = if held_at == 1 { 0x11 } else { 0x22 };
    let ram = std::fs::read(dir.path().join("replica").join("ram")).unwrap();
    assert_eq!(
        &ram[..2 * PAGE],
        &vec![fill; 2 * PAGE][..],
        "RAM file at checkpoint {held_at}"
    );
    let dev = std::fs::read(dir.path().join("replica").join("devstate")).unwrap();
    assert_eq!(
        dev,
        vec![fill; 16],
        "device state file at checkpoint {held_at}"
    );
    assert!(!backup.is_finished());
    // Let go: the rest is taken and acknowledged; the session goes on.
    resume.send(()).unwrap();
    for k in held_at + 1..=3 {
        assert_eq!(reply(&mut p).await, Reply::Ack(k));
    }
    // A requester that gives up before being served does not hold anything.
    let (quiesced, _resume) = ask_quiesce(&c.quiesce).await;
    drop(quiesced);
    send_checkpoint(&p, 4, 0x44, true).await;
    assert_eq!(reply(&mut p).await, Reply::Ack(4));
    send_checkpoint(&p, 5, 0x55, true).await;
    assert_eq!(reply(&mut p).await, Reply::Ack(5));
    c.cancel.send(true).unwrap();
    let (exit, replica) = tokio::time::timeout(Duration::from_secs(5), backup)
        .await
        .expect("cancel ends the receiver")
        .unwrap();
    assert!(
        matches!(
            exit,
            Err(BackupError::Cancelled {
                replica: ReplicaState::Committed(5),
                ..
            })
        ),
        "{exit:?}"
    );
    assert_eq!(replica.activation_inputs().unwrap().epoch, 5);
}
