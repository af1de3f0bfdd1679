//! What this node says of each domain in its heartbeats, and how it reads the peer's.
//!
//! The heartbeat detector (`remus_ha::heartbeat`) carries an opaque fixed-size payload per
//! domain and knows nothing of roles; its layout is decided here, by the daemon, and
//! versioned with the heartbeat datagram. Version 2 (18 bytes, big-endian):
//!
//! ```text
//!   0 role u8          the sender's persisted role for the domain (table below)
//!   1 epoch u64        primary: last acknowledged epoch; backup: last committed epoch
//!   9 generation u64   the sender's copy stamp (`remus_ha::lineage`)
//!  17 holder u8        0 none, 1 received as backup, 2 ran the VM
//! ```
//! Role values: 0 stopped, 1 standalone, 2 primary, 3 backup, 4 fencing, 5 fenced,
//! 6 activating, 7 activated, 8 resyncing. The rules read it only as a
//! [`PeerClaim`](remus_ha::decide::PeerClaim).

use remus_ha::decide::PeerClaim;
use remus_ha::heartbeat::DOMAIN_PAYLOAD_LEN;
use remus_ha::lineage::{CopyHolder, CopyStamp};
use thiserror::Error;

use crate::api;

/// A payload this node cannot read (an unknown value from a newer or broken peer).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum AdvertError {
    /// The role byte.
    #[error("unknown role value {0} in the peer's heartbeat")]
    UnknownRole(u8),
    /// The copy holder byte.
    #[error("unknown copy holder value {0} in the peer's heartbeat")]
    UnknownHolder(u8),
}

/// One domain as a node advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainAdvert {
    /// The sender's role, as its wire value (see the module table).
    role: u8,
    /// Primary: last acknowledged epoch; backup: last committed epoch.
    pub epoch: u64,
    /// The sender's stamp on its copy of the domain's data.
    pub copy: CopyStamp,
}

/// A role's wire value.
fn role_value(role: &api::Role) -> u8 {
    use api::Role;
    match role {
        Role::Stopped => 0,
        Role::Standalone => 1,
        Role::Primary { .. } => 2,
        Role::Backup { .. } => 3,
        Role::Fencing { .. } => 4,
        Role::Fenced { .. } => 5,
        Role::Activating { .. } => 6,
        Role::Activated { .. } => 7,
        Role::Resyncing { .. } => 8,
    }
}

impl DomainAdvert {
    /// What this node advertises in `role`: built from the same status snapshot the control
    /// socket serves, so a peer and an operator never see different roles.
    pub fn new(role: &api::Role, epoch: u64, copy: api::CopyStamp) -> Self {
        Self {
            role: role_value(role),
            epoch,
            copy: copy.into(),
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> [u8; DOMAIN_PAYLOAD_LEN] {
        let mut b = [0u8; DOMAIN_PAYLOAD_LEN];
        b[0] = self.role;
        b[1..9].copy_from_slice(&self.epoch.to_be_bytes());
        b[9..17].copy_from_slice(&self.copy.generation.to_be_bytes());
        b[17] = self.copy.holder.to_u8();
        b
    }

    /// Reads a peer's payload.
    ///
    /// # Errors
    /// An unknown role or copy holder value.
    pub fn decode(b: &[u8; DOMAIN_PAYLOAD_LEN]) -> Result<Self, AdvertError> {
        if b[0] > 8 {
            return Err(AdvertError::UnknownRole(b[0]));
        }
        let holder = CopyHolder::from_u8(b[17]).ok_or(AdvertError::UnknownHolder(b[17]))?;
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(v)
        };
        Ok(Self {
            role: b[0],
            epoch: u64_at(1),
            copy: CopyStamp {
                generation: u64_at(9),
                holder,
            },
        })
    }

    /// What the sender's role means for the rules.
    pub fn claim(&self) -> PeerClaim {
        match self.role {
            0 => PeerClaim::Stopped,
            3 => PeerClaim::Backup,
            4 | 5 => PeerClaim::TakingOver,
            // standalone, primary, activating, activated, resyncing (decode refuses others)
            _ => PeerClaim::Runs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_ha::role::{FenceProof, Role};

    #[test]
    fn every_role_roundtrips_to_its_claim() {
        let p = || "p".to_string();
        let rows = [
            (Role::Stopped, PeerClaim::Stopped),
            (Role::Standalone, PeerClaim::Runs),
            (
                Role::Primary {
                    peer: p(),
                    since_epoch: 0,
                },
                PeerClaim::Runs,
            ),
            (
                Role::Backup {
                    peer: p(),
                    last_committed: None,
                },
                PeerClaim::Backup,
            ),
            (
                Role::Fencing {
                    peer: p(),
                    started_ms: 0,
                    attempts: 0,
                },
                PeerClaim::TakingOver,
            ),
            (
                Role::Fenced {
                    peer: p(),
                    by: FenceProof::Lease,
                },
                PeerClaim::TakingOver,
            ),
            (Role::Activating { from_epoch: 1 }, PeerClaim::Runs),
            (Role::Activated { epoch: 1 }, PeerClaim::Runs),
            (Role::Resyncing { peer: p() }, PeerClaim::Runs),
        ];
        let copy = CopyStamp {
            generation: 0x0102_0304_0506_0708,
            holder: CopyHolder::Received,
        };
        for (role, claim) in rows {
            let a = DomainAdvert::new(&api::Role::from(&role), 41, copy.into());
            let back = DomainAdvert::decode(&a.encode()).unwrap();
            assert_eq!(back, a, "{role:?}");
            assert_eq!(back.claim(), claim, "{role:?}");
        }
    }

    #[test]
    fn wire_layout_is_version_2s() {
        // The bytes a v0.1.0 node sends for a primary at epoch 17, generation 4, ran.
        let mut b = [0u8; DOMAIN_PAYLOAD_LEN];
        b[0] = 2;
        b[8] = 17;
        b[16] = 4;
        b[17] = 2;
        let a = DomainAdvert::decode(&b).unwrap();
        assert_eq!((a.claim(), a.epoch), (PeerClaim::Runs, 17));
        assert_eq!(
            a.copy,
            CopyStamp {
                generation: 4,
                holder: CopyHolder::Ran
            }
        );
        assert_eq!(a.encode(), b);
    }

    #[test]
    fn unknown_values_are_refused() {
        let mut b = [0u8; DOMAIN_PAYLOAD_LEN];
        b[0] = 9;
        assert_eq!(DomainAdvert::decode(&b), Err(AdvertError::UnknownRole(9)));
        b[0] = 3;
        b[17] = 7;
        assert_eq!(DomainAdvert::decode(&b), Err(AdvertError::UnknownHolder(7)));
    }
}
