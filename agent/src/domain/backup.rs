//! The backup side of a domain: keep a replica from the primary's checkpoints, and turn it
//! into the running VM when the primary is gone.
//!
//! Activation discards every uncommitted epoch (memory and disk), starts QEMU on the
//! replica RAM with `-incoming defer`, loads the committed checkpoint's device state,
//! resumes it and announces its MACs. The replica disks become the VM's disks, served over
//! NBD through `blk-remus` primaries that track dirty regions, ready for failback.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use remus_engine::backup::{Backup, BackupError, BackupExit, BackupStatus, QuiesceRequest};
use remus_engine::disk::ReplicaDisks;
use remus_engine::replica::{ReplicaState, ReplicaStore, WrittenPages};
use remus_engine::session::BackupSession;
use remus_stream::PAGE_SIZE;
use sch_plug::Netns;
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::config::DomainConfig;
use crate::domain::primary::{Launch, RunningVm};
use crate::domain::DomainPaths;

/// How the caller follows and steers one receiving session (see [`ReplicaDomain::receive`]).
#[derive(Default)]
pub struct ReceiveControls {
    /// Gets the receiver's status channel once the session is set up.
    pub status: Option<watch::Sender<Option<watch::Receiver<BackupStatus>>>>,
    /// Ends the session between two records when it turns `true`.
    pub cancel: Option<watch::Receiver<bool>>,
    /// Requests to hold the receiver still right after a checkpoint commits, for the last
    /// pass of a copy ([`ReplicaFiles::finish`]) taken while the session goes on.
    pub quiesce: Option<mpsc::Receiver<QuiesceRequest>>,
}

/// A domain's replica on the backup.
pub struct ReplicaDomain {
    domain: DomainConfig,
    paths: DomainPaths,
    replica: Option<ReplicaStore>,
    disks: Vec<(String, Arc<blk_remus::BackupStore>)>,
}

impl ReplicaDomain {
    /// Opens (or creates) the replica of `domain`: RAM and checkpoint metadata under the run
    /// directory, each disk's replica image and WAL under the state directory. An apply
    /// interrupted by a restart is finished here.
    ///
    /// # Errors
    /// File errors; a replica of another size or domain.
    pub fn open(domain: &DomainConfig, paths: DomainPaths) -> Result<Self> {
        paths.create()?;
        let bytes = domain.qemu.memory_mib << 20;
        let replica = ReplicaStore::open(&domain.name, &paths.replica(), bytes)
            .with_context(|| format!("domain {}: opening the replica", domain.name))?;
        let mut disks = Vec::new();
        for d in &domain.disks {
            let cfg = blk_remus::BackupConfig::new(paths.disk_state(&d.id), &d.replica);
            let store = blk_remus::BackupStore::open(cfg)
                .with_context(|| format!("domain {}: disk {} replica", domain.name, d.id))?;
            disks.push((format!("disk {}/{}", domain.name, d.id), Arc::new(store)));
        }
        Ok(Self {
            domain: domain.clone(),
            paths,
            replica: Some(replica),
            disks,
        })
    }

    /// The replica's last committed checkpoint, if it holds one (not while a session's
    /// first checkpoint is being written).
    pub fn committed(&self) -> Option<u64> {
        match self.replica().state() {
            remus_engine::replica::ReplicaState::Committed(k) => Some(k),
            _ => None,
        }
    }

    /// The replica store.
    pub fn replica(&self) -> &ReplicaStore {
        self.replica
            .as_ref()
            .expect("replica present between sessions")
    }

