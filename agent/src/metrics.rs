//! The Prometheus exporter: `GET /metrics` renders the daemon's [`DaemonStatus`].
//!
//! There is no second set of counters: every scrape asks the [`ControlHandler`] for the same
//! snapshot `remusctl status` shows and renders it, so the exporter can never disagree with
//! the CLI. The encoding is `prometheus-client`'s OpenMetrics text encoder driven by a
//! [`Collector`] over the snapshot (const gauges/counters built per scrape); a registry of
//! live metric objects would have to be kept in sync with the snapshot and would duplicate
//! it. Prometheus scrapes OpenMetrics natively.
//!
//! Conventions: every name starts with `remus_`; per-domain series carry a `domain` label;
//! durations are in seconds and sizes in bytes (the snapshot's microseconds are converted);
//! counters end in `_total`; one-hot gauges (role, peer state) have one series per possible
//! value so that a dashboard can `max by (role)` without knowing which exist. A series whose
//! source is absent from the snapshot (no protection loop, no failover yet) is omitted
//! rather than reported as zero, since zero would be a lie (e.g. "pause 0 s").
//! The full list is in `docs/control-and-metrics.md`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::api::{
    ControlHandler, DaemonStatus, DomainStatus, EpochReport, PeerLiveness, Percentiles,
};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scrape waits for the daemon's snapshot before answering 503.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Every role a domain may have, for the one-hot `remus_domain_role`.
const ROLES: [&str; 9] = [
    "stopped",
    "standalone",
    "primary",
    "backup",
    "fencing",
    "fenced",
    "activating",
    "activated",
    "resyncing",
];

/// Every peer state, for the one-hot `remus_peer_liveness`.
const PEER_STATES: [&str; 4] = ["starting", "alive", "suspect", "lost"];

/// Errors of the exporter; each names the address.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The listening socket could not be set up.
    #[error("metrics exporter: bind {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Renders `status` as an OpenMetrics text exposition (ending in `# EOF`).
pub fn render(status: &DaemonStatus) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would mean a value it refuses
    // (a gauge over i64::MAX), which the collector never produces.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        warn!(error = %e, "metrics: encoding failed");
    }
    out
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves.
///
/// # Errors
/// [`MetricsError::Bind`] when the address cannot be listened on.
pub async fn serve_metrics(
    addr: SocketAddr,
    source: Arc<dyn ControlHandler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    MetricsServer::bind(addr).await?.run(source, shutdown).await;
    Ok(())
}

/// A bound exporter, not yet serving (lets a caller learn the port of `:0`).
#[derive(Debug)]
pub struct MetricsServer {
    /// Accepts scrapers.
    listener: TcpListener,
    /// The address actually bound.
    local: SocketAddr,
}

