//! In-process stand-ins shared by the session tests (re-protection, hand-off): a "guest"
//! thread writing guest RAM (a shared file mapping) and, optionally, a replicated disk
//! (a real `blk_remus::Primary` over a real image file); a stand-in VM whose `stop` parks the
//! guest and which records every stop/cont; an output buffer that checks the output-commit
//! invariant; and a loopback replication session whose backup end runs in a task
//! (`loopback_session`). The disk path is the engine's own (`remus_engine::disk`), the one
//! the daemon uses.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use blk_remus::BlockBackend;
use bytes::Bytes;
use memmap2::MmapMut;
use remus_engine::backup::{Backup, BackupError, BackupExit, BackupStatus};
use remus_engine::peer::{ChannelAuth, PreSharedKey};
use remus_engine::ports::{OutputBuffer, PortError, ReplicaDisk, VmControl};
use remus_engine::primary::GuestMemory;
use remus_engine::replica::{ReplicaState, ReplicaStore};
use remus_engine::session::{accept_backup, open_primary, Identity, PrimarySession};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const PAGES: usize = 2048;
pub const PAGE: usize = 4096;
/// Size of the replicated disk of the tests that have one.
pub const DISK_SIZE: u64 = 8 << 20;
/// Dirty-bitmap granularity of that disk.
pub const DISK_GRAN: u64 = 64 << 10;
/// The guest's random disk writes stay in this first part of the disk, so a resync of what
/// it dirtied is visibly smaller than a full copy.
pub const DISK_HOT: u64 = DISK_SIZE / 4;

/// The engine's view of guest RAM.
pub struct Ram {
    pub map: MmapMut,
}

impl GuestMemory for Ram {
    fn bytes(&self) -> &[u8] {
        &self.map
    }
}

pub fn map(path: &Path) -> MmapMut {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.set_len((PAGES * PAGE) as u64).unwrap();
    // SAFETY: test-only shared mapping of a file this test owns; concurrent writes by the
    // guest thread are the point of the test and are only read as bytes.
    unsafe { MmapMut::map_mut(&f).unwrap() }
}

