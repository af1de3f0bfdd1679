//! Network egress buffering for output commit.
//!
//! A protected VM's packets must not reach the world before the checkpoint that produced
//! them is safe on the backup. This crate holds them per epoch behind one interface,
//! [`EgressBuffer`], with two backends:
//! - [`plug::PlugBuffer`]: the kernel's plug qdisc on an IFB fed from the guest's tap
//!   (production default; needs sch_plug, ifb, act_mirred, cls_u32, sch_ingress);
//! - [`relay::RelayBuffer`]: the agent relays QEMU's `-netdev stream` socket to a tap it owns
//!   and holds frames in memory (for kernels without sch_plug).
//!
//! [`backend`] picks one per domain; [`ctl`] holds the plain functions behind
//! `remusctl netbuf …`. `testkit` (feature `testkit`) is real-kernel scaffolding for the
//! tests, benchmarks and the kernel-harness program, not part of the product.

pub mod backend;
pub mod buffer;
pub mod ctl;
pub mod epoch;
pub mod netns;
pub mod plug;
pub mod relay;
// Test tooling, behind the `testkit` feature so the product build does not compile it.
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::{open, probe_plug, resolve, Backend, EgressConfig, OpenedBuffer, RelayOptions};
pub use buffer::{BackendKind, EgressBuffer, EgressError};
pub use epoch::{EgressStats, EgressTotals, Epoch, EpochCounters, EpochError, EpochStats, Mode};
pub use netns::Netns;
