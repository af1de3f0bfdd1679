//! Heartbeats and the failure detector.
//!
//! Each node sends an authenticated UDP datagram on every configured link every `interval`
//! and listens on the same sockets for its peer's. The detector declares the peer
//! [`PeerLiveness::Lost`] when *every* link — and the replication traffic, if the engine
//! reports it through a [`TrafficProbe`] — has been silent for `timeout`.
//!
//! # Why the peer is lost only when every link is silent
//! A silent link proves only that the link (a NIC, a cable, a switch) is broken; the peer may
//! be running its VM and releasing output. Declaring it lost then would start fencing or
//! activation against a live primary, the split brain the whole design avoids. The peer is
//! presumed dead only when no path at all brings news of it; several independent links make
//! that conclusion reliable, one link makes it a guess (which is why fencing or the witness
//! still has to prove it before anything is activated). For the same reason a flood of
//! checkpoint data counts as proof of life: a busy replication link may delay heartbeats
//! that share it, while the data itself shows the peer is running.
//!
//! # Datagram (version 2, fixed layout, big-endian)
//! ```text
//!   0 magic "RMHB" | 4 version u8 = 2 | 5 node_len u8 | 6 domain_count u8 | 7 flags u8 = 0
//!   8 seq u64            strictly increasing per sender, ≥ its wall clock in µs (replays)
//!  16 uptime_us u64      sender's monotonic time since its detector started (restarts)
//!  24 node name
//!     per domain: name_len u8 | name | payload [18]   (opaque to the detector)
//!     tag[32]            HMAC-SHA256 over everything before it
//! ```
//! A datagram with a bad tag, from another node than the configured peer (including our own
//! datagrams reflected back), malformed, or whose sequence number is not above the last one
//! accepted on that link, is dropped and counted per link.
//!
//! # What the detector does not know
//! Roles, epochs and copy stamps are the daemon's business: each domain's entry carries a
//! fixed-size payload the detector passes through untouched ([`DomainView::payload`]). Its
//! layout belongs to the daemon (`remus-agent`'s `daemon::advert`) and is versioned with
//! the datagram: version 2 carries exactly [`DOMAIN_PAYLOAD_LEN`] bytes per domain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::auth::{HaKey, PeerKeys, SequenceSource, TAG_LEN};

/// Default time between heartbeats on each link.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Default silence after which the peer is lost.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest node or domain name in a heartbeat.
pub const MAX_NAME: usize = 64;
/// Most domains one heartbeat describes (keeps a datagram under 1400 bytes).
pub const MAX_DOMAINS: usize = 16;

const MAGIC: &[u8; 4] = b"RMHB";
/// 2 added the copy stamp per domain.
const VERSION: u8 = 2;
const HEADER: usize = 24;
/// Bytes of each domain's payload in a version-2 datagram.
pub const DOMAIN_PAYLOAD_LEN: usize = 18;
const MAX_DATAGRAM: usize =
    HEADER + MAX_NAME + MAX_DOMAINS * (1 + MAX_NAME + DOMAIN_PAYLOAD_LEN) + TAG_LEN;

/// Errors of the heartbeat detector; each names the link or the setting.
#[derive(Debug, Error)]
pub enum HeartbeatError {
    /// The configuration cannot work.
    #[error("heartbeat: {0}")]
    BadConfig(String),
    /// A link's socket could not be set up.
    #[error("heartbeat link {local} -> {remote}: {op}: {source}")]
    Io {
        local: SocketAddr,
        remote: SocketAddr,
        op: &'static str,
        source: std::io::Error,
    },
}

/// Why a datagram was dropped.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Authentication failed (wrong key, tampering, not a heartbeat).
    #[error("bad tag")]
    BadTag,
    /// Authentic but not a well-formed version-1 heartbeat.
    #[error("malformed")]
    Malformed,
}

