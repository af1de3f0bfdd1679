//! The primary side of a domain: start the VM with every NIC behind an egress buffer and
//! every disk served by the agent over NBD, then protect it against a backup.
//!
//! Order of start-up, and why:
//! 1. egress buffers first: the relay must listen before QEMU connects (QEMU 7.2's stream
//!    netdev never reconnects);
//! 2. NBD servers over `blk-remus` primaries: every guest write passes through the agent;
//! 3. QEMU, with its RAM in a shared file the agent maps read-only;
//! 4. protection: the encrypted session, disk forwarders, the initial disk sync, pre-copy,
//!    then checkpoints ([`remus_engine::primary`]).
//!
//! Until protection starts the buffers pass traffic through (the VM runs standalone).

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blk_remus::{DiskEvent, FileBackend, SyncMode, SyncProgress};
use remus_engine::disk::{spawn_disk_forwarder, PrimaryDisk, PrimaryDisks};
use remus_engine::peer::ChannelAuth;
use remus_engine::primary::{
    Compression, GuestMemory, Primary, PrimaryConfig, PrimaryExit, PrimaryHandle, PrimaryParts,
};
use remus_engine::session::{open_primary, Identity};
use remus_qemu::{GuestRam, QemuProcess};
use remus_tracker::{select, QemuFacts, ScanPool, SoftDirtyTarget, TrackerChoice};
use sch_plug::{Backend, EgressConfig, Netns, RelayOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use crate::config::{self, DomainConfig};
use crate::domain::adapters::{NamedBuffer, NicBuffers, QemuVm};
use crate::domain::disk_copy::DiskCopy;
use crate::domain::spec::{qemu_spec, NicWiring};
use crate::domain::DomainPaths;

/// Guest RAM as the engine reads it.
struct Ram(Arc<GuestRam>);

impl GuestMemory for Ram {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// One disk of a running VM.
pub struct ServedDisk {
    /// The disk's id.
    pub id: String,
    /// The replicating backend NBD serves.
    pub primary: Arc<blk_remus::Primary>,
}

/// A VM this agent started and serves, protected or not.
pub struct RunningVm {
    /// The policy it was started from.
    pub domain: DomainConfig,
    /// Its files.
    pub paths: DomainPaths,
    /// The QEMU process (killed with the agent).
    pub qemu: QemuProcess,
    /// QMP control, shared with the engine's adapter.
    pub control: Arc<remus_qemu::VmControl>,
    /// Guest RAM, mapped.
    pub ram: Arc<GuestRam>,
    /// NIC buffers (pass-through until protection starts).
    pub nics: NicBuffers,
    /// Disks.
    pub disks: Vec<ServedDisk>,
    /// Stops the NBD servers when dropped or sent.
    _nbd_stop: watch::Sender<bool>,
}

fn netbuf_backend(b: config::NetbufBackend) -> Backend {
    match b {
        config::NetbufBackend::Auto => Backend::Auto,
        config::NetbufBackend::Plug => Backend::Plug,
        config::NetbufBackend::Relay => Backend::Relay,
    }
}

/// Opens the egress buffer of every NIC of `domain` and says how QEMU must be wired to it.
///
/// # Errors
/// A backend that cannot be set up (e.g. the kernel lacks sch_plug with `backend = "plug"`).
pub async fn open_nics(
    domain: &DomainConfig,
    paths: &DomainPaths,
    netns: &Netns,
) -> Result<(Vec<NamedBuffer>, Vec<NicWiring>)> {
    let mut buffers = Vec::new();
    let mut wiring = Vec::new();
    for (i, nic) in domain.nics.iter().enumerate() {
        let dev = DomainPaths::tap_name(&domain.name, i);
        let cfg = EgressConfig {
            backend: netbuf_backend(domain.netbuf.backend),
            dev: dev.clone(),
            netns: netns.clone(),
            limit_bytes: domain.netbuf.limit_bytes,
            relay: Some(RelayOptions {
                socket_path: paths.relay(&nic.id),
                bridge: Some(nic.bridge.clone()),
                max_closed_epochs: 2,
            }),
        };
        let opened = sch_plug::open(&cfg)
            .await
            .with_context(|| format!("domain {}: netbuf for NIC {}", domain.name, nic.id))?;
        wiring.push(match &opened.socket_path {
            Some(p) => NicWiring::Relay(p.clone()),
            None => NicWiring::Tap(opened.dev.clone()),
        });
        let mut buffer = opened.buffer;
        // Until protection starts, the VM runs standalone: nothing is held.
        buffer
            .release_indefinite()
            .await
            .with_context(|| format!("domain {}: netbuf {dev}: pass-through", domain.name))?;
        buffers.push((format!("netbuf {dev}"), buffer));
    }
    Ok((buffers, wiring))
}

/// Serves `backends` over NBD at the domain's sockets until `stop` turns true.
pub fn serve_disks(
    paths: &DomainPaths,
    backends: Vec<(String, Arc<dyn blk_remus::BlockBackend>)>,
    stop: watch::Receiver<bool>,
) {
    for (id, backend) in backends {
        let server = blk_remus::nbd::NbdServer::new(vec![blk_remus::nbd::Export {
            name: id.clone(),
            description: String::new(),
            backend,
        }]);
        let socket = paths.nbd(&id);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = server.serve_unix(&socket, shutdown).await {
                tracing::error!(disk = %id, error = %e, "NBD server stopped");
            }
        });
    }
}

