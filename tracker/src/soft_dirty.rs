//! The soft-dirty tracker: reads the kernel's per-page soft-dirty bits for QEMU's mapping of
//! the RAM file instead of comparing all of RAM.
//!
//! One collect, with the VM stopped throughout (the [`VmStopped`] token):
//! 1. re-read QEMU's `maps`: if its mapping of the RAM file changed, compare everything once
//!    (a new mapping starts all-dirty, and pages may have moved);
//! 2. read the pagemap entries of every mapped page (positioned reads in batches) and mark
//!    as candidates the pages with bit 55 set, plus pages that were present at the last
//!    collect and are absent now (their entry was zapped, which drops the bit: a cheap partial
//!    guard, not a substitute for the preconditions);
//! 3. clear the bits (`clear_refs` = 4);
//! 4. compare each candidate with the shadow and synchronise the ones that differ, in
//!    parallel over disjoint page ranges.
//!
//! Order matters: reading then clearing is not atomic, which is why the VM must be stopped
//! across both; copying after the clear means a store that slipped in anyway would be marked
//! again for the next epoch rather than lost.
//!
//! The first collect after attaching or [`DirtyTracker::rearm`] compares all of RAM (the
//! shadow's history is unknown, and QEMU's mapping reports every page dirty until its first
//! clear anyway).

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::compare::{sync_listed, sync_pages};
use crate::dirty_set::DirtySet;
use crate::page::{page_count, Pfn, PAGE_SIZE};
use crate::pagemap::{ClearRefs, Pagemap, PM_PRESENT, PM_SOFT_DIRTY};
use crate::pool::ScanPool;
use crate::procfs::{FileId, RamMapping};
use crate::tracker::{
    check_sizes, CollectStats, DirtyTracker, TrackerError, TrackerKind, VmStopped,
};

/// Pagemap entries read per `pread` (512 KiB of entries = 256 MiB of RAM).
const PAGEMAP_BATCH: usize = 64 * 1024;

/// Where the tracker is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next collect compares all of RAM and then starts trusting the dirty log.
    NeedsFullScan,
    /// The dirty log has been cleared at the last collect and is trusted.
    Tracking,
}

/// A fixed-size bitmap over page indices.
#[derive(Debug, Default)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn reset(&mut self, bits: usize) {
        self.0.clear();
        self.0.resize(bits.div_ceil(64), 0);
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn assign(&mut self, i: usize, v: bool) {
        if v {
            self.set(i)
        } else {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                (b != 0).then(|| {
                    let t = b.trailing_zeros() as usize;
                    b &= b - 1;
                    w * 64 + t
                })
            })
        })
    }
}

/// Finds dirty pages from QEMU's soft-dirty bits.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    /// QEMU's pid: whose page tables hold the bits.
    pid: i32,
    /// The RAM file, by device and inode.
    file: FileId,
    /// Bytes of guest RAM; every collect must be given images of this size.
    ram_len: usize,
    /// QEMU's current mapping of the file, re-checked every collect.
    mapping: RamMapping,
    /// Kept open so the stop window performs no `open`.
    pagemap: Pagemap,
    /// Kept open for the same reason.
    clear_refs: ClearRefs,
    /// Threads for the full scan and the copies.
    pool: Arc<ScanPool>,
    state: State,
    /// Reused buffers: entries of one batch and their bytes.
    entries: Vec<u64>,
    scratch: Vec<u8>,
    /// Candidate file pages of this collect.
    candidates: Bitmap,
    /// Which mapped pages (concatenated over the segments) were present at the last collect.
    present: Bitmap,
    /// Whether `present` describes the current mapping.
    present_valid: bool,
    /// Sorted candidate list, reused.
    candidate_list: Vec<Pfn>,
}