    /// Receives one replication session until the primary ends it, it fails, or
    /// `controls.cancel` turns true (between records: a checkpoint being committed completes
    /// first). The replica keeps the last committed checkpoint either way.
    ///
    /// # Errors
    /// The session failed (the primary may be gone) or a checkpoint was refused.
    pub async fn receive(
        &mut self,
        session: BackupSession,
        controls: ReceiveControls,
    ) -> std::result::Result<BackupExit, BackupError> {
        let replica = self
            .replica
            .take()
            .expect("replica present between sessions");
        let disks = ReplicaDisks::new(self.disks.clone());
        let (mut b, st) = Backup::new(
            &self.domain.name,
            session.reader,
            session.replies,
            replica,
            Box::new(disks),
        );
        if let Some(c) = controls.cancel {
            b.set_cancel(c);
        }
        if let Some(q) = controls.quiesce {
            b.set_quiesce(q);
        }
        if let Some(tx) = controls.status {
            let _ = tx.send(Some(st));
        }
        let r = b.run().await;
        let (replica, _disks) = b.into_replica();
        self.replica = Some(replica);
        r
    }

    /// Where the replica's files are, for copying them while a session owns the replica.
    pub fn files(&self) -> ReplicaFiles {
        ReplicaFiles {
            domain: self.domain.clone(),
            paths: self.paths.clone(),
            ram_written: self.replica().written_pages(),
            disks: self.disks.iter().map(|(_, s)| s.clone()).collect(),
        }
    }

    /// Loads the replica into a new QEMU, stopped (the caller has fenced the old primary).
    /// The caller persists that the guest may run, then calls
    /// [`RunningVm::resume_activated`].
    ///
    /// # Errors
    /// No committed checkpoint; a disk replica that is mid-synchronisation; QEMU failures.
    pub async fn activate(mut self, netns: &Netns) -> Result<(RunningVm, u64)> {
        let replica = self
            .replica
            .take()
            .expect("replica present between sessions");
        let inputs = replica
            .activation_inputs()
            .with_context(|| format!("domain {}: activation", self.domain.name))?;
        drop(replica);
        let mut backends: Vec<Arc<dyn blk_remus::BlockBackend>> = Vec::new();
        for (name, store) in self.disks.drain(..) {
            let dropped = store.discard_uncommitted();
            let Ok(store) = Arc::try_unwrap(store) else {
                bail!("{name}: still in use by a replication session");
            };
            let backend = store
                .activate()
                .with_context(|| format!("{name}: activation"))?;
            info!(disk = %name, dropped, "replica disk activated");
            backends.push(Arc::new(backend));
        }
        let vm = RunningVm::launch(
            &self.domain,
            self.paths.clone(),
            netns,
            backends,
            Launch::Activate {
                ram_path: inputs.ram_path,
                device_state: inputs.device_state,
            },
        )
        .await?;
        info!(domain = %self.domain.name, epoch = inputs.epoch, "activated from checkpoint");
        Ok((vm, inputs.epoch))
    }
}

/// The files of a domain's replica, for copying the committed checkpoint (a test
/// activation boots the copy) while replication goes on.
///
/// The copy takes two passes, as a live migration would: [`precopy`](Self::precopy) starts
/// tracking what the receiver writes and copies everything while checkpoints keep being
/// applied; [`finish`](Self::finish), called while the receiver is held still right after a
/// commit (or between sessions), copies only what was written since, plus the device state
/// and the checkpoint metadata. The hold lasts as long as the second pass: the pages and disk
/// ranges of the few checkpoints applied during the first, not the guest's whole RAM and
/// disks.
#[derive(Clone)]
pub struct ReplicaFiles {
    domain: DomainConfig,
    paths: DomainPaths,
    ram_written: WrittenPages,
    disks: Vec<Arc<blk_remus::BackupStore>>,
}

/// A copy whose first pass is done (see [`ReplicaFiles::precopy`]).
pub struct Precopy {
    domain: DomainConfig,
    paths: DomainPaths,
}

/// A finished copy of the committed replica.
pub struct ReplicaCopy {
    /// The domain as the copy must be started (disks pointing at the copies).
    pub domain: DomainConfig,
    /// The copy's files.
    pub paths: DomainPaths,
    /// The checkpoint it holds.
    pub epoch: u64,
    /// Bytes the second pass copied (RAM pages and disk ranges written during the first).
    pub final_pass_bytes: u64,
}

