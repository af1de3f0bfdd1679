//! Which node holds the newest copy of a domain's data.
//!
//! After both nodes stopped (a double failure, or an operator who stopped both), each holds
//! a copy of the guest's disks and nothing in the files says which is newer. Starting the
//! older one takes the guest back in time, silently. So each node stamps its copy, keeps
//! the stamp with its disk-copy record, advertises it in every heartbeat and records it at
//! the witness (which keeps the newest per domain); `start` refuses a copy that the peer's
//! stamp or the witness's record shows to be older.
//!
//! A stamp is a *generation* and a *holder*:
//! - the generation grows by one each time a node begins to run the VM as its authority
//!   (an operator's start, or an activation after a failover or a switchover), taking the
//!   larger of its own and the peer's last advertised generation first, as a Raft term
//!   does, so a later run always carries a larger generation than any copy it heard of;
//! - the holder says how the node came by that generation's data: it [`Ran`] the VM (its
//!   disks have every write of the generation), or it [`Received`] it as the backup (its
//!   replica has the writes up to the last committed checkpoint, never more than the
//!   runner's). Within a generation the runner's copy is the newer.
//!
//! Stamps are ordered by generation, then holder; a node that never ran nor received the
//! domain holds [`CopyStamp::NONE`], older than every other.
//!
//! [`Ran`]: CopyHolder::Ran
//! [`Received`]: CopyHolder::Received

use serde::{Deserialize, Serialize};

/// How a node came by its copy of a generation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CopyHolder {
    /// Nothing: the node never ran the domain nor received it.
    #[default]
    None = 0,
    /// The node kept the copy as the backup of the generation's runner.
    Received = 1,
    /// The node ran the VM in this generation.
    Ran = 2,
}

impl CopyHolder {
    /// The wire value (heartbeats).
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// From the wire value; `None` for an unknown one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CopyHolder::None,
            1 => CopyHolder::Received,
            2 => CopyHolder::Ran,
            _ => return None,
        })
    }
}

/// A node's stamp on its copy of one domain's data. Ordered: the greater stamp is the
/// newer copy (generation first, then holder).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct CopyStamp {
    /// Runs of the VM so far, as far as this node knows.
    pub generation: u64,
    /// How this node holds that generation's data.
    pub holder: CopyHolder,
}

impl CopyStamp {
    /// The stamp of a node that never had the domain.
    pub const NONE: CopyStamp = CopyStamp {
        generation: 0,
        holder: CopyHolder::None,
    };

    /// The stamp of a node about to run the VM as its authority: one generation past
    /// every copy it knows of (its own, and the peer's last advertised one if any).
    pub fn next_run(own: CopyStamp, peer: Option<CopyStamp>) -> CopyStamp {
        let known = peer.map_or(own.generation, |p| p.generation.max(own.generation));
        CopyStamp {
            generation: known.saturating_add(1),
            holder: CopyHolder::Ran,
        }
    }

    /// The stamp of a backup receiving the copy of a runner that advertises `runner`
    /// (`None`: not heard; the backup's copy then counts as the oldest of all, which can
    /// only make an operator's `start` prefer the runner's copy).
    pub fn received_from(runner: Option<CopyStamp>) -> CopyStamp {
        CopyStamp {
            generation: runner.map_or(0, |r| r.generation),
            holder: CopyHolder::Received,
        }
    }
}

impl std::fmt::Display for CopyStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.holder {
            CopyHolder::None => write!(f, "no copy"),
            CopyHolder::Received => {
                write!(f, "generation {}, received as backup", self.generation)
            }
            CopyHolder::Ran => write!(f, "generation {}, ran the VM", self.generation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(generation: u64, holder: CopyHolder) -> CopyStamp {
        CopyStamp { generation, holder }
    }

    #[test]
    fn newer_is_a_later_generation_then_the_runner() {
        use CopyHolder::{Ran, Received};
        let order = [
            CopyStamp::NONE,
            s(0, Received),
            s(1, Received),
            s(1, Ran),
            s(2, Received),
            s(2, Ran),
            s(10, Received),
        ];
        for w in order.windows(2) {
            assert!(w[0] < w[1], "{:?} < {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn a_run_outranks_every_copy_it_knew_of() {
        use CopyHolder::{Ran, Received};
        // A failover: the backup received generation 4 and activates.
        let own = CopyStamp::received_from(Some(s(4, Ran)));
        let next = CopyStamp::next_run(own, Some(s(4, Ran)));
        assert_eq!(next, s(5, Ran));
        assert!(next > s(4, Ran));
        // A start on a node whose own generation is ahead of what it heard.
        assert_eq!(
            CopyStamp::next_run(s(7, Ran), Some(s(3, Received))),
            s(8, Ran)
        );
        // Nothing heard.
        assert_eq!(
            CopyStamp::next_run(CopyStamp::NONE, Option::None),
            s(1, Ran)
        );
        assert_eq!(
            CopyStamp::next_run(s(u64::MAX, Ran), Option::None).generation,
            u64::MAX
        );
    }

    #[test]
    fn a_backup_that_heard_nothing_holds_the_oldest_copy() {
        let r = CopyStamp::received_from(None);
        assert!(r < s(1, CopyHolder::Received));
        assert!(r > CopyStamp::NONE);
    }

    #[test]
    fn wire_values_round_trip_and_unknown_ones_are_refused() {
        for h in [CopyHolder::None, CopyHolder::Received, CopyHolder::Ran] {
            assert_eq!(CopyHolder::from_u8(h.to_u8()), Some(h));
        }
        assert_eq!(CopyHolder::from_u8(3), None);
    }
}
