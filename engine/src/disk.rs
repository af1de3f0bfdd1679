//! The disk path: `blk-remus` replicated disks wired to the replication stream, on both
//! sides, by the engine itself.
//!
//! Why here and not in the daemon: a disk write and a checkpoint share one stream and one
//! barrier (`DISK_BARRIER(k)` must follow every write of epoch ≤ k and precede every write
//! of k+1), so the engine owns the whole path of a write. On the primary, `blk-remus` emits
//! each applied write as a [`DiskEvent`] holding the guest's request bytes; the forwarder
//! queues it as [`Outgoing::DiskWrite`], and the stream encoder writes those bytes into the
//! record: the one copy between the guest's NBD request and the socket (before the
//! channel's encryption). On the backup, the receiver hands each `DISK_WRITE` to
//! [`ReplicaDisks`], which gives it to the disk's `blk_remus::BackupStore` (held per epoch,
//! committed through its WAL). The engine's tests use these same types.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use blk_remus::{DiskEvent, WriteKind};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::ports::{
    DiskBarrier, DiskOpHeld, DiskWriteHeld, PortError, ReplicaDisk, ReplicaRegionDigest,
};
use crate::wire::{DiskWriteOp, Outgoing, StreamSender};
use remus_stream::{Record, VerifyRegion};

/// The JSON of a `CONTROL` record that carries a disk synchronisation marker (the stream
/// format has no record type of its own for it; see `docs/stream-format.md`, CONTROL).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlMessage {
    /// A disk synchronisation starts: the replica is inconsistent until its end commits.
    DiskSyncBegin {
        /// Disk index.
        disk: u16,
        /// Epoch of the marker.
        epoch: u64,
        /// Full copy or bitmap resync.
        full: bool,
    },
    /// The synchronisation copied everything.
    DiskSyncEnd {
        /// Disk index.
        disk: u16,
        /// Epoch of the marker.
        epoch: u64,
    },
}

/// The backup's first record on its reply stream (a `CONTROL`, before any ACK): what it can
/// answer. A backup that sends none (older than online verify) answers no `DISK_VERIFY`,
/// and the primary refuses a verify against it instead of waiting or reporting "clean".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename = "capabilities")]
pub struct Capabilities {
    /// Version of `DISK_VERIFY` handling: 0 none, 1 XXH3-128 region digests.
    #[serde(default)]
    pub disk_verify: u32,
}

/// Carries one disk's events from `blk-remus` into the replication stream.
///
/// `blk-remus` hands events to a bounded channel from blocking threads; this task turns them
/// into `DISK_WRITE` records on the shared stream sender, in order. Its own `Barrier` events
/// are not sent (the engine sends one `DISK_BARRIER` for all disks, counted by the stream
/// encoder); they only move `forwarded`, which the engine's barrier waits on so that every
/// write of epoch ≤ k is queued before anything of checkpoint k.
pub fn spawn_disk_forwarder(
    disk: u16,
    mut events: mpsc::Receiver<DiskEvent>,
    out: StreamSender,
    forwarded: watch::Sender<u64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let item = match ev {
                DiskEvent::Write {
                    epoch,
                    offset,
                    kind,
                } => {
                    let op = match kind {
                        WriteKind::Data(b) => DiskWriteOp::Data(b),
                        WriteKind::Zeroes { len } => match u32::try_from(len) {
                            Ok(n) => DiskWriteOp::Zeroes(n),
                            Err(_) => {
                                // NBD lengths are 32-bit, so this cannot come from a request.
                                warn!(disk, len, "zeroes range over 4 GiB cannot be replicated");
                                continue;
                            }
                        },
                        WriteKind::Trim { len } => match u32::try_from(len) {
                            Ok(n) => DiskWriteOp::Trim(n),
                            Err(_) => {
                                warn!(disk, len, "trim range over 4 GiB cannot be replicated");
                                continue;
                            }
                        },
                    };
                    Outgoing::DiskWrite {
                        epoch,
                        disk,
                        offset,
                        op,
                    }
                }
                DiskEvent::Barrier { epoch, .. } => {
                    let _ = forwarded.send(epoch);
                    continue;
                }
                DiskEvent::SyncBegin { epoch, full } => {
                    let msg = ControlMessage::DiskSyncBegin { disk, epoch, full };
                    Outgoing::Record(Record::Control(
                        serde_json::to_string(&msg).expect("control message serialises"),
                    ))
                }
                DiskEvent::SyncEnd { epoch } => {
                    let msg = ControlMessage::DiskSyncEnd { disk, epoch };
                    Outgoing::Record(Record::Control(
                        serde_json::to_string(&msg).expect("control message serialises"),
                    ))
                }
            };
            if out.send(item).await.is_err() {
                return;
            }
        }
    })
}

