//! The backup's disk: hold each epoch's writes until the checkpoint commits, then apply them
//! atomically to the replica.
//!
//! [`BackupStore::receive`] takes [`DiskEvent`]s in stream order and buffers them per epoch:
//! in memory while the backlog is under [`BackupConfig::memory_limit`], then in a spill file per
//! epoch (`spill-<epoch>.log` in the state directory, same framing as the WAL). A `Barrier(k)`
//! closes epoch k after checking its write and byte counts. [`BackupStore::commit`] moves the
//! closed epochs ≤ k through the write-ahead log ([`crate::wal`]) into the replica; it is
//! durable (and may be acknowledged) once the WAL's commit record is synced, and the replica is
//! always at a committed epoch boundary after a crash and [`BackupStore::open`]'s replay.
//!
//! Uncommitted epochs are not durable state: spill files left by a previous process are
//! deleted at open (the primary resyncs from its dirty bitmap after any link loss), and
//! [`BackupStore::discard_uncommitted`] drops them on failover. [`BackupStore::activate`] turns
//! the replica into a servable backend — refused while a sync is incomplete, because then the
//! replica is not an image the VM ever had.
//!
//! Sessions: a store outlives replication sessions. Each session numbers its epochs from 1,
//! so [`BackupStore::begin_session`] restarts the epoch bookkeeping (and the WAL generation)
//! before a session's first event, and marks the replica inconsistent until that session's
//! sync commits: between sessions the primary ran unprotected, so the old image is stale.
//!
//! Concurrency: receiving and committing use separate locks, so events of epoch k+1 keep
//! arriving while epoch k is being committed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::backend::{BackendError, BlockBackend, FileBackend};
use crate::event::{DiskEvent, Epoch, WriteKind};
use crate::wal::{Record, RecordReader, Wal, WalError};