/// Where a launched VM's state comes from.
pub enum Launch {
    /// A fresh boot on the primary's own RAM file and images.
    Fresh,
    /// An activation on the backup: RAM from the replica, device state loaded before `cont`.
    Activate {
        /// The replica RAM file (QEMU runs on it from now on).
        ram_path: std::path::PathBuf,
        /// The device state of the committed checkpoint.
        device_state: Vec<u8>,
    },
}

impl RunningVm {
    /// Starts the domain's VM, unprotected, with its NICs in `netns`, booting fresh from
    /// `copy` of its disks: the configured images, or the replicas (see
    /// [`crate::domain::disk_copy`]). A replica is used only as its last committed epoch,
    /// and only when it is a consistent image (no resync half done).
    ///
    /// # Errors
    /// A replica mid-resync; any step of the start-up; QEMU's stderr is included when it
    /// fails to start.
    pub async fn start(
        domain: &DomainConfig,
        paths: DomainPaths,
        netns: &Netns,
        copy: DiskCopy,
    ) -> Result<Self> {
        let mut backends: Vec<Arc<dyn blk_remus::BlockBackend>> = Vec::new();
        for d in &domain.disks {
            let what = || format!("domain {}: disk {} ({})", domain.name, d.id, copy.name());
            let local = match copy {
                DiskCopy::Image => FileBackend::open(&d.image, false).with_context(what)?,
                DiskCopy::Replica => {
                    let cfg = blk_remus::BackupConfig::new(paths.disk_state(&d.id), &d.replica);
                    let store = blk_remus::BackupStore::open(cfg).with_context(what)?;
                    store.discard_uncommitted();
                    store.activate().with_context(|| {
                        format!(
                            "{}: {} is this node's newest copy but it is not a whole disk (a resync was interrupted); the complete copy is on the peer",
                            what(),
                            d.replica.display()
                        )
                    })?
                }
            };
            backends.push(Arc::new(local));
        }
        Self::launch(domain, paths, netns, backends, Launch::Fresh).await
    }