/// One replicated disk on the primary.
pub struct PrimaryDisk {
    /// `disk <domain>/<id>`.
    pub object: String,
    /// The replicating backend (also served over NBD).
    pub primary: Arc<blk_remus::Primary>,
    /// The epoch whose `Barrier` the forwarder has queued last.
    pub forwarded: watch::Receiver<u64>,
}

/// The primary's disks as the engine's `DiskBarrier`.
pub struct PrimaryDisks {
    /// Every replicated disk of the domain.
    pub disks: Vec<PrimaryDisk>,
}

#[async_trait]
impl DiskBarrier for PrimaryDisks {
    async fn barrier(&mut self, epoch: u64) -> Result<(), PortError> {
        for d in &mut self.disks {
            let report =
                d.primary.barrier_async(epoch).await.map_err(|e| {
                    PortError::new(&d.object, format!("barrier of epoch {epoch}"), e)
                })?;
            if !report.forwarded {
                return Err(PortError::new(
                    &d.object,
                    format!("barrier of epoch {epoch}"),
                    "the replication link is down (writes are being tracked for resync)",
                ));
            }
            d.forwarded.wait_for(|&e| e >= epoch).await.map_err(|_| {
                PortError::new(
                    &d.object,
                    format!("barrier of epoch {epoch}"),
                    "forwarder stopped",
                )
            })?;
        }
        Ok(())
    }

    fn acknowledged(&mut self, epoch: u64) {
        for d in &self.disks {
            d.primary.acknowledged(epoch);
        }
    }

    fn verify_sizes(&self) -> Vec<u64> {
        use blk_remus::BlockBackend;
        self.disks.iter().map(|d| d.primary.size()).collect()
    }

    async fn digests(&mut self, regions: &[VerifyRegion]) -> Result<Vec<[u8; 16]>, PortError> {
        let disks: Vec<(String, Arc<blk_remus::Primary>)> = self
            .disks
            .iter()
            .map(|d| (d.object.clone(), d.primary.clone()))
            .collect();
        let regions = regions.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(regions.len());
            for r in regions {
                let (name, disk) = disks.get(usize::from(r.disk)).ok_or_else(|| {
                    PortError::new(format!("disk #{}", r.disk), "digest", "no such disk")
                })?;
                let what = format!("digest of {} bytes at {}", r.length, r.offset);
                let d = disk
                    .digests(&[(r.offset, r.length.into())])
                    .map_err(|e| PortError::new(name.as_str(), &what, e))?;
                out.extend(d);
            }
            Ok(out)
        })
        .await
        .map_err(|e| PortError::new("disks", "digest", e))?
    }

    async fn recopy(&mut self, regions: &[VerifyRegion]) -> Result<u64, PortError> {
        let disks: Vec<(String, Arc<blk_remus::Primary>)> = self
            .disks
            .iter()
            .map(|d| (d.object.clone(), d.primary.clone()))
            .collect();
        let regions = regions.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut sent = 0;
            for r in regions {
                let (name, disk) = disks.get(usize::from(r.disk)).ok_or_else(|| {
                    PortError::new(format!("disk #{}", r.disk), "re-copy", "no such disk")
                })?;
                let what = format!("re-copy of {} bytes at {}", r.length, r.offset);
                sent += disk
                    .recopy(r.offset, r.length.into())
                    .map_err(|e| PortError::new(name.as_str(), &what, e))?;
            }
            Ok(sent)
        })
        .await
        .map_err(|e| PortError::new("disks", "re-copy", e))?
    }
}

/// The backup's disks as the engine's `ReplicaDisk`.
pub struct ReplicaDisks {
    /// `disk <domain>/<id>` and its store, by disk index.
    pub disks: Vec<(String, Arc<blk_remus::BackupStore>)>,
    /// Writes and data bytes received per (epoch, disk), to give each store its own barrier.
    counts: HashMap<(u64, u16), (u64, u64)>,
}

impl ReplicaDisks {
    /// Wraps the stores (index = the disk number in `DISK_WRITE`).
    pub fn new(disks: Vec<(String, Arc<blk_remus::BackupStore>)>) -> Self {
        Self {
            disks,
            counts: HashMap::new(),
        }
    }

    fn store(&self, disk: u32) -> Result<&(String, Arc<blk_remus::BackupStore>), PortError> {
        self.disks.get(disk as usize).ok_or_else(|| {
            PortError::new(
                format!("disk #{disk}"),
                "receive write",
                format!("the domain has {} disks", self.disks.len()),
            )
        })
    }

