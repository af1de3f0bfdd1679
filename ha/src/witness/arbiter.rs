//! The boundary between the daemon and whatever arbitrates its leases.
//!
//! Why a trait: the lease rules (`crate::decide`, [`super::LeaseKeeper`], the fencing by
//! lease) do not depend on who grants the lease, only on what a grant promises. Two
//! arbiters keep those promises: `remus-witness` ([`super::WitnessClient`], UDP, one
//! process of this project) and an etcd cluster (the `remus-etcd-arbiter` crate: leases
//! and transactions of a replicated store many pairs may share). The daemon holds an
//! `Arc<dyn LeaseArbiter>` and never knows which.
//!
//! # What every implementation must promise
//! - **One holder at a time**: a grant succeeds only if the domain's lease is free, already
//!   held by the requester, or (with [`LeaseArbiter::preempt`]) held by a node that declared
//!   it preemptible by the requester ([`LeaseMode::PreemptibleBy`]).
//! - **The holder's view ends first**: a returned [`Lease`]'s `expires_at_local` is no later
//!   than the instant the arbiter itself may grant the lease to another node, by this node's
//!   monotonic clock: the TTL counts from when the answered request was *sent*, less the
//!   drift margin ([`super::DRIFT_DIVISOR`]).
//! - **Serialised takeover**: an exclusive renewal and a peer's preemption are ordered by the
//!   arbiter; exactly one of them wins (see `docs/design.md`, "Takeover without waiting out
//!   the lease").
//! - **Copy stamps only grow**: [`LeaseArbiter::record_copy`] keeps the newest stamp recorded
//!   for a domain and answers with it.
//! - **Errors never grant**: any failure is an `Err`; [`WitnessError::Denied`] when another
//!   node holds the lease (the keeper reports it as such), anything else is "not known".

use std::time::Duration;

use async_trait::async_trait;

use super::client::{Lease, LeaseInfo, LeaseMode, RecordedCopy};
use super::WitnessError;
use crate::lineage::CopyStamp;

/// Something that grants each domain's lease to one node at a time and keeps the newest
/// copy stamp per domain (see the module documentation for the promises).
#[async_trait]
pub trait LeaseArbiter: Send + Sync + std::fmt::Debug {
    /// Which backend this is, for status and logs: `"witness"` or `"etcd"`.
    fn backend(&self) -> &'static str;

    /// Where it is, for status and logs (an address, or a list of endpoints).
    fn location(&self) -> String;

    /// This node's name.
    fn node(&self) -> &str;

    /// The lease length asked for (the keeper renews every third of it).
    fn ttl(&self) -> Duration;

    /// Acquires the domain's lease in `mode`.
    ///
    /// # Errors
    /// [`WitnessError::Denied`] if another node holds it; anything else when the arbiter
    /// could not be asked or refused.
    async fn acquire_as(&self, domain: &str, mode: &LeaseMode) -> Result<Lease, WitnessError>;

    /// Acquires the domain's lease exclusive, taking it at once from a holder that declared
    /// it preemptible by this node (the backup's fencing, after it stopped acknowledging).
    ///
    /// # Errors
    /// As [`LeaseArbiter::acquire_as`].
    async fn preempt(&self, domain: &str) -> Result<Lease, WitnessError>;

    /// Renews a lease in `mode` (the same generation if still held; a new one if it had
    /// lapsed at the arbiter and was free).
    ///
    /// # Errors
    /// As [`LeaseArbiter::acquire_as`].
    async fn renew_as(&self, lease: &Lease, mode: &LeaseMode) -> Result<Lease, WitnessError>;

    /// Gives the lease up. Returns whether the arbiter still had it as ours.
    ///
    /// # Errors
    /// The arbiter could not be asked or refused.
    async fn release(&self, lease: &Lease) -> Result<bool, WitnessError>;

    /// Who holds the domain's lease, and for how long still.
    ///
    /// # Errors
    /// The arbiter could not be asked or refused.
    async fn query(&self, domain: &str) -> Result<LeaseInfo, WitnessError>;

    /// Records this node's copy stamp for `domain` (the arbiter keeps the newest it was
    /// ever sent) and returns the newest recorded, with the node that recorded it.
    ///
    /// # Errors
    /// The arbiter could not be asked or refused.
    async fn record_copy(
        &self,
        domain: &str,
        copy: CopyStamp,
    ) -> Result<RecordedCopy, WitnessError>;

    /// Acquires the domain's lease exclusive.
    ///
    /// # Errors
    /// As [`LeaseArbiter::acquire_as`].
    async fn acquire(&self, domain: &str) -> Result<Lease, WitnessError> {
        self.acquire_as(domain, &LeaseMode::Exclusive).await
    }

    /// Renews a lease exclusive.
    ///
    /// # Errors
    /// As [`LeaseArbiter::acquire_as`].
    async fn renew(&self, lease: &Lease) -> Result<Lease, WitnessError> {
        self.renew_as(lease, &LeaseMode::Exclusive).await
    }
}
