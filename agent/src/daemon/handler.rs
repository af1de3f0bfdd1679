//! Answers `remusctl` and the metrics exporter from the supervisors' snapshots, and
//! advertises this node's per-domain roles in its heartbeats.
//!
//! Status never waits for a supervisor: each publishes its [`DomainStatus`] on a watch
//! channel after every step, so `remusctl status` answers even while a domain is busy
//! activating. Commands are queued to the domain's supervisor, which carries them out
//! between two steps of its own loop (so a command never races a failover decision).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use remus_ha::heartbeat::{Detector, DomainView, PeerLiveness as HbLiveness};

use super::advert::DomainAdvert;
use tokio::sync::oneshot;

use super::domains::Domains;
use super::reload::Reloader;
use super::Shared;
use crate::api::{ControlHandler, DaemonStatus, PeerLiveness, Request, Response, CONTROL_VERSION};

/// The daemon's [`ControlHandler`].
pub struct DaemonHandler {
    shared: Arc<Shared>,
    supervisors: Domains,
    reloader: Arc<Reloader>,
}

impl DaemonHandler {
    /// A handler over the domains' supervisors; `reload` requests go to `reloader`.
    pub fn new(shared: Arc<Shared>, supervisors: Domains, reloader: Arc<Reloader>) -> Self {
        Self {
            shared,
            supervisors,
            reloader,
        }
    }

    fn peer_liveness(&self) -> PeerLiveness {
        match *self.shared.liveness.borrow() {
            HbLiveness::Starting => PeerLiveness::Starting,
            HbLiveness::Alive {
                links_up,
                links_total,
            } => PeerLiveness::Alive {
                links_up,
                links_total,
            },
            HbLiveness::Suspect => PeerLiveness::Suspect,
            HbLiveness::Lost { detected_after, .. } => PeerLiveness::Lost {
                detected_after_ms: detected_after.as_millis() as u64,
            },
        }
    }
}

impl DaemonHandler {
    /// The doors' counters: heartbeat drops summed over the links, and the listener's.
    fn doors(&self) -> crate::api::Doors {
        let mut d = crate::api::Doors::default();
        for l in &self.shared.heartbeat_stats.get().links {
            d.heartbeat_bad_tag += l.dropped_bad_tag;
            d.heartbeat_malformed += l.dropped_malformed;
            d.heartbeat_unknown_node += l.dropped_unknown_node;
            d.heartbeat_replayed += l.dropped_replay;
        }
        let (refused, shed) = self.shared.listener.get();
        d.handshakes_refused = refused;
        d.connections_shed = shed;
        d
    }
}

#[async_trait]
impl ControlHandler for DaemonHandler {
    async fn status(&self) -> DaemonStatus {
        let hb = self.shared.heartbeat_stats.get();
        DaemonStatus {
            version: CONTROL_VERSION,
            node: self.shared.config.node.name.clone(),
            peer: self.shared.config.peer.name.clone(),
            peer_liveness: self.peer_liveness(),
            replication_heard_ms_ago: self
                .shared
                .traffic
                .last_seen()
                .map(|t| t.elapsed().as_millis() as u64),
            peer_longest_silence_ms: Some(hb.longest_silence.as_millis() as u64)
                .filter(|&ms| ms > 0),
            heartbeat_longest_gap_ms: hb
                .links
                .iter()
                .map(|l| l.longest_gap.as_millis() as u64)
                .max()
                .filter(|&ms| ms > 0),
            uptime_s: self.shared.started.elapsed().as_secs(),
            domains: self
                .supervisors
                .handles()
                .iter()
                .map(|s| s.status.borrow().clone())
                .collect(),
            doors: self.doors(),
            arbiter: self
                .shared
                .witness
                .as_ref()
                .map(|w| crate::api::ArbiterStatus {
                    backend: w.backend().to_string(),
                    location: w.location(),
                    lease_ms: w.ttl().as_millis() as u64,
                    requests: self
                        .shared
                        .arbiter_stats
                        .as_ref()
                        .map(|m| m.snapshot())
                        .unwrap_or_default(),
                }),
        }
    }

    async fn command(&self, request: Request) -> Response {
        let domain = match &request {
            Request::Status => {
                return Response::Error {
                    message: "status is not a command".into(),
                }
            }
            Request::Reload => {
                return match self.reloader.reload().await {
                    Ok(message) => Response::Done { message },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Start { domain, .. }
            | Request::Switchover { domain }
            | Request::Failover { domain }
            | Request::TestActivate { domain }
            | Request::DomainConfig { domain }
            | Request::Verify { domain, .. } => domain.clone(),
        };
        let Some(s) = self.supervisors.get(&domain) else {
            return Response::Error {
                message: format!(
                    "no domain {domain:?} on node {} (configured: {})",
                    self.shared.config.node.name,
                    self.supervisors.names().join(", ")
                ),
            };
        };
        let (tx, rx) = oneshot::channel();
        if s.commands.send((request, tx)).await.is_err() {
            return Response::Error {
                message: format!("domain {domain}: its supervisor has stopped"),
            };
        }
        rx.await.unwrap_or_else(|_| Response::Error {
            message: format!("domain {domain}: the command was abandoned"),
        })
    }
}

/// Publishes the domains' roles in this node's heartbeats until the daemon stops.
pub async fn advertise(handler: Arc<DaemonHandler>, detector: Detector) {
    let mut stop = handler.shared.shutdown.clone();
    let period = handler
        .shared
        .config
        .heartbeat
        .interval
        .max(Duration::from_millis(20));
    loop {
        let view: Vec<DomainView> = handler
            .supervisors
            .handles()
            .iter()
            .map(|s| {
                let st = s.status.borrow();
                let epoch = st
                    .protection
                    .as_ref()
                    .and_then(|p| p.last_acked)
                    .or(st.committed_epoch)
                    .unwrap_or(0);
                DomainView {
                    domain: st.name.clone(),
                    payload: DomainAdvert::new(&st.role, epoch, st.copy).encode(),
                }
            })
            .collect();
        if let Err(e) = detector.set_view(view) {
            tracing::warn!(error = %e, "cannot advertise the domains in heartbeats");
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    detector.shutdown().await;
}
