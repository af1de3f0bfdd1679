//! The witness: a tiny arbiter on a third host that grants a per-domain lease to one node
//! at a time, and its client.
//!
//! A node that holds a domain's lease may run that domain's VM; a node that does not hold it
//! and cannot prove its peer gone otherwise must not. Fencing by lease works because the
//! witness grants a lease only when it is free, expired, or already held by the requester —
//! or, since wire version 3, when its holder declared it *preemptible by* the requester.
//!
//! # Takeover
//! A protecting primary releases output only on its backup's acknowledgements, so it holds
//! its lease preemptible by that backup ([`LeaseMode::PreemptibleBy`]); the backup, once it
//! has stopped acknowledging, takes the lease at once ([`WitnessClient::preempt`]) instead of
//! waiting for it to run out. A preemptible lease lets its holder run the VM but never
//! release output alone: before that, the holder renews it exclusive, and the witness
//! serialises that renewal and the takeover. The argument is in `docs/design.md`
//! ("Takeover without waiting out the lease").
//!
//! # Why the holder's view of a lease expires first
//! The witness starts a lease's TTL when it *receives* the request; the client starts it when
//! it *sent* the request that was answered, and subtracts a drift margin
//! ([`DRIFT_DIVISOR`]: 1 % of the TTL). Since a request is received after it is sent, the
//! holder's expiry precedes the witness's by at least the one-way latency plus the margin, as
//! long as the two clocks' *rates* differ by less than 1 % (real oscillators differ by
//! < 0.01 %; no clock synchronisation is assumed, only monotonic clocks). So when the witness
//! hands the lease to the other node, the old holder has already considered it lost for a
//! while, and [`crate::decide`] stopped its VM.
//!
//! # Why a witness restart does not grant a lease twice
//! Every grant, renewal and release is written to the state file (fsync + rename) *before*
//! the answer leaves. On start, the witness treats every lease in the file as held by its
//! holder for a full TTL from the restart: the holder may have renewed just before the crash,
//! and its view ends at most one TTL after that renewal, which is before the restart's TTL.
//!
//! # Authentication and replay
//! Requests and responses carry an HMAC-SHA256 tag ([`crate::auth`]). Each request has a
//! nonce from a clock-based increasing counter; the witness drops a request whose nonce is
//! not above the last one it accepted from that node for that domain (persisted with every
//! change, so a restart does not forget it). Responses echo the nonce, node and domain and
//! are tagged, so an old "granted" cannot be replayed to a client. Each grant has a
//! generation; a release names the generation it gives up, so a delayed release cannot free a
//! lease its sender acquired again since.
//!
//! # The newest copy of each domain
//! The witness also keeps, per domain, the newest copy stamp ([`crate::lineage`]) any node
//! recorded (op `record`), with that node's name, durable like the leases. Nodes record a
//! stamp whenever they start or activate a VM, and ask before an operator's start: a node
//! learns that its copy is older even when the node holding the newer one is down for good.

mod arbiter;
mod client;
mod proto;
mod server;

pub use arbiter::LeaseArbiter;
pub use client::{
    Lease, LeaseInfo, LeaseKeeper, LeaseMode, LeaseState, RecordedCopy, WitnessClient,
    WitnessClientConfig,
};
pub use proto::{
    flags, reason, Op, ProtoError, Request, Response, Status, MAX_NAME, VERSION_2, VERSION_3,
};
pub use server::{
    Handled, LeaseTable, WitnessKeys, WitnessServer, WitnessServerConfig, WitnessStats,
};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `remus-witness`'s command line (here, not in its `main`, so the man page is generated
/// from it).
#[derive(Debug, clap::Parser)]
#[command(
    name = "remus-witness",
    version,
    about = "The lease arbiter of remus-agent pairs, run on a third host: grants each domain's lease to one node at a time (UDP, HMAC-authenticated) and persists every grant before answering."
)]
pub struct WitnessArgs {
    /// UDP address to serve on, e.g. 0.0.0.0:7790.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The pairs' pre-shared key file (the agents' `[auth] key_file` in pre-shared key
    /// mode, at least 32 bytes, readable by its owner only). Nodes pinned with --node never
    /// use it.
    #[arg(long, required_unless_present = "private_key_file")]
    pub key_file: Option<PathBuf>,
    /// The witness's own private key (per-node keys: written by `remusctl keygen --out`,
    /// owner-only); its public half goes in each node's `[witness] public_key`.
    #[arg(long, requires = "node")]
    pub private_key_file: Option<PathBuf>,
    /// A node's pinned public key, as NAME=PUBLIC_KEY (repeat per node; twice for one name
    /// during that node's key rotation). A pinned node is accepted under its key only.
    #[arg(long, value_name = "NAME=PUBLIC_KEY", requires = "private_key_file")]
    pub node: Vec<String>,
    /// Where the lease table is persisted (fsync + rename before every answer).
    #[arg(long)]
    pub state_file: PathBuf,
}

use thiserror::Error;

/// Default lease length.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);
/// Shortest lease the witness grants.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// Longest lease the witness grants.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// The client's drift margin is `ttl / DRIFT_DIVISOR`.
pub const DRIFT_DIVISOR: u32 = 100;

/// Errors of the witness server and client; each names the witness and the domain.
#[derive(Debug, Error)]
pub enum WitnessError {
    /// A socket operation failed.
    #[error("witness {addr}: {op}: {source}")]
    Io {
        addr: SocketAddr,
        op: &'static str,
        source: std::io::Error,
    },
    /// No authentic answer within the retries.
    #[error("witness {addr}: domain {domain}: no answer to {op} after {attempts} attempts")]
    Unreachable {
        addr: SocketAddr,
        domain: String,
        op: &'static str,
        attempts: u32,
    },
    /// Another node holds the lease.
    #[error("{at}: domain {domain}: lease held by {holder} for {remaining:?} more")]
    Denied {
        /// The arbiter that said so (`witness 192.0.2.3:7790`, `etcd …`).
        at: String,
        domain: String,
        holder: String,
        remaining: Duration,
    },
    /// The witness refused the request (bad TTL, cannot persist).
    #[error("witness {addr}: domain {domain}: {op} refused: {reason}")]
    Refused {
        addr: SocketAddr,
        domain: String,
        op: &'static str,
        reason: &'static str,
    },
    /// A name does not fit the protocol.
    #[error("witness: {what} {name:?} is empty or longer than {MAX_NAME} bytes")]
    BadName { what: &'static str, name: String },
    /// Another arbiter backend failed (its own typed error, naming its endpoint, key and
    /// operation).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The state file is unusable.
    #[error("witness state file {path}: {op}: {reason}")]
    State {
        path: PathBuf,
        op: &'static str,
        reason: String,
    },
}