impl SoftDirtyTracker {
    /// Attaches to QEMU process `pid` whose guest RAM is the `ram_len`-byte file `ram_path`.
    /// Check [`crate::preconditions::check`] first: attaching only verifies that the dirty log
    /// is accessible.
    pub fn attach(
        pid: i32,
        ram_path: &std::path::Path,
        ram_len: usize,
        pool: Arc<ScanPool>,
    ) -> Result<Self, TrackerError> {
        let file = FileId::of(ram_path)?;
        let mapping = RamMapping::of_process(pid, &file, ram_len as u64)?;
        let pagemap = Pagemap::open(pid)?;
        let clear_refs = ClearRefs::open(pid)?;
        info!(pid, ram = %ram_path.display(), ram_len, segments = mapping.segments.len(), "soft-dirty tracker attached");
        Ok(SoftDirtyTracker {
            pid,
            file,
            ram_len,
            mapping,
            pagemap,
            clear_refs,
            pool,
            state: State::NeedsFullScan,
            entries: Vec::new(),
            scratch: Vec::new(),
            candidates: Bitmap::default(),
            present: Bitmap::default(),
            present_valid: false,
            candidate_list: Vec::new(),
        })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn full_scan(
        &mut self,
        live: &[u8],
        shadow: &mut [u8],
        out: &mut DirtySet,
    ) -> Result<CollectStats, TrackerError> {
        // Clear first: from here on QEMU's stores set bits again, and the compare below sees
        // everything stored before.
        let t = Instant::now();
        self.clear_refs.clear_soft_dirty()?;
        let log_clear = t.elapsed();
        let totals = sync_pages(&self.pool, 0, live, shadow, out);
        self.present_valid = false;
        self.state = State::Tracking;
        let pages = page_count(live.len()) as u64;
        Ok(CollectStats {
            pages_scanned: pages,
            pages_candidate: pages,
            pages_dirty: totals.dirty,
            bytes_copied: totals.bytes,
            full_scan: true,
            elapsed: Default::default(),
            log_read: Default::default(),
            log_clear,
        })
    }

    /// Marks candidate pages from the pagemap; returns the number of entries read.
    fn read_dirty_log(&mut self) -> Result<u64, TrackerError> {
        let total_pages = page_count(self.ram_len);
        let mapped: usize = self
            .mapping
            .segments
            .iter()
            .map(|s| (s.len / PAGE_SIZE as u64) as usize)
            .sum();
        self.candidates.reset(total_pages);
        if !self.present_valid {
            self.present.reset(mapped);
        }
        let mut scanned = 0u64;
        let mut flat = 0usize; // index of the page in the concatenated segments
        for seg in &self.mapping.segments {
            let seg_pages = (seg.len / PAGE_SIZE as u64) as usize;
            let first_pfn = (seg.file_offset / PAGE_SIZE as u64) as usize;
            let mut done = 0;
            while done < seg_pages {
                let n = (seg_pages - done).min(PAGEMAP_BATCH);
                self.entries.resize(n, 0);
                let vaddr = seg.vaddr + (done * PAGE_SIZE) as u64;
                self.pagemap
                    .read(vaddr, &mut self.entries, &mut self.scratch)?;
                for (j, &e) in self.entries.iter().enumerate() {
                    let pfn = first_pfn + done + j;
                    let present = e & PM_PRESENT != 0;
                    let zapped = self.present_valid && !present && self.present.get(flat + j);
                    if pfn < total_pages && (e & PM_SOFT_DIRTY != 0 || zapped) {
                        self.candidates.set(pfn);
                    }
                    self.present.assign(flat + j, present);
                }
                scanned += n as u64;
                done += n;
                flat += n;
            }
        }
        self.present_valid = true;
        Ok(scanned)
    }

    /// Re-reads QEMU's mapping; returns whether it changed since the last collect.
    fn refresh_mapping(&mut self) -> Result<bool, TrackerError> {
        let now = RamMapping::of_process(self.pid, &self.file, self.ram_len as u64)?;
        if now == self.mapping {
            return Ok(false);
        }
        warn!(
            pid = self.pid,
            "QEMU's mapping of guest RAM changed: comparing all of RAM this epoch"
        );
        self.mapping = now;
        self.present_valid = false;
        Ok(true)
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::SoftDirty
    }

    fn rearm(&mut self) {
        self.state = State::NeedsFullScan;
    }

    fn collect(
        &mut self,
        _stopped: &VmStopped,
        live: &[u8],
        shadow: &mut [u8],
        out: &mut DirtySet,
    ) -> Result<CollectStats, TrackerError> {
        check_sizes(live, shadow, Some(self.ram_len))?;
        let started = Instant::now();
        // Any failure below leaves the log in an unknown state: start over with a full scan.
        let previous = self.state;
        self.state = State::NeedsFullScan;
        let remapped = self.refresh_mapping()?;
        let mut stats = if previous == State::NeedsFullScan || remapped {
            self.full_scan(live, shadow, out)?
        } else {
            let t = Instant::now();
            let scanned = self.read_dirty_log()?;
            let log_read = t.elapsed();
            let t = Instant::now();
            self.clear_refs.clear_soft_dirty()?;
            let log_clear = t.elapsed();
            self.candidate_list.clear();
            self.candidate_list
                .extend(self.candidates.ones().map(|p| p as Pfn));
            // Ascending and in range by construction (bitmap order, pfn < total pages).
            let totals = sync_listed(&self.pool, &self.candidate_list, live, shadow, out)?;
            self.state = State::Tracking;
            CollectStats {
                pages_scanned: scanned,
                pages_candidate: self.candidate_list.len() as u64,
                pages_dirty: totals.dirty,
                bytes_copied: totals.bytes,
                full_scan: false,
                elapsed: Default::default(),
                log_read,
                log_clear,
            }
        };
        stats.elapsed = started.elapsed();
        debug!(
            tracker = "soft-dirty",
            pid = self.pid,
            scanned = stats.pages_scanned,
            candidates = stats.pages_candidate,
            dirty = stats.pages_dirty,
            full = stats.full_scan,
            elapsed_us = stats.elapsed.as_micros() as u64,
            log_read_us = stats.log_read.as_micros() as u64,
            log_clear_us = stats.log_clear.as_micros() as u64,
            "collect"
        );
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_ones_in_order() {
        let mut b = Bitmap::default();
        b.reset(200);
        for i in [0, 63, 64, 130, 199] {
            b.set(i);
        }
        b.assign(130, false);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 63, 64, 199]);
        assert!(b.get(199) && !b.get(1));
    }
}
