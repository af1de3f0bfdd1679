//! The protected state: one counter in RAM, backed by its disk log.
//!
//! Invariant (the thing a failover must preserve): the last record on disk is the value in
//! memory or one more, because `increment` writes the record before it sets memory. While the
//! lock is held nothing is in flight, so `check` expects them to be equal.

use std::sync::Mutex;

use crate::disklog::{DiskLog, LogError, Record};

/// Result of comparing memory with the disk log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub mem: u64,
    /// Value of the last record on disk (0 for an empty log).
    pub disk: u64,
}

impl Check {
    pub fn agrees(&self) -> bool {
        self.mem == self.disk
    }

    /// The line printed on the console and sent to `CHECK` requests.
    pub fn line(&self) -> String {
        let verdict = if self.agrees() { "ok" } else { "mismatch" };
        format!("{verdict} mem={} disk={}", self.mem, self.disk)
    }
}

struct State {
    mem: u64,
    log: DiskLog,
}

/// The counter shared by the ticker and every connection.
pub struct Counter {
    state: Mutex<State>,
}

impl Counter {
    /// Starts from the log's last record (a fresh boot must not reset the counter).
    pub fn recover(log: DiskLog) -> Result<Counter, LogError> {
        let mem = log.last()?.map_or(0, |r| r.value);
        Ok(Counter {
            state: Mutex::new(State { mem, log }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave memory ahead of disk (memory is set
        // last), so the state behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs `mem + 1`, then sets it; returns the new value.
    pub fn increment(&self) -> Result<u64, LogError> {
        let mut s = self.lock();
        let next = s.mem + 1;
        s.log.append(Record {
            seq: next,
            value: next,
        })?;
        s.mem = next;
        Ok(next)
    }

    pub fn get(&self) -> u64 {
        self.lock().mem
    }

    /// Reads the disk log and compares it with memory.
    pub fn check(&self) -> Result<Check, LogError> {
        let s = self.lock();
        let disk = s.log.last()?.map_or(0, |r| r.value);
        Ok(Check { mem: s.mem, disk })
    }
}
