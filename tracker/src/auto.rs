//! Choosing a tracker: soft-dirty where it is exact, compare everywhere else.
//!
//! `auto` checks every precondition and uses soft-dirty only if none is unmet; otherwise it
//! uses compare and logs and returns each reason, so the agent can report *why* the pause is
//! longer than it could be. Asking for `soft-dirty` explicitly refuses to start when a
//! precondition is unmet: an operator who insists on the fast path is told what blocks it,
//! never handed a tracker that silently loses writes.

use std::str::FromStr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::compare::CompareTracker;
use crate::pool::ScanPool;
use crate::preconditions::{check, Precondition, SoftDirtyTarget, Unmet};
use crate::soft_dirty::SoftDirtyTracker;
use crate::tracker::{DirtyTracker, TrackerError, TrackerKind};

/// The configured tracking method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrackerChoice {
    /// Always compare.
    Compare,
    /// Soft-dirty, or fail to start.
    SoftDirty,
    /// Soft-dirty when every precondition holds, else compare.
    #[default]
    Auto,
}

/// An unknown tracker name in configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tracker: unknown method {0:?} (expected compare, soft-dirty or auto)")]
pub struct UnknownChoice(pub String);

impl FromStr for TrackerChoice {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compare" => Ok(TrackerChoice::Compare),
            "soft-dirty" => Ok(TrackerChoice::SoftDirty),
            "auto" => Ok(TrackerChoice::Auto),
            other => Err(UnknownChoice(other.to_owned())),
        }
    }
}

/// Errors choosing a tracker.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Soft-dirty was required and cannot be exact.
    #[error("tracker: soft-dirty required but {} precondition(s) unmet: {}", .0.len(), join(.0))]
    SoftDirtyUnmet(Vec<Unmet>),
    /// Soft-dirty was required and attaching to QEMU failed.
    #[error("tracker: attaching the required soft-dirty tracker: {0}")]
    Attach(#[source] TrackerError),
}

fn join(unmet: &[Unmet]) -> String {
    unmet
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The chosen tracker and, if it is not the one asked for, why.
pub struct Selection {
    /// The tracker to collect with.
    pub tracker: Box<dyn DirtyTracker>,
    /// Unmet soft-dirty preconditions (empty when soft-dirty was chosen or not considered).
    pub unmet: Vec<Unmet>,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("tracker", &self.tracker.kind())
            .field("unmet", &self.unmet)
            .finish()
    }
}

/// Chooses and builds the tracker for `target` per `choice`.
///
/// # Errors
/// Only for [`TrackerChoice::SoftDirty`]: an unmet precondition or a failed attach.
pub fn select(
    choice: TrackerChoice,
    target: &SoftDirtyTarget<'_>,
    pool: Arc<ScanPool>,
) -> Result<Selection, SelectError> {
    let compare = |pool, unmet: Vec<Unmet>| Selection {
        tracker: Box::new(CompareTracker::new(pool)),
        unmet,
    };
    if choice == TrackerChoice::Compare {
        info!(tracker = %TrackerKind::Compare, "dirty tracking: compare (configured)");
        return Ok(compare(pool, Vec::new()));
    }
    let unmet = check(target);
    if !unmet.is_empty() {
        if choice == TrackerChoice::SoftDirty {
            return Err(SelectError::SoftDirtyUnmet(unmet));
        }
        for u in &unmet {
            warn!(precondition = u.precondition.as_str(), reason = %u.reason, "soft-dirty precondition unmet");
        }
        warn!(
            unmet = unmet.len(),
            "dirty tracking: compare (soft-dirty unavailable)"
        );
        return Ok(compare(pool, unmet));
    }
    match SoftDirtyTracker::attach(
        target.pid,
        target.ram_path,
        target.ram_len as usize,
        pool.clone(),
    ) {
        Ok(t) => {
            info!(tracker = %TrackerKind::SoftDirty, pid = target.pid, "dirty tracking: soft-dirty");
            Ok(Selection {
                tracker: Box::new(t),
                unmet: Vec::new(),
            })
        }
        Err(e) if choice == TrackerChoice::SoftDirty => Err(SelectError::Attach(e)),
        Err(e) => {
            let u = Unmet {
                precondition: Precondition::QemuMapping,
                reason: format!("attach failed: {e}"),
            };
            warn!(precondition = u.precondition.as_str(), reason = %u.reason, "dirty tracking: compare (soft-dirty unavailable)");
            Ok(compare(pool, vec![u]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_names_table() {
        let cases = [
            ("compare", Ok(TrackerChoice::Compare)),
            ("soft-dirty", Ok(TrackerChoice::SoftDirty)),
            ("auto", Ok(TrackerChoice::Auto)),
            ("softdirty", Err(UnknownChoice("softdirty".into()))),
            ("", Err(UnknownChoice(String::new()))),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<TrackerChoice>(), want, "{s:?}");
        }
    }
}