impl MetricsServer {
    /// Binds the exporter's address.
    ///
    /// # Errors
    /// [`MetricsError::Bind`].
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        info!(%local, "metrics exporter: listening");
        Ok(MetricsServer { listener, local })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves scrapes until `shutdown` resolves, then closes every connection.
    pub async fn run(self, source: Arc<dyn ControlHandler>, shutdown: impl Future<Output = ()>) {
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept(), if connections.len() < MAX_CONNECTIONS => {
                    match accepted {
                        Ok((stream, peer)) => {
                            let source = source.clone();
                            connections.spawn(async move {
                                let service = service_fn(move |req| {
                                    let source = source.clone();
                                    async move { Ok::<_, std::convert::Infallible>(respond(req, &source).await) }
                                });
                                let served = http1::Builder::new()
                                    .timer(TokioTimer::new())
                                    .header_read_timeout(HEADER_TIMEOUT)
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                                if let Err(e) = served {
                                    debug!(%peer, error = %e, "metrics exporter: connection ended");
                                }
                            });
                        }
                        Err(e) => {
                            warn!(error = %e, "metrics exporter: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        info!(local = %self.local, "metrics exporter: stopped");
    }
}

/// One HTTP exchange: `/metrics` or 404.
async fn respond(
    req: hyper::Request<Incoming>,
    source: &Arc<dyn ControlHandler>,
) -> hyper::Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "{} not found: the metrics are at /metrics\n",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".to_string(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let status = match tokio::time::timeout(SNAPSHOT_TIMEOUT, source.status()).await {
        Ok(s) => s,
        Err(_) => {
            warn!("metrics exporter: the daemon's snapshot timed out");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("remusd did not produce a status within {SNAPSHOT_TIMEOUT:?}\n"),
            );
        }
    };
    let mut r = hyper::Response::new(Full::new(Bytes::from(render(&status))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
    );
    r
}

/// The collector: one snapshot, encoded once.
#[derive(Debug)]
struct Snapshot(DaemonStatus);

/// A label set: `(name, value)` pairs, values already escaped.
type Labels = Vec<(&'static str, String)>;

/// A sample: its labels and its value.
type Sample<V> = (Labels, V);

/// Escapes a label value for the text format (`\`, `"`, newline).
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Microseconds to seconds.
fn secs_us(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Milliseconds to seconds.
fn secs_ms(ms: u64) -> f64 {
    ms as f64 / 1e3
}

/// Saturating conversion for gauges (the encoder refuses values over `i64::MAX`).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Writes one gauge family.
fn gauges<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: Vec<Sample<V>>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            // A daemon-wide gauge has a single unlabelled sample (no `{}`).
            return ConstGauge::new(value).encode(family);
        }
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter family (`name` without `_total`, which the encoder appends).
fn counters<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: Vec<Sample<N>>,
) -> Result<(), std::fmt::Error>
where
    N: prometheus_client::encoding::EncodeCounterValue + std::fmt::Debug,
{
    let mut family = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            // A daemon-wide counter has a single unlabelled sample (no `{}`).
            return ConstCounter::new(value).encode(family);
        }
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Snapshot {
    /// One sample per domain for which `f` yields a value.
    fn per_domain<V>(&self, f: impl Fn(&DomainStatus) -> Option<V>) -> Vec<Sample<V>> {
        self.0
            .domains
            .iter()
            .filter_map(|d| f(d).map(|v| (vec![("domain", esc(&d.name))], v)))
            .collect()
    }

    /// p50/p99/max series (quantile 0.5/0.99/1) of a summary percentile, for domains whose
    /// window holds at least one epoch.
    fn quantiles(&self, f: impl Fn(&DomainStatus) -> Option<Percentiles>) -> Vec<Sample<f64>> {
        let mut out = Vec::new();
        for d in &self.0.domains {
            let Some(p) = f(d) else { continue };
            for (q, v) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("1", p.max_us)] {
                out.push((
                    vec![("domain", esc(&d.name)), ("quantile", q.to_string())],
                    secs_us(v),
                ));
            }
        }
        out
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut enc;
        let peer = esc(&s.peer);

        // The daemon and its peer.
        {
            let info = Info::new(vec![
                ("node", esc(&s.node)),
                ("peer", peer.clone()),
                ("control_version", s.version.to_string()),
            ]);
            let family = e.encode_descriptor(
                "remus_daemon",
                "This node's name, its peer's and the control protocol version.",
                None,
                MetricType::Info,
            )?;
            info.encode(family)?;
        }
        gauges(
            e,
            "remus_daemon_uptime",
            "Time since the daemon started.",
            Some(Unit::Seconds),
            vec![(vec![], int(s.uptime_s))],
        )?;
        let state = match s.peer_liveness {
            PeerLiveness::Starting => "starting",
            PeerLiveness::Alive { .. } => "alive",
            PeerLiveness::Suspect => "suspect",
            PeerLiveness::Lost { .. } => "lost",
        };
        gauges(
            e,
            "remus_peer_liveness",
            "The heartbeat detector's verdict on the peer (one-hot over state).",
            None,
            PEER_STATES
                .iter()
                .map(|st| {
                    (
                        vec![("peer", peer.clone()), ("state", st.to_string())],
                        i64::from(*st == state),
                    )
                })
                .collect(),
        )?;
        let (links_up, links_total) = match s.peer_liveness {
            PeerLiveness::Alive {
                links_up,
                links_total,
            } => (links_up, Some(links_total)),
            _ => (0, None),
        };
        gauges(
            e,
            "remus_peer_links_up",
            "Heartbeat links on which the peer was heard within the timeout.",
            None,
            vec![(vec![("peer", peer.clone())], links_up as i64)],
        )?;
        gauges(
            e,
            "remus_peer_links",
            "Configured heartbeat links (reported while the peer is alive).",
            None,
            links_total
                .map(|t| vec![(vec![("peer", peer.clone())], t as i64)])
                .unwrap_or_default(),
        )?;
        gauges(
            e,
            "remus_peer_replication_heard_ago",
            "Time since replication traffic from the peer (a checkpoint, an ACK) last counted as proof of life (absent if never).",
            Some(Unit::Seconds),
            s.replication_heard_ms_ago
                .map(|ms| vec![(vec![("peer", peer.clone())], secs_ms(ms))])
                .unwrap_or_default(),
        )?;

        gauges(
            e,
            "remus_peer_longest_silence",
            "The longest silence of the peer (no heartbeat, no replication traffic) that ended without a loss: compare with the heartbeat timeout.",
            Some(Unit::Seconds),
            s.peer_longest_silence_ms
                .map(|ms| vec![(vec![("peer", peer.clone())], secs_ms(ms))])
                .unwrap_or_default(),
        )?;
        gauges(
            e,
            "remus_heartbeat_longest_gap",
            "The longest time between two heartbeats on one link (interval, jitter and losses).",
            Some(Unit::Seconds),
            s.heartbeat_longest_gap_ms
                .map(|ms| vec![(vec![("peer", peer.clone())], secs_ms(ms))])
                .unwrap_or_default(),
        )?;

        // The lease arbiter's requests (renewals are its heartbeat).
        if let Some(a) = &s.arbiter {
            let backend = esc(&a.backend);
            let mut outcomes = Vec::new();
            let mut sums = Vec::new();
            let mut maxes = Vec::new();
            for r in &a.requests {
                let op = || ("op", esc(&r.op));
                for (result, v) in [("ok", r.ok), ("denied", r.denied), ("failed", r.failed)] {
                    outcomes.push((
                        vec![
                            ("backend", backend.clone()),
                            op(),
                            ("result", result.to_string()),
                        ],
                        v,
                    ));
                }
                sums.push((
                    vec![("backend", backend.clone()), op()],
                    secs_us(r.latency_sum_us),
                ));
                maxes.push((
                    vec![("backend", backend.clone()), op()],
                    secs_us(r.latency_max_us),
                ));
            }
            counters(
                e,
                "remus_lease_requests",
                "Requests to the lease arbiter (remus-witness or etcd) by operation and outcome; renew is the lease keepers' renewals.",
                None,
                outcomes,
            )?;
            counters(
                e,
                "remus_lease_request_time",
                "Time spent in requests to the lease arbiter, by operation (divide by remus_lease_requests_total for the mean).",
                Some(Unit::Seconds),
                sums,
            )?;
            gauges(
                e,
                "remus_lease_request_max",
                "The slowest request to the lease arbiter since the daemon started, by operation.",
                Some(Unit::Seconds),
                maxes,
            )?;
        }

        // The doors: what anyone on the network sent and this node refused.
        let d = &s.doors;
        counters(
            e,
            "remus_heartbeat_dropped",
            "Heartbeat datagrams dropped, by reason (logged at a limited rate).",
            None,
            [
                ("bad_tag", d.heartbeat_bad_tag),
                ("malformed", d.heartbeat_malformed),
                ("unknown_node", d.heartbeat_unknown_node),
                ("replayed", d.heartbeat_replayed),
            ]
            .into_iter()
            .map(|(reason, v)| {
                (
                    vec![("peer", peer.clone()), ("reason", reason.to_string())],
                    v,
                )
            })
            .collect(),
        )?;
        counters(
            e,
            "remus_replication_handshakes_refused",
            "Replication connections that failed the handshake or its deadline.",
            None,
            vec![(vec![], d.handshakes_refused)],
        )?;
        counters(
            e,
            "remus_replication_connections_shed",
            "Replication connections closed on accept: unauthenticated ones were at the cap.",
            None,
            vec![(vec![], d.connections_shed)],
        )?;

        // Per domain: role and VM.
        let mut roles = Vec::new();
        for d in &s.domains {
            for r in ROLES {
                roles.push((
                    vec![("domain", esc(&d.name)), ("role", r.to_string())],
                    i64::from(d.role.name() == r),
                ));
            }
        }
        gauges(
            e,
            "remus_domain_role",
            "This node's persisted role for the domain (one-hot over role).",
            None,
            roles,
        )?;
        gauges(
            e,
            "remus_vm_running",
            "Whether this node's QEMU for the domain runs the guest (0 without a QEMU).",
            None,
            self.per_domain(|d| Some(i64::from(d.vm.is_some_and(|v| v.running)))),
        )?;
        gauges(
            e,
            "remus_vm_output_held",
            "Whether the guest's network output is held until the backup acknowledges.",
            None,
            self.per_domain(|d| Some(i64::from(d.vm.is_some_and(|v| v.output_held)))),
        )?;

        // Per domain: counters.
        counters(
            e,
            "remus_checkpoints",
            "Checkpoints acknowledged by the backup (primary) or committed (backup).",
            None,
            self.per_domain(|d| Some(d.counters.checkpoints)),
        )?;
        counters(
            e,
            "remus_checkpoints_refused",
            "Checkpoints refused (backup) or NACKed (primary).",
            None,
            self.per_domain(|d| Some(d.counters.refused)),
        )?;
        counters(
            e,
            "remus_protection_lost",
            "Times the primary lost its backup.",
            None,
            self.per_domain(|d| Some(d.counters.protection_lost)),
        )?;
        counters(
            e,
            "remus_unprotected",
            "Time the guest ran on this node without a backup acknowledging its checkpoints.",
            Some(Unit::Seconds),
            self.per_domain(|d| Some(secs_ms(d.counters.unprotected_ms))),
        )?;
        gauges(
            e,
            "remus_unprotected_now",
            "1 while the guest runs on this node without acknowledged checkpoints.",
            None,
            self.per_domain(|d| {
                Some(i64::from(
                    d.unprotected.last().is_some_and(|w| w.to_ms.is_none()),
                ))
            }),
        )?;
        counters(
            e,
            "remus_failovers",
            "Failovers this node carried out for the domain.",
            None,
            self.per_domain(|d| Some(d.counters.failovers)),
        )?;
        counters(
            e,
            "remus_audit_repaired_pages",
            "Pages the replica audit found missed by the dirty tracker (resent).",
            None,
            self.per_domain(|d| d.protection.as_ref().map(|p| p.audit_repaired_total)),
        )?;

        // Per domain: the epoch loop.
        gauges(
            e,
            "remus_last_acked_epoch",
            "Last checkpoint the backup acknowledged (primary).",
            None,
            self.per_domain(|d| d.protection.as_ref()?.last_acked.map(int)),
        )?;
        gauges(
            e,
            "remus_committed_epoch",
            "Last committed checkpoint of the replica (backup).",
            None,
            self.per_domain(|d| d.committed_epoch.map(int)),
        )?;
        gauges(
            e,
            "remus_checkpoints_in_flight",
            "Checkpoints sent and not yet acknowledged (primary).",
            None,
            self.per_domain(|d| d.protection.as_ref().map(|p| p.in_flight as i64)),
        )?;
        let summary = |d: &DomainStatus| {
            d.protection
                .as_ref()
                .filter(|p| p.summary.epochs > 0)
                .map(|p| p.summary.clone())
        };
        gauges(
            e,
            "remus_epoch_window",
            "Epochs in the window the pause/ack/output quantiles are computed over.",
            None,
            self.per_domain(|d| summary(d).map(|s| int(s.epochs))),
        )?;
        gauges(
            e,
            "remus_epoch_pause",
            "The VM's pause per checkpoint, stop to cont (quantile 1 is the maximum).",
            Some(Unit::Seconds),
            self.quantiles(|d| summary(d).map(|s| s.pause)),
        )?;
        gauges(
            e,
            "remus_epoch_ack_latency",
            "From resuming the VM to the backup's acknowledgement.",
            Some(Unit::Seconds),
            self.quantiles(|d| summary(d).map(|s| s.ack_latency)),
        )?;
        gauges(
            e,
            "remus_epoch_output_commit_delay",
            "How long an epoch's network output was held.",
            Some(Unit::Seconds),
            self.quantiles(|d| summary(d).map(|s| s.output_commit_delay)),
        )?;

        // Per domain: the latest checkpoint's costs.
        let last = |d: &DomainStatus| d.protection.as_ref()?.last.clone();
        gauges(
            e,
            "remus_last_epoch",
            "Epoch number of the latest checkpoint the costs below describe.",
            None,
            self.per_domain(|d| last(d).map(|r| int(r.epoch))),
        )?;
        for (name, help, f) in [
            (
                "remus_last_epoch_pause",
                "Latest checkpoint: the VM's whole pause.",
                (|r| r.pause.as_micros() as u64) as fn(&EpochReport) -> u64,
            ),
            (
                "remus_last_epoch_stop",
                "Latest checkpoint: QMP stop, including draining guest block I/O.",
                |r| r.stop.as_micros() as u64,
            ),
            (
                "remus_last_epoch_capture",
                "Latest checkpoint: finding and copying the dirty pages.",
                |r| r.capture.as_micros() as u64,
            ),
            (
                "remus_last_epoch_disk_barrier",
                "Latest checkpoint: the disk barrier.",
                |r| r.disk_barrier.as_micros() as u64,
            ),
            (
                "remus_last_epoch_device_save",
                "Latest checkpoint: saving the device state.",
                |r| r.device_save.as_micros() as u64,
            ),
            (
                "remus_last_epoch_ack_latency",
                "Latest checkpoint: from resuming the VM to the backup's acknowledgement.",
                |r| r.ack_latency.as_micros() as u64,
            ),
            (
                "remus_last_epoch_output_commit_delay",
                "Latest checkpoint: how long its network output was held.",
                |r| r.output_commit_delay.as_micros() as u64,
            ),
        ] {
            gauges(
                e,
                name,
                help,
                Some(Unit::Seconds),
                self.per_domain(|d| last(d).map(|r| secs_us(f(&r)))),
            )?;
        }
        gauges(
            e,
            "remus_last_epoch_dirty_pages",
            "Latest checkpoint: pages that changed in the epoch.",
            None,
            self.per_domain(|d| last(d).map(|r| int(r.dirty_pages))),
        )?;
        gauges(
            e,
            "remus_last_epoch_page_raw",
            "Latest checkpoint: page bytes before encoding.",
            Some(Unit::Bytes),
            self.per_domain(|d| last(d).map(|r| int(r.page_bytes_raw))),
        )?;
        gauges(
            e,
            "remus_last_epoch_page_encoded",
            "Latest checkpoint: page bytes after encoding (zero, LZ4, XOR+LZ4).",
            Some(Unit::Bytes),
            self.per_domain(|d| last(d).map(|r| int(r.page_bytes_encoded))),
        )?;
        gauges(
            e,
            "remus_last_epoch_device",
            "Latest checkpoint: device-state bytes.",
            Some(Unit::Bytes),
            self.per_domain(|d| last(d).map(|r| int(r.device_bytes))),
        )?;

        // Per domain: the latest failover this node carried out.
        let failover = |d: &DomainStatus| d.failovers.last().cloned();
        gauges(
            e,
            "remus_last_failover_timestamp",
            "When the primary was declared lost in the latest failover (Unix time).",
            Some(Unit::Seconds),
            self.per_domain(|d| failover(d).map(|f| secs_ms(f.declared_at_ms))),
        )?;
        gauges(
            e,
            "remus_last_failover_detection",
            "Latest failover: from the last news of the primary to its declaration as lost.",
            Some(Unit::Seconds),
            self.per_domain(|d| failover(d).map(|f| secs_ms(f.detection_ms))),
        )?;
        gauges(
            e,
            "remus_last_failover_fencing",
            "Latest failover: fencing the old primary.",
            Some(Unit::Seconds),
            self.per_domain(|d| failover(d).map(|f| secs_ms(f.fencing_ms))),
        )?;
        gauges(
            e,
            "remus_last_failover_activation",
            "Latest failover: from fencing done to the VM running.",
            Some(Unit::Seconds),
            self.per_domain(|d| failover(d).map(|f| secs_ms(f.activation_ms))),
        )?;

        // Per domain: disk resynchronisations.
        counters(
            e,
            "remus_resyncs",
            "Disk resynchronisations streamed by this node.",
            None,
            self.per_domain(|d| Some(d.resyncs.len() as u64)),
        )?;
        counters(
            e,
            "remus_resync_copied",
            "Bytes sent as data by disk resynchronisations.",
            Some(Unit::Bytes),
            self.per_domain(|d| Some(d.resyncs.iter().map(|r| r.bytes_copied).sum::<u64>())),
        )?;
        counters(
            e,
            "remus_resync_zero",
            "Bytes found zero and sent as zeroes by disk resynchronisations.",
            Some(Unit::Bytes),
            self.per_domain(|d| Some(d.resyncs.iter().map(|r| r.bytes_zero).sum::<u64>())),
        )?;

        // Per domain: online disk verifies (primary).
        counters(
            e,
            "remus_verify_runs",
            "Online disk verifies finished on this node as primary.",
            None,
            self.per_domain(|d| Some(d.counters.verify_runs)),
        )?;
        counters(
            e,
            "remus_verify_differing_regions",
            "Disk regions those verifies found differing from the backup's replica.",
            None,
            self.per_domain(|d| Some(d.counters.verify_differing_regions)),
        )?;
        gauges(
            e,
            "remus_verify_last_differing_regions",
            "Regions the last finished verify found differing (absent before the first).",
            None,
            self.per_domain(|d| {
                d.verify
                    .as_ref()
                    .and_then(|v| v.last.as_ref())
                    .map(|l| i64::try_from(l.differing).unwrap_or(i64::MAX))
            }),
        )?;

        // Per domain: what an operator must look at.
        gauges(
            e,
            "remus_alarms",
            "Conditions an operator must know about (remusctl status lists them).",
            None,
            self.per_domain(|d| Some(d.alarms.len() as i64)),
        )?;
        gauges(
            e,
            "remus_lease_held",
            "Whether this node holds the witness lease (domains fencing with a witness).",
            None,
            self.per_domain(|d| d.lease.as_ref().map(|l| i64::from(l.starts_with("held")))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let cases = [
            ("web", "web"),
            ("a\"b", "a\\\"b"),
            ("a\\b", "a\\\\b"),
            ("a\nb", "a\\nb"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(esc(raw), escaped, "{raw:?}");
        }
    }
}
