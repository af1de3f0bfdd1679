//! The backup side of a domain: keep a replica from the primary's checkpoints, and turn it
//! into the running VM when the primary is gone.
//!
//! Activation discards every uncommitted epoch (memory and disk), starts QEMU on the
//! replica RAM with `-incoming defer`, loads the committed checkpoint's device state,
//! resumes it and announces its MACs. The replica disks become the VM's disks, served over
//! NBD through `blk-remus` primaries that track dirty regions, ready for failback.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use remus_engine::backup::{Backup, BackupError, BackupExit, BackupStatus};
use remus_engine::replica::ReplicaStore;
use remus_engine::session::BackupSession;
use sch_plug::Netns;
use tokio::sync::watch;
use tracing::info;

use crate::config::DomainConfig;
use crate::domain::adapters::ReplicaDisks;
use crate::domain::primary::{Launch, RunningVm};
use crate::domain::DomainPaths;

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

    /// Receives one replication session until the primary ends it, it fails, or `cancel`
    /// turns true (between records: a checkpoint being committed completes first). The
    /// replica keeps the last committed checkpoint either way.
    ///
    /// # Errors
    /// The session failed (the primary may be gone) or a checkpoint was refused.
    pub async fn receive(
        &mut self,
        session: BackupSession,
        status: Option<watch::Sender<Option<watch::Receiver<BackupStatus>>>>,
        cancel: Option<watch::Receiver<bool>>,
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
        if let Some(c) = cancel {
            b.set_cancel(c);
        }
        if let Some(tx) = status {
            let _ = tx.send(Some(st));
        }
        let r = b.run().await;
        let (replica, _disks) = b.into_replica();
        self.replica = Some(replica);
        r
    }

    /// Copies the committed replica (RAM, device state, checkpoint metadata, each disk's
    /// replica image and WAL) under `scratch`, for a throwaway test activation. Call it
    /// between sessions only (no checkpoint being applied). Returns the domain as the copy
    /// must be started (disks pointing at the copies) and its paths.
    ///
    /// # Errors
    /// File errors, naming the file.
    pub fn copy_committed(&self, scratch: &std::path::Path) -> Result<(DomainConfig, DomainPaths)> {
        let paths = DomainPaths::new(
            &scratch.join("run"),
            &scratch.join("state"),
            &self.domain.name,
        );
        paths.create()?;
        copy_dir(&self.paths.replica(), &paths.replica())?;
        let mut domain = self.domain.clone();
        std::fs::create_dir_all(scratch.join("disks"))?;
        for d in &mut domain.disks {
            let to = scratch.join("disks").join(format!("{}.img", d.id));
            std::fs::copy(&d.replica, &to)
                .with_context(|| format!("copying {} to {}", d.replica.display(), to.display()))?;
            copy_dir(&self.paths.disk_state(&d.id), &paths.disk_state(&d.id))?;
            d.replica = to;
        }
        Ok((domain, paths))
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("reading {}", from.display()))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}
