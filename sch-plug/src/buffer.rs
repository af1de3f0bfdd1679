//! The interface the checkpoint engine drives: [`EgressBuffer`].
//!
//! The engine holds a `Box<dyn EgressBuffer>` per domain and calls, once per epoch,
//! `buffer(k)` when it closes epoch `k` and `release(k)` when the backup acknowledged
//! checkpoint `k`. Both backends enforce the order through [`crate::epoch::EpochLedger`].
//!
//! # Pipelining
//! [`EgressBuffer::max_closed_epochs`] says how many epochs may be closed and unreleased at
//! once. The plug qdisc answers 1: after `buffer(k)` the engine must wait for ACK(k) and
//! `release(k)` before `buffer(k + 1)`; calling `buffer(k + 1)` early is refused with
//! [`crate::epoch::EpochError::TooManyClosed`] and nothing is sent to the kernel (the plug
//! would silently merge epoch k into k + 1, releasing k + 1's packets with k's ACK). With
//! the relay backend the engine may close up to `max_closed_epochs()` epochs ahead of the
//! acknowledgements, i.e. keep that many checkpoints in flight.

use async_trait::async_trait;
use thiserror::Error;

use crate::epoch::{EgressStats, Epoch, EpochError, EpochStats};
use crate::plug::PlugError;
use crate::relay::RelayError;

/// Which mechanism holds the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The kernel's plug qdisc on an IFB fed from the tap's ingress.
    Plug,
    /// The agent relays QEMU's stream netdev to a tap and holds frames in memory.
    Relay,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Plug => "plug",
            BackendKind::Relay => "relay",
        })
    }
}

/// Any failure of an egress buffer operation.
#[derive(Debug, Error)]
pub enum EgressError {
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error(transparent)]
    Plug(#[from] PlugError),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Holds a domain's network output per epoch until it may be released (output commit).
#[async_trait]
pub trait EgressBuffer: Send {
    /// The backend behind this buffer.
    fn kind(&self) -> BackendKind;

    /// How many closed, unreleased epochs this buffer keeps apart (plug: 1).
    fn max_closed_epochs(&self) -> usize;

    /// Closes epoch `epoch`: packets from now on belong to `epoch + 1`.
    async fn buffer(&mut self, epoch: Epoch) -> Result<(), EgressError>;

    /// Releases exactly the packets of closed epoch `epoch`, which must be the oldest closed
    /// one; returns what it held.
    async fn release(&mut self, epoch: Epoch) -> Result<EpochStats, EgressError>;

    /// Stops holding: everything held goes out and later packets pass straight through
    /// until the next `buffer`.
    async fn release_indefinite(&mut self) -> Result<(), EgressError>;

    /// Sets the most bytes held at once; packets beyond it are dropped and counted.
    async fn set_limit(&mut self, bytes: u64) -> Result<(), EgressError>;

    /// A snapshot of the epochs and counters.
    async fn stats(&mut self) -> Result<EgressStats, EgressError>;

    /// Removes what setup installed. Packets still held are dropped (they are uncommitted
    /// output: call `release_indefinite` first to let them go).
    async fn teardown(&mut self) -> Result<(), EgressError>;
}
