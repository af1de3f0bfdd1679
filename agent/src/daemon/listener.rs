//! The replication listener: accepts the peer's sessions and hands each to its domain.
//!
//! Authentication happens here, before any domain sees a byte: a connection that fails the
//! pre-shared-key handshake, names another node, or asks for a domain this node does not
//! protect is refused and logged with its address. Whether a domain *accepts* an
//! authenticated session (it will not while it runs the VM itself) is its supervisor's
//! decision.
//!
//! The door is bounded: anyone who can reach the port can open connections, so at most
//! [`MAX_UNAUTHENTICATED`] may be in their handshake at once (more are closed on accept and
//! counted as shed), each has [`HANDSHAKE_TIMEOUT`] to finish, and refusals are counted
//! always but logged at most once per period ([`remus_ha::lograte`]). The real peer opens one
//! connection per domain and finishes its handshake in a few round trips.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remus_engine::session::accept_backup;
use remus_ha::lograte::LogLimit;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn, Instrument};

use super::domains::Domains;
use super::Shared;

/// Time a connecting peer has to complete the handshake: a few round trips even on a slow
/// WAN link, far less than a flood of idle connections would like to hold a slot for.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections allowed in their handshake at once (the peer needs one per domain it
/// protects here, and only briefly).
pub const MAX_UNAUTHENTICATED: usize = 32;

/// What the listener refused, for status and metrics.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    refused: AtomicU64,
    shed: AtomicU64,
    /// Log limits for refusals and sheds.
    quiet: Mutex<(LogLimit, LogLimit)>,
}

impl ListenerCounters {
    /// (handshakes refused, connections shed at the cap).
    pub fn get(&self) -> (u64, u64) {
        (
            self.refused.load(Ordering::Relaxed),
            self.shed.load(Ordering::Relaxed),
        )
    }

    fn refused(&self, from: SocketAddr, error: &dyn std::fmt::Display) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let admit = self.quiet.lock().map(|mut q| q.0.admit(Instant::now()));
        if let Ok(Some(folded)) = admit {
            warn!(%from, %error, total, folded, "refused a replication connection (rate-limited: `folded` more since the last line)");
        }
    }

    fn shed(&self, from: SocketAddr) {
        let total = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
        let admit = self.quiet.lock().map(|mut q| q.1.admit(Instant::now()));
        if let Ok(Some(folded)) = admit {
            warn!(%from, total, folded, cap = MAX_UNAUTHENTICATED, "replication connection closed: too many unauthenticated connections (rate-limited)");
        }
    }
}

/// The bound listener.
pub struct Listener {
    socket: TcpListener,
    shared: Arc<Shared>,
    domains: Domains,
}

impl Listener {
    /// Binds the replication address.
    ///
    /// # Errors
    /// The address is in use or not local.
    pub async fn bind(
        addr: SocketAddr,
        shared: Arc<Shared>,
        domains: Domains,
    ) -> std::io::Result<Self> {
        let socket = TcpListener::bind(addr).await?;
        Ok(Self {
            socket,
            shared,
            domains,
        })
    }

    /// Accepts sessions until the daemon stops.
    pub async fn serve(self) {
        let mut stop = self.shared.shutdown.clone();
        let handshakes = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
        loop {
            let (stream, from) = tokio::select! {
                r = self.socket.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "replication listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            };
            // Over the cap: close at once (dropping the stream), before reading a byte.
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                self.shared.listener.shed(from);
                continue;
            };
            let shared = self.shared.clone();
            // The domains of the moment (a reload may add or remove one).
            let routes = self.domains.clone();
            let domains = routes.names();
            let span = tracing::info_span!("replication_session", %from);
            tokio::spawn(
                async move {
                    let cfg = &shared.config;
                    let session = match accept_backup(
                        stream,
                        &shared.channel_auth(),
                        &cfg.node.name,
                        &cfg.peer.name,
                        Some(domains),
                        HANDSHAKE_TIMEOUT,
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            shared.listener.refused(from, &e);
                            return;
                        }
                    };
                    drop(slot);
                    let domain = session.header.domain.clone();
                    match routes.sessions(&domain) {
                        Some(tx) => {
                            info!(%domain, "replication session authenticated");
                            if tx.send(session).await.is_err() {
                                warn!(%domain, "domain supervisor gone; session dropped");
                            }
                        }
                        None => warn!(%domain, "replication session for an unknown domain"),
                    }
                }
                .instrument(span),
            );
        }
    }
}
