//! High availability for remus-agent: everything that decides *whether this node may run a
//! protected VM*.
//!
//! - [`heartbeat`]: authenticated UDP heartbeats on every link and the failure detector
//!   (the peer is lost only when every link, and the replication traffic, is silent);
//! - [`witness`]: the lease arbiter on a third host (`remus-witness`) and its client, whose
//!   view of a lease always ends before the witness's;
//! - [`fence`]: proving the peer gone (a command, the lease, or — unsafely — nothing);
//! - [`role`]: the per-domain role state machine, persisted before anyone acts on it;
//! - [`lineage`]: which node holds the newest copy of a domain's data (advertised in the
//!   heartbeats, so an operator's start never boots the older copy);
//! - [`lograte`]: counted, rate-limited logging of what anyone on the network can cause;
//! - [`decide`]: the pure rule table the daemon consults to turn all of the above into an
//!   action on the VM;
//! - [`migration`]: a staged live migration's phases, their persisted record, its cookie
//!   negotiation, and the pure rule that says which side runs the VM when it cannot go on.
//!
//! The crate knows nothing of QEMU or the checkpoint engine: the daemon wires them together,
//! roughly like this:
//!
//! 1. At start, per domain, [`role::RoleStore::open`]; a role of `Activated` with no VM
//!    means the guest may have run from the checkpoint: apply `Stop`, never re-activate.
//! 2. One [`heartbeat::Detector`] per peer (shared by the domains of the pair); its
//!    [`heartbeat::TrafficProbe`] goes to the replication connection's reader, and
//!    [`heartbeat::Detector::set_view`] is updated when a role or epoch changes.
//! 3. With the witness policy, one shared [`witness::WitnessClient`]; a
//!    [`witness::LeaseKeeper`] per domain while the VM runs here.
//! 4. Whenever liveness, lease, ACK flow or fencing progress changes: build a
//!    [`decide::Situation`], call [`decide::decide`], apply the matching [`role::Event`]
//!    (persisted) and only then act (stop the VM, release output, run the [`fence::Fencer`],
//!    activate: `ActivationStarted`, load, `Resuming`, `cont`, `ActivationDone`).
//!
//! Side effects sit behind small types (sockets, processes, files) that the tests drive for
//! real on loopback and in temporary directories.

pub mod auth;
pub mod decide;
pub mod fence;
pub mod heartbeat;
pub mod lineage;
pub mod lograte;
pub mod migration;
pub mod persist;
pub mod role;
pub mod witness;

pub use auth::{HaKey, PeerKeys};