/// One domain as the sender sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainView {
    /// The domain.
    pub domain: String,
    /// What the sender says of it, in the daemon's layout (opaque here).
    pub payload: [u8; DOMAIN_PAYLOAD_LEN],
}

/// A decoded, authenticated heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The sender.
    pub node: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its detector's uptime.
    pub uptime_us: u64,
    /// Its view of its domains.
    pub domains: Vec<DomainView>,
}

impl Beat {
    /// Encodes and tags the heartbeat. Names longer than [`MAX_NAME`] and domains beyond
    /// [`MAX_DOMAINS`] are the caller's error ([`Detector::set_view`] checks them).
    pub fn encode(&self, key: &HaKey) -> Vec<u8> {
        let mut b = self.encode_body();
        key.seal(&mut b);
        b
    }

    /// The datagram without its tag.
    fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_DATAGRAM);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(u8::try_from(self.node.len()).unwrap_or(0));
        b.push(u8::try_from(self.domains.len()).unwrap_or(0));
        b.push(0);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.uptime_us.to_be_bytes());
        b.extend_from_slice(self.node.as_bytes());
        for d in &self.domains {
            b.push(u8::try_from(d.domain.len()).unwrap_or(0));
            b.extend_from_slice(d.domain.as_bytes());
            b.extend_from_slice(&d.payload);
        }
        b
    }

    /// Authenticates and decodes a heartbeat.
    ///
    /// # Errors
    /// [`DecodeError::BadTag`] before anything is parsed; [`DecodeError::Malformed`].
    pub fn decode(key: &HaKey, datagram: &[u8]) -> Result<Self, DecodeError> {
        let b = key.open(datagram).ok_or(DecodeError::BadTag)?;
        Self::parse(b)
    }

    /// Authenticates under any of `keys` and decodes; also returns which pinned peer key it
    /// verified under.
    ///
    /// # Errors
    /// As [`Beat::decode`].
    pub fn decode_with(keys: &PeerKeys, datagram: &[u8]) -> Result<(Self, usize), DecodeError> {
        let (b, pin) = keys.open(datagram).ok_or(DecodeError::BadTag)?;
        Self::parse(b).map(|beat| (beat, pin))
    }

    fn parse(b: &[u8]) -> Result<Self, DecodeError> {
        let bad = DecodeError::Malformed;
        if b.len() < HEADER || &b[0..4] != MAGIC || b[4] != VERSION || b[7] != 0 {
            return Err(bad);
        }
        let count = usize::from(b[6]);
        if count > MAX_DOMAINS {
            return Err(bad);
        }
        let mut at = HEADER;
        let mut take = |n: usize| -> Result<&[u8], DecodeError> {
            let s = b.get(at..at.checked_add(n).ok_or(bad)?).ok_or(bad)?;
            at += n;
            Ok(s)
        };
        let text = |s: &[u8]| String::from_utf8(s.to_vec()).map_err(|_| bad);
        let node = text(take(usize::from(b[5]))?)?;
        let mut domains = Vec::with_capacity(count);
        for _ in 0..count {
            let len = usize::from(take(1)?[0]);
            let domain = text(take(len)?)?;
            let payload = take(DOMAIN_PAYLOAD_LEN)?.try_into().map_err(|_| bad)?;
            domains.push(DomainView { domain, payload });
        }
        if at != b.len() || node.is_empty() {
            return Err(bad);
        }
        Ok(Self {
            node,
            seq: u64::from_be_bytes(b[8..16].try_into().map_err(|_| bad)?),
            uptime_us: u64::from_be_bytes(b[16..24].try_into().map_err(|_| bad)?),
            domains,
        })
    }
}

/// One heartbeat path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// Address the link's socket binds to.
    pub local: SocketAddr,
    /// The peer's address on this link.
    pub remote: SocketAddr,
}

