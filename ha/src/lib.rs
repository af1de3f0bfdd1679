//! High availability for remus-agent: everything that decides *whether this node may run a
//! protected VM*.
//!
//! - [`heartbeat`]: authenticated UDP heartbeats on every link and the failure detector
//!   (the peer is lost only when every link, and the replication traffic, is silent);
//! - [`witness`]: the lease arbiter on a third host (`remus-witness`) and its client, whose
//!   view of a lease always ends before the witness's;
//! - [`fence`]: proving the peer gone (a command, the lease, or — unsafely — nothing);
//! - [`role`]: the per-domain role state machine, persisted before anyone acts on it;
//! - [`decide`]: the pure rule table the daemon consults to turn all of the above into an
//!   action on the VM.
//!
//! The crate knows nothing of QEMU or the checkpoint engine: the daemon wires them together.
//! Side effects sit behind small types (sockets, processes, files) that the tests drive for
//! real on loopback and in temporary directories.

pub mod auth;
pub mod decide;
pub mod fence;
pub mod heartbeat;
pub mod persist;
pub mod role;
pub mod witness;

pub use auth::HaKey;
