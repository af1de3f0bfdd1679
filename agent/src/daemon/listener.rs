//! The replication listener: accepts the peer's sessions and hands each to its domain.
//!
//! Authentication happens here, before any domain sees a byte: a connection that fails the
//! pre-shared-key handshake, names another node, or asks for a domain this node does not
//! protect is refused and logged with its address. Whether a domain *accepts* an
//! authenticated session (it will not while it runs the VM itself) is its supervisor's
//! decision.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use remus_engine::session::{accept_backup, BackupSession};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn, Instrument};

use super::Shared;

/// Time a connecting peer has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound listener.
pub struct Listener {
    socket: TcpListener,
    shared: Arc<Shared>,
    routes: HashMap<String, mpsc::Sender<BackupSession>>,
}

impl Listener {
    /// Binds the replication address.
    ///
    /// # Errors
    /// The address is in use or not local.
    pub async fn bind(
        addr: SocketAddr,
        shared: Arc<Shared>,
        routes: HashMap<String, mpsc::Sender<BackupSession>>,
    ) -> std::io::Result<Self> {
        let socket = TcpListener::bind(addr).await?;
        Ok(Self {
            socket,
            shared,
            routes,
        })
    }

    /// Accepts sessions until the daemon stops.
    pub async fn serve(self) {
        let mut stop = self.shared.shutdown.clone();
        let domains: Vec<String> = self.routes.keys().cloned().collect();
        let routes = Arc::new(self.routes);
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
            let shared = self.shared.clone();
            let routes = routes.clone();
            let domains = domains.clone();
            let span = tracing::info_span!("replication_session", %from);
            tokio::spawn(
                async move {
                    let cfg = &shared.config;
                    let session = match accept_backup(
                        stream,
                        &shared.psk,
                        &cfg.node.name,
                        &cfg.peer.name,
                        Some(domains),
                        HANDSHAKE_TIMEOUT,
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "refused a replication connection");
                            return;
                        }
                    };
                    let domain = session.header.domain.clone();
                    match routes.get(&domain) {
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
