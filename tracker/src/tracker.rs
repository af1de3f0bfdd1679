//! The contract between the checkpoint engine and a dirty-page tracker.
//!
//! Each epoch, with the VM stopped, the engine calls [`DirtyTracker::collect`] with the live
//! guest RAM (the engine's read-only mapping of the RAM file) and its *shadow* (guest RAM as
//! of the last checkpoint). On return:
//! - `out` holds every page whose live content differed from the shadow (a tracker may not
//!   miss one; both trackers also drop pages that were written but are unchanged), each with
//!   the captured bytes the set asks for ([`crate::Capture`]);
//! - the shadow equals live RAM on every page (for pages outside `out` it already did).
//!
//! This is a single pass per dirty page: compare, capture (XOR delta or old page), copy. The
//! engine then resumes the VM and encodes from `out` plus the shadow while the VM runs: the
//! shadow stays untouched until the next collect, so it is a stable source for the new page
//! content, and the captured delta/old page is the only other input the encoder needs.
//!
//! The VM must be stopped from before a collect starts until it returns: a write during the
//! collect may be missed (soft-dirty: read-then-clear is not atomic) or tear a page (compare).
//! [`VmStopped`] is the caller's written statement that it is, required by every call that
//! reads live RAM.

use std::time::Duration;

use crate::dirty_set::DirtySet;

/// Proof-by-assertion that the guest cannot write its RAM right now.
///
/// The engine obtains one after QEMU's `stop` has completed (which also drains block I/O) and
/// must not resume the VM while any collect or audit it passed the token to is running. It
/// cannot be checked here: the type exists so the requirement is visible at every call site.
#[derive(Debug)]
pub struct VmStopped {
    _private: (),
}

impl VmStopped {
    /// The caller asserts that the VM (every vCPU, and every device that can DMA into guest
    /// RAM) is stopped and stays stopped while this token is in use.
    pub fn caller_asserts_vm_stopped() -> Self {
        VmStopped { _private: () }
    }
}

/// Which tracking method a tracker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackerKind {
    /// Full compare of live RAM against the shadow.
    Compare,
    /// The kernel's soft-dirty bits for QEMU's mapping of the RAM file.
    SoftDirty,
}

impl TrackerKind {
    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackerKind::Compare => "compare",
            TrackerKind::SoftDirty => "soft-dirty",
        }
    }
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one collect did, for metrics and for the epoch's timing report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollectStats {
    /// Pages whose state was examined: compared (compare) or whose pagemap entry was read
    /// (soft-dirty).
    pub pages_scanned: u64,
    /// Pages the dirty log reported (soft-dirty) or that were compared as candidates; equals
    /// `pages_scanned` for compare.
    pub pages_candidate: u64,
    /// Pages that differed from the shadow and were copied (the size of the output).
    pub pages_dirty: u64,
    /// Bytes copied into the shadow.
    pub bytes_copied: u64,
    /// Whether this collect compared all of RAM (always for compare; the first collect after
    /// arming for soft-dirty).
    pub full_scan: bool,
    /// Wall time of the collect.
    pub elapsed: Duration,
    /// Part of `elapsed` spent reading the kernel's dirty log (soft-dirty; zero for compare).
    pub log_read: Duration,
    /// Part of `elapsed` spent clearing the kernel's dirty log (soft-dirty; zero for compare).
    pub log_clear: Duration,
}

/// Errors of a collect.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// Live RAM and shadow differ in size.
    #[error("tracker: collect: live RAM is {live} bytes but the shadow is {shadow} bytes")]
    LengthMismatch { live: usize, shadow: usize },
    /// The RAM image changed size since the tracker was attached.
    #[error(
        "tracker: collect: RAM is {got} bytes but the tracker was attached to {attached} bytes"
    )]
    SizeChanged { attached: usize, got: usize },
    /// A caller-supplied page list is unusable.
    #[error("tracker: sync of listed pages: {problem}")]
    BadPageList { problem: String },
    /// The kernel's dirty log could not be read or cleared.
    #[error(transparent)]
    Pagemap(#[from] crate::pagemap::PagemapError),
    /// QEMU's mapping of the RAM file could not be found or read.
    #[error(transparent)]
    Proc(#[from] crate::procfs::ProcError),
}

/// A method of finding the pages of guest RAM dirtied since the last collect.
pub trait DirtyTracker: Send {
    /// The method in use.
    fn kind(&self) -> TrackerKind;

    /// Makes the next collect compare all of RAM (for a new shadow, a restarted QEMU, or
    /// after an audit found a miss). Cheap; takes effect at the next collect.
    fn rearm(&mut self);

    /// Finds the pages where `live` differs from `shadow`, records them in `out` (which the
    /// caller cleared, or which still holds entries it wants to keep), and copies them into
    /// the shadow. See the module doc for the exact postcondition.
    ///
    /// # Errors
    /// Size mismatches, and for soft-dirty a failure to read or clear the kernel's dirty log
    /// (the caller should then fall back to a compare tracker: the shadow may be partially
    /// updated, which a compare collect repairs).
    fn collect(
        &mut self,
        stopped: &VmStopped,
        live: &[u8],
        shadow: &mut [u8],
        out: &mut DirtySet,
    ) -> Result<CollectStats, TrackerError>;
}

/// Checks that `live` and `shadow` have the same length and, when the caller was attached to
/// a RAM image of `attached` bytes, that the image has not changed size since.
///
/// # Errors
/// [`TrackerError::LengthMismatch`], [`TrackerError::SizeChanged`].
pub(crate) fn check_sizes(
    live: &[u8],
    shadow: &[u8],
    attached: Option<usize>,
) -> Result<(), TrackerError> {
    if live.len() != shadow.len() {
        return Err(TrackerError::LengthMismatch {
            live: live.len(),
            shadow: shadow.len(),
        });
    }
    match attached {
        Some(attached) if attached != live.len() => Err(TrackerError::SizeChanged {
            attached,
            got: live.len(),
        }),
        _ => Ok(()),
    }
}
