//! The compare tracker: always correct, needs nothing from the kernel.
//!
//! Every epoch it compares all of live RAM with the shadow page by page and synchronises the
//! pages that differ. It cannot miss a write by construction (whatever wrote the page: vCPU,
//! DMA, another process, a hole punch), so it is the baseline the soft-dirty tracker falls
//! back to and the oracle the tests check it against. Its cost is a read of both images at
//! memory bandwidth, split across the [`ScanPool`]'s threads in contiguous chunks.
//!
//! [`sync_pages`] is the shared engine: the soft-dirty tracker uses it for its full first pass
//! and the audit for its slices.

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use crate::dirty_set::{DirtySet, Segment};
use crate::page::{page_bytes, page_count, sync_page, Capture, Pfn, PAGE_SIZE};
use crate::pool::ScanPool;
use crate::tracker::{
    check_sizes, CollectStats, DirtyTracker, TrackerError, TrackerKind, VmStopped,
};

/// Smallest unit of parallel work. Large enough that handing out a chunk (an atomic add and
/// an uncontended lock) is noise; small enough that a thread slowed by other load on the host
/// leaves its share to the others.
const MIN_CHUNK_PAGES: usize = 256;
/// Chunks per thread aimed for on large images (dynamic load balancing).
const CHUNKS_PER_THREAD: usize = 8;

/// Fewest listed pages per parallel job of [`sync_listed`]: 1 MiB of copying (~0.1–0.2 ms)
/// is worth waking a helper thread for; fewer pages are copied by the caller alone, which
/// also keeps a small epoch independent of another thread's wake-up latency.
const MIN_LISTED_CHUNK: usize = 256;

/// Totals of a synchronisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncTotals {
    /// Pages that differed (and were copied).
    pub dirty: u64,
    /// Bytes copied into the shadow.
    pub bytes: u64,
}

