//! Version ranges and capability sets, negotiated once when two agents meet.
//!
//! Every peer protocol of remus (the replication channel's hello, the witness wire, a
//! migration's cookies) follows one rule, taken from Xen's migration stream v2 planning: a
//! side announces the range of versions it speaks and the capabilities it offers; both use
//! the **highest common version** and the **common capabilities**; a peer with no version in
//! common is refused with both ranges named. Capabilities are names, so a newer peer's
//! unknown ones are simply not in common — ignored, never misread. This module is the one
//! place that rule is computed; it is sans-IO, like the rest of the crate.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A range of protocol versions a side speaks, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u32,
    /// Newest version spoken.
    pub max: u32,
}

impl VersionRange {
    /// The range of one version (what a peer that predates negotiation speaks).
    pub const fn only(v: u32) -> Self {
        Self { min: v, max: v }
    }

    /// Whether `v` is in the range.
    pub fn contains(self, v: u32) -> bool {
        self.min <= v && v <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// What both sides will use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The highest common version.
    pub version: u32,
    /// The capabilities both offered.
    pub capabilities: BTreeSet<String>,
}

/// Announcements that cannot be agreed with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    /// An announcement whose current version lies outside its own range: it claims a
    /// version it then violates.
    #[error("its hello says version {version} outside the range {range} it announces")]
    Contradicts {
        /// The version it says it speaks.
        version: u32,
        /// The range it announces.
        range: VersionRange,
    },
    /// A range whose `min` is above its `max`.
    #[error("the peer announces an empty version range {}..={}", .0.min, .0.max)]
    EmptyRange(VersionRange),
    /// No version in common; both ranges named.
    #[error("no common protocol version: this node speaks {ours}, the peer {theirs}")]
    NoCommonVersion {
        /// This side's range.
        ours: VersionRange,
        /// The peer's range.
        theirs: VersionRange,
    },
    /// A capability this side requires that the peer lacks.
    #[error("the peer lacks the capability `{0}`, which this node requires")]
    Missing(String),
}

/// The highest common version and the common capabilities of two announcements;
/// `required` capabilities must be among the common ones.
pub fn negotiate<'a>(
    ours: VersionRange,
    our_capabilities: impl IntoIterator<Item = &'a str>,
    theirs: VersionRange,
    their_capabilities: impl IntoIterator<Item = &'a str>,
    required: &[&str],
) -> Result<Negotiated, NegotiationError> {
    if theirs.min > theirs.max {
        return Err(NegotiationError::EmptyRange(theirs));
    }
    let version = ours.max.min(theirs.max);
    if version < ours.min.max(theirs.min) {
        return Err(NegotiationError::NoCommonVersion { ours, theirs });
    }
    let theirs: BTreeSet<&str> = their_capabilities.into_iter().collect();
    let capabilities: BTreeSet<String> = our_capabilities
        .into_iter()
        .filter(|c| theirs.contains(c))
        .map(str::to_string)
        .collect();
    if let Some(missing) = required.iter().find(|c| !capabilities.contains(**c)) {
        return Err(NegotiationError::Missing((*missing).to_string()));
    }
    Ok(Negotiated {
        version,
        capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u32, max: u32) -> VersionRange {
        VersionRange { min, max }
    }

    /// (ours, theirs, their capabilities, required, the version or the error's text).
    type Row = (
        VersionRange,
        VersionRange,
        &'static [&'static str],
        &'static [&'static str],
        Result<u32, &'static str>,
    );

    #[test]
    fn highest_common_version_and_common_capabilities() {
        let ours = ["page-lz4", "disk-bitmap", "config-record"];
        let rows: &[Row] = &[
            (r(1, 2), r(1, 1), &["page-lz4", "future-thing"], &[], Ok(1)),
            (r(1, 2), r(2, 5), &["disk-bitmap"], &["disk-bitmap"], Ok(2)),
            (r(1, 2), r(0, 9), &[], &[], Ok(2)),
            (r(2, 2), r(2, 2), &[], &[], Ok(2)),
            (
                r(1, 2),
                r(3, 4),
                &[],
                &[],
                Err("no common protocol version: this node speaks 1..=2, the peer 3..=4"),
            ),
            (
                r(2, 3),
                r(1, 1),
                &[],
                &[],
                Err("no common protocol version: this node speaks 2..=3, the peer 1"),
            ),
            (r(1, 2), r(2, 1), &[], &[], Err("empty version range 2..=1")),
            (
                r(1, 2),
                r(1, 2),
                &["page-lz4"],
                &["disk-bitmap"],
                Err("lacks the capability `disk-bitmap`"),
            ),
        ];
        for (o, t, caps, req, want) in rows {
            let got = negotiate(*o, ours, *t, caps.iter().copied(), req);
            match (want, &got) {
                (Ok(v), Ok(n)) => {
                    assert_eq!(n.version, *v, "{o} vs {t}");
                    let common: BTreeSet<String> = caps
                        .iter()
                        .filter(|c| ours.contains(c))
                        .map(|c| c.to_string())
                        .collect();
                    assert_eq!(n.capabilities, common, "{o} vs {t}: unknown ones ignored");
                }
                (Err(msg), Err(e)) => assert!(e.to_string().contains(msg), "{e}"),
                _ => panic!("{o} vs {t}: wanted {want:?}, got {got:?}"),
            }
        }
    }
}
