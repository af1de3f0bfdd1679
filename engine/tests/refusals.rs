//! What the backup refuses, over a real encrypted TCP session: a checkpoint whose
//! `CHECKPOINT_END` does not match what arrived is NACKed and discarded while the previous
//! checkpoint stays activatable; a peer without the key is refused before any data flows.

use std::sync::Arc;
use std::time::Duration;

use remus_engine::backup::{Backup, BackupError};
use remus_engine::peer::{ChannelAuth, PeerError, PreSharedKey};
use remus_engine::ports::NoDisk;
use remus_engine::primary::Reply;
use remus_engine::replica::{ReplicaState, ReplicaStore};
use remus_engine::session::{accept_backup, open_primary, Identity};
use remus_engine::wire::{Outgoing, WireError};
use remus_stream::{CheckpointEnd, EncodingChoice, NackReason, PageEncoding, Record};
use tokio::net::TcpListener;

const PAGE: usize = 4096;
const PAGES: u64 = 16;

fn id() -> Identity {
    Identity {
        node: "pri".into(),
        peer_node: "bak".into(),
        domain: "vm".into(),
    }
}

fn pages(fill: u8, n: usize) -> Vec<u8> {
    vec![fill; n * PAGE]
}

async fn checkpoint(
    tx: &remus_engine::wire::StreamSender,
    epoch: u64,
    fill: u8,
    dev: &[u8],
    good_end: bool,
) {
    tx.send(Outgoing::Record(Record::CheckpointBegin { epoch }))
        .await
        .unwrap();
    tx.send(Outgoing::Pages {
        epoch,
        pfns: vec![0, 3],
        new: pages(fill, 2),
        old: None,
        choice: EncodingChoice::Fixed(PageEncoding::Lz4),
    })
    .await
    .unwrap();
    tx.send(Outgoing::DeviceState {
        epoch,
        blob: Arc::new(dev.to_vec()),
    })
    .await
    .unwrap();
    tx.send(Outgoing::DiskBarrier(epoch)).await.unwrap();
    let end = if good_end {
        Outgoing::CheckpointEnd { epoch, done: None }
    } else {
        // Counts that match, a digest that does not: as if a record had been replaced.
        Outgoing::Record(Record::CheckpointEnd(CheckpointEnd {
            epoch,
            pages: 2,
            page_records: 1,
            device_state_bytes: dev.len() as u64,
            disk_writes: 0,
            digest: 0xdead_beef,
        }))
    };
    tx.send(end).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_with_a_wrong_digest_is_refused_and_the_previous_one_still_activates() {
    let dir = tempfile::tempdir().unwrap();
    let psk = ChannelAuth::from(PreSharedKey::from_bytes(&[1; 40]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (psk_b, rdir) = (psk.clone(), dir.path().to_path_buf());
    let backup = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let s = accept_backup(sock, &psk_b, "bak", "pri", None, Duration::from_secs(5))
            .await
            .unwrap();
        let replica = ReplicaStore::open("vm", &rdir, PAGES * PAGE as u64).unwrap();
        let (mut b, _) = Backup::new("vm", s.reader, s.replies, replica, Box::new(NoDisk));
        let r = b.run().await;
        (r, b.into_replica().0)
    });
    let mut session = open_primary(&addr, &psk, &id(), Duration::from_secs(5))
        .await
        .unwrap();
    checkpoint(&session.sender, 1, 0x11, b"device-1", true).await;
    // Before any ACK the backup says what it can answer: without disks, no disk verify.
    assert_eq!(
        session.replies.recv().await,
        Some(Reply::Capabilities(remus_engine::disk::Capabilities {
            disk_verify: 0
        }))
    );
    assert_eq!(session.replies.recv().await, Some(Reply::Ack(1)));
    checkpoint(&session.sender, 2, 0x22, b"device-2", false).await;
    match session.replies.recv().await {
        Some(Reply::Nack { epoch: 2, reason }) => {
            assert!(reason.starts_with("digest-mismatch"), "{reason}")
        }
        other => panic!("expected NACK(2), got {other:?}"),
    }
    let (result, replica) = backup.await.unwrap();
    match result {
        Err(BackupError::Refused {
            epoch: 2, reason, ..
        }) => {
            assert_eq!(reason, NackReason::DigestMismatch)
        }
        other => panic!("expected a refusal of checkpoint 2, got {other:?}"),
    }
    assert_eq!(replica.state(), ReplicaState::Committed(1));
    let a = replica.activation_inputs().unwrap();
    assert_eq!((a.epoch, a.device_state.as_slice()), (1, &b"device-1"[..]));
    assert!(
        replica.ram()[..PAGE].iter().all(|&b| b == 0x11),
        "page 0 from checkpoint 1"
    );
    assert!(replica.ram()[3 * PAGE..4 * PAGE].iter().all(|&b| b == 0x11));
    assert!(
        replica.ram()[PAGE..2 * PAGE].iter().all(|&b| b == 0),
        "untouched page"
    );
    // Reopening (a restarted agent) finds the same activatable checkpoint.
    drop(replica);
    let again = ReplicaStore::open("vm", dir.path(), PAGES * PAGE as u64).unwrap();
    assert_eq!(again.activation_inputs().unwrap().epoch, 1);
}

#[tokio::test]
async fn a_peer_without_the_key_is_refused_and_sees_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let backup = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let good = ChannelAuth::from(PreSharedKey::from_bytes(&[1; 40]).unwrap());
        accept_backup(sock, &good, "bak", "pri", None, Duration::from_secs(5))
            .await
            .err()
    });
    let intruder = ChannelAuth::from(PreSharedKey::from_bytes(&[2; 40]).unwrap());
    let r = open_primary(&addr, &intruder, &id(), Duration::from_secs(5)).await;
    assert!(r.is_err(), "the intruder must not get a session");
    match backup.await.unwrap() {
        Some(WireError::Peer(PeerError::Unauthenticated { stage, .. })) => {
            assert_eq!(stage, "handshake message 1")
        }
        other => panic!("expected an authentication refusal, got {other:?}"),
    }
}