/// How to run the detector.
#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    /// This node's name (sent in every heartbeat).
    pub node: String,
    /// The only node whose heartbeats are accepted.
    pub peer: String,
    /// The links; the peer is lost only when all are silent.
    pub links: Vec<Link>,
    /// Time between heartbeats per link.
    pub interval: Duration,
    /// Silence on every link after which the peer is lost (more than 2 × interval).
    pub timeout: Duration,
    /// The MAC keys ([`PeerKeys::shared`] with a pre-shared key).
    pub keys: PeerKeys,
}

impl HeartbeatConfig {
    /// A configuration with the default interval (100 ms) and timeout (500 ms).
    pub fn new(
        node: impl Into<String>,
        peer: impl Into<String>,
        links: Vec<Link>,
        keys: PeerKeys,
    ) -> Self {
        Self {
            node: node.into(),
            peer: peer.into(),
            links,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            keys,
        }
    }

    fn validate(&self) -> Result<(), HeartbeatError> {
        let bad = |m: String| Err(HeartbeatError::BadConfig(m));
        for (what, n) in [("node", &self.node), ("peer", &self.peer)] {
            if n.is_empty() || n.len() > MAX_NAME {
                return bad(format!(
                    "{what} name {n:?} is empty or longer than {MAX_NAME} bytes"
                ));
            }
        }
        if self.node == self.peer {
            return bad(format!("node and peer are both named {:?}", self.node));
        }
        if self.links.is_empty() {
            return bad("no links".into());
        }
        if self.interval.is_zero() || self.timeout <= self.interval * 2 {
            return bad(format!(
                "timeout {:?} must exceed twice the interval {:?}",
                self.timeout, self.interval
            ));
        }
        Ok(())
    }
}

/// The detector's verdict on the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerLiveness {
    /// Nothing heard yet, and the timeout has not passed since the detector started.
    Starting,
    /// Heard within the timeout.
    Alive {
        /// Links heard within the timeout.
        links_up: usize,
        /// Configured links.
        links_total: usize,
    },
    /// Silent on every link for more than two intervals, not yet for the timeout.
    Suspect,
    /// Silent on every link (and replication) for the timeout.
    Lost {
        /// Last news of the peer (or the detector's start if there never was any).
        since: Instant,
        /// When the loss was declared.
        declared_at: Instant,
        /// `declared_at - since`: the detection time.
        detected_after: Duration,
    },
}

impl PeerLiveness {
    /// Whether the peer is lost.
    pub fn is_lost(&self) -> bool {
        matches!(self, PeerLiveness::Lost { .. })
    }
}

/// Per-link counters and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStats {
    /// The link (`local` as actually bound, so port 0 shows the chosen port).
    pub link: Link,
    /// Heard within the timeout.
    pub up: bool,
    /// Last authentic heartbeat.
    pub last_heard: Option<Instant>,
    /// Heartbeats sent.
    pub sent: u64,
    /// Sends that failed (unreachable network, …).
    pub send_errors: u64,
    /// Heartbeats accepted.
    pub received: u64,
    /// Dropped: bad tag (wrong key, tampered).
    pub dropped_bad_tag: u64,
    /// Dropped: authentic but from another node than the peer.
    pub dropped_unknown_node: u64,
    /// Dropped: sequence number not above the last accepted on this link.
    pub dropped_replay: u64,
    /// Dropped: authentic but malformed.
    pub dropped_malformed: u64,
    /// Times the link went down.
    pub went_down: u64,
    /// Heartbeats presumed lost in transit: gaps between accepted heartbeats longer than
    /// the interval, counted in intervals (an estimate: the sender's pace jitters).
    pub missed_estimate: u64,
    /// The longest time between two accepted heartbeats on this link: the interval plus
    /// the worst jitter and losses seen (while the peer was alive or not).
    pub longest_gap: Duration,
}

