//! Failover drills: protect a real test guest, fail its primary at a random point of the
//! epoch cycle, let the backup take over, and check that nothing committed was lost and
//! nothing uncommitted survived, from what the guest, its disk and a network client show.
//!
//! This is test tooling, kept out of the product: `remus-agent` (remusd, remusctl) does not
//! depend on this crate nor on the test guest (`remus-guest`), whose disk-log codec the
//! drill uses to read the guest's records.
//!
//! - [`pair`]: the pair drill (the default of `remus-drill`): two real `remusd` daemons in
//!   two network namespaces and a `remus-witness`, driven only through their control
//!   sockets ([`remus_agent::control::ControlClient`]) and by killing processes;
//! - [`local`]: the one-process drill (`remus-drill --local`): two daemons' supervisors
//!   ([`inproc`]) and a witness in this process, reached through their control sockets;
//!   no binaries to find, and it reports the checkpoint path's figures beside the scan floor;
//! - [`client`], [`net`], [`guest`]: the network client through the failover, the hosts'
//!   namespaces, and reading the guest's console and disk log;
//! - [`image`]: where the guest image is, and building it for the tests;
//! - [`cli`]: the `remus-drill` command line.

pub mod cli;
pub mod client;
pub mod guest;
pub mod image;
pub mod impair;
pub mod inproc;
pub mod local;
pub mod net;
pub mod pair;

pub use local::{run_local, DrillOptions, DrillReport};
