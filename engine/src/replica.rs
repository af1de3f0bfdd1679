//! The backup's copy of the VM: replica RAM, device state, and which checkpoint they hold.
//!
//! Invariant: whenever the metadata says `Committed(k)`, the replica RAM file and the device
//! state file are exactly checkpoint k, and an activation may start from them. A checkpoint
//! is applied in three durable steps, so that a kill of the agent at any instant leaves
//! either checkpoint k-1 or a redo-able checkpoint k behind, never a torn mixture:
//!
//! 1. **stage**: the verified pages and device state of k are written to `staging` (a
//!    checksummed file, written to a temporary name and renamed), then the metadata becomes
//!    `Applying(k)`;
//! 2. **apply**: pages are copied into the replica RAM, the device state file replaced; the
//!    caller commits the disk writes of k;
//! 3. the metadata becomes `Committed(k)` and `staging` is removed.
//!
//! On open, `Applying(k)` means step 2 may be partial: it is redone from `staging` (copying
//! the same pages again is idempotent). The first checkpoint of a protection session is
//! different: there is no previous checkpoint to protect, so its pages are written straight
//! into the replica RAM while the metadata says `Syncing`, and `Committed(0)` is written only
//! when the first checkpoint is complete.
//!
//! All files live in one directory next to the replica RAM (by default under /dev/shm), so a
//! reboot of the backup host loses them together and never leaves metadata describing RAM
//! that is gone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;
use remus_stream::{FlatMemory, PageDataRef, PageReference};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use remus_stream::PAGE_SIZE as PAGE;
const STAGING_MAGIC: &[u8; 8] = b"RMSTAGE1";
const META_VERSION: u32 = 1;

/// Errors of the replica store; each names the file and the operation.
#[derive(Debug, Error)]
pub enum ReplicaError {
    /// A file operation failed.
    #[error("replica {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// The metadata file does not parse or belongs to another domain/size.
    #[error("replica {path}: metadata unusable: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    /// The staging file is torn or corrupt.
    #[error("replica {path}: staging file corrupt: {reason}")]
    BadStaging { path: PathBuf, reason: String },
    /// A page lies outside guest RAM.
    #[error("replica: page frame {pfn} is beyond guest RAM of {ram_size} bytes")]
    PageOutOfRange { pfn: u64, ram_size: u64 },
    /// An operation needs a committed checkpoint and there is none.
    #[error("replica of {domain}: no committed checkpoint ({state})")]
    NotCommitted { domain: String, state: String },
    /// Checkpoints must be applied in order.
    #[error("replica of {domain}: checkpoint {got} cannot follow {state}")]
    OutOfOrder {
        domain: String,
        got: u64,
        state: String,
    },
}

/// Where the replica stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "epoch", rename_all = "snake_case")]
pub enum ReplicaState {
    /// No usable checkpoint: nothing was ever received, or the first one is incomplete.
    Empty,
    /// A session has begun and its first checkpoint is being written straight into the
    /// replica: not activatable (whatever an earlier session committed is given up).
    Syncing,
    /// Checkpoint k is staged and being applied (redo on open).
    Applying(u64),
    /// Checkpoint k is complete and activatable.
    Committed(u64),
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaState::Empty => f.write_str("empty"),
            ReplicaState::Syncing => f.write_str("first checkpoint of the session in progress"),
            ReplicaState::Applying(k) => write!(f, "applying checkpoint {k}"),
            ReplicaState::Committed(k) => write!(f, "committed checkpoint {k}"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    version: u32,
    domain: String,
    ram_size: u64,
    session: u64,
    #[serde(flatten)]
    state: ReplicaState,
}

/// Pages of one checkpoint held in memory until the checkpoint is verified complete.
///
/// One slot per distinct page, in arrival order, all in one buffer: a `PAGE_DATA` batch is
/// decoded straight into the next free slots ([`decode`](Self::decode)), and the staging
/// file and the apply read the pages where they were decoded, so a page is written once
/// between the received record and the staging file. The buffer keeps its length between
/// checkpoints (only the slots are forgotten), so a checkpoint overwrites stale bytes instead
/// of zero-filling first.
#[derive(Debug, Default)]
pub struct StagedPages {
    /// The page in each slot; its length is the number of slots in use.
    pfns: Vec<u64>,
    /// Slot `i` is `data[i * PAGE..(i + 1) * PAGE]`; bytes past the last slot are stale.
    data: Vec<u8>,
    /// The slot of each staged page.
    index: std::collections::HashMap<u64, usize>,
}

impl StagedPages {
    /// Adds or replaces the page `pfn`.
    pub fn put(&mut self, pfn: u64, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE);
        let slot = match self.index.get(&pfn) {
            Some(&i) => i,
            None => self.new_slot(pfn),
        };
        self.data[slot * PAGE..(slot + 1) * PAGE].copy_from_slice(page);
    }