    /// Starts QEMU for `domain` on the given disk backends (one per `[[domain.disk]]`, in
    /// order), fresh or from a checkpoint.
    ///
    /// # Errors
    /// Any step of the start-up; QEMU's stderr is included when it fails to start.
    pub async fn launch(
        domain: &DomainConfig,
        paths: DomainPaths,
        netns: &Netns,
        backends: Vec<Arc<dyn blk_remus::BlockBackend>>,
        how: Launch,
    ) -> Result<Self> {
        paths
            .create()
            .with_context(|| format!("domain {}: creating {:?}", domain.name, paths.run))?;
        let (buffers, wiring) = open_nics(domain, &paths, netns).await?;

        let mut disks = Vec::new();
        let mut served: Vec<(String, Arc<dyn blk_remus::BlockBackend>)> = Vec::new();
        for (d, local) in domain.disks.iter().zip(backends) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(paths.disk_state(&d.id))?;
            let cfg = blk_remus::PrimaryConfig {
                bitmap_path: Some(paths.disk_state(&d.id).join("dirty.bitmap")),
                ..Default::default()
            };
            let p = Arc::new(
                blk_remus::Primary::new(local, &cfg)
                    .with_context(|| format!("domain {}: disk {}", domain.name, d.id))?,
            );
            served.push((d.id.clone(), p.clone()));
            disks.push(ServedDisk {
                id: d.id.clone(),
                primary: p,
            });
        }
        let (nbd_stop, nbd_rx) = watch::channel(false);
        serve_disks(&paths, served, nbd_rx);
        for d in &domain.disks {
            wait_for_socket(&paths.nbd(&d.id)).await?;
        }

        let (ram_path, incoming) = match &how {
            Launch::Fresh => (paths.guest_ram(), false),
            Launch::Activate { ram_path, .. } => (ram_path.clone(), true),
        };
        let spec = qemu_spec(domain, &paths, ram_path.clone(), &wiring, incoming);
        let mut qemu = QemuProcess::spawn(&spec)
            .await
            .with_context(|| format!("domain {}: starting QEMU", domain.name))?;
        let qmp = qemu
            .connect_qmp()
            .await
            .with_context(|| format!("domain {}: QMP", domain.name))?;
        let control = Arc::new(remus_qemu::VmControl::new(qmp));
        control
            .enable_checkpointing()
            .await
            .with_context(|| format!("domain {}: enabling checkpointing", domain.name))?;
        if let Launch::Activate { device_state, .. } = &how {
            control
                .load_device_state(device_state)
                .await
                .with_context(|| {
                    format!(
                        "domain {}: loading the checkpoint's device state",
                        domain.name
                    )
                })?;
        }
        let ram = GuestRam::open(&ram_path, spec.memory_bytes())
            .with_context(|| format!("domain {}: mapping guest RAM", domain.name))?;
        info!(domain = %domain.name, pid = qemu.pid(), activated = incoming, "VM started");
        Ok(Self {
            domain: domain.clone(),
            paths,
            qemu,
            control,
            ram: Arc::new(ram),
            nics: NicBuffers::new(buffers),
            disks,
            _nbd_stop: nbd_stop,
        })
    }
}

impl RunningVm {
    /// Resumes a VM launched with [`Launch::Activate`] and announces its MACs, so the
    /// network learns the guest's new location. The caller persists that the guest may run
    /// (role `Activated`) *before* calling this.
    ///
    /// # Errors
    /// QMP `cont` failed (announce failures are only logged: the guest's own traffic will
    /// teach the switches soon enough).
    pub async fn resume_activated(&self) -> Result<()> {
        let name = &self.domain.name;
        self.control
            .cont()
            .await
            .with_context(|| format!("domain {name}: resuming the activated VM"))?;
        if let Err(e) = self
            .control
            .announce_self(remus_qemu::Announce::default())
            .await
        {
            tracing::warn!(domain = %name, error = %e, "announce-self failed");
        }
        Ok(())
    }
}

