//! One protected domain on this host: its files, its QEMU, and the wiring of the checkpoint
//! engine to the real VM, network buffer and disks.
//!
//! - [`paths`]: where every file of a domain lives;
//! - [`adapters`]: the engine's ports implemented by `remus-qemu`, `sch-plug`, `blk-remus`;
//! - [`primary`]: start the VM with its NICs buffered and disks served over NBD, then protect
//!   it (pre-copy, checkpoints) against a backup;
//! - [`backup`]: receive a domain's checkpoints into a replica, and activate the replica;
//! - [`disk_copy`]: which of a node's two files of each disk (image or replica) holds its
//!   newest data, so that a cold start boots that one;
//! - [`template`]: the domain's stored configuration (what this node launched, and the steps
//!   of device changes), merged with QEMU's live devices for `remusctl domain config`.
//!
//! The primary and the activated backup must start QEMU with the same devices (the device
//! state of one must load into the other): [`spec::qemu_spec`] builds both from the policy.

pub mod adapters;
pub mod backup;
pub mod disk_copy;
pub mod paths;
pub mod primary;
pub mod spec;
pub mod template;

pub use paths::DomainPaths;