impl SyncTotals {
    fn add(self, other: SyncTotals) -> SyncTotals {
        SyncTotals {
            dirty: self.dirty + other.dirty,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// Compares and synchronises the pages of `live`/`shadow` (equal lengths; page `i` of the
/// slices is page `base + i` of RAM), appending differing pages to `out` in new segments.
pub(crate) fn sync_pages(
    pool: &ScanPool,
    base: Pfn,
    live: &[u8],
    shadow: &mut [u8],
    out: &mut DirtySet,
) -> SyncTotals {
    debug_assert_eq!(live.len(), shadow.len());
    let pages = page_count(live.len());
    if pages == 0 {
        return SyncTotals::default();
    }
    let chunk_pages = (pages / (pool.threads() * CHUNKS_PER_THREAD))
        .max(MIN_CHUNK_PAGES)
        .min(pages);
    let chunk_bytes = chunk_pages * PAGE_SIZE;
    let n = pages.div_ceil(chunk_pages);
    let capture = out.capture();
    let segments = out.add_segments(n);
    let items: Vec<(Pfn, &[u8], &mut [u8], &mut Segment)> = live
        .chunks(chunk_bytes)
        .zip(shadow.chunks_mut(chunk_bytes))
        .zip(segments.iter_mut())
        .enumerate()
        .map(|(i, ((l, s), seg))| (base + (i * chunk_pages) as Pfn, l, s, seg))
        .collect();
    let per_chunk = pool.map(items, |(first, l, s, seg)| {
        sync_chunk(first, l, s, capture, seg)
    });
    per_chunk
        .into_iter()
        .fold(SyncTotals::default(), SyncTotals::add)
}

/// Compares and synchronises only the listed pages (strictly ascending, each below the
/// image's page count), in parallel over disjoint page ranges, appending those that differ to
/// `out`. This is the soft-dirty tracker's copy stage; the engine may also use it for pages it
/// knows changed (e.g. resending after a NACK).
///
/// # Errors
/// Mismatched image sizes, or a list that is not strictly ascending or names a page beyond
/// the image.
pub fn sync_listed(
    pool: &ScanPool,
    pfns: &[Pfn],
    live: &[u8],
    shadow: &mut [u8],
    out: &mut DirtySet,
) -> Result<SyncTotals, TrackerError> {
    check_sizes(live, shadow, None)?;
    let len = live.len();
    let pages = page_count(len) as Pfn;
    if let Some(i) = (1..pfns.len()).find(|&i| pfns[i] <= pfns[i - 1]) {
        return Err(TrackerError::BadPageList {
            problem: format!(
                "entry {i} ({}) does not ascend from {}",
                pfns[i],
                pfns[i - 1]
            ),
        });
    }
    if let Some(&last) = pfns.last().filter(|&&p| p >= pages) {
        return Err(TrackerError::BadPageList {
            problem: format!("page {last} is beyond the {pages}-page image"),
        });
    }
    if pfns.is_empty() {
        return Ok(SyncTotals::default());
    }
    let chunk = (pfns.len() / (pool.threads() * CHUNKS_PER_THREAD)).max(MIN_LISTED_CHUNK);
    let n = pfns.len().div_ceil(chunk);
    let capture = out.capture();
    let segments = out.add_segments(n);
    let mut items: Vec<ListedJob<'_>> = Vec::with_capacity(n);
    // Carve the shadow into the disjoint byte ranges the runs of pages occupy.
    let mut rest: &mut [u8] = shadow;
    let mut consumed = 0usize;
    for (run, seg) in pfns.chunks(chunk).zip(segments.iter_mut()) {
        let start = page_bytes(run[0], len).start;
        let end = page_bytes(run[run.len() - 1], len).end;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
        let (mine, tail) = tail.split_at_mut(end - start);
        rest = tail;
        consumed = end;
        items.push(ListedJob {
            pfns: run,
            start,
            live: &live[start..end],
            shadow: mine,
            seg,
        });
    }
    let results = pool.map(items, |job| sync_listed_run(job, len, capture));
    Ok(results
        .into_iter()
        .fold(SyncTotals::default(), SyncTotals::add))
}

/// One parallel unit of [`sync_listed`]: a run of listed pages and the byte range of the
/// images that holds them.
struct ListedJob<'a> {
    /// Ascending pages, all within the range.
    pfns: &'a [Pfn],
    /// Offset of the range in the images.
    start: usize,
    live: &'a [u8],
    shadow: &'a mut [u8],
    seg: &'a mut Segment,
}

fn sync_listed_run(job: ListedJob<'_>, len: usize, capture: Capture) -> SyncTotals {
    let mut totals = SyncTotals::default();
    for &pfn in job.pfns {
        let r = page_bytes(pfn, len);
        let (a, b) = (r.start - job.start, r.end - job.start);
        if sync_page(
            &job.live[a..b],
            &mut job.shadow[a..b],
            capture,
            &mut job.seg.pages,
        ) {
            job.seg.pfns.push(pfn);
            totals.dirty += 1;
            totals.bytes += (b - a) as u64;
        }
    }
    totals
}

fn sync_chunk(
    first: Pfn,
    live: &[u8],
    shadow: &mut [u8],
    capture: Capture,
    seg: &mut Segment,
) -> SyncTotals {
    let mut totals = SyncTotals::default();
    for (i, (l, s)) in live
        .chunks(PAGE_SIZE)
        .zip(shadow.chunks_mut(PAGE_SIZE))
        .enumerate()
    {
        if sync_page(l, s, capture, &mut seg.pages) {
            seg.pfns.push(first + i as Pfn);
            totals.dirty += 1;
            totals.bytes += l.len() as u64;
        }
    }
    totals
}

/// Finds dirty pages by comparing all of RAM with the shadow every collect.
#[derive(Debug)]
pub struct CompareTracker {
    /// Threads that split the scan; shared with other trackers and the audit.
    pool: Arc<ScanPool>,
}

impl CompareTracker {
    /// A compare tracker scanning on `pool`.
    pub fn new(pool: Arc<ScanPool>) -> Self {
        CompareTracker { pool }
    }
}

impl DirtyTracker for CompareTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Compare
    }

    fn rearm(&mut self) {}