impl ReplicaFiles {
    /// First pass: starts tracking the RAM pages and disk ranges the receiver writes, then
    /// copies the RAM file and each disk's image under `scratch` while replication goes on.
    /// Blocking.
    ///
    /// # Errors
    /// File errors, naming the file.
    pub fn precopy(&self, scratch: &std::path::Path) -> Result<Precopy> {
        let name = &self.domain.name;
        let paths = DomainPaths::new(&scratch.join("run"), &scratch.join("state"), name);
        paths.create()?;
        let bytes = self.domain.qemu.memory_mib << 20;
        self.ram_written.start(bytes / PAGE_SIZE as u64);
        let (src, dst) = (self.paths.replica(), paths.replica());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dst)
            .with_context(|| format!("creating {}", dst.display()))?;
        std::fs::copy(src.join("ram"), dst.join("ram"))
            .with_context(|| format!("domain {name}: copying {}", src.join("ram").display()))?;
        let mut domain = self.domain.clone();
        let disks_dir = scratch.join("disks");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&disks_dir)
            .with_context(|| format!("creating {}", disks_dir.display()))?;
        for (d, store) in domain.disks.iter_mut().zip(&self.disks) {
            let to = disks_dir.join(format!("{}.img", d.id));
            store
                .precopy(&to)
                .with_context(|| format!("domain {name}: disk {}: copying the replica", d.id))?;
            d.replica = to;
        }
        Ok(Precopy { domain, paths })
    }

    /// Second pass: call it only while nothing applies a checkpoint (the receiver held
    /// still, or between sessions). Copies the RAM pages and disk ranges written since the
    /// first pass, the device state and the checkpoint metadata, and checks that RAM and
    /// every disk are at the same committed checkpoint. Blocking.
    ///
    /// # Errors
    /// File errors, naming the file; a replica with no committed checkpoint or mid-sync; RAM
    /// and disks at different checkpoints.
    pub fn finish(&self, pre: Precopy) -> Result<ReplicaCopy> {
        use std::os::unix::fs::FileExt;
        let name = &self.domain.name;
        let (src, dst) = (self.paths.replica(), pre.paths.replica());
        let pages = self.ram_written.take();
        let ram_err = || format!("domain {name}: copying RAM pages to {}", dst.display());
        let from = std::fs::File::open(src.join("ram")).with_context(ram_err)?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(dst.join("ram"))
            .with_context(ram_err)?;
        let mut page = vec![0u8; PAGE_SIZE];
        for &pfn in &pages {
            let off = pfn * PAGE_SIZE as u64;
            from.read_exact_at(&mut page, off).with_context(ram_err)?;
            to.write_all_at(&page, off).with_context(ram_err)?;
        }
        let mut final_pass_bytes = pages.len() as u64 * PAGE_SIZE as u64;
        for f in ["devstate", "checkpoint.json"] {
            std::fs::copy(src.join(f), dst.join(f))
                .with_context(|| format!("domain {name}: copying {}", src.join(f).display()))?;
        }
        let mut disk_epochs = Vec::new();
        for (d, store) in pre.domain.disks.iter().zip(&self.disks) {
            let (epoch, bytes) = store
                .finish_copy(&d.replica)
                .with_context(|| format!("domain {name}: disk {}: copying the replica", d.id))?;
            final_pass_bytes += bytes;
            disk_epochs.push((d.id.clone(), epoch));
        }
        let bytes = self.domain.qemu.memory_mib << 20;
        let copy = ReplicaStore::open(name, &dst, bytes)
            .with_context(|| format!("domain {name}: opening the copied replica"))?;
        let ReplicaState::Committed(epoch) = copy.state() else {
            bail!(
                "domain {name}: the replica holds no committed checkpoint ({})",
                copy.state()
            );
        };
        if let Some((disk, e)) = disk_epochs.iter().find(|(_, e)| *e != epoch) {
            bail!("domain {name}: the copy is not of one checkpoint: RAM at {epoch}, disk {disk} at {e}");
        }
        Ok(ReplicaCopy {
            domain: pre.domain,
            paths: pre.paths,
            epoch,
            final_pass_bytes,
        })
    }
}