    /// Decodes one `PAGE_DATA` batch straight into the staged pages: a page already staged
    /// by this checkpoint is replaced, XOR-delta pages refer to the copy staged earlier in
    /// this checkpoint, else to `replica` (the committed RAM). Returns the bytes moved
    /// again after decoding (pages this checkpoint already carried; normally none).
    ///
    /// # Errors
    /// The batch does not decode; nothing of it is staged then.
    pub fn decode(
        &mut self,
        batch: &PageDataRef<'_>,
        replica: &[u8],
    ) -> Result<u64, remus_stream::PageError> {
        let n = batch.count();
        let first = self.pfns.len();
        let (start, end) = (first * PAGE, (first + n) * PAGE);
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        let (staged, free) = self.data.split_at_mut(start);
        let staged: &[u8] = staged;
        let index = &self.index;
        let mut reference = |pfn: u64| match index.get(&pfn) {
            Some(&i) => staged.get(i * PAGE..(i + 1) * PAGE),
            None => FlatMemory(replica).page(pfn),
        };
        batch.decode_into(&mut free[..n * PAGE], &mut reference)?;
        // Give each page its slot: a new page keeps the one it was decoded into (moved down
        // if an earlier page of the batch replaced an older copy), a replacing page goes to
        // the older copy's slot.
        let mut moved = 0u64;
        for i in 0..n {
            let pfn = batch.pfn(i);
            let at = start + i * PAGE;
            let to = match self.index.get(&pfn) {
                Some(&slot) => slot,
                None => {
                    let slot = self.pfns.len();
                    self.index.insert(pfn, slot);
                    self.pfns.push(pfn);
                    slot
                }
            };
            if to * PAGE != at {
                self.data.copy_within(at..at + PAGE, to * PAGE);
                moved += PAGE as u64;
            }
        }
        Ok(moved)
    }

    /// The staged copy of `pfn`, if this checkpoint carried it.
    pub fn get(&self, pfn: u64) -> Option<&[u8]> {
        self.index
            .get(&pfn)
            .map(|&i| &self.data[i * PAGE..(i + 1) * PAGE])
    }

    /// Number of distinct pages staged.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// True when no page is staged.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Drops everything (a discarded or applied checkpoint); the buffer is kept for reuse.
    pub fn clear(&mut self) {
        self.pfns.clear();
        self.index.clear();
    }

    fn new_slot(&mut self, pfn: u64) -> usize {
        let slot = self.pfns.len();
        self.index.insert(pfn, slot);
        self.pfns.push(pfn);
        if self.data.len() < (slot + 1) * PAGE {
            self.data.resize((slot + 1) * PAGE, 0);
        }
        slot
    }

    /// Every staged page, slot by slot, as one slice.
    fn bytes(&self) -> &[u8] {
        &self.data[..self.pfns.len() * PAGE]
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pfns
            .iter()
            .enumerate()
            .map(move |(i, &p)| (p, &self.data[i * PAGE..(i + 1) * PAGE]))
    }
}

/// What an activation needs from the replica.
#[derive(Debug, Clone)]
pub struct ActivationInputs {
    /// The checkpoint the replica holds.
    pub epoch: u64,
    /// The replica RAM file QEMU must be started on.
    pub ram_path: PathBuf,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// The saved device state of that checkpoint.
    pub device_state: Vec<u8>,
}

/// Pages of the replica RAM written while tracking is on: lets a copy of the RAM file be
/// taken in two passes, the bulk while checkpoints keep being applied, then only the pages
/// written since, while the receiver is held still (see `remus-agent`'s test activation).
/// Cloning shares the tracker.
#[derive(Clone, Debug, Default)]
pub struct WrittenPages {
    on: Arc<AtomicBool>,
    bits: Arc<Mutex<Vec<u64>>>,
}