async fn wait_for_socket(path: &std::path::Path) -> Result<()> {
    for _ in 0..200 {
        if path.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("{} did not appear", path.display())
}

/// How the engine is tuned for a domain (from the policy, with test overrides).
#[derive(Clone, Debug)]
pub struct ProtectOptions {
    /// The backup's replication address.
    pub peer_addr: String,
    /// The pair's pre-shared key.
    pub auth: ChannelAuth,
    /// Node names and domain.
    pub identity: Identity,
    /// How long the backup may stay silent about a checkpoint once nothing more is
    /// leaving for it.
    pub ack_timeout: Duration,
    /// The longest a checkpoint's ACK is waited for while its bytes still move.
    pub ack_wait_max: Duration,
    /// How the disks are brought up to date before the first checkpoint: `Full` for a
    /// backup whose replica has never followed this disk, `Dirty` (only the regions written
    /// since the last acknowledged checkpoint) for a backup that returns after a loss.
    pub disk_sync: SyncMode,
}

/// One disk synchronisation streamed at the start of a protection session.
#[derive(Clone, Debug)]
pub struct DiskSyncDone {
    /// The disk's id.
    pub disk: String,
    /// How.
    pub mode: SyncMode,
    /// What it copied.
    pub report: blk_remus::SyncReport,
}

/// A protection in progress.
pub struct Protection {
    /// Status and shutdown of the epoch loop.
    pub handle: PrimaryHandle,
    /// The loop; its result says why it ended.
    pub task: tokio::task::JoinHandle<
        std::result::Result<PrimaryExit, remus_engine::primary::PrimaryError>,
    >,
    /// Why soft-dirty tracking was not used (empty when it is, or was not asked for).
    pub tracker_unmet: Vec<String>,
    /// The disk synchronisations of this session, filled in as each completes.
    pub disk_syncs: Arc<std::sync::Mutex<Vec<DiskSyncDone>>>,
}

/// Starts protecting `vm` against the backup named in `opts`.
///
/// # Errors
/// The backup cannot be reached or refuses us; a disk cannot be connected.
pub async fn protect(vm: &RunningVm, opts: &ProtectOptions) -> Result<Protection> {
    let d = &vm.domain;
    let session = open_primary(
        &opts.peer_addr,
        &opts.auth,
        &opts.identity,
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("domain {}: connecting to the backup", d.name))?;

    let mut disks = Vec::new();
    let mut syncs = Vec::new();
    let disk_syncs = Arc::new(std::sync::Mutex::new(Vec::new()));
    for (i, disk) in vm.disks.iter().enumerate() {
        let (tx, rx) = mpsc::channel::<DiskEvent>(1024);
        let (fw_tx, fw_rx) = watch::channel(0u64);
        let index = u16::try_from(i).context("more than 65535 disks")?;
        spawn_disk_forwarder(index, rx, session.sender.clone(), fw_tx);
        // Every session numbers its epochs from the engine's first; the disk's own counter
        // restarts with it (unacknowledged chunks of an earlier session join the bitmap).
        disk.primary
            .connect_session(Arc::new(tx), remus_engine::primary::FIRST_EPOCH)
            .with_context(|| format!("domain {}: disk {}: new session", d.name, disk.id))?;
        let (ptx, _prx) = watch::channel(SyncProgress::default());
        let p = disk.primary.clone();
        let id = disk.id.clone();
        let object = format!("disk {}/{}", d.name, disk.id);
        let mode = opts.disk_sync;
        let done = disk_syncs.clone();
        syncs.push(tokio::spawn(async move {
            p.sync_async(mode, ptx)
                .await
                .map(|report| {
                    info!(disk = %id, ?mode, ?report, "disk sync streamed");
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(DiskSyncDone {
                            disk: id.clone(),
                            mode,
                            report,
                        });
                })
                .map_err(|e| {
                    remus_engine::ports::PortError::new(object, format!("{mode:?} sync"), e)
                })
        }));
        disks.push(PrimaryDisk {
            object: format!("disk {}/{}", d.name, disk.id),
            primary: disk.primary.clone(),
            forwarded: fw_rx,
        });
    }
    let (sync_tx, sync_rx) = oneshot::channel();
    let syncs_of = format!("domain {} disks", d.name);
    tokio::spawn(async move {
        let mut result = Ok(());
        for s in syncs {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) => {
                    result = Err(remus_engine::ports::PortError::new(
                        syncs_of.clone(),
                        "initial sync task",
                        e,
                    ))
                }
            }
        }
        let _ = sync_tx.send(result);
    });

    let mut cfg = PrimaryConfig::new(&d.name);
    cfg.interval = d.checkpoint_interval;
    cfg.verify_interval = d.verify_interval;
    cfg.verify = verify_request_of(d);
    cfg.ack_timeout = opts.ack_timeout;
    cfg.ack_wait_max = opts.ack_wait_max;
    cfg.compression = match d.compression {
        config::Compression::None => Compression::None,
        config::Compression::Lz4 => Compression::Lz4,
        config::Compression::XorLz4 => Compression::XorLz4,
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = Arc::new(ScanPool::new(threads).context("starting page-scan threads")?);
    // The RAM file QEMU runs on: the domain's own, or the replica's after an activation.
    let ram_path = vm.ram.path().to_path_buf();
    let has = |needle: &str| d.qemu.extra_args.iter().any(|a| a.contains(needle));
    let target = SoftDirtyTarget {
        pid: i32::try_from(vm.qemu.pid()).context("QEMU pid")?,
        ram_path: &ram_path,
        ram_len: vm.ram.len() as u64,
        facts: QemuFacts {
            // The agent builds QEMU's devices itself: no balloon, no RAM discard; extra
            // arguments are scanned for what would break soft-dirty.
            balloon: has("balloon"),
            ram_discard: has("virtio-mem") || has("discard-data"),
            mem_lock: has("mem-lock=on"),
            // Every disk goes through QEMU's block layer to our NBD server: `stop` drains it.
            block_io_drained_on_stop: true,
            vfio: has("vfio"),
            external_ram_users: has("vhost-user") || has("virtiofs"),
        },
    };
    let choice = match d.tracker {
        config::Tracker::Auto => TrackerChoice::Auto,
        config::Tracker::Compare => TrackerChoice::Compare,
        config::Tracker::SoftDirty => TrackerChoice::SoftDirty,
    };
    let selection = select(choice, &target, pool.clone())
        .with_context(|| format!("domain {}: dirty-page tracker", d.name))?;
    let tracker_unmet: Vec<String> = selection.unmet.iter().map(|u| format!("{u:?}")).collect();
    for u in &tracker_unmet {
        info!(domain = %d.name, precondition = %u, "soft-dirty not used");
    }
    let net: Box<dyn remus_engine::ports::OutputBuffer> = if d.netbuf.output_buffering {
        Box::new(vm.nics.clone())
    } else {
        tracing::warn!(
            domain = %d.name,
            "UNSAFE: output buffering is off (unsafe_no_output_buffering): a failover can \
             expose output of state the backup never received"
        );
        Box::new(remus_engine::ports::Unbuffered)
    };
    let parts = PrimaryParts {
        vm: Box::new(QemuVm {
            object: format!("vm {}", d.name),
            control: vm.control.clone(),
        }),
        net,
        disk: Box::new(PrimaryDisks { disks }),
        memory: Arc::new(Ram(vm.ram.clone())),
        tracker: selection.tracker,
        pool,
        out: session.sender,
        replies: session.replies,
        initial_sync: Some(sync_rx),
    };
    let (primary, handle) =
        Primary::new(cfg, parts).with_context(|| format!("domain {}: epoch loop", d.name))?;
    let served: Vec<Arc<blk_remus::Primary>> = vm.disks.iter().map(|d| d.primary.clone()).collect();
    let task = tokio::spawn(async move {
        let exit = primary.run().await;
        // Protection is over, whatever ended it: detach the disks from the stream (they track
        // dirty regions from now on), which drops the last senders and closes the session,
        // so the backup sees the end at once instead of waiting for a timeout.
        for d in &served {
            if let Err(e) = d.disconnect() {
                tracing::warn!(error = %e, "detaching a disk from the replication stream");
            }
        }
        exit
    });
    Ok(Protection {
        handle,
        task,
        tracker_unmet,
        disk_syncs,
    })
}

/// The region size and per-pause budget of a domain's verifies (engine defaults: 1 MiB
/// regions, 4 MiB per checkpoint pause).
pub fn verify_request_of(_d: &DomainConfig) -> remus_engine::verify::VerifyRequest {
    remus_engine::verify::VerifyRequest::default()
}

/// The part of a domain's policy a running protection may change.
pub fn tuning_of(d: &DomainConfig) -> remus_engine::primary::Tuning {
    remus_engine::primary::Tuning {
        interval: d.checkpoint_interval,
        ack_timeout: d.ack_timeout,
        ack_wait_max: d.ack_wait_max,
    }
}
