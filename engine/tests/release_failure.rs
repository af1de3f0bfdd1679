//! Output the backup acknowledged but the network buffer cannot release ends the loop with
//! its own error (`PrimaryError::Release`, naming the epoch and the buffer's failure), not
//! with "backup lost": the backup is fine, the host is not.

mod common;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use remus_engine::peer::PreSharedKey;
use remus_engine::ports::{NoDisk, OutputBuffer, PortError};
use remus_engine::primary::{Compression, Primary, PrimaryConfig, PrimaryError, PrimaryParts};
use remus_engine::replica::ReplicaStore;
use remus_tracker::{CompareTracker, ScanPool};

use common::{loopback_session, map, spawn_guest, FakeVm, Ram, PAGE, PAGES};

/// Releases epochs before `fail_at`, then fails to.
struct FailingBuffer {
    fail_at: u64,
}

#[async_trait]
impl OutputBuffer for FailingBuffer {
    fn max_closed_epochs(&self) -> usize {
        1
    }
    async fn close_epoch(&mut self, _epoch: u64) -> Result<(), PortError> {
        Ok(())
    }
    async fn release(&mut self, epoch: u64) -> Result<(), PortError> {
        if epoch >= self.fail_at {
            let cause = std::io::Error::other("qdisc vanished");
            return Err(PortError::new(
                "netbuf tap0",
                format!("release epoch {epoch}"),
                cause,
            ));
        }
        Ok(())
    }
    async fn release_all(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_is_its_own_error_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let ram_path = dir.path().join("guest.ram");
    let engine_view = Arc::new(Ram {
        map: map(&ram_path),
    });
    let guest = spawn_guest(map(&ram_path), None);
    let psk = PreSharedKey::from_bytes(&[9; 48]).unwrap();
    let replica =
        ReplicaStore::open("vm", &dir.path().join("replica"), (PAGES * PAGE) as u64).unwrap();
    let (session, _backup) = loopback_session(&psk, replica, Box::new(NoDisk), |_, _| {}).await;
    let pool = Arc::new(ScanPool::new(2).unwrap());
    let mut cfg = PrimaryConfig::new("vm");
    cfg.interval = Duration::from_millis(40);
    cfg.compression = Compression::XorLz4;
    let (primary, _handle) = Primary::new(
        cfg,
        PrimaryParts {
            vm: Box::new(FakeVm::new(guest.clone(), engine_view.clone(), None)),
            net: Box::new(FailingBuffer { fail_at: 3 }),
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
    let exit = tokio::time::timeout(Duration::from_secs(60), primary.run())
        .await
        .expect("the loop ends");
    let err = match exit {
        Err(e) => e,
        Ok(x) => panic!("expected a release error, got {x:?}"),
    };
    assert!(
        matches!(err, PrimaryError::Release { epoch: 3, .. }),
        "{err}"
    );
    let port = err
        .source()
        .and_then(|s| s.downcast_ref::<PortError>())
        .expect("the buffer's error is the source");
    assert_eq!(port.object, "netbuf tap0");
    let io = port
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the cause is kept, not rendered");
    assert_eq!(io.to_string(), "qdisc vanished");
}
