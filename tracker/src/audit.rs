//! The replica audit: a rolling comparison of the shadow against live RAM that turns a write
//! the tracker missed into a detected and repaired one.
//!
//! Why: the soft-dirty tracker is exact only under preconditions that can change after they
//! were checked (a process maps the file, swap is enabled, a device DMAs late). A miss leaves
//! the shadow — and so the backup, which holds what the shadow held when the checkpoint was
//! committed — silently different from the primary. The audit compares a slice of pages every
//! epoch, right after the collect and still with the VM stopped, when shadow and live must be
//! equal everywhere; any difference is a miss.
//!
//! Invariants:
//! - Deterministic coverage: slices are consecutive ranges of `ceil(pages / N)` pages starting
//!   at page 0 and wrapping at the end, so every page is audited exactly once per cycle of N
//!   runs, whatever the tracker does.
//! - A mismatched page is repaired like a collect would: it is appended to the epoch's
//!   [`DirtySet`] (captured per its [`crate::Capture`]; the backup holds the shadow's stale
//!   content, so an XOR delta against it is valid) and the shadow is brought up to date. The
//!   engine sends it with the epoch's checkpoint.

use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::compare::sync_pages;
use crate::dirty_set::DirtySet;
use crate::page::{page_count, Pfn, PAGE_SIZE};
use crate::pool::ScanPool;
use crate::tracker::{check_sizes, TrackerError, VmStopped};

/// How fast the audit covers RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Runs (epochs) per full pass over RAM. At 200 ms epochs and 256 MiB, 64 means a 4 MiB
    /// slice (~0.5 ms) per epoch and all of RAM every ~13 s.
    pub epochs_per_cycle: NonZeroU32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            epochs_per_cycle: NonZeroU32::new(64).expect("nonzero"),
        }
    }
}

/// Counters since the audit started, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Runs performed.
    pub runs: u64,
    /// Pages compared.
    pub pages_audited: u64,
    /// Pages found different (writes the tracker missed).
    pub mismatches: u64,
    /// Completed passes over all of RAM.
    pub cycles: u64,
}

/// What one run checked and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Pages compared by this run.
    pub range: Range<Pfn>,
    /// Pages that differed; they were repaired and appended to the epoch's dirty set.
    pub mismatched: Vec<Pfn>,
    /// Whether this run finished a pass over all of RAM.
    pub cycle_completed: bool,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Rolling shadow-versus-live comparison.
#[derive(Debug)]
pub struct ReplicaAudit {
    pool: Arc<ScanPool>,
    /// Bytes of RAM audited.
    ram_len: usize,
    /// Pages per run.
    slice_pages: usize,
    /// First page of the next run.
    cursor: usize,
    stats: AuditStats,
}

