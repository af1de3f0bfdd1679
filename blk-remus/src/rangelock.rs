//! Byte-range locks that order overlapping writes on the primary.
//!
//! A write holds the lock on its range from the moment it is applied to the local image until
//! its event has been handed to the forwarder, and the sync code holds it while it reads a
//! region and emits the copy. So for any two operations on overlapping ranges, the order of
//! their events equals the order in which they touched the local image: the backup, replaying
//! events in order, reproduces the primary byte for byte. Non-overlapping writes commute and
//! run in parallel.

use std::sync::{Condvar, Mutex};

/// The set of ranges currently held.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    /// Held ranges; short (bounded by requests in flight).
    held: Mutex<Held>,
    /// Signalled whenever a range is released.
    released: Condvar,
}

/// The last id handed out and the held ranges as `(id, start, end)`.
#[derive(Debug, Default)]
struct Held(u64, Vec<(u64, u64, u64)>);

/// Releases its range on drop.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Blocks until `[start, start+len)` overlaps no held range, then holds it.
    pub(crate) fn lock(&self, start: u64, len: u64) -> RangeGuard<'_> {
        let end = start.saturating_add(len.max(1));
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while g.1.iter().any(|&(_, s, e)| s < end && start < e) {
            g = self.released.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.0 += 1;
        let id = g.0;
        g.1.push((id, start, end));
        RangeGuard { locks: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        g.1.retain(|&(id, _, _)| id != self.id);
        drop(g);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_waits_disjoint_does_not() {
        let l = Arc::new(RangeLocks::default());
        let g = l.lock(100, 100);
        // Disjoint: immediate.
        drop(l.lock(200, 10));
        drop(l.lock(0, 100));
        let l2 = l.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(150, 1);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(g);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