/// A snapshot of the detector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectorStats {
    /// Per link, in configuration order.
    pub links: Vec<LinkStats>,
    /// Last replication traffic reported through the probe.
    pub replication_last_seen: Option<Instant>,
    /// Times the peer was declared lost.
    pub losses: u64,
    /// Times it was heard again after being lost.
    pub recoveries: u64,
    /// Detection time of the last loss.
    pub last_detection: Option<Duration>,
    /// Times the peer's uptime went backwards (it restarted).
    pub peer_restarts: u64,
    /// The longest silence of the peer (no heartbeat on any link, no replication traffic)
    /// that ended without the peer being declared lost: how close the detector came to a
    /// false loss, to compare with the timeout. An upper bound: replication traffic is seen
    /// when the detector evaluates (at least every heartbeat), not at each record.
    pub longest_silence: Duration,
}

/// The peer's advertised view, as last heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// Its detector's uptime when it sent the view.
    pub uptime_us: u64,
    /// Its domains.
    pub domains: Vec<DomainView>,
}

/// Lets the replication connection report traffic from the peer as proof of life.
/// Cheap to call for every received record (an atomic store and a wake-up).
#[derive(Clone, Debug)]
pub struct TrafficProbe {
    base: Instant,
    /// Nanoseconds after `base` of the last traffic, 0 = never.
    last: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl TrafficProbe {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Records that data from the peer arrived just now.
    pub fn seen(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last.store(ns, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// When traffic was last reported, if ever.
    pub fn last_seen(&self) -> Option<Instant> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }
}

/// Reads the detector's per-link counters (for status and metrics).
#[derive(Clone, Debug)]
pub struct StatsReader(Arc<Mutex<DetectorStats>>);

impl StatsReader {
    /// A snapshot of the per-link counters.
    pub fn get(&self) -> DetectorStats {
        self.0.lock().expect("stats lock").clone()
    }
}

/// A running detector (the task stops when this is dropped or [`Detector::shutdown`]).
#[derive(Debug)]
pub struct Detector {
    liveness: watch::Receiver<PeerLiveness>,
    peer_view: watch::Receiver<Option<PeerView>>,
    view: watch::Sender<Vec<DomainView>>,
    stats: Arc<Mutex<DetectorStats>>,
    probe: TrafficProbe,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    recv_tasks: Vec<JoinHandle<()>>,
}

struct Incoming {
    link: usize,
    at: Instant,
    /// The beat and which pinned peer key it verified under.
    result: Result<(Beat, usize), DecodeError>,
}

impl Detector {
    /// Binds one socket per link and starts sending and listening.
    ///
    /// # Errors
    /// [`HeartbeatError::BadConfig`], or [`HeartbeatError::Io`] naming the link whose
    /// socket could not be bound.
    pub async fn start(cfg: HeartbeatConfig) -> Result<Self, HeartbeatError> {
        cfg.validate()?;
        let mut sockets = Vec::with_capacity(cfg.links.len());
        let mut bound = Vec::with_capacity(cfg.links.len());
        for l in &cfg.links {
            let io = |op| {
                move |source| HeartbeatError::Io {
                    local: l.local,
                    remote: l.remote,
                    op,
                    source,
                }
            };
            let s = UdpSocket::bind(l.local).await.map_err(io("bind"))?;
            bound.push(Link {
                local: s.local_addr().map_err(io("local address"))?,
                remote: l.remote,
            });
            sockets.push(Arc::new(s));
        }
        let (in_tx, in_rx) = mpsc::channel(1024);
        let recv_tasks = sockets
            .iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(receive(i, s.clone(), cfg.keys.clone(), in_tx.clone())))
            .collect();
        let started = Instant::now();
        let (live_tx, live_rx) = watch::channel(PeerLiveness::Starting);
        let (pv_tx, pv_rx) = watch::channel(None);
        let (view_tx, view_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = Arc::new(Mutex::new(DetectorStats {
            links: bound
                .into_iter()
                .map(|link| LinkStats {
                    link,
                    up: false,
                    last_heard: None,
                    sent: 0,
                    send_errors: 0,
                    received: 0,
                    dropped_bad_tag: 0,
                    dropped_unknown_node: 0,
                    dropped_replay: 0,
                    dropped_malformed: 0,
                    went_down: 0,
                    missed_estimate: 0,
                    longest_gap: Duration::ZERO,
                })
                .collect(),
            replication_last_seen: None,
            losses: 0,
            recoveries: 0,
            last_detection: None,
            peer_restarts: 0,
            longest_silence: Duration::ZERO,
        }));
        let probe = TrafficProbe::new();
        let state = State {
            highest_seq: vec![None; cfg.links.len()],
            proven_pin: None,
            quiet: Default::default(),
            last_uptime: None,
            seen_news: None,
            seq: SequenceSource::new(),
            started,
            cfg,
            sockets,
            live: live_tx,
            peer_view: pv_tx,
            view: view_rx,
            stats: stats.clone(),
            probe: probe.clone(),
        };
        let task = tokio::spawn(state.run(in_rx, stop_rx));
        Ok(Self {
            liveness: live_rx,
            peer_view: pv_rx,
            view: view_tx,
            stats,
            probe,
            stop: stop_tx,
            task: Some(task),
            recv_tasks,
        })
    }

    /// The verdicts, as a watch channel.
    pub fn liveness(&self) -> watch::Receiver<PeerLiveness> {
        self.liveness.clone()
    }

    /// The peer's advertised view.
    pub fn peer_view(&self) -> watch::Receiver<Option<PeerView>> {
        self.peer_view.clone()
    }

    /// A snapshot of the per-link counters.
    pub fn stats(&self) -> DetectorStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// A reader of the per-link counters that outlives a move of the detector.
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.stats.clone())
    }