/// The guest thread's controls.
pub struct Guest {
    pub running: Arc<AtomicBool>,
    pub parked: Arc<AtomicBool>,
    pub counter: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// While running: bump a counter (RAM page 0, and disk offset 0 when there is a disk),
/// scribble it on pseudo-random pages, and every 8th step write 4 KiB at a pseudo-random
/// place in the disk's first quarter.
pub fn spawn_guest(mut mem: MmapMut, disk: Option<Arc<dyn BlockBackend>>) -> Arc<Guest> {
    let g = Arc::new(Guest {
        running: Arc::new(AtomicBool::new(true)),
        parked: Arc::new(AtomicBool::new(false)),
        counter: Arc::new(AtomicU64::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
    });
    let (r, p, c, stop) = (
        g.running.clone(),
        g.parked.clone(),
        g.counter.clone(),
        g.stop.clone(),
    );
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
            mem[0..8].copy_from_slice(&n.to_le_bytes());
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = 1 + (x as usize % (PAGES - 1));
                let off = page * PAGE + (x as usize >> 20) % (PAGE - 8);
                mem[off..off + 8].copy_from_slice(&n.to_le_bytes());
            }
            if let Some(d) = &disk {
                d.write_at(0, Bytes::copy_from_slice(&n.to_le_bytes()), false)
                    .expect("guest disk write");
                if n % 8 == 0 {
                    let off = (4096 + (x >> 11) % (DISK_HOT - 8192)) & !4095;
                    d.write_at(off, Bytes::from(vec![n as u8; 4096]), false)
                        .expect("guest disk write");
                }
            }
            c.store(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    g
}

/// What the stand-in VM was asked to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmCall {
    Stop,
    Cont,
    Save,
}

/// (epoch, RAM, disk image) at each of the last few checkpoints.
pub type Snapshots = Arc<Mutex<Vec<(u64, Vec<u8>, Vec<u8>)>>>;

pub struct FakeVm {
    pub guest: Arc<Guest>,
    pub ram: Arc<Ram>,
    /// The primary's disk image file, copied at each checkpoint (if any).
    pub disk_image: Option<std::path::PathBuf>,
    pub snapshots: Snapshots,
    pub calls: Arc<Mutex<Vec<VmCall>>>,
    pub saves: u64,
    /// Called with the epoch of each checkpoint while its device state is saved.
    pub on_save: Option<Box<dyn FnMut(u64) + Send>>,
}

impl FakeVm {
    pub fn new(guest: Arc<Guest>, ram: Arc<Ram>, disk_image: Option<&Path>) -> Self {
        Self {
            guest,
            ram,
            disk_image: disk_image.map(Path::to_path_buf),
            snapshots: Arc::new(Mutex::new(Vec::new())),
            calls: Arc::new(Mutex::new(Vec::new())),
            saves: 0,
            on_save: None,
        }
    }
}

#[async_trait]
impl VmControl for FakeVm {
    async fn stop(&mut self) -> Result<(), PortError> {
        self.calls.lock().unwrap().push(VmCall::Stop);
        self.guest.running.store(false, Ordering::SeqCst);
        while !self.guest.parked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        Ok(())
    }
    async fn cont(&mut self) -> Result<(), PortError> {
        self.calls.lock().unwrap().push(VmCall::Cont);
        self.guest.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn save_device_state(&mut self) -> Result<Vec<u8>, PortError> {
        self.calls.lock().unwrap().push(VmCall::Save);
        let disk = match &self.disk_image {
            Some(p) => std::fs::read(p).unwrap(),
            None => Vec::new(),
        };
        let mut snaps = self.snapshots.lock().unwrap();
        snaps.push((self.saves + 1, self.ram.bytes().to_vec(), disk));
        if snaps.len() > 4 {
            snaps.remove(0);
        }
        self.saves += 1;
        if let Some(f) = &mut self.on_save {
            f(self.saves);
        }
        Ok(self
            .guest
            .counter
            .load(Ordering::SeqCst)
            .to_le_bytes()
            .to_vec())
    }
}

/// Checks output commit: epoch k may be released only once the backup committed k.
pub struct CheckedBuffer {
    /// The backup receiver's status, once it exists (it is built after the handshake).
    pub backup: watch::Receiver<Option<watch::Receiver<BackupStatus>>>,
    pub closed: Vec<u64>,
    pub released: Arc<Mutex<Vec<u64>>>,
    pub released_all: Arc<AtomicBool>,
}

impl CheckedBuffer {
    pub fn new(backup: watch::Receiver<Option<watch::Receiver<BackupStatus>>>) -> Self {
        Self {
            backup,
            closed: Vec::new(),
            released: Arc::new(Mutex::new(Vec::new())),
            released_all: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[async_trait]
impl OutputBuffer for CheckedBuffer {
    fn max_closed_epochs(&self) -> usize {
        1
    }
    async fn close_epoch(&mut self, epoch: u64) -> Result<(), PortError> {
        assert!(
            self.closed.len() == self.released.lock().unwrap().len(),
            "epoch {epoch} closed while an earlier one is unreleased (plug depth 1)"
        );
        self.closed.push(epoch);
        Ok(())
    }
    async fn release(&mut self, epoch: u64) -> Result<(), PortError> {
        let committed = match &*self.backup.borrow() {
            Some(st) => match st.borrow().replica {
                ReplicaState::Committed(k) => Some(k),
                _ => None,
            },
            None => None,
        };
        assert!(
            committed.is_some_and(|c| c >= epoch),
            "released epoch {epoch} but the backup has committed only {committed:?}"
        );
        self.released.lock().unwrap().push(epoch);
        Ok(())
    }
    async fn release_all(&mut self) -> Result<(), PortError> {
        self.released_all.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Waits until the guest has run `steps` more steps.
pub async fn let_guest_run(guest: &Guest, steps: u64) {
    let start = guest.counter.load(Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), async {
        while guest.counter.load(Ordering::SeqCst) < start + steps {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the guest runs");
}

/// The backup as the session tests build it.
pub type TestBackup = Backup<OwnedReadHalf, OwnedWriteHalf>;

/// The backup end of a loopback session: how its `run` ended, and its replica.
pub type BackupTask = tokio::task::JoinHandle<(Result<BackupExit, BackupError>, ReplicaStore)>;

/// A replication session over an encrypted TCP connection on 127.0.0.1, node "pri" to
/// node "bak", domain "vm": the backup accepts it and runs a `Backup` of `replica` and
/// `disk`, after `configure` has seen it and its status channel (to set a cancel or quiesce
/// channel, or to hand the status to the test). Returns the primary's end and the backup's
/// task.
pub async fn loopback_session(
    psk: &PreSharedKey,
    replica: ReplicaStore,
    disk: Box<dyn ReplicaDisk>,
    configure: impl FnOnce(&mut TestBackup, watch::Receiver<BackupStatus>) + Send + 'static,
) -> (PrimarySession, BackupTask) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let auth = ChannelAuth::from(psk.clone());
    let psk_b = auth.clone();
    let backup = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let s = accept_backup(sock, &psk_b, "bak", "pri", None, Duration::from_secs(5))
            .await
            .unwrap();
        let (mut b, status) = Backup::new("vm", s.reader, s.replies, replica, disk);
        configure(&mut b, status);
        let exit = b.run().await;
        (exit, b.into_replica().0)
    });
    let id = Identity {
        node: "pri".into(),
        peer_node: "bak".into(),
        domain: "vm".into(),
    };
    let session = open_primary(&addr, &auth, &id, Duration::from_secs(5))
        .await
        .unwrap();
    (session, backup)
}
