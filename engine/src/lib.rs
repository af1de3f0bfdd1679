//! The checkpoint engine: the primary's epoch loop, the backup's receiver, and the
//! authenticated channel between them.
//!
//! The engine owns the one invariant the product exists for: the backup acknowledges epoch
//! k only when it holds all of checkpoint k (pages, device state) and every disk write
//! tagged ≤ k durably, and the primary releases epoch k's network output only after that
//! acknowledgement. Side effects (the VM, the network buffer, the disk) sit behind the
//! traits in [`ports`], so the logic is testable; the daemon plugs in the real QEMU driver
//! and `sch-plug`. The disk path ([`disk`]) is the engine's own: it drives `blk-remus`
//! directly, because a disk write and a checkpoint share one stream and one barrier.

pub mod backup;
pub mod copies;
pub mod disk;
pub mod metrics;
pub mod peer;
pub mod ports;
pub mod precopy;
pub mod primary;
pub mod replica;
pub mod session;
pub mod verify;
pub mod wire;
