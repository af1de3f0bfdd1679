//! A persistent pool of scan threads for the work done while the VM is stopped.
//!
//! Why persistent: a collect runs every epoch (every ~100–200 ms) inside the VM's stop
//! window; keeping the threads parked on a channel avoids spawning and joining them each time.
//! Why not a general-purpose pool: the jobs borrow the caller's slices (the RAM mapping, the
//! shadow, the output buffers) for exactly the duration of one call, which needs a scoped
//! hand-off that `'static` thread pools cannot express safely.
//!
//! Each worker a job is handed to gets a *hand-off* cell, shared by reference count (so it
//! outlives the borrow), whose state moves `Pending -> Running -> Finished` on the worker's
//! side or `Pending -> Withdrawn` on the caller's side, always under the cell's lock.
//!
//! Invariants (what makes the lifetime erasure in [`ScanPool::map`] sound):
//! - A worker dereferences the job only in `Running`, which it can enter only from `Pending`.
//! - `map` returns (or unwinds) only after every hand-off is `Finished` or `Withdrawn`: it
//!   withdraws those still `Pending` and waits for those `Running` (workers catch a job's
//!   panic, so `Running` always ends in `Finished`).
//!
//! Scheduling is dynamic: the items are handed out one at a time from an atomic counter, so a
//! thread slowed by another process's load takes fewer items instead of stalling the epoch.
//! And the caller never waits for a helper that has not started: once the caller has run out
//! of items it withdraws the hand-offs of helpers still waking up. This matters in the stop
//! window: measured in a 2-vCPU guest under TCG on a loaded host, waiting for a helper's
//! wake-up stretched a 12 ms collect to 1–4 s; withdrawing bounds it by the work itself.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

/// A job as the workers see it: a call that processes the next items until none remain.
type Job = dyn Fn() + Sync;

/// A borrowed job whose lifetime was erased for the trip through a channel.
struct JobRef(*const Job);

// SAFETY: the pointee is `Sync` (shared calls from several threads are fine) and the pool's
// invariants (module doc) keep it alive until every receiver is done with it.
unsafe impl Send for JobRef {}

/// Where one worker is with one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// Sent, not yet picked up: the caller may still withdraw it.
    Pending,
    /// The worker is running the job: the caller must wait.
    Running,
    /// The worker is done with the job (`true`: it panicked).
    Finished(bool),
    /// The caller finished without this worker: it must not touch the job.
    Withdrawn,
}

/// A hand-off cell and the signal that it reached `Finished`.
struct HandoffCell {
    state: Mutex<Handoff>,
    finished: Condvar,
}

struct Task {
    job: JobRef,
    handoff: Arc<HandoffCell>,
}

struct Worker {
    tx: Option<mpsc::Sender<Task>>,
    handle: Option<JoinHandle<()>>,
}

/// Error starting the pool.
#[derive(Debug, thiserror::Error)]
#[error("scan pool: spawning worker thread {index}: {source}")]
pub struct PoolError {
    index: usize,
    #[source]
    source: std::io::Error,
}

/// Threads that process a list of items in parallel; the calling thread takes part.
pub struct ScanPool {
    workers: Vec<Worker>,
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
        let mut workers = Vec::new();
        for index in 1..threads.max(1) {
            let (tx, rx) = mpsc::channel::<Task>();
            let handle = thread::Builder::new()
                .name(format!("remus-scan-{index}"))
                .spawn(move || worker_loop(rx))
                .map_err(|source| PoolError { index, source })?;
            workers.push(Worker {
                tx: Some(tx),
                handle: Some(handle),
            });
        }
        Ok(ScanPool { workers })
    }

    /// A pool with one thread per available CPU.
    pub fn with_available_parallelism() -> Result<Self, PoolError> {
        Self::new(thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Threads that take part in a call, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
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
        let helpers = self.workers.len().min(n - 1);
        self.run(&job, helpers);
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("scan pool: every item was processed")
            })
            .collect()
    }

    /// Runs `job` on the caller and on up to `helpers` workers; returns when no worker uses
    /// it any more.
    fn run(&self, job: &(dyn Fn() + Sync + '_), helpers: usize) {
        // SAFETY: erases the borrow's lifetime so the reference can travel to the workers.
        // Workers use it only in `Running`, and this function withdraws or waits out every
        // hand-off before it returns or unwinds (module doc).
        let erased: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn() + Sync + '_), &'static Job>(job) };
        let mut handoffs = Vec::with_capacity(helpers);
        for w in self.workers.iter().take(helpers) {
            let cell = Arc::new(HandoffCell {
                state: Mutex::new(Handoff::Pending),
                finished: Condvar::new(),
            });
            let task = Task {
                job: JobRef(erased),
                handoff: cell.clone(),
            };
            if let Some(tx) = &w.tx {
                if tx.send(task).is_ok() {
                    handoffs.push(cell);
                }
            }
        }
        let mine = panic::catch_unwind(AssertUnwindSafe(job));
        let mut worker_panicked = false;
        for cell in &handoffs {
            let mut state = lock(&cell.state);
            loop {
                match *state {
                    Handoff::Pending => {
                        *state = Handoff::Withdrawn;
                        break;
                    }
                    Handoff::Running => {
                        state = cell.finished.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                    Handoff::Finished(panicked) => {
                        worker_panicked |= panicked;
                        break;
                    }
                    Handoff::Withdrawn => break,
                }
            }
        }
        if let Err(payload) = mine {
            panic::resume_unwind(payload);
        }
        if worker_panicked {
            panic!("scan pool: a scan job panicked on a worker thread");
        }
    }
}

impl Drop for ScanPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx.take();
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn worker_loop(rx: mpsc::Receiver<Task>) {
    while let Ok(Task { job, handoff }) = rx.recv() {
        {
            let mut state = lock(&handoff.state);
            if *state != Handoff::Pending {
                // Withdrawn: the caller finished without us and the job may be gone.
                continue;
            }
            *state = Handoff::Running;
        }
        let result = {
            // SAFETY: we are `Running`, so `ScanPool::run` waits for our `Finished` before the
            // job's borrow ends; this reference is gone by the end of this block.
            let job: &Job = unsafe { &*job.0 };
            panic::catch_unwind(AssertUnwindSafe(job))
        };
        *lock(&handoff.state) = Handoff::Finished(result.is_err());
        handoff.finished.notify_all();
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
    fn withdrawn_and_running_handoffs_race_safely() {
        // Many short calls: helpers are often still waking when the caller runs out of items
        // (withdrawn), sometimes mid-item (waited for). Every item must be processed once.
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