    async fn receive(&self, disk: u32, ev: DiskEvent) -> Result<(), PortError> {
        let (name, store) = self.store(disk)?.clone();
        let what = format!("receive event of epoch {}", ev.epoch());
        tokio::task::spawn_blocking(move || store.receive(ev))
            .await
            .map_err(|e| PortError::new(&name, &what, e))?
            .map_err(|e| PortError::new(&name, &what, e))
    }

    async fn apply_control(&mut self, msg: ControlMessage) -> Result<(), PortError> {
        match msg {
            ControlMessage::DiskSyncBegin { disk, epoch, full } => {
                self.receive(disk.into(), DiskEvent::SyncBegin { epoch, full })
                    .await
            }
            ControlMessage::DiskSyncEnd { disk, epoch } => {
                self.receive(disk.into(), DiskEvent::SyncEnd { epoch })
                    .await
            }
        }
    }
}

#[async_trait]
impl ReplicaDisk for ReplicaDisks {
    async fn begin_session(&mut self) -> Result<(), PortError> {
        for (name, store) in &self.disks {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.begin_session())
                .await
                .map_err(|e| PortError::new(name.as_str(), "begin session", e))?
                .map_err(|e| PortError::new(name.as_str(), "begin session", e))?;
        }
        self.counts.clear();
        Ok(())
    }

    async fn hold(&mut self, w: DiskWriteHeld) -> Result<(), PortError> {
        let disk = u16::try_from(w.disk).unwrap_or(u16::MAX);
        let kind = match w.op {
            DiskOpHeld::Data(d) => {
                let c = self.counts.entry((w.epoch, disk)).or_default();
                c.0 += 1;
                c.1 += d.len() as u64;
                WriteKind::Data(d.into())
            }
            DiskOpHeld::Zeroes(len) => {
                self.counts.entry((w.epoch, disk)).or_default().0 += 1;
                WriteKind::Zeroes { len }
            }
            DiskOpHeld::Trim(len) => {
                self.counts.entry((w.epoch, disk)).or_default().0 += 1;
                WriteKind::Trim { len }
            }
        };
        self.receive(
            w.disk,
            DiskEvent::Write {
                epoch: w.epoch,
                offset: w.offset,
                kind,
            },
        )
        .await
    }

    async fn barrier(&mut self, epoch: u64, writes: u64, bytes: u64) -> Result<(), PortError> {
        let mut total = (0, 0);
        for disk in 0..self.disks.len() {
            let (w, b) = self
                .counts
                .remove(&(epoch, disk as u16))
                .unwrap_or_default();
            total.0 += w;
            total.1 += b;
            self.receive(
                disk as u32,
                DiskEvent::Barrier {
                    epoch,
                    writes: w,
                    bytes: b,
                },
            )
            .await?;
        }
        if total != (writes, bytes) {
            return Err(PortError::new(
                "disks",
                format!("barrier of epoch {epoch}"),
                format!(
                    "{writes} writes / {bytes} bytes announced, {} / {} received",
                    total.0, total.1
                ),
            ));
        }
        Ok(())
    }

    async fn commit(&mut self, epoch: u64) -> Result<(), PortError> {
        for (name, store) in &self.disks {
            store
                .commit_async(epoch)
                .await
                .map_err(|e| PortError::new(name.as_str(), format!("commit epoch {epoch}"), e))?;
        }
        Ok(())
    }

    async fn control(&mut self, json: &str) -> Result<(), PortError> {
        match serde_json::from_str::<ControlMessage>(json) {
            Ok(msg) => self.apply_control(msg).await,
            // Not a disk message: other control traffic shares the record type.
            Err(_) => Ok(()),
        }
    }

    fn can_verify(&self) -> bool {
        true
    }

    async fn digest(
        &mut self,
        disk: u16,
        offset: u64,
        len: u64,
    ) -> Result<ReplicaRegionDigest, PortError> {
        let (name, store) = self.store(disk.into())?.clone();
        let what = format!("digest of {len} bytes at {offset}");
        let d = tokio::task::spawn_blocking(move || store.digest(offset, len))
            .await
            .map_err(|e| PortError::new(&name, &what, e))?
            .map_err(|e| PortError::new(&name, &what, e))?;
        Ok(ReplicaRegionDigest {
            committed: d.committed,
            consistent: d.consistent,
            digest: d.digest,
        })
    }

    async fn discard_uncommitted(&mut self) -> Result<(), PortError> {
        for (name, store) in &self.disks {
            let dropped = store.discard_uncommitted();
            tracing::info!(disk = %name, dropped, "discarded uncommitted disk epochs");
        }
        self.counts.clear();
        Ok(())
    }
}