/// Errors of the backup store.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The WAL failed.
    #[error("backup disk: {0}")]
    Wal(#[from] WalError),
    /// The replica failed.
    #[error("backup disk: replica: {0}")]
    Replica(#[from] BackendError),
    /// A spill file failed.
    #[error("backup disk: spill file {path}: {op}: {source}")]
    Spill {
        /// The spill file.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory could not be prepared.
    #[error("backup disk: state dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// An event breaks the stream's rules (wrong epoch order, out of range, bad counts).
    #[error("backup disk: event for epoch {epoch}: {reason}")]
    InvalidEvent {
        /// The event's epoch.
        epoch: Epoch,
        /// What is wrong.
        reason: String,
    },
    /// `commit(k)` was asked for an epoch whose barrier has not arrived.
    #[error("backup disk: commit of epoch {requested}: epochs are complete only up to {complete}")]
    NotComplete {
        /// Epoch asked for.
        requested: Epoch,
        /// Highest epoch whose barrier arrived.
        complete: Epoch,
    },
    /// Copying the committed replica failed.
    #[error("backup disk: copying {from} to {to}: {source}")]
    Copy {
        /// The file copied.
        from: PathBuf,
        /// Where to.
        to: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// `activate` while the replica is mid-sync.
    #[error("backup disk: cannot activate: replica is inconsistent (sync not committed)")]
    Inconsistent,
}

/// Configuration of the backup side.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Holds `wal.log` and spill files (`/var/lib/remus/<domain>/disk`).
    pub state_dir: PathBuf,
    /// The replica raw image (must exist with the primary's size).
    pub replica: PathBuf,
    /// Payload bytes of uncommitted epochs kept in memory before spilling to files.
    pub memory_limit: u64,
    /// Rewind the WAL (after syncing the replica) once it holds this many bytes.
    pub wal_reset_bytes: u64,
    /// Test hook: sleep this long after applying each record, so a crash test can kill the
    /// process in the middle of an apply. `None` in production.
    pub apply_delay: Option<Duration>,
}

impl BackupConfig {
    /// Defaults: 256 MiB in memory, WAL rewound past 256 MiB.
    pub fn new(state_dir: impl Into<PathBuf>, replica: impl Into<PathBuf>) -> Self {
        BackupConfig {
            state_dir: state_dir.into(),
            replica: replica.into(),
            memory_limit: 256 << 20,
            wal_reset_bytes: 256 << 20,
            apply_delay: None,
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitReport {
    /// The epoch now committed.
    pub epoch: Epoch,
    /// Epochs committed by this call.
    pub epochs: u64,
    /// Write records applied.
    pub writes: u64,
    /// Data payload bytes applied.
    pub bytes: u64,
    /// Time until the WAL commit record was durable (the acknowledgement point).
    pub durable_after: Duration,
    /// Total time including the apply.
    pub total: Duration,
}

/// A snapshot of the backup's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupStatus {
    /// Last committed epoch (0: the base image).
    pub committed: Epoch,
    /// Highest epoch whose barrier has arrived.
    pub complete: Epoch,
    /// Uncommitted epochs held (complete or receiving).
    pub backlog_epochs: u64,
    /// Uncommitted payload bytes held.
    pub backlog_bytes: u64,
    /// Of those, bytes in spill files.
    pub spilled_bytes: u64,
    /// Whether the replica is a consistent image (no sync in progress).
    pub consistent: bool,
}

/// One uncommitted epoch: records in memory, then (once spilling started) in its file.
#[derive(Debug, Default)]
struct EpochBuf {
    mem: Vec<Record>,
    spill: Option<(File, PathBuf)>,
    /// Encoded bytes waiting to be appended to the spill file.
    spill_buf: Vec<u8>,
    writes: u64,
    bytes: u64,
    spilled: u64,
    complete: bool,
}

#[derive(Debug, Default)]
struct Pending {
    epochs: BTreeMap<Epoch, EpochBuf>,
    mem_bytes: u64,
    /// Highest epoch closed by a barrier.
    complete: Epoch,
}

#[derive(Debug)]
struct Committer {
    wal: Wal,
    replica: FileBackend,
    consistent: bool,
}

/// Byte ranges of the replica written by commits while tracking is on: lets a copy of the
/// replica be taken in two passes, the bulk while commits keep being applied, then only the
/// ranges written since, while nothing commits (see `remus-agent`'s test activation).
/// Cloning shares the tracker.
#[derive(Clone, Debug, Default)]
pub struct WrittenRanges {
    /// `(offset, len)` of each write while tracking; `None` while not tracking.
    inner: Arc<Mutex<Option<Ranges>>>,
}

type Ranges = Vec<(u64, u64)>;

impl WrittenRanges {
    /// Starts tracking afresh.
    pub fn start(&self) {
        *lock(&self.inner) = Some(Vec::new());
    }

    /// Stops tracking and returns the ranges written since [`start`](Self::start) as
    /// `(offset, len)`, sorted and merged.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut v = lock(&self.inner).take().unwrap_or_default();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (off, len) in v {
            match out.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => out.push((off, len)),
            }
        }
        out
    }

    /// Notes a range just written (after the write: a range written while tracking starts
    /// is either seen by the bulk copy or noted).
    fn note(&self, off: u64, len: u64) {
        if let Some(v) = lock(&self.inner).as_mut() {
            v.push((off, len));
        }
    }
}

/// The backup's replica and its uncommitted epochs. See the module documentation.
#[derive(Debug)]
pub struct BackupStore {
    cfg: BackupConfig,
    size: u64,
    pending: Mutex<Pending>,
    committer: Mutex<Committer>,
    /// Mirrors the committer's last committed epoch so `receive` can check without waiting.
    committed: AtomicU64,
    /// Ranges written by commits while tracking is on.
    written: WrittenRanges,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn apply(replica: &FileBackend, rec: &Record, consistent: &mut bool) -> Result<(), BackendError> {
    match rec {
        Record::Write { offset, kind, .. } => match kind {
            WriteKind::Data(b) => replica.write_at(*offset, b.clone(), false),
            WriteKind::Zeroes { len } => replica.write_zeroes(*offset, *len, false, true),
            WriteKind::Trim { len } => replica.trim(*offset, *len, false),
        },
        Record::SyncBegin { .. } => {
            *consistent = false;
            Ok(())
        }
        Record::SyncEnd { .. } => {
            *consistent = true;
            Ok(())
        }
        Record::Commit { .. } => Ok(()),
    }
}

impl BackupStore {
    /// Opens the store: replays the WAL into the replica (finishing any interrupted commit),
    /// and deletes stale spill files.
    ///
    /// # Errors
    /// [`BackupError`] on I/O failures or a WAL that belongs to another disk.
    pub fn open(cfg: BackupConfig) -> Result<Self, BackupError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(|source| BackupError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            })?;
        if let Ok(rd) = std::fs::read_dir(&cfg.state_dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("spill-") && name.ends_with(".log") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let replica = FileBackend::open(&cfg.replica, false)?;
        let size = replica.size();
        let (mut wal, records) = Wal::open(&cfg.state_dir.join("wal.log"), size)?;
        let mut st = wal.state();
        let mut consistent = st.consistent;
        if !records.is_empty() {
            for rec in &records {
                apply(&replica, rec, &mut consistent)?;
                if let Record::Commit { epoch } = rec {
                    st.committed = *epoch;
                }
            }
            replica.flush()?;
            info!(
                records = records.len(),
                committed = st.committed,
                "backup disk: WAL replayed"
            );
        }
        wal.reset(st.committed, consistent)?;
        Ok(BackupStore {
            size,
            pending: Mutex::new(Pending {
                complete: st.committed,
                ..Default::default()
            }),
            committed: AtomicU64::new(st.committed),
            committer: Mutex::new(Committer {
                wal,
                replica,
                consistent,
            }),
            written: WrittenRanges::default(),
            cfg,
        })
    }

    /// Size of the replica.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Last committed epoch.
    pub fn committed(&self) -> Epoch {
        self.committed.load(Ordering::Acquire)
    }

    /// Takes one event, in stream order.
    ///
    /// # Errors
    /// [`BackupError::InvalidEvent`] when it breaks the stream's rules (the engine should drop
    /// the connection); [`BackupError::Spill`] when spilling fails.
    pub fn receive(&self, ev: DiskEvent) -> Result<(), BackupError> {
        let epoch = ev.epoch();
        let invalid = |reason: String| BackupError::InvalidEvent { epoch, reason };
        let mut p = lock(&self.pending);
        if epoch <= p.complete {
            return Err(invalid(format!(
                "epoch already closed (complete up to {})",
                p.complete
            )));
        }
        if let Some((&last, buf)) = p.epochs.iter().next_back() {
            if epoch < last {
                return Err(invalid(format!("epoch goes backwards after {last}")));
            }
            if epoch > last && !buf.complete {
                return Err(invalid(format!(
                    "epoch {last} was never closed by a barrier"
                )));
            }
        }
        let rec = match ev {
            DiskEvent::Barrier { writes, bytes, .. } => {
                let buf = p.epochs.entry(epoch).or_default();
                if buf.writes != writes || buf.bytes != bytes {
                    return Err(invalid(format!(
                        "barrier announces {writes} writes / {bytes} bytes, received {} / {}",
                        buf.writes, buf.bytes
                    )));
                }
                buf.complete = true;
                Self::flush_spill(buf)?;
                p.complete = epoch;
                debug!(epoch, writes, bytes, "backup disk: epoch complete");
                return Ok(());
            }
            DiskEvent::Write { offset, kind, .. } => {
                let len = kind.len();
                if len == 0 || offset.checked_add(len).is_none_or(|e| e > self.size) {
                    return Err(invalid(format!(
                        "write of {len} bytes at {offset} outside replica of {} bytes",
                        self.size
                    )));
                }
                Record::Write {
                    epoch,
                    offset,
                    kind,
                }
            }
            DiskEvent::SyncBegin { full, .. } => Record::SyncBegin { epoch, full },
            DiskEvent::SyncEnd { .. } => Record::SyncEnd { epoch },
        };
        let payload = rec.payload_len();
        let fits = p.mem_bytes + payload <= self.cfg.memory_limit;
        let buf = p.epochs.entry(epoch).or_default();
        if matches!(rec, Record::Write { .. }) {
            buf.writes += 1;
            buf.bytes += payload;
        }
        // Once an epoch spills, all its later records follow it into the file, so the
        // order "memory records, then file records" is the arrival order.
        if buf.spill.is_none() && fits {
            buf.mem.push(rec);
            p.mem_bytes += payload;
            return Ok(());
        }
        if buf.spill.is_none() {
            let path = self.cfg.state_dir.join(format!("spill-{epoch}.log"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .truncate(true)
                .open(&path)
                .map_err(|source| BackupError::Spill {
                    path: path.clone(),
                    op: "create",
                    source,
                })?;
            buf.spill = Some((f, path));
        }
        buf.spilled += payload;
        rec.encode(0, &mut buf.spill_buf);
        if buf.spill_buf.len() >= 1 << 20 {
            Self::flush_spill(buf)?;
        }
        Ok(())
    }

    fn flush_spill(buf: &mut EpochBuf) -> Result<(), BackupError> {
        use std::io::Write;
        if let Some((f, path)) = &mut buf.spill {
            if !buf.spill_buf.is_empty() {
                f.write_all(&buf.spill_buf)
                    .map_err(|source| BackupError::Spill {
                        path: path.clone(),
                        op: "append",
                        source,
                    })?;
                buf.spill_buf.clear();
            }
        }
        Ok(())
    }

    /// Commits every complete epoch ≤ k: WAL, then replica. Returns once epoch k is durable
    /// and applied; `on_durable(k)` is called as soon as it is durable (the acknowledgement
    /// point), before the apply. Blocking: call from a blocking thread.
    ///
    /// # Errors
    /// [`BackupError::NotComplete`] when epoch k's barrier has not arrived; I/O errors (after
    /// which the store should be reopened, which replays the WAL).
    pub fn commit_with(
        &self,
        k: Epoch,
        on_durable: impl FnOnce(Epoch),
    ) -> Result<CommitReport, BackupError> {
        let t0 = Instant::now();
        let mut c = lock(&self.committer);
        let committed = self.committed();
        if k <= committed {
            on_durable(committed);
            return Ok(CommitReport {
                epoch: committed,
                epochs: 0,
                writes: 0,
                bytes: 0,
                durable_after: t0.elapsed(),
                total: t0.elapsed(),
            });
        }
        let taken: Vec<(Epoch, EpochBuf)> = {
            let mut p = lock(&self.pending);
            if p.complete < k {
                return Err(BackupError::NotComplete {
                    requested: k,
                    complete: p.complete,
                });
            }
            let later = p.epochs.split_off(&(k + 1));
            let taken: Vec<_> = std::mem::replace(&mut p.epochs, later)
                .into_iter()
                .collect();
            for (_, b) in &taken {
                p.mem_bytes -= b.bytes - b.spilled;
            }
            taken
        };
        let mut report = CommitReport {
            epoch: k,
            epochs: taken.len() as u64,
            writes: 0,
            bytes: 0,
            durable_after: Duration::ZERO,
            total: Duration::ZERO,
        };
        // (1) WAL.
        for (_, b) in &taken {
            Self::for_each_record(b, |rec| c.wal.append(rec).map_err(BackupError::from))?;
            report.writes += b.writes;
            report.bytes += b.bytes;
        }
        c.wal.append(&Record::Commit { epoch: k })?;
        c.wal.sync()?;
        self.committed.store(k, Ordering::Release);
        report.durable_after = t0.elapsed();
        on_durable(k);
        // (2) Apply.
        let delay = self.cfg.apply_delay;
        let Committer {
            replica,
            consistent,
            wal,
        } = &mut *c;
        for (_, b) in &taken {
            Self::for_each_record(b, |rec| {
                apply(replica, rec, consistent)?;
                if let Record::Write { offset, kind, .. } = rec {
                    self.written.note(*offset, kind.len());
                }
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                Ok(())
            })?;
            if let Some((_, path)) = &b.spill {
                let _ = std::fs::remove_file(path);
            }
        }
        // (3) Rewind the log when it is large.
        if wal.len() >= self.cfg.wal_reset_bytes {
            replica.flush()?;
            wal.reset(k, *consistent)?;
        }
        report.total = t0.elapsed();
        debug!(?report, "backup disk: committed");
        Ok(report)
    }

    /// [`BackupStore::commit_with`] without a durability callback.
    ///
    /// # Errors
    /// As `commit_with`.
    pub fn commit(&self, k: Epoch) -> Result<CommitReport, BackupError> {
        self.commit_with(k, |_| {})
    }

    /// [`BackupStore::commit`] on the blocking pool.
    ///
    /// # Errors
    /// As `commit`.
    pub async fn commit_async(self: &Arc<Self>, k: Epoch) -> Result<CommitReport, BackupError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.commit(k))
            .await
            .expect("commit task panicked")
    }

    fn for_each_record(
        b: &EpochBuf,
        mut f: impl FnMut(&Record) -> Result<(), BackupError>,
    ) -> Result<(), BackupError> {
        for rec in &b.mem {
            f(rec)?;
        }
        if let Some((file, path)) = &b.spill {
            let io = |op| {
                let path = path.clone();
                move |source| BackupError::Spill { path, op, source }
            };
            let mut file = file.try_clone().map_err(io("clone"))?;
            file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
            let mut rd = RecordReader::new(BufReader::with_capacity(1 << 20, file), 0);
            while let Some((rec, _)) = rd.next_record().map_err(io("read"))? {
                f(&rec)?;
            }
        }
        Ok(())
    }

    /// Drops every uncommitted epoch (failover: the primary is gone, its last incomplete or
    /// unacknowledged epochs must never reach the replica). Returns the epochs dropped.
    pub fn discard_uncommitted(&self) -> u64 {
        let mut p = lock(&self.pending);
        let n = p.epochs.len() as u64;
        for (_, b) in std::mem::take(&mut p.epochs) {
            if let Some((_, path)) = b.spill {
                let _ = std::fs::remove_file(path);
            }
        }
        p.mem_bytes = 0;
        p.complete = self.committed();
        info!(epochs = n, "backup disk: uncommitted epochs discarded");
        n
    }

    /// Starts a new replication session into this replica (the first, or a re-protection
    /// after the previous session was lost). Call it between sessions, before the session's
    /// first event; nothing may be receiving or committing concurrently.
    ///
    /// The new session's epochs restart at 1, so the epoch bookkeeping restarts at 0 (the
    /// image as it is now): uncommitted epochs of the previous session are dropped, the
    /// replica is made durable and the WAL starts a new generation whose header says
    /// `committed = 0`, so no record of the old session can be replayed into the new one.
    ///
    /// The replica is also marked **inconsistent** (not activatable) until the session's
    /// synchronisation commits its `SyncEnd`: the primary ran unprotected before this
    /// session, so the image here is older than what the primary's clients have seen.
    /// Every session must therefore start with a sync (`SyncMode::Full`, or `SyncMode::Dirty`
    /// which copies only the primary's dirty bitmap and still sends both markers when the
    /// bitmap is empty).
    ///
    /// # Errors
    /// I/O errors of the replica or the WAL (the previous state stays, reopen to retry).
    pub fn begin_session(&self) -> Result<(), BackupError> {
        let mut c = lock(&self.committer);
        let previous = self.committed();
        let dropped = self.discard_uncommitted();
        c.replica.flush()?;
        c.wal.reset(0, false)?;
        c.consistent = false;
        self.committed.store(0, Ordering::Release);
        lock(&self.pending).complete = 0;
        info!(
            previous,
            dropped,
            "backup disk: new session, epochs restart; replica inconsistent until its sync commits"
        );
        Ok(())
    }

    /// Turns the replica into a servable backend at the last committed epoch: drops
    /// uncommitted epochs, makes the replica durable and the WAL empty.
    ///
    /// # Errors
    /// [`BackupError::Inconsistent`] while a sync is incomplete; I/O errors.
    pub fn activate(self) -> Result<FileBackend, BackupError> {
        self.discard_uncommitted();
        let committed = self.committed();
        let Committer {
            replica,
            mut wal,
            consistent,
        } = self
            .committer
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        if !consistent {
            return Err(BackupError::Inconsistent);
        }
        replica.flush()?;
        wal.reset(committed, consistent)?;
        info!(committed, "backup disk: activated");
        Ok(replica)
    }

    /// Current state.
    pub fn status(&self) -> BackupStatus {
        let consistent = lock(&self.committer).consistent;
        let p = lock(&self.pending);
        BackupStatus {
            committed: self.committed(),
            complete: p.complete,
            backlog_epochs: p.epochs.len() as u64,
            backlog_bytes: p.epochs.values().map(|b| b.bytes).sum(),
            spilled_bytes: p.epochs.values().map(|b| b.spilled).sum(),
            consistent,
        }
    }

    /// First pass of a copy of the committed replica to `image`: starts tracking the ranges
    /// commits write, then copies the whole image while commits go on (ranges they write
    /// meanwhile may be torn in the copy; [`finish_copy`](Self::finish_copy) copies them
    /// again). Blocking.
    ///
    /// # Errors
    /// [`BackupError::Copy`] naming the file.
    pub fn precopy(&self, image: &Path) -> Result<(), BackupError> {
        self.written.start();
        std::fs::copy(&self.cfg.replica, image)
            .map(|_| ())
            .map_err(|source| BackupError::Copy {
                from: self.cfg.replica.clone(),
                to: image.to_path_buf(),
                source,
            })
    }

    /// Last pass of the copy begun by [`precopy`](Self::precopy): under the commit lock,
    /// copies the ranges commits wrote since, so that `image` is the replica at the committed
    /// epoch returned (a store opened on it with an empty state directory holds exactly
    /// that). The caller pairs it with RAM of the same checkpoint by calling it while the
    /// replication receiver is held still. Returns the epoch and the bytes copied. Blocking.
    ///
    /// # Errors
    /// [`BackupError::Inconsistent`] while a sync is incomplete (the replica is no image the
    /// VM ever had); [`BackupError::Copy`] naming the file.
    pub fn finish_copy(&self, image: &Path) -> Result<(Epoch, u64), BackupError> {
        use std::os::unix::fs::FileExt;
        let c = lock(&self.committer);
        let ranges = self.written.take();
        if !c.consistent {
            return Err(BackupError::Inconsistent);
        }
        let copy_err = |source| BackupError::Copy {
            from: self.cfg.replica.clone(),
            to: image.to_path_buf(),
            source,
        };
        let src = File::open(&self.cfg.replica).map_err(copy_err)?;
        let dst = OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(copy_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut copied = 0;
        for (off, len) in ranges {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                src.read_exact_at(&mut buf[..n], off + done)
                    .map_err(copy_err)?;
                dst.write_all_at(&buf[..n], off + done).map_err(copy_err)?;
                done += n as u64;
            }
            copied += len;
        }
        Ok((self.committed(), copied))
    }

    /// Runs `f` on the replica under the commit lock (no commit can change it meanwhile),
    /// with whether it is consistent and the committed epoch.
    pub(crate) fn with_replica<T>(
        &self,
        f: impl FnOnce(&FileBackend, bool, Epoch) -> Result<T, BackendError>,
    ) -> Result<T, BackupError> {
        let c = lock(&self.committer);
        Ok(f(&c.replica, c.consistent, self.committed())?)
    }

    /// The tracker of ranges written to the replica by commits (shared).
    pub fn written_ranges(&self) -> WrittenRanges {
        self.written.clone()
    }

    /// The replica image.
    pub fn replica_path(&self) -> &Path {
        &self.cfg.replica
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}