    /// A probe for the replication connection to report traffic.
    pub fn traffic_probe(&self) -> TrafficProbe {
        self.probe.clone()
    }

    /// Sets what this node advertises from the next heartbeat on.
    ///
    /// # Errors
    /// [`HeartbeatError::BadConfig`] if it has more than [`MAX_DOMAINS`] domains or a name
    /// longer than [`MAX_NAME`].
    pub fn set_view(&self, domains: Vec<DomainView>) -> Result<(), HeartbeatError> {
        if domains.len() > MAX_DOMAINS {
            return Err(HeartbeatError::BadConfig(format!(
                "{} domains, at most {MAX_DOMAINS} fit a heartbeat",
                domains.len()
            )));
        }
        if let Some(d) = domains
            .iter()
            .find(|d| d.domain.is_empty() || d.domain.len() > MAX_NAME)
        {
            return Err(HeartbeatError::BadConfig(format!(
                "domain name {:?} unusable",
                d.domain
            )));
        }
        self.view.send_replace(domains);
        Ok(())
    }

    /// Stops the detector and waits for its task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.recv_tasks {
            t.abort();
        }
    }
}

async fn receive(link: usize, socket: Arc<UdpSocket>, keys: PeerKeys, tx: mpsc::Sender<Incoming>) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, _from)) => {
                let at = Instant::now();
                let result = Beat::decode_with(&keys, &buf[..n]);
                if tx.send(Incoming { link, at, result }).await.is_err() {
                    return;
                }
            }
            // ICMP port unreachable from a peer that is down surfaces here on Linux.
            // Pause briefly so a persistent error cannot spin the task.
            Err(e) => {
                debug!(link, error = %e, "heartbeat receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The detector task's state (owned by the task alone).
struct State {
    cfg: HeartbeatConfig,
    sockets: Vec<Arc<UdpSocket>>,
    seq: SequenceSource,
    started: Instant,
    /// Per link: the highest sequence number accepted.
    highest_seq: Vec<Option<u64>>,
    /// Which of the peer's pinned keys its accepted heartbeats verify under (`None` until
    /// one arrives): heartbeats are sent under that one only.
    proven_pin: Option<usize>,
    /// One log limit per kind of dropped datagram (bad tag, malformed, unknown node,
    /// replay): anyone can send them, so they are counted always and logged rarely.
    quiet: [crate::lograte::LogLimit; 4],
    /// The peer's uptime in its last heartbeat (a decrease means it restarted).
    last_uptime: Option<u64>,
    /// The newest proof of life the last evaluation saw.
    seen_news: Option<Instant>,
    live: watch::Sender<PeerLiveness>,
    peer_view: watch::Sender<Option<PeerView>>,
    view: watch::Receiver<Vec<DomainView>>,
    stats: Arc<Mutex<DetectorStats>>,
    probe: TrafficProbe,
}

impl State {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let wake = self.probe.wake.clone();
        loop {
            let deadline = self.next_deadline(Instant::now());
            tokio::select! {
                _ = tick.tick() => self.send_all(),
                Some(m) = incoming.recv() => self.on_datagram(m),
                () = wake.notified() => {}
                () = sleep_until(deadline) => {}
                _ = stop.changed() => return,
            }
            self.evaluate(Instant::now());
        }
    }

    fn send_all(&mut self) {
        let view = self.view.borrow().clone();
        let uptime_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut stats = self.stats.lock().expect("stats lock");
        for (i, s) in self.sockets.iter().enumerate() {
            let beat = Beat {
                node: self.cfg.node.clone(),
                seq: self.seq.next(),
                uptime_us,
                domains: view.clone(),
            };
            let body = beat.encode_body();
            for key in self.cfg.keys.send_keys(self.proven_pin) {
                let key = &key;
                let mut bytes = body.clone();
                key.seal(&mut bytes);
                match s.try_send_to(&bytes, self.cfg.links[i].remote) {
                    Ok(_) => stats.links[i].sent += 1,
                    Err(e) => {
                        stats.links[i].send_errors += 1;
                        debug!(link = i, error = %e, "heartbeat not sent");
                    }
                }
            }
        }
    }

    fn on_datagram(&mut self, m: Incoming) {
        let mut stats = self.stats.lock().expect("stats lock");
        let ls = &mut stats.links[m.link];
        let (beat, pin) = match m.result {
            Ok(b) => b,
            Err(DecodeError::BadTag) => {
                ls.dropped_bad_tag += 1;
                if let Some(folded) = self.quiet[0].admit(m.at.into_std()) {
                    warn!(link = m.link, total = ls.dropped_bad_tag, folded, "heartbeat with a bad tag dropped (rate-limited: `folded` more since the last line)");
                }
                return;
            }
            Err(DecodeError::Malformed) => {
                ls.dropped_malformed += 1;
                if let Some(folded) = self.quiet[1].admit(m.at.into_std()) {
                    warn!(
                        link = m.link,
                        total = ls.dropped_malformed,
                        folded,
                        "malformed heartbeat dropped (rate-limited)"
                    );
                }
                return;
            }
        };
        if beat.node != self.cfg.peer {
            ls.dropped_unknown_node += 1;
            if let Some(folded) = self.quiet[2].admit(m.at.into_std()) {
                warn!(link = m.link, node = %beat.node, total = ls.dropped_unknown_node, folded, "heartbeat from an unknown node dropped (rate-limited)");
            }
            return;
        }
        if self.highest_seq[m.link].is_some_and(|h| beat.seq <= h) {
            ls.dropped_replay += 1;
            if let Some(folded) = self.quiet[3].admit(m.at.into_std()) {
                warn!(
                    link = m.link,
                    seq = beat.seq,
                    total = ls.dropped_replay,
                    folded,
                    "replayed heartbeat dropped (rate-limited)"
                );
            }
            return;
        }
        self.highest_seq[m.link] = Some(beat.seq);
        if self.proven_pin != Some(pin) {
            if self.cfg.keys.len() > 1 {
                info!(peer = %self.cfg.peer, pin, "the peer's heartbeats verify under pinned key #{pin}; sending under it only");
            }
            self.proven_pin = Some(pin);
        }
        ls.received += 1;
        if let Some(prev) = ls.last_heard {
            // A gap of k intervals (rounded) means k - 1 heartbeats did not arrive.
            let gap = m.at.saturating_duration_since(prev);
            ls.longest_gap = ls.longest_gap.max(gap);
            let intervals = (gap.as_secs_f64() / self.cfg.interval.as_secs_f64()).round() as u64;
            ls.missed_estimate += intervals.saturating_sub(1);
        }
        ls.last_heard = Some(m.at);
        if self.last_uptime.is_some_and(|u| beat.uptime_us < u) {
            stats.peer_restarts += 1;
            info!(peer = %self.cfg.peer, "peer restarted (its uptime went backwards)");
        }
        self.last_uptime = Some(beat.uptime_us);
        let uptime_us = beat.uptime_us;
        let domains = beat.domains;
        self.peer_view.send_if_modified(|cur| match cur {
            Some(v) if v.domains == domains => {
                v.uptime_us = uptime_us;
                false
            }
            _ => {
                *cur = Some(PeerView { uptime_us, domains });
                true
            }
        });
    }

    fn last_news(&self, stats: &DetectorStats) -> Option<Instant> {
        stats
            .links
            .iter()
            .filter_map(|l| l.last_heard)
            .chain(self.probe.last_seen())
            .max()
    }

    /// The next instant at which the verdict or a link's state can change by silence alone.
    fn next_deadline(&self, now: Instant) -> Instant {
        let stats = self.stats.lock().expect("stats lock");
        let t = self.cfg.timeout;
        let suspect = self.cfg.interval * 2;
        let base = self.last_news(&stats).unwrap_or(self.started);
        let mut candidates = vec![base + suspect, base + t];
        candidates.extend(
            stats
                .links
                .iter()
                .filter(|l| l.up)
                .filter_map(|l| l.last_heard.map(|h| h + t)),
        );
        candidates
            .into_iter()
            .filter(|&c| c > now)
            .min()
            .unwrap_or(now + self.cfg.interval)
    }

    fn evaluate(&mut self, now: Instant) {
        let mut stats = self.stats.lock().expect("stats lock");
        let t = self.cfg.timeout;
        stats.replication_last_seen = self.probe.last_seen();
        for (i, l) in stats.links.iter_mut().enumerate() {
            let up = l
                .last_heard
                .is_some_and(|h| now.saturating_duration_since(h) < t);
            if l.up && !up {
                l.went_down += 1;
                warn!(link = i, local = %l.link.local, remote = %l.link.remote, "heartbeat link down");
            } else if !l.up && up {
                info!(link = i, local = %l.link.local, remote = %l.link.remote, "heartbeat link up");
            }
            l.up = up;
        }
        let links_up = stats.links.iter().filter(|l| l.up).count();
        let last = self.last_news(&stats);
        // A silence that just ended (news newer than the last seen) without a loss.
        if let (Some(new), Some(old)) = (last, self.seen_news) {
            if new > old && !matches!(*self.live.borrow(), PeerLiveness::Lost { .. }) {
                stats.longest_silence = stats.longest_silence.max(new - old);
            }
        }
        self.seen_news = last;
        let since = last.unwrap_or(self.started);
        let silent = now.saturating_duration_since(since);
        let prev = *self.live.borrow();
        let next = if silent >= t {
            match prev {
                PeerLiveness::Lost { .. } => prev,
                _ => {
                    stats.losses += 1;
                    stats.last_detection = Some(silent);
                    warn!(peer = %self.cfg.peer, detected_after = ?silent, links = stats.links.len(), "peer lost: every link silent");
                    PeerLiveness::Lost {
                        since,
                        declared_at: now,
                        detected_after: silent,
                    }
                }
            }
        } else if last.is_none() {
            PeerLiveness::Starting
        } else if silent >= self.cfg.interval * 2 {
            PeerLiveness::Suspect
        } else {
            if let PeerLiveness::Lost { declared_at, .. } = prev {
                stats.recoveries += 1;
                info!(peer = %self.cfg.peer, after = ?now.saturating_duration_since(declared_at), "peer heard again");
            }
            PeerLiveness::Alive {
                links_up,
                links_total: stats.links.len(),
            }
        };
        // A lost peer is lost until heard again: silence-based states do not replace it.
        let next = match (prev, next) {
            (PeerLiveness::Lost { .. }, PeerLiveness::Suspect | PeerLiveness::Starting) => prev,
            _ => next,
        };
        drop(stats);
        self.live.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HaKey {
        HaKey::derive(&[9u8; 32]).unwrap()
    }

    fn beat() -> Beat {
        Beat {
            node: "alpha".into(),
            seq: 1234,
            uptime_us: 99,
            domains: vec![
                DomainView {
                    domain: "web".into(),
                    payload: [7; DOMAIN_PAYLOAD_LEN],
                },
                DomainView {
                    domain: "db".into(),
                    payload: [0; DOMAIN_PAYLOAD_LEN],
                },
            ],
        }
    }

    #[test]
    fn beat_roundtrip_and_limits() {
        let k = key();
        let b = beat();
        let bytes = b.encode(&k);
        assert_eq!(Beat::decode(&k, &bytes), Ok(b));
        let full = Beat {
            node: "n".repeat(MAX_NAME),
            domains: (0..MAX_DOMAINS)
                .map(|i| DomainView {
                    domain: format!("{i:0>64}"),
                    payload: [0xff; DOMAIN_PAYLOAD_LEN],
                })
                .collect(),
            ..beat()
        };
        let bytes = full.encode(&k);
        // One unfragmented datagram on a 1500-byte MTU even over IPv6 (40 + 8 header bytes).
        assert!(
            bytes.len() <= MAX_DATAGRAM && bytes.len() <= 1500 - 48,
            "{}",
            bytes.len()
        );
        assert_eq!(Beat::decode(&k, &bytes), Ok(full));
    }

    #[test]
    fn malformed_beats() {
        let k = key();
        let good = beat().encode(&k);
        let body = &good[..good.len() - TAG_LEN];
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = body.to_vec();
            f(&mut b);
            k.seal(&mut b);
            b
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            ("other key", beat().encode(&HaKey::derive(&[1u8; 32]).unwrap()), DecodeError::BadTag),
            ("runt", vec![0; 5], DecodeError::BadTag),
            ("short", with(&|b| b.truncate(20)), DecodeError::Malformed),
            ("magic", with(&|b| b[0] = b'X'), DecodeError::Malformed),
            ("version", with(&|b| b[4] = 1), DecodeError::Malformed),
            ("flags", with(&|b| b[7] = 1), DecodeError::Malformed),
            ("too many domains", with(&|b| b[6] = 17), DecodeError::Malformed),
            ("count past end", with(&|b| b[6] = 3), DecodeError::Malformed),
            ("trailing", with(&|b| b.push(0)), DecodeError::Malformed),
            ("payload cut short", with(&|b| { let n = b.len(); b.truncate(n - 1) }), DecodeError::Malformed),
            ("empty node", with(&|b| b[5] = 0), DecodeError::Malformed),
        ];
        for (what, d, want) in cases {
            assert_eq!(Beat::decode(&k, &d), Err(want), "{what}");
        }
    }

    #[test]
    fn config_validation() {
        let l = Link {
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
        };
        let ok = HeartbeatConfig::new("a", "b", vec![l], PeerKeys::shared(key()));
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.timeout = Duration::from_millis(200);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("twice the interval"));
        let mut c = ok.clone();
        c.links.clear();
        assert!(c.validate().is_err());
        let mut c = ok;
        c.peer = "a".into();
        assert!(c.validate().is_err());
    }
}
