//! The running supervisors, by domain: the one list the listener routes replication
//! sessions by, the control handler answers from, and the watchdog checks.
//!
//! It changes only when a policy reload adds or removes a domain ([`super::reload`]); every
//! reader takes a snapshot of the handles it needs and never holds the lock across an
//! await.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use remus_engine::session::BackupSession;

use super::supervisor::SupervisorHandle;

struct Entry {
    handle: SupervisorHandle,
    task: Option<JoinHandle<()>>,
}

/// The supervisors (cheap to clone: a shared list).
#[derive(Clone, Default)]
pub struct Domains(Arc<Mutex<Vec<Entry>>>);

impl Domains {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        // A panic elsewhere while holding the lock leaves a list that is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a started supervisor.
    pub fn insert(&self, handle: SupervisorHandle, task: JoinHandle<()>) {
        self.lock().push(Entry {
            handle,
            task: Some(task),
        });
    }

    /// Every supervisor's handle, in the order they were added.
    pub fn handles(&self) -> Vec<SupervisorHandle> {
        self.lock().iter().map(|e| e.handle.clone()).collect()
    }

    /// The handle of `domain`.
    pub fn get(&self, domain: &str) -> Option<SupervisorHandle> {
        self.lock()
            .iter()
            .find(|e| e.handle.name == domain)
            .map(|e| e.handle.clone())
    }

    /// The domains' names.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.handle.name.clone()).collect()
    }

    /// Where `domain`'s replication sessions go.
    pub fn sessions(&self, domain: &str) -> Option<mpsc::Sender<BackupSession>> {
        self.get(domain).map(|h| h.sessions)
    }

    /// Takes `domain` out of the list; its task, to wait for its end.
    pub fn remove(&self, domain: &str) -> Option<JoinHandle<()>> {
        let mut list = self.lock();
        let at = list.iter().position(|e| e.handle.name == domain)?;
        list.remove(at).task
    }

    /// Every supervisor's task (at shutdown), leaving the handles.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        self.lock()
            .iter_mut()
            .filter_map(|e| e.task.take())
            .collect()
    }
}