impl WrittenPages {
    /// Starts tracking afresh (forgetting pages noted before) for RAM of `pages` pages.
    pub fn start(&self, pages: u64) {
        let mut b = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        b.clear();
        b.resize(pages.div_ceil(64) as usize, 0);
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops tracking and returns the pages written since [`start`](Self::start), in order.
    pub fn take(&self) -> Vec<u64> {
        self.on.store(false, Ordering::SeqCst);
        let b = std::mem::take(&mut *self.bits.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        for (w, &word) in b.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros() as u64;
                out.push(w as u64 * 64 + bit);
                word &= word - 1;
            }
        }
        out
    }

    /// Notes pages just written (called after the write, so a page written while tracking
    /// starts is either seen by the bulk copy or noted).
    fn note(&self, pfns: impl IntoIterator<Item = u64>) {
        if !self.on.load(Ordering::SeqCst) {
            return;
        }
        let mut b = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        for pfn in pfns {
            if let Some(w) = b.get_mut((pfn / 64) as usize) {
                *w |= 1 << (pfn % 64);
            }
        }
    }
}

/// The backup's replica of one domain.
pub struct ReplicaStore {
    domain: String,
    dir: PathBuf,
    ram_size: u64,
    ram: MmapMut,
    meta: Meta,
    written: WrittenPages,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("domain", &self.domain)
            .field("dir", &self.dir)
            .field("state", &self.meta.state)
            .finish()
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ReplicaError + 'a {
    move |source| ReplicaError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReplicaError> {
    write_atomic_parts(path, &[bytes])
}

/// [`write_atomic`] of the concatenation of `parts`, without building it in memory.
fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<(), ReplicaError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    for part in parts {
        f.write_all(part).map_err(io_err(&tmp, "write"))?;
    }
    f.sync_all().map_err(io_err(&tmp, "fsync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica of `domain` in `dir`, with guest RAM of
    /// `ram_size` bytes, and finishes an interrupted apply if there is one.
    ///
    /// # Errors
    /// File errors; metadata of another domain or RAM size; a corrupt staging file while
    /// the metadata says a checkpoint is being applied.
    pub fn open(domain: &str, dir: &Path, ram_size: u64) -> Result<Self, ReplicaError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir, "create directory"))?;
        let ram_path = dir.join("ram");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(&ram_path)
            .map_err(io_err(&ram_path, "open"))?;
        let len = file.metadata().map_err(io_err(&ram_path, "stat"))?.len();
        let meta_path = dir.join("checkpoint.json");
        let meta = match fs::read(&meta_path) {
            Ok(bytes) => {
                let m: Meta =
                    serde_json::from_slice(&bytes).map_err(|e| ReplicaError::BadMeta {
                        path: meta_path.clone(),
                        reason: e.to_string(),
                    })?;
                if m.domain != domain || m.ram_size != ram_size || m.version != META_VERSION {
                    return Err(ReplicaError::BadMeta {
                        path: meta_path,
                        reason: format!(
                            "describes domain {:?} with {} bytes of RAM (format {}), expected {:?} with {} bytes",
                            m.domain, m.ram_size, m.version, domain, ram_size
                        ),
                    });
                }
                if len != ram_size {
                    // The RAM file was lost or replaced: whatever the metadata says, there is
                    // no usable checkpoint.
                    Meta {
                        state: ReplicaState::Empty,
                        ..m
                    }
                } else {
                    m
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta {
                version: META_VERSION,
                domain: domain.to_string(),
                ram_size,
                session: 0,
                state: ReplicaState::Empty,
            },
            Err(e) => return Err(io_err(&meta_path, "read")(e)),
        };
        if len != ram_size {
            file.set_len(ram_size)
                .map_err(io_err(&ram_path, "resize"))?;
        }
        // SAFETY: the file is at least `ram_size` bytes (set above) and stays open for the
        // mapping's lifetime (memmap2 keeps its own handle). The replica RAM file is private
        // to this agent while it is the backup: QEMU maps it only after activation, when the
        // store has stopped writing (see `activation_inputs`), so no other process mutates
        // it underneath this mapping.
        let ram = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(&ram_path, "mmap"))?;
        let mut store = Self {
            domain: domain.to_string(),
            dir: dir.to_path_buf(),
            ram_size,
            ram,
            meta,
            written: WrittenPages::default(),
        };
        store.write_meta()?;
        if let ReplicaState::Applying(k) = store.meta.state {
            tracing::warn!(
                domain,
                epoch = k,
                "finishing a checkpoint apply interrupted by a restart"
            );
            let (pages, dev) = store.read_staging(k)?;
            store.apply_pages(&pages)?;
            write_atomic(&store.dir.join("devstate"), &dev)?;
        }
        Ok(store)
    }