impl ReplicaAudit {
    /// An audit of a `ram_len`-byte RAM image covering it every `config.epochs_per_cycle` runs.
    pub fn new(ram_len: usize, config: AuditConfig, pool: Arc<ScanPool>) -> Self {
        let pages = page_count(ram_len);
        ReplicaAudit {
            pool,
            ram_len,
            slice_pages: pages
                .div_ceil(config.epochs_per_cycle.get() as usize)
                .max(1),
            cursor: 0,
            stats: AuditStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> AuditStats {
        self.stats
    }

    /// Compares the next slice of `shadow` with `live`, repairs and reports mismatches. Call
    /// after the epoch's collect, before the VM resumes.
    ///
    /// # Errors
    /// The images are not of the size the audit was created for.
    pub fn run(
        &mut self,
        _stopped: &VmStopped,
        live: &[u8],
        shadow: &mut [u8],
        out: &mut DirtySet,
    ) -> Result<AuditReport, TrackerError> {
        check_sizes(live, shadow, Some(self.ram_len))?;
        let started = Instant::now();
        let pages = page_count(self.ram_len);
        let first = self.cursor;
        let end = (first + self.slice_pages).min(pages);
        let bytes = first * PAGE_SIZE..(end * PAGE_SIZE).min(self.ram_len);
        let before = out.len();
        let totals = sync_pages(
            &self.pool,
            first as Pfn,
            &live[bytes.clone()],
            &mut shadow[bytes],
            out,
        );
        let mismatched: Vec<Pfn> = out.pfns().skip(before).collect();
        let cycle_completed = end >= pages;
        self.cursor = if cycle_completed { 0 } else { end };
        self.stats.runs += 1;
        self.stats.pages_audited += (end - first) as u64;
        self.stats.mismatches += totals.dirty;
        self.stats.cycles += u64::from(cycle_completed);
        if !mismatched.is_empty() {
            warn!(
                count = mismatched.len(),
                first = ?&mismatched[..mismatched.len().min(8)],
                "replica audit: pages differ from the shadow after collect (missed writes); repaired and resent"
            );
        }
        Ok(AuditReport {
            range: first as Pfn..end as Pfn,
            mismatched,
            cycle_completed,
            elapsed: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::Capture;

    fn audit(len: usize, n: u32) -> ReplicaAudit {
        let cfg = AuditConfig {
            epochs_per_cycle: NonZeroU32::new(n).unwrap(),
        };
        ReplicaAudit::new(len, cfg, Arc::new(ScanPool::new(2).unwrap()))
    }

    #[test]
    fn slices_cover_all_pages_once_per_cycle() {
        // (len, N): exact division, remainder, more epochs than pages, partial page.
        for (len, n) in [
            (64 * PAGE_SIZE, 8),
            (100 * PAGE_SIZE + 7, 7),
            (3 * PAGE_SIZE, 10),
            (1, 1),
        ] {
            let mut a = audit(len, n);
            let live = vec![0u8; len];
            let mut shadow = live.clone();
            let mut seen = vec![0u32; page_count(len)];
            let stopped = VmStopped::caller_asserts_vm_stopped();
            for run in 0..n {
                let r = a
                    .run(
                        &stopped,
                        &live,
                        &mut shadow,
                        &mut DirtySet::new(Capture::PfnsOnly),
                    )
                    .unwrap();
                for p in r.range.clone() {
                    seen[p as usize] += 1;
                }
                if r.cycle_completed {
                    assert!(run < n, "cycle within N runs");
                    break;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "len {len} n {n}: {seen:?}");
            assert_eq!(a.stats().cycles, 1);
        }
    }

    #[test]
    fn corrupted_shadow_is_found_and_repaired_within_one_cycle() {
        let len = 1000 * PAGE_SIZE + 123;
        let n = 16;
        let mut a = audit(len, n);
        let live: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        let mut shadow = live.clone();
        // Simulated tracker misses: stale shadow pages, including the partial last page.
        let missed: Vec<Pfn> = vec![0, 1, 63, 64, 511, 999, 1000];
        for &p in &missed {
            shadow[p as usize * PAGE_SIZE] ^= 0x5a;
        }
        let stale: Vec<(Pfn, Vec<u8>)> = missed
            .iter()
            .map(|&p| {
                let r = crate::page::page_bytes(p, len);
                (p, shadow[r].to_vec())
            })
            .collect();
        let stopped = VmStopped::caller_asserts_vm_stopped();
        let mut found = Vec::new();
        for _ in 0..n {
            let mut out = DirtySet::new(Capture::XorDelta);
            let r = a.run(&stopped, &live, &mut shadow, &mut out).unwrap();
            // The dirty set carries exactly the repairs, with deltas against the stale copy.
            assert_eq!(out.pfns().collect::<Vec<_>>(), r.mismatched);
            for page in out.iter() {
                let old = &stale.iter().find(|(p, _)| *p == page.pfn).unwrap().1;
                let range = crate::page::page_bytes(page.pfn, len);
                let d = page.captured.unwrap();
                for (i, b) in range.clone().enumerate() {
                    assert_eq!(d[i], old[i] ^ live[b]);
                }
            }
            found.extend(r.mismatched);
        }
        assert_eq!(found, missed);
        assert!(shadow == live, "repaired");
        assert_eq!(a.stats().mismatches, missed.len() as u64);
        assert_eq!(a.stats().pages_audited, page_count(len) as u64);
    }

    #[test]
    fn wrong_size_is_an_error() {
        let mut a = audit(8192, 2);
        let mut shadow = vec![0u8; 4096];
        let err = a
            .run(
                &VmStopped::caller_asserts_vm_stopped(),
                &[0u8; 4096],
                &mut shadow,
                &mut DirtySet::new(Capture::PfnsOnly),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            TrackerError::SizeChanged {
                attached: 8192,
                got: 4096
            }
        ));
    }
}
