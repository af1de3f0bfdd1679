//! A persistent pool of scan threads for the work done while the VM is stopped.
//!
//! Why persistent: a collect runs every epoch (every ~100–200 ms) inside the VM's stop
//! window; keeping the threads parked avoids spawning and joining them each time. The threads
//! are a [`rayon::ThreadPool`], whose scopes let the jobs borrow the caller's slices (the RAM
//! mapping, the shadow, the output buffers) for exactly the duration of one call, so this
//! module has no lifetime erasure and no `unsafe` of its own.
//!
//! How a call runs: the caller takes part. It opens an in-place scope (its own share of the
//! work runs on the calling thread, not on a pool thread), spawns one helper job per pool
//! thread it can use, and all of them take items one at a time from an atomic counter, so a
//! thread slowed by another process's load takes fewer items instead of stalling the epoch.
//! The scope returns once every helper job has returned; a helper that wakes after the items
//! ran out finds none and returns at once.
//!
//! What this gave up: the hand-written pool it replaces could withdraw a helper that had not
//! started yet, so the caller never waited for a wake-up (measured then in a 2-vCPU guest
//! under TCG on a loaded host: waiting stretched a 12 ms collect to 1–4 s). A rayon scope
//! always waits for its spawned jobs. Measured back to back on the 2-CPU development host
//! (load average ~11 from other builds; `REMUS_BENCH_ROUNDS=21 cargo bench -p remus-tracker
//! --bench collect`, two runs each, median ms, hand-written -> rayon): compare collect with
//! 2 threads 104 / 80 -> 104 / 87, with XOR delta 107 / 95 -> 87 / 94, listed sync 8.2 / 8.4
//! -> 4.0 / 9.2, audit slice 0.58 / 0.56 -> 0.53 / 0.52: the same within noise. The one
//! visible cost is the empty dispatch (2 trivial items): 0.018 / 0.000 -> 0.017 / 0.013, the
//! helper's wake-up that the old pool could skip; small beside any real collect. The bench
//! reports min and median, not the tail under a starved host that motivated withdrawal.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Error starting the pool.
#[derive(Debug, thiserror::Error)]
#[error("scan pool: starting {threads} worker threads: {source}")]
pub struct PoolError {
    threads: usize,
    #[source]
    source: rayon::ThreadPoolBuildError,
}

/// Threads that process a list of items in parallel; the calling thread takes part.
pub struct ScanPool {
    /// The parked helper threads; `None` when the caller works alone.
    helpers: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for ScanPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanPool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl ScanPool {
    /// A pool of `threads` threads in all: the caller plus `threads - 1` parked workers.
    /// `threads == 0` is treated as 1.
    pub fn new(threads: usize) -> Result<Self, PoolError> {
        let helpers = match threads.saturating_sub(1) {
            0 => None,
            workers => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(workers)
                    .thread_name(|i| format!("remus-scan-{}", i + 1))
                    .build()
                    .map_err(|source| PoolError {
                        threads: workers,
                        source,
                    })?,
            ),
        };
        Ok(ScanPool { helpers })
    }

    /// A pool with one thread per available CPU.
    pub fn with_available_parallelism() -> Result<Self, PoolError> {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Threads that take part in a call, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers
            .as_ref()
            .map_or(0, rayon::ThreadPool::current_num_threads)
            + 1
    }

    /// Applies `f` to every item, in parallel, and returns the results in item order.
    ///
    /// # Panics
    /// Re-raises a panic of `f` (after every thread has stopped using the items).
    pub fn map<T: Send, R: Send>(&self, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
        let n = items.len();
        if n == 0 {
            return Vec::new();
        }
        let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
        let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let job = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let item = lock(&slots[i]).take();
            if let Some(item) = item {
                let r = f(item);
                *lock(&results[i]) = Some(r);
            }
        };
        // Only wake as many workers as there are items beyond the caller's first one.
        let helpers = (self.threads() - 1).min(n - 1);
        match &self.helpers {
            Some(pool) if helpers > 0 => pool.in_place_scope(|scope| {
                let job = &job;
                for _ in 0..helpers {
                    scope.spawn(move |_| job());
                }
                job();
            }),
            _ => job(),
        }
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("scan pool: every item was processed")
            })
            .collect()
    }
}

/// Locks a mutex, ignoring poisoning: the pool re-raises panics itself, and the slots hold
/// plain data that a panic cannot leave half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{self, AssertUnwindSafe};

    #[test]
    fn map_returns_results_in_order_on_every_pool_size() {
        for threads in [0, 1, 2, 3, 5] {
            let pool = ScanPool::new(threads).unwrap();
            assert_eq!(pool.threads(), threads.max(1));
            for n in [0usize, 1, 2, 7, 64] {
                let items: Vec<usize> = (0..n).collect();
                let got = pool.map(items, |i| i * i);
                assert_eq!(
                    got,
                    (0..n).map(|i| i * i).collect::<Vec<_>>(),
                    "threads {threads} n {n}"
                );
            }
        }
    }

    #[test]
    fn map_uses_borrowed_mutable_chunks() {
        let pool = ScanPool::new(3).unwrap();
        let mut data = vec![0u32; 1000];
        let chunks: Vec<&mut [u32]> = data.chunks_mut(33).collect();
        let lens = pool.map(chunks, |c| {
            c.iter_mut().for_each(|x| *x += 1);
            c.len()
        });
        assert_eq!(lens.iter().sum::<usize>(), 1000);
        assert!(data.iter().all(|&x| x == 1));
    }

    #[test]
    fn many_short_calls_process_every_item_once() {
        // Many short calls: helpers are often still waking when the caller runs out of items,
        // sometimes mid-item. Every item must be processed exactly once.
        let pool = ScanPool::new(3).unwrap();
        for round in 0..5000usize {
            let n = 1 + round % 5;
            let mut data = vec![0u8; n];
            let cells: Vec<&mut u8> = data.iter_mut().collect();
            pool.map(cells, |c| *c += 1);
            assert!(data.iter().all(|&x| x == 1), "round {round}: {data:?}");
        }
    }

    #[test]
    fn panics_propagate_and_pool_stays_usable() {
        let pool = ScanPool::new(2).unwrap();
        for _ in 0..3 {
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.map((0..16).collect::<Vec<u32>>(), |i| {
                    if i == 11 {
                        panic!("boom");
                    }
                    i
                })
            }));
            assert!(r.is_err());
        }
        assert_eq!(pool.map(vec![1, 2], |x| x + 1), vec![2, 3]);
    }
}