    /// Where the replica stands.
    pub fn state(&self) -> ReplicaState {
        self.meta.state
    }

    /// The session (stream id) of the checkpoints the replica holds.
    pub fn session(&self) -> u64 {
        self.meta.session
    }

    /// Guest RAM size.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The replica RAM as of the last committed checkpoint (or the partial first one): the
    /// reference for XOR-delta pages.
    pub fn ram(&self) -> &[u8] {
        &self.ram
    }

    /// Path of the replica RAM file.
    pub fn ram_path(&self) -> PathBuf {
        self.dir.join("ram")
    }

    /// Starts a new replication session (the first, or a re-protection after the previous
    /// session was lost): the replica is **not activatable** from this call until the new
    /// session's first checkpoint commits ([`commit_first`](Self::commit_first)).
    ///
    /// Why the previous checkpoint k is given up here and not kept as a fallback: a new
    /// session exists only because the primary lost its backup, and a primary without a
    /// backup runs unprotected with its output released. Its clients may have seen state
    /// newer than k, so activating k would roll back output that was already released. The
    /// state `Syncing` is written durably before anything else, so a restart during the
    /// resynchronisation finds the replica not activatable too.
    ///
    /// # Errors
    /// Metadata write failures.
    pub fn begin_session(&mut self, session: u64) -> Result<(), ReplicaError> {
        if let ReplicaState::Committed(k) | ReplicaState::Applying(k) = self.meta.state {
            tracing::info!(
                domain = %self.domain,
                epoch = k,
                session = format_args!("{session:#x}"),
                "new replication session: checkpoint {k} of the previous session is no longer activatable"
            );
        }
        // The primary's shadow starts all zero and never sends a page that is still zero, so
        // the replica must start all zero too: drop whatever an earlier session left. The
        // metadata stops naming a committed checkpoint before the RAM is touched.
        self.meta.state = ReplicaState::Empty;
        self.write_meta()?;
        let path = self.ram_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open"))?;
        file.set_len(0).map_err(io_err(&path, "truncate"))?;
        file.set_len(self.ram_size)
            .map_err(io_err(&path, "resize"))?;
        // SAFETY: as in `open`: the file has `ram_size` bytes and no other process maps it
        // while this store is the backup's replica.
        self.ram = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(&path, "mmap"))?;
        self.meta.session = session;
        self.meta.state = ReplicaState::Syncing;
        self.write_meta()
    }

    /// Writes one page of the first checkpoint straight into the replica RAM.
    ///
    /// # Errors
    /// [`ReplicaError::PageOutOfRange`].
    pub fn write_first_page(&mut self, pfn: u64, page: &[u8]) -> Result<(), ReplicaError> {
        let off = self.page_offset(pfn)?;
        self.ram[off..off + PAGE].copy_from_slice(page);
        self.written.note([pfn]);
        Ok(())
    }

    /// The tracker of pages written to the RAM file (shared: keep it to copy the replica
    /// while sessions apply checkpoints).
    pub fn written_pages(&self) -> WrittenPages {
        self.written.clone()
    }

    /// Completes the first checkpoint: its device state is stored and the replica becomes
    /// `Committed(epoch)`.
    ///
    /// # Errors
    /// File errors; out of order if no first checkpoint was begun.
    pub fn commit_first(&mut self, epoch: u64, device_state: &[u8]) -> Result<(), ReplicaError> {
        if self.meta.state != ReplicaState::Syncing {
            return Err(ReplicaError::OutOfOrder {
                domain: self.domain.clone(),
                got: epoch,
                state: self.meta.state.to_string(),
            });
        }
        self.ram
            .flush()
            .map_err(io_err(&self.ram_path(), "msync"))?;
        write_atomic(&self.dir.join("devstate"), device_state)?;
        self.meta.state = ReplicaState::Committed(epoch);
        self.write_meta()
    }

    /// Step 1 and 2 of applying checkpoint `epoch`: stage it durably, then copy it into the
    /// replica. The caller then commits the disk writes and calls
    /// [`mark_committed`](Self::mark_committed).
    ///
    /// # Errors
    /// File errors, pages out of range, or a checkpoint that does not follow the committed one.
    pub fn stage_and_apply(
        &mut self,
        epoch: u64,
        pages: &StagedPages,
        device_state: &[u8],
    ) -> Result<(), ReplicaError> {
        match self.meta.state {
            ReplicaState::Committed(prev) if epoch > prev => {}
            other => {
                return Err(ReplicaError::OutOfOrder {
                    domain: self.domain.clone(),
                    got: epoch,
                    state: other.to_string(),
                })
            }
        }
        for (pfn, _) in pages.iter() {
            self.page_offset(pfn)?;
        }
        self.write_staging(epoch, pages, device_state)?;
        self.meta.state = ReplicaState::Applying(epoch);
        self.write_meta()?;
        self.apply_pages(pages)?;
        write_atomic(&self.dir.join("devstate"), device_state)
    }

    /// Step 3: checkpoint `epoch` is complete (its disk writes committed too).
    ///
    /// # Errors
    /// Metadata write failures; out of order if `epoch` is not the one being applied.
    pub fn mark_committed(&mut self, epoch: u64) -> Result<(), ReplicaError> {
        if self.meta.state != ReplicaState::Applying(epoch) {
            return Err(ReplicaError::OutOfOrder {
                domain: self.domain.clone(),
                got: epoch,
                state: self.meta.state.to_string(),
            });
        }
        self.meta.state = ReplicaState::Committed(epoch);
        self.write_meta()?;
        let _ = fs::remove_file(self.dir.join("staging"));
        Ok(())
    }

    /// The epoch being applied if an apply was interrupted and redone at open (the caller
    /// must then commit that epoch's disk writes and mark it committed).
    pub fn pending_apply(&self) -> Option<u64> {
        match self.meta.state {
            ReplicaState::Applying(k) => Some(k),
            _ => None,
        }
    }

    /// What an activation needs; only for a committed replica.
    ///
    /// # Errors
    /// [`ReplicaError::NotCommitted`]; device-state read errors.
    pub fn activation_inputs(&self) -> Result<ActivationInputs, ReplicaError> {
        let ReplicaState::Committed(epoch) = self.meta.state else {
            return Err(ReplicaError::NotCommitted {
                domain: self.domain.clone(),
                state: self.meta.state.to_string(),
            });
        };
        let path = self.dir.join("devstate");
        let device_state = fs::read(&path).map_err(io_err(&path, "read"))?;
        Ok(ActivationInputs {
            epoch,
            ram_path: self.ram_path(),
            ram_size: self.ram_size,
            device_state,
        })
    }

    fn page_offset(&self, pfn: u64) -> Result<usize, ReplicaError> {
        let end = pfn
            .checked_mul(PAGE as u64)
            .and_then(|o| o.checked_add(PAGE as u64))
            .filter(|&e| e <= self.ram_size)
            .ok_or(ReplicaError::PageOutOfRange {
                pfn,
                ram_size: self.ram_size,
            })?;
        Ok((end as usize) - PAGE)
    }

    fn apply_pages(&mut self, pages: &StagedPages) -> Result<(), ReplicaError> {
        for (pfn, data) in pages.iter() {
            let off = self.page_offset(pfn)?;
            self.ram[off..off + PAGE].copy_from_slice(data);
        }
        self.written.note(pages.iter().map(|(pfn, _)| pfn));
        crate::copies::add(crate::copies::Stage::Apply, (pages.len() * PAGE) as u64);
        self.ram
            .flush()
            .map_err(io_err(&self.dir.join("ram"), "msync"))
    }

    fn write_meta(&self) -> Result<(), ReplicaError> {
        let bytes = serde_json::to_vec_pretty(&self.meta).expect("metadata serialises");
        write_atomic(&self.dir.join("checkpoint.json"), &bytes)
    }

    fn write_staging(
        &self,
        epoch: u64,
        pages: &StagedPages,
        dev: &[u8],
    ) -> Result<(), ReplicaError> {
        // Layout: magic, epoch, page count, device-state length, the pfns, the pages, the
        // device state, CRC32C of all of it. The pages are written from where they were
        // staged, not copied into one buffer first.
        let mut head = Vec::with_capacity(32 + pages.len() * 8);
        head.extend_from_slice(STAGING_MAGIC);
        head.extend_from_slice(&epoch.to_le_bytes());
        head.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        head.extend_from_slice(&(dev.len() as u64).to_le_bytes());
        for &pfn in &pages.pfns {
            head.extend_from_slice(&pfn.to_le_bytes());
        }
        let body = pages.bytes();
        crate::copies::add(crate::copies::Stage::StagingWrite, body.len() as u64);
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&head), body), dev);
        write_atomic_parts(
            &self.dir.join("staging"),
            &[&head, body, dev, &crc.to_le_bytes()],
        )
    }

    fn read_staging(&self, epoch: u64) -> Result<(StagedPages, Vec<u8>), ReplicaError> {
        let path = self.dir.join("staging");
        let bad = |reason: String| ReplicaError::BadStaging {
            path: path.clone(),
            reason,
        };
        let mut buf = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(io_err(&path, "read"))?;
        if buf.len() < 36 || &buf[..8] != STAGING_MAGIC {
            return Err(bad("bad magic or too short".into()));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch".into()));
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let (e, count, dev_len) = (u(8), u(16) as usize, u(24) as usize);
        if e != epoch {
            return Err(bad(format!("holds epoch {e}, metadata says {epoch}")));
        }
        let expect = count
            .checked_mul(8 + PAGE)
            .and_then(|n| n.checked_add(32 + dev_len))
            .ok_or_else(|| bad("sizes overflow".into()))?;
        if expect != body.len() {
            return Err(bad(format!(
                "{} bytes, header implies {expect}",
                body.len()
            )));
        }
        let mut pages = StagedPages::default();
        let pages_at = 32 + count * 8;
        for i in 0..count {
            let pfn = u(32 + i * 8);
            pages.put(pfn, &body[pages_at + i * PAGE..pages_at + (i + 1) * PAGE]);
        }
        Ok((pages, body[pages_at + count * PAGE..].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    /// Encodes `pages` (one per pfn) as one `PAGE_DATA` record of a replication stream,
    /// XOR-delta against `old` where given, and hands its borrowed batch to `f`.
    fn with_batch(
        pfns: &[u64],
        pages: &[u8],
        old: Option<&[u8]>,
        f: impl FnOnce(&PageDataRef<'_>),
    ) {
        use remus_stream::{
            Decoder, Encoder, EncodingChoice, Item, PageEncoding, RecordRef, StreamHeader,
            StreamKind,
        };
        let mut enc = Encoder::new();
        let mut buf = Vec::new();
        let header = StreamHeader {
            kind: StreamKind::Replication,
            session_id: 1,
            node: "pri".into(),
            domain: "vm".into(),
        };
        enc.header(&mut buf, &header).unwrap();
        let choice = match old {
            Some(_) => EncodingChoice::Fixed(PageEncoding::XorLz4),
            None => EncodingChoice::Fixed(PageEncoding::Raw),
        };
        let mut reference = |pfn: u64| {
            let i = pfns.iter().position(|&p| p == pfn)?;
            old.map(|o| &o[i * PAGE..(i + 1) * PAGE])
        };
        enc.page_data(&mut buf, 2, pfns, pages, choice, &mut reference)
            .unwrap();
        let mut dec = Decoder::default();
        let mut input = &buf[..];
        assert!(matches!(
            dec.decode_frame(&mut input).unwrap(),
            Some(Item::Header(_))
        ));
        match dec.decode_frame(&mut input).unwrap() {
            Some(Item::Record(frame)) => match &frame.record {
                RecordRef::PageData(batch) => f(batch),
                other => panic!("expected PAGE_DATA, got {other:?}"),
            },
            other => panic!("expected a record, got {other:?}"),
        }
    }

    /// A batch is decoded straight into the staging slots: a page the checkpoint already
    /// carried is replaced in its slot (and the later pages of the batch close the gap), an
    /// XOR-delta page refers to the copy staged earlier in the checkpoint, else to the
    /// replica.
    #[test]
    fn batches_decode_into_their_slots() {
        let replica: Vec<u8> = (0..8 * PAGE).map(|i| (i / PAGE) as u8).collect();
        let mut staged = StagedPages::default();
        // Batch 1: pages 1 and 3, raw.
        let b1 = [page(0x11), page(0x33)].concat();
        with_batch(&[1, 3], &b1, None, |b| {
            assert_eq!(staged.decode(b, &replica).unwrap(), 0);
        });
        // Batch 2: pages 2, 3 (again) and 5, XOR against what the backup holds: page 3 as
        // staged by batch 1, pages 2 and 5 as in the replica.
        let new2 = [page(0x22), page(0x34), page(0x55)].concat();
        let old2 = [page(2), page(0x33), page(5)].concat();
        with_batch(&[2, 3, 5], &new2, Some(&old2), |b| {
            assert_eq!(
                staged.decode(b, &replica).unwrap(),
                2 * PAGE as u64,
                "page 3 goes to its slot, page 5 moves down one"
            );
        });
        assert_eq!(staged.len(), 4);
        for (pfn, byte) in [(1, 0x11), (2, 0x22), (3, 0x34), (5, 0x55)] {
            assert_eq!(staged.get(pfn), Some(&page(byte)[..]), "page {pfn}");
        }
        assert_eq!(staged.pfns, vec![1, 3, 2, 5]);
        assert_eq!(staged.bytes().len(), 4 * PAGE);
        // The next checkpoint reuses the buffer: its first page lands in slot 0.
        staged.clear();
        assert!(staged.is_empty() && staged.get(1).is_none());
        with_batch(&[4], &page(0x44), None, |b| {
            staged.decode(b, &replica).unwrap();
        });
        assert_eq!(
            staged.get(4),
            Some(&page(0x44)[..]),
            "stale bytes overwritten"
        );
        assert_eq!(staged.pfns, vec![4]);
    }

    #[test]
    fn written_pages_are_noted_only_while_tracking() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 256 * PAGE as u64).unwrap();
        let w = r.written_pages();
        r.begin_session(1).unwrap();
        r.write_first_page(3, &page(1)).unwrap();
        w.start(256);
        r.write_first_page(200, &page(2)).unwrap();
        r.write_first_page(5, &page(2)).unwrap();
        r.commit_first(1, b"dev").unwrap();
        let mut staged = StagedPages::default();
        staged.put(64, &page(3));
        staged.put(5, &page(3));
        r.stage_and_apply(2, &staged, b"dev2").unwrap();
        assert_eq!(
            w.take(),
            vec![5, 64, 200],
            "page 3 was written before tracking"
        );
        staged.put(7, &page(4));
        r.mark_committed(2).unwrap();
        r.stage_and_apply(3, &staged, b"dev3").unwrap();
        assert!(w.take().is_empty(), "nothing is noted after take");
    }

    #[test]
    fn first_checkpoint_then_incremental_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 16 * PAGE as u64).unwrap();
        assert_eq!(r.state(), ReplicaState::Empty);
        assert!(r.activation_inputs().is_err());
        r.begin_session(7).unwrap();
        r.write_first_page(3, &page(3)).unwrap();
        r.commit_first(0, b"dev0").unwrap();
        let mut staged = StagedPages::default();
        staged.put(3, &page(0x33));
        staged.put(15, &page(0xff));
        r.stage_and_apply(1, &staged, b"dev1").unwrap();
        assert_eq!(r.state(), ReplicaState::Applying(1));
        r.mark_committed(1).unwrap();
        drop(r);
        let r = ReplicaStore::open("vm", dir.path(), 16 * PAGE as u64).unwrap();
        let a = r.activation_inputs().unwrap();
        assert_eq!((a.epoch, a.device_state.as_slice()), (1, &b"dev1"[..]));
        assert_eq!(&r.ram()[3 * PAGE..4 * PAGE], &page(0x33)[..]);
        assert_eq!(&r.ram()[15 * PAGE..16 * PAGE], &page(0xff)[..]);
        assert_eq!(r.session(), 7);
    }

    /// Re-protection: a store that committed checkpoint 57 of one session, reopened (backup
    /// restart), takes a second session whose epochs restart at 1, and is not activatable
    /// from the start of that session (even across another restart) until its first
    /// checkpoint commits.
    #[test]
    fn a_second_session_restarts_at_epoch_1_and_is_not_activatable_until_it_commits() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * PAGE as u64;
        let mut r = ReplicaStore::open("vm", dir.path(), size).unwrap();
        r.begin_session(1).unwrap();
        r.write_first_page(1, &page(1)).unwrap();
        r.commit_first(1, b"dev1").unwrap();
        let mut staged = StagedPages::default();
        staged.put(2, &page(2));
        r.stage_and_apply(57, &staged, b"dev57").unwrap();
        r.mark_committed(57).unwrap();
        drop(r);
        let mut r = ReplicaStore::open("vm", dir.path(), size).unwrap();
        assert_eq!(r.activation_inputs().unwrap().epoch, 57);
        r.begin_session(2).unwrap();
        assert_eq!(r.state(), ReplicaState::Syncing);
        assert!(r.activation_inputs().is_err());
        assert!(
            r.ram().iter().all(|&b| b == 0),
            "the new session starts from zero RAM"
        );
        drop(r);
        let mut r = ReplicaStore::open("vm", dir.path(), size).unwrap();
        assert_eq!(
            r.state(),
            ReplicaState::Syncing,
            "a restart keeps it unusable"
        );
        assert!(r.activation_inputs().is_err());
        r.write_first_page(3, &page(3)).unwrap();
        r.commit_first(1, b"s2dev1").unwrap();
        let mut staged = StagedPages::default();
        staged.put(3, &page(0x33));
        r.stage_and_apply(2, &staged, b"s2dev2").unwrap();
        r.mark_committed(2).unwrap();
        let a = r.activation_inputs().unwrap();
        assert_eq!((a.epoch, a.device_state.as_slice()), (2, &b"s2dev2"[..]));
        assert_eq!(r.session(), 2);
        assert_eq!(
            &r.ram()[2 * PAGE..3 * PAGE],
            &page(0)[..],
            "session 1's page is gone"
        );
        assert_eq!(&r.ram()[3 * PAGE..4 * PAGE], &page(0x33)[..]);
    }

    #[test]
    fn interrupted_apply_is_redone_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        r.begin_session(1).unwrap();
        r.commit_first(0, b"dev0").unwrap();
        let mut staged = StagedPages::default();
        staged.put(2, &page(9));
        r.stage_and_apply(1, &staged, b"dev1").unwrap();
        // Simulate a kill in the middle of the apply: the page copy was lost.
        r.ram[2 * PAGE..3 * PAGE].fill(0);
        fs::write(dir.path().join("devstate"), b"dev0").unwrap();
        drop(r);
        let mut r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        assert_eq!(r.pending_apply(), Some(1));
        assert_eq!(&r.ram()[2 * PAGE..3 * PAGE], &page(9)[..]);
        r.mark_committed(1).unwrap();
        assert_eq!(r.activation_inputs().unwrap().device_state, b"dev1");
    }

    #[test]
    fn a_torn_first_checkpoint_is_not_activatable() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        r.begin_session(1).unwrap();
        r.write_first_page(1, &page(1)).unwrap();
        drop(r);
        let r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        assert_eq!(r.state(), ReplicaState::Syncing);
        let e = r.activation_inputs().unwrap_err().to_string();
        assert!(e.contains("no committed checkpoint"), "{e}");
    }

    #[test]
    fn checks_order_range_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        assert!(matches!(
            r.stage_and_apply(1, &StagedPages::default(), b""),
            Err(ReplicaError::OutOfOrder { .. })
        ));
        r.begin_session(1).unwrap();
        assert!(matches!(
            r.write_first_page(8, &page(0)),
            Err(ReplicaError::PageOutOfRange { pfn: 8, .. })
        ));
        assert!(matches!(
            r.write_first_page(u64::MAX, &page(0)),
            Err(ReplicaError::PageOutOfRange { .. })
        ));
        r.commit_first(0, b"").unwrap();
        drop(r);
        let e = ReplicaStore::open("other", dir.path(), 8 * PAGE as u64).unwrap_err();
        assert!(e.to_string().contains("describes domain \"vm\""), "{e}");
    }

    #[test]
    fn corrupt_staging_is_reported_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap();
        r.begin_session(1).unwrap();
        r.commit_first(0, b"").unwrap();
        let mut staged = StagedPages::default();
        staged.put(1, &page(5));
        r.stage_and_apply(1, &staged, b"d").unwrap();
        drop(r);
        let p = dir.path().join("staging");
        let mut b = fs::read(&p).unwrap();
        b[100] ^= 0xff;
        fs::write(&p, b).unwrap();
        let e = ReplicaStore::open("vm", dir.path(), 8 * PAGE as u64).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }
}