    fn collect(
        &mut self,
        _stopped: &VmStopped,
        live: &[u8],
        shadow: &mut [u8],
        out: &mut DirtySet,
    ) -> Result<CollectStats, TrackerError> {
        check_sizes(live, shadow, None)?;
        let started = Instant::now();
        let totals = sync_pages(&self.pool, 0, live, shadow, out);
        let pages = page_count(live.len()) as u64;
        let stats = CollectStats {
            pages_scanned: pages,
            pages_candidate: pages,
            pages_dirty: totals.dirty,
            bytes_copied: totals.bytes,
            full_scan: true,
            elapsed: started.elapsed(),
            ..CollectStats::default()
        };
        debug!(
            tracker = "compare",
            pages,
            dirty = totals.dirty,
            elapsed_us = stats.elapsed.as_micros() as u64,
            "collect"
        );
        Ok(stats)
    }
}

/// The floor under a compare pass over `bytes` of RAM on this host: the best of three
/// reads of a buffer that large, split across every core (as a pass is split across the
/// [`ScanPool`]). A pass reads RAM and its shadow, and copies what differs, so its time is
/// some multiple of this; the drill reports the pause beside it and `config check` uses it
/// to estimate a domain's pause before it runs.
pub fn read_floor(bytes: u64) -> std::time::Duration {
    let buf = vec![1u64; usize::try_from(bytes / 8).unwrap_or(usize::MAX).max(1)];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = buf.len().div_ceil(cores).max(1);
    let mut best = std::time::Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(chunk) {
                s.spawn(move || {
                    let sum = part.iter().fold(0u64, |a, &x| a.wrapping_add(x));
                    std::hint::black_box(sum);
                });
            }
        });
        best = best.min(t.elapsed());
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stopped() -> VmStopped {
        VmStopped::caller_asserts_vm_stopped()
    }

    /// Applies `writes` (byte offset, value) to a copy of `base` and checks a collect reports
    /// exactly the changed pages, leaves shadow == live and captures correctly.
    fn check_collect(threads: usize, base: &[u8], writes: &[(usize, u8)], capture: Capture) {
        let pool = Arc::new(ScanPool::new(threads).unwrap());
        let mut tracker = CompareTracker::new(pool);
        let mut live = base.to_vec();
        for &(off, v) in writes {
            live[off] = v;
        }
        let expected: std::collections::BTreeSet<Pfn> = (0..page_count(base.len()))
            .filter(|&p| {
                let r = crate::page::page_bytes(p as Pfn, base.len());
                live[r.clone()] != base[r]
            })
            .map(|p| p as Pfn)
            .collect();
        let mut shadow = base.to_vec();
        let mut out = DirtySet::new(capture);
        let stats = tracker
            .collect(&stopped(), &live, &mut shadow, &mut out)
            .unwrap();
        let got: Vec<Pfn> = out.pfns().collect();
        assert_eq!(
            got,
            expected.iter().copied().collect::<Vec<_>>(),
            "ascending, exact"
        );
        assert_eq!(stats.pages_dirty, expected.len() as u64);
        assert_eq!(stats.pages_scanned, page_count(base.len()) as u64);
        assert!(shadow == live, "shadow equals live after collect");
        for page in out.iter() {
            let r = crate::page::page_bytes(page.pfn, base.len());
            let n = r.len();
            match capture {
                Capture::PfnsOnly => assert!(page.captured.is_none()),
                Capture::XorDelta => {
                    let d = page.captured.unwrap();
                    for i in 0..n {
                        assert_eq!(d[i], base[r.start + i] ^ live[r.start + i]);
                    }
                }
                Capture::OldPage => assert_eq!(&page.captured.unwrap()[..n], &base[r]),
            }
        }
        // A second collect finds nothing.
        out.clear();
        let again = tracker
            .collect(&stopped(), &live, &mut shadow, &mut out)
            .unwrap();
        assert_eq!(again.pages_dirty, 0);
        assert!(out.is_empty());
    }

    #[test]
    fn odd_sizes_and_thread_counts_table() {
        // (len, threads, writes): sizes around chunk and page boundaries.
        let big = MIN_CHUNK_PAGES * PAGE_SIZE;
        let cases: &[(usize, usize, &[usize])] = &[
            (0, 2, &[]),                                              // empty image
            (1, 1, &[0]),                                             // a single partial page
            (4095, 3, &[4094]),                                       // last byte of a partial page
            (4097, 2, &[4096]),                                       // the one-byte final page
            (3 * 4096 + 17, 4, &[0, 8191, 3 * 4096 + 16]),            // first, boundary, tail
            (big + 4096 * 3 + 1, 3, &[big - 1, big, big + 4096 * 3]), // chunk boundary + tail
            (2 * big + 5, 7, &[5, big + 1, 2 * big + 4]),             // more threads than chunks
        ];
        for &(len, threads, offsets) in cases {
            let base: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let writes: Vec<(usize, u8)> = offsets.iter().map(|&o| (o, base[o] ^ 0xff)).collect();
            for capture in [Capture::PfnsOnly, Capture::XorDelta, Capture::OldPage] {
                check_collect(threads, &base, &writes, capture);
            }
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut t = CompareTracker::new(Arc::new(ScanPool::new(1).unwrap()));
        let mut shadow = vec![0u8; 8192];
        let err = t
            .collect(
                &stopped(),
                &[0u8; 4096],
                &mut shadow,
                &mut DirtySet::new(Capture::PfnsOnly),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            TrackerError::LengthMismatch {
                live: 4096,
                shadow: 8192
            }
        ));
    }

    #[test]
    fn sync_listed_syncs_only_listed_changed_pages() {
        let pool = ScanPool::new(3).unwrap();
        let len = 300 * PAGE_SIZE + 100; // partial last page
        let base: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut live = base.clone();
        // Pages 3, 150, 300 (partial) change and are listed; the other listed pages are
        // unchanged; 200 changes but is not listed (a miss: it must stay stale, proving only
        // listed pages are touched).
        for p in [3usize, 150, 200] {
            live[p * PAGE_SIZE + 5] ^= 0xff;
        }
        live[300 * PAGE_SIZE + 99] ^= 1;
        let listed: Vec<Pfn> = (0..300)
            .filter(|p| p % 7 == 3 || *p == 150)
            .chain([300])
            .collect();
        let mut shadow = base.clone();
        let mut out = DirtySet::new(Capture::XorDelta);
        let totals = sync_listed(&pool, &listed, &live, &mut shadow, &mut out).unwrap();
        assert_eq!(out.pfns().collect::<Vec<_>>(), vec![3, 150, 300]);
        assert_eq!(
            totals,
            SyncTotals {
                dirty: 3,
                bytes: 2 * PAGE_SIZE as u64 + 100
            }
        );
        let r = page_bytes(200, len);
        assert_ne!(shadow[r.clone()], live[r], "unlisted page untouched");
        let r = page_bytes(300, len);
        assert_eq!(shadow[r.clone()], live[r]);
    }

    #[test]
    fn sync_listed_rejects_bad_lists_table() {
        let pool = ScanPool::new(1).unwrap();
        let live = vec![1u8; 4 * PAGE_SIZE];
        // (list, message fragment)
        let cases: &[(&[Pfn], &str)] = &[
            (&[1, 1], "does not ascend"),
            (&[2, 1], "does not ascend"),
            (&[0, 4], "beyond the 4-page image"),
        ];
        for (list, want) in cases {
            let mut shadow = vec![0u8; live.len()];
            let err = sync_listed(
                &pool,
                list,
                &live,
                &mut shadow,
                &mut DirtySet::new(Capture::PfnsOnly),
            )
            .unwrap_err();
            assert!(err.to_string().contains(want), "{list:?}: {err}");
            assert!(shadow.iter().all(|&b| b == 0), "nothing touched on error");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn reports_exactly_the_changed_pages(
            pages in 0usize..700,
            tail in 0usize..4096,
            threads in 1usize..5,
            seed in any::<u64>(),
            writes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..200),
            capture in prop_oneof![Just(Capture::PfnsOnly), Just(Capture::XorDelta), Just(Capture::OldPage)],
        ) {
            let len = pages * PAGE_SIZE + tail;
            let base: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 29) as u8).collect();
            let writes: Vec<(usize, u8)> = if len == 0 {
                Vec::new()
            } else {
                writes.iter().map(|(ix, v)| (ix.index(len), *v)).collect()
            };
            check_collect(threads, &base, &writes, capture);
        }
    }
}
