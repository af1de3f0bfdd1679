//! Dirty-page tracking for guest RAM: which pages of the QEMU RAM file changed since the last
//! checkpoint, copied into the engine's shadow in the same pass.
//!
//! - [`DirtyTracker`] is the engine's interface ([`tracker`] documents the contract);
//!   [`CompareTracker`] (always exact) and [`SoftDirtyTracker`] (kernel dirty log, exact under
//!   [`preconditions`]) implement it; [`select`] picks one per [`TrackerChoice`].
//! - [`ReplicaAudit`] re-compares a rolling slice of RAM every epoch so a write the tracker
//!   missed is found and resent within a bounded number of epochs.
//! - [`ScanPool`] holds the scan threads shared by all of them.
//!
//! Typical epoch (VM stopped):
//! ```no_run
//! # use std::sync::Arc;
//! # use remus_tracker::*;
//! # fn epoch(tracker: &mut dyn DirtyTracker, audit: &mut ReplicaAudit, live: &[u8], shadow: &mut [u8]) -> Result<(), TrackerError> {
//! let stopped = VmStopped::caller_asserts_vm_stopped(); // after QMP `stop` returned
//! let mut out = DirtySet::new(Capture::XorDelta);
//! let stats = tracker.collect(&stopped, live, shadow, &mut out)?;
//! let report = audit.run(&stopped, live, shadow, &mut out)?;
//! if !report.mismatched.is_empty() {
//!     tracker.rearm(); // the dirty log cannot be trusted: compare all of RAM next epoch
//! }
//! // `cont` the VM, then encode `out` (deltas) with the shadow (new content) while it runs.
//! # let _ = stats; Ok(()) }
//! ```

pub mod audit;
pub mod auto;
pub mod compare;
pub mod dirty_set;
pub mod page;
pub mod pagemap;
pub mod pool;
pub mod preconditions;
pub mod procfs;
pub mod soft_dirty;
pub mod tracker;

pub use audit::{AuditConfig, AuditReport, AuditStats, ReplicaAudit};
pub use auto::{select, SelectError, Selection, TrackerChoice};
pub use compare::{sync_listed, CompareTracker, SyncTotals};
pub use dirty_set::{DirtyPage, DirtySet};
pub use page::{page_bytes, page_count, prefault, Capture, Pfn, PAGE_SIZE};
pub use pool::{PoolError, ScanPool};
pub use preconditions::{
    check as check_preconditions, Precondition, QemuFacts, SoftDirtyTarget, Unmet,
};
pub use soft_dirty::SoftDirtyTracker;
pub use tracker::{CollectStats, DirtyTracker, TrackerError, TrackerKind, VmStopped};
